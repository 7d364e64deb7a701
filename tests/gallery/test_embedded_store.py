"""The embedded store's connections: closing a store closes every connection it made, the readers
other threads opened included, so nothing of it stays open (and its WAL file goes) once it is closed."""

from __future__ import annotations

import threading

import numpy as np

from service.gallery.embedded.galleries import erase_directory
from service.gallery.embedded.store import Store


def test_closing_a_store_closes_the_readers_of_other_threads(tmp_path):
    """A reader opened by a thread that outlives the store (a server's worker threads do) was closed
    only when that thread's local went away, at any later moment: SQLite then deleted the WAL file,
    and a collection delete listing the files at that moment failed (500) on a file gone under it."""
    store = Store(tmp_path / "c" / "gallery.sqlite3")
    store.add_faces("someone", np.ones((1, 4), np.float32), None, False)
    opened, release = threading.Event(), threading.Event()

    def worker() -> None:
        store.list_identities(10, None)  # this thread's reader
        opened.set()
        release.wait(30)

    thread = threading.Thread(target=worker)
    thread.start()
    assert opened.wait(30)
    wal = tmp_path / "c" / "gallery.sqlite3-wal"
    try:
        store.close()
        assert not wal.exists()  # the last connection closed: SQLite removed its WAL
        erase_directory(tmp_path / "c")
        assert not (tmp_path / "c").exists()
    finally:
        release.set()
        thread.join()
