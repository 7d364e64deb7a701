"""What the migration job reads of its source (service/jobs/migrate.py), through the backend interface:

* ``identity_crops``: many identities' faces and sealed crops in one batched read, on both backends
  (the ``crops_backend`` of test_crops.py: real key file, real stores);
* the fenced pass on PostgreSQL with a standby: while ``write_fence`` is held, reads see every write
  committed before it, even when the standby that serves reads has not replayed them (the
  ``cluster`` of test_postgres_collections.py: a PostgreSQL of its own with a streaming standby).
"""

from __future__ import annotations

import time

import numpy as np

from service.gallery.postgres.backend import PostgresOptions
from tests.gallery.test_crops import _enroll, crops_backend  # noqa: F401 - the fixture
from tests.gallery.test_gallery import unit
from tests.gallery.test_postgres_collections import cluster, opened  # noqa: F401 - the fixtures


def test_identity_crops_reads_many_identities_faces_and_crops_at_once(crops_backend):  # noqa: F811
    galleries = crops_backend.open()
    galleries.create_collection("kept", keep_crops=True)
    galleries.create_collection("other", keep_crops=True)
    gallery = galleries.collection("kept")
    alice, alice_crops = _enroll(galleries, "kept", "alice", [1, 2, 3])
    bob, bob_crops = _enroll(galleries, "kept", "bob", [4])
    _enroll(galleries, "other", "carol", [5])
    gallery.enroll("dave", unit(np.random.default_rng(6), 1))  # a face without a crop
    read = gallery.identity_crops(["bob", "alice", "carol", "nobody", "dave", "alice"])
    assert set(read) == {"alice", "bob", "dave"}  # carol is another collection's; nobody does not exist
    cipher = crops_backend.cipher()
    assert [f for f, _, _ in read["alice"]] == sorted(alice.face_ids)
    assert [cipher.open("kept", f, b) for f, b, _ in read["alice"] if b is not None] == alice_crops
    assert [(f, cipher.open("kept", f, b)) for f, b, _ in read["bob"] if b is not None] == [(bob.face_ids[0], bob_crops[0])]
    assert [b for _, b, _ in read["dave"]] == [None]
    details = gallery.get_identity("alice")
    assert details is not None and [t for _, _, t in read["alice"]] == [f.created_at for f in details.faces]
    assert gallery.identity_crops([]) == {}
    gallery.delete("alice")
    assert set(gallery.identity_crops(["alice", "bob"])) == {"bob"}


def test_the_fenced_pass_reads_what_the_primary_has_while_a_standby_lags(cluster, opened):  # noqa: F811
    primary, standby = cluster
    options = PostgresOptions(url=primary.url, schema=primary.fresh_schema(), read_urls=(standby.url,),
                              max_lag_ms=60_000, lag_check_ms=100)
    galleries = opened(options)
    galleries.create_collection("a")
    gallery = galleries.collection("a")
    gallery.enroll("before", unit(np.random.default_rng(1), 1))
    deadline = time.monotonic() + 30
    while [r.identity_id for r in gallery.list_identities(10, None)] != ["before"]:  # the standby has it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    standby.pause_replay()
    try:
        gallery.enroll("during", unit(np.random.default_rng(2), 1))  # committed on the primary only
        assert [r.identity_id for r in gallery.list_identities(10, None)] == ["before"]  # read on the standby
        with gallery.write_fence():
            assert [r.identity_id for r in gallery.list_identities(10, None)] == ["before", "during"]
            assert set(gallery.identity_crops(["before", "during"])) == {"before", "during"}
    finally:
        standby.resume_replay()
