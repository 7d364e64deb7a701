"""``python -m service gallery``: export an embedded gallery, import it into PostgreSQL, enroll a folder.

Real processes, the real default model, a real PostgreSQL; the galleries are checked by opening them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.cli.gallery import export_gallery, read_gallery_file
from service.config import Settings
from service.gallery.api import AuditQuery
from service.gallery.open import make_gallery
from service.model.contract import read_contract
from tests.conftest import ENROLLED, FIXTURES, face_files
from tests.server import MODEL_CACHE, REPO


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "FACE_DATABASE_URL"}
    full_env = {**base, "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE), "FACE_INTRA_OP_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "service", "gallery", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def opened(settings: Settings, model):
    contract = read_contract(model)
    gallery = make_gallery(settings, contract.model_id, contract.embedding_size)
    gallery.open()
    return gallery


def test_export_embedded_then_import_into_postgres(tmp_path, default_model, postgres):
    contract = read_contract(default_model)
    rng = np.random.default_rng(0)
    source = opened(Settings(data_dir=tmp_path / "data"), default_model)
    people = {}
    for i in range(40):
        v = rng.normal(size=(1 + i % 3, contract.embedding_size)).astype(np.float32)
        people[f"person {i:02d} é"] = v / np.linalg.norm(v, axis=1, keepdims=True)  # any id the API accepts
        source.collection("default").enroll(f"person {i:02d} é", people[f"person {i:02d} é"], {"n": i})
    enrolled_at = {identity: [f.created_at for f in source.collection("default").get_identity(identity).faces]
                   for identity in people}
    source.close()

    exported = tmp_path / "gallery.jsonl"
    r = run_cli(["--data-dir", str(tmp_path / "data"), "--model", str(default_model), "export", str(exported)])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["identities"] == 40
    header = json.loads(exported.read_text().splitlines()[0])
    assert header["model_id"] == contract.model_id and header["embedding_size"] == contract.embedding_size

    pg_env = postgres.gallery_env()
    r = run_cli(["--model", str(default_model), "import", str(exported), "--batch", "16", "--build-index-after"],
                env=pg_env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["backend"], report["identities"], report["faces"]) == ("postgres", 40, sum(len(v) for v in people.values()))

    target = opened(Settings(database_url=pg_env["FACE_DATABASE_URL"], database_schema=pg_env["FACE_DATABASE_SCHEMA"]),
                    default_model)
    try:
        for identity, vectors in people.items():
            np.testing.assert_array_equal(target.collection("default").identity_embeddings(identity), vectors)  # bit-exact
            # each face keeps when it was first enrolled (a collection's retention counts from then)
            assert [f.created_at for f in target.collection("default").get_identity(identity).faces] == enrolled_at[identity]
            assert target.collection("default").get_identity(identity).record.metadata == {"n": int(identity[7:9])}
            assert target.collection("default").search(vectors[:1], 1)[0][0].identity_id == identity
    finally:
        target.close()

    # an interrupted import can be rerun: what is there already is skipped
    r = run_cli(["--model", str(default_model), "import", str(exported)], env=pg_env)
    assert r.returncode == 0 and json.loads(r.stdout)["skipped_existing"] == 40


def test_import_refuses_another_model_and_a_cut_file(tmp_path, default_model):
    data = tmp_path / "data"
    contract = read_contract(default_model)
    good = tmp_path / "good.jsonl"
    v = np.ones((1, contract.embedding_size), np.float32) / np.sqrt(contract.embedding_size)
    source = opened(Settings(data_dir=tmp_path / "src"), default_model)
    source.collection("default").enroll("someone", v)
    source.close()
    assert run_cli(["--data-dir", str(tmp_path / "src"), "--model", str(default_model), "export", str(good)]).returncode == 0
    lines = good.read_text().splitlines()

    other = tmp_path / "other.jsonl"
    other.write_text("\n".join([json.dumps({**json.loads(lines[0]), "model_id": "arcface@1"}), *lines[1:]]) + "\n")
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-1]) + "\n")
    slash = tmp_path / "slash.jsonl"
    slash.write_text("\n".join([lines[0], lines[1].replace('"someone"', '"some/one"'), *lines[2:]]) + "\n")
    for bad, reason in ((other, "arcface@1"), (cut, "incomplete"), (slash, "not a valid identity id")):
        r = run_cli(["--data-dir", str(data), "--model", str(default_model), "import", str(bad)])
        assert r.returncode == 2 and reason in r.stderr, r.stderr
    target = opened(Settings(data_dir=data), default_model)
    assert target.stats().identities == 0  # refused before anything was written
    target.close()


def test_files_that_cannot_be_read_or_written_are_one_error_line_before_the_gallery_is_opened(tmp_path, default_model):
    """A missing gallery file, a directory where a file goes, an export into a folder that is not there
    and a data dir that is a file: exit 2 with ``error: ...`` naming the path (each was a traceback, and
    the gallery was opened, or made, first)."""
    data = tmp_path / "data"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(["--data-dir", str(data), "import", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
             (["--data-dir", str(data), "import", str(tmp_path)], str(tmp_path)),
             (["--data-dir", str(data), "export", str(tmp_path / "no-such-dir" / "out.jsonl")], "no-such-dir"),
             (["--data-dir", str(data), "export", str(tmp_path)], str(tmp_path)),
             (["--data-dir", str(a_file), "export", str(tmp_path / "out.jsonl")], "a-file")]
    for args, named in cases:
        r = run_cli([*args[:2], "--model", str(default_model), *args[2:]])
        assert r.returncode == 2, (args, r.returncode, r.stderr[-1000:])
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and named in r.stderr, (args, r.stderr)
        assert ".tmp" not in r.stderr  # (the export's temporary file is not the user's to know)
    assert not data.exists()  # nothing was opened, so nothing was made
    assert not (tmp_path / "out.jsonl").exists()


def test_import_refuses_a_hostile_file_by_its_line_and_writes_nothing(tmp_path, default_model):
    """A gallery file someone else made is checked line by line as the API checks a request: a broken
    line is an error naming it (exit 2, no traceback) before anything is written. (Each of these was
    a traceback, or stored: metadata the API refuses, a vector of NaNs, a zero vector.)"""
    import base64

    data = tmp_path / "data"
    dim = read_contract(default_model).embedding_size
    header = json.dumps({"format": "face-gallery", "version": 1, "model_id": read_contract(default_model).model_id,
                         "embedding_size": dim, "dtype": "float32"})

    def b64(values) -> str:
        return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()

    unit = b64(np.ones(dim) / np.sqrt(dim))
    good = json.dumps({"identity_id": "fine", "metadata": {}, "embeddings": [unit]})
    bad_lines = {
        "not JSON": "not json",
        "not an identity object": "[1, 2]",
        "not base64": json.dumps({"identity_id": "x", "embeddings": ["!!!"]}),
        "values, the header says": json.dumps({"identity_id": "x", "embeddings": ["AAAA"]}),
        "not base64 text": json.dumps({"identity_id": "x", "embeddings": [1]}),
        "has no embeddings": json.dumps({"identity_id": "x", "embeddings": "AAAA"}),
        "NaN or infinite": json.dumps({"identity_id": "x", "embeddings": [b64(np.full(dim, np.nan))]}),
        "cannot be normalised": json.dumps({"identity_id": "x", "embeddings": [b64(np.zeros(dim))]}),
        "metadata must be a JSON object": json.dumps({"identity_id": "x", "metadata": "text", "embeddings": [unit]}),
        "NaN is not valid JSON": json.dumps({"identity_id": "x", "metadata": {"a": float("nan")}, "embeddings": [unit]}),
        "not valid Unicode": json.dumps({"identity_id": "x", "metadata": {"a": "\ud800"}, "embeddings": [unit]}),
        **{f"enrolled_at is not one Unix time per embedding ({why})": json.dumps(
            {"identity_id": "x", "embeddings": [unit], "enrolled_at": times})
           for why, times in (("two for one", [1.0, 2.0]), ("text", ["yesterday"]), ("true", [True]),
                              ("negative", [-5]), ("not a list", 1.0))},
        # a face enrolled "later" would outlive its collection's retention (the year 10^300: never erased)
        **{f"enrolled_at is in the future ({why})": json.dumps(
            {"identity_id": "x", "embeddings": [unit], "enrolled_at": [at]})
           for why, at in (("the year 10^300", 1e308), ("two hours ahead", time.time() + 7200))},
    }
    for reason, line in bad_lines.items():
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join([header, good, line, json.dumps({"end": True, "identities": 2, "faces": 2})]) + "\n")
        r = run_cli(["--data-dir", str(data), "--model", str(default_model), "import", str(path)])
        assert r.returncode == 2 and "line 3" in r.stderr and reason.split(" (")[0] in r.stderr, (reason, r.stderr[-500:])
        assert "Traceback" not in r.stderr, r.stderr[-500:]
    target = opened(Settings(data_dir=data), default_model)
    assert target.stats().identities == 0  # "fine", on the line before each, was never written
    target.close()
    # a vector that is not unit length is normalised, as the API normalises a client's
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([header, json.dumps({"identity_id": "long", "embeddings": [b64(np.full(dim, 3.0))]}),
                               json.dumps({"end": True, "identities": 1, "faces": 1})]) + "\n")
    assert run_cli(["--data-dir", str(data), "--model", str(default_model), "import", str(path)]).returncode == 0
    target = opened(Settings(data_dir=data), default_model)
    stored = target.collection("default").identity_embeddings("long")
    target.close()
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)


def test_export_and_import_take_a_collection(tmp_path, default_model):
    """``--collection``: export one collection, import into a collection of another gallery; a
    collection that does not exist is an error (exit 2), never a silent write to another."""
    contract = read_contract(default_model)
    rng = np.random.default_rng(3)
    v = rng.normal(size=(2, contract.embedding_size)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)  # unit vectors, as the service stores (an import normalises)
    source = opened(Settings(data_dir=tmp_path / "src"), default_model)
    source.create_collection("site-a")
    source.collection("site-a").enroll("only-in-a", v)
    source.collection("default").enroll("only-in-default", v[:1])
    source.close()
    exported = tmp_path / "a.jsonl"
    base = ["--model", str(default_model)]
    r = run_cli(["--data-dir", str(tmp_path / "src"), *base, "export", str(exported), "--collection", "site-a"])
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["identities"], json.loads(r.stdout)["collection"]) == (1, "site-a")

    target = opened(Settings(data_dir=tmp_path / "dst"), default_model)
    target.create_collection("site-b")
    target.close()
    r = run_cli(["--data-dir", str(tmp_path / "dst"), *base, "import", str(exported), "--collection", "nowhere"])
    assert r.returncode == 2 and "nowhere" in r.stderr
    r = run_cli(["--data-dir", str(tmp_path / "dst"), *base, "import", str(exported), "--collection", "site-b"])
    assert r.returncode == 0, r.stderr
    target = opened(Settings(data_dir=tmp_path / "dst"), default_model)
    try:
        np.testing.assert_array_equal(target.collection("site-b").identity_embeddings("only-in-a"), v)
        assert target.collection("default").get_identity("only-in-a") is None
        assert target.collection("site-b").get_identity("only-in-default") is None
        trail = target.audit(AuditQuery(collection="site-b"))  # a change from the CLI is audited too
        assert [(e.action, e.identity_id, e.key_id, e.details) for e in trail] == [
            ("identity.imported", "only-in-a", None, {"faces": 2, "via": "cli"}),
            ("collection.created", None, None, {"model_id": contract.model_id, "dim": contract.embedding_size,
                                                "keep_crops": False})]
    finally:
        target.close()


def test_enroll_folder_reports_skips_and_resumes(tmp_path, default_model):
    root = tmp_path / "people"
    for name in ENROLLED[:3]:
        (root / name).mkdir(parents=True)
        for path in face_files(name)[:2]:
            shutil.copy(path, root / name / path.name)
    (root / ENROLLED[0] / "broken.jpg").write_bytes(b"not an image at all")
    (root / ENROLLED[0] / "notes.txt").write_text("ignored: not an image suffix")
    group = root / "Group_Photo"
    group.mkdir()
    shutil.copy(FIXTURES / "photos" / "Alvaro_Silva_Calderon_0002.jpg", group / "four_faces.jpg")
    (root / "Empty_Person").mkdir()
    (root / ("x" * 130)).mkdir()  # longer than an identity id may be
    shutil.copy(face_files(ENROLLED[3])[0], root / ("x" * 130) / "face.jpg")
    data = tmp_path / "data"

    r = run_cli(["--data-dir", str(data), "--model", str(default_model), "enroll", str(root)])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["people"] == 6 and summary["enrolled"] == 3 and summary["faces"] == 6
    assert summary["images_skipped"] == {"not_an_image": 1, "several_faces": 1}
    assert summary["people_skipped"] == {"no_usable_face": 1, "no_images": 1, "invalid_identity_id": 1}

    gallery = opened(Settings(data_dir=data), default_model)
    try:
        for name in ENROLLED[:3]:
            assert gallery.collection("default").get_identity(name).record.face_count == 2
            probe = gallery.collection("default").identity_embeddings(name)[:1]
            assert gallery.collection("default").search(probe, 1)[0][0].identity_id == name
        created = [(e.identity_id, e.details.get("via")) for e in gallery.audit(AuditQuery(limit=100))]
        assert sorted(created) == [(name, "cli") for name in sorted(ENROLLED[:3])]
    finally:
        gallery.close()

    # a rerun (as after an interruption) enrolls nobody twice
    r = run_cli(["--data-dir", str(data), "--model", str(default_model), "enroll", str(root)])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["already_enrolled"] == 3 and json.loads(r.stdout)["enrolled"] == 0


def test_server_flags_still_work_beside_the_gallery_commands():
    out = subprocess.run([sys.executable, "-m", "service", "gallery", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert all(word in out for word in ("export", "import", "enroll"))
    out = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "--host" in out and "gallery" in out


def test_imported_and_folder_ids_follow_the_api_rule(tmp_path):
    """The API's identity id rule (service.gallery.identity_ids) holds for gallery files and person folders too:
    NFC (an NFD 'José' is the NFC one), nothing invisible (an RLO id refuses the file)."""
    import base64

    from service.cli.gallery import FORMAT, VERSION, GalleryFileError, people_in, read_gallery_file

    vector = base64.b64encode(np.ones(4, "<f4").tobytes()).decode()
    header = json.dumps({"format": FORMAT, "version": VERSION, "model_id": "m@1", "embedding_size": 4})

    def gallery_file(identity: str):
        path = tmp_path / "g.jsonl"
        path.write_text("\n".join([header, json.dumps({"identity_id": identity, "embeddings": [vector]}),
                                   json.dumps({"end": True, "identities": 1, "faces": 1})]) + "\n")
        return path

    assert [i for i, *_ in read_gallery_file(gallery_file("Jose\u0301"), "m@1", 4)] == ["Jos\u00e9"]
    for bad in ("\u202eevil", "a\u200bb", "   "):
        try:
            list(read_gallery_file(gallery_file(bad), "m@1", 4))
        except GalleryFileError as exc:
            assert "not a valid identity id" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")

    (tmp_path / "people" / "Jose\u0301").mkdir(parents=True)
    assert [i for i, _ in people_in(tmp_path / "people")] == ["Jos\u00e9"]


def test_folder_commands_list_the_image_formats_the_service_takes(tmp_path):
    """``gallery enroll``, ``calibrate`` and ``cluster`` read the files of FACE_IMAGE_FORMATS from a
    folder: a ``.tif`` (TIFF is off by default) or a ``.gif`` is no image to them, where each was read
    and reported ``not_an_image``; with TIFF named, ``.tif`` and ``.tiff`` are."""
    from service.cli.calibrate import labelled_files
    from service.cli.cluster import image_files
    from service.cli.gallery import people_in

    person = tmp_path / "people" / "alice"
    person.mkdir(parents=True)
    names = ["a.jpg", "b.JPEG", "c.png", "d.webp", "e.bmp", "f.tif", "g.tiff", "h.gif", "i.txt"]
    for name in names:
        (person / name).write_bytes(b"x")
    taken = {"a.jpg", "b.JPEG", "c.png", "d.webp", "e.bmp"}
    with_tiff = Settings(image_formats="JPEG,PNG,WEBP,BMP,TIFF").image_formats
    for formats, expected in ((Settings().image_formats, taken), (with_tiff, taken | {"f.tif", "g.tiff"})):
        assert [(i, {p.name for p in files}) for i, files in people_in(tmp_path / "people", formats)] == \
            [("alice", expected)]
        assert {p.name for _, p in labelled_files(tmp_path / "people", formats)} == expected
        assert {p.name for p in image_files(tmp_path / "people", formats)} == expected


class PausedExport:
    """A real collection whose listing stops before its second page until released: an export paused
    half-way, so that another export can run beside it."""

    def __init__(self, real) -> None:
        self.real = real
        self.reached, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def list_identities(self, limit, after):
        if after is not None and not self.go.is_set():
            self.reached.set()
            assert self.go.wait(30)
        return self.real.list_identities(limit, after)


def test_two_exports_to_one_file_at_once_each_write_a_whole_file(tmp_path, default_model):
    """Two exports of a gallery to one path at once (two operators, a cron job beside a person): each
    writes a file of its own and renames it whole. Both wrote through one fixed ``<file>.part``: the
    second truncated the first's half-written file and renamed it; the first then wrote the rest into the
    renamed file, corrupting it, and failed on its own rename."""
    contract = read_contract(default_model)
    rng = np.random.default_rng(11)
    galleries = opened(Settings(data_dir=tmp_path / "g"), default_model)
    try:
        collection = galleries.collection("default")
        ids = [f"p{i:02d}" for i in range(30)]
        collection.import_identities([(i, rng.normal(size=(1, contract.embedding_size)).astype(np.float32), None)
                                      for i in ids])
        out = tmp_path / "out" / "gallery.jsonl"
        out.parent.mkdir()
        paused = PausedExport(collection)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(export_gallery, paused, out, 10)
            assert paused.reached.wait(30)  # its header and first page written
            second = export_gallery(collection, out, 10)  # a whole export meanwhile
            paused.go.set()
            done = first.result(30)
    finally:
        galleries.close()
    assert (done.identities, second.identities) == (30, 30)
    rows = list(read_gallery_file(out, contract.model_id, contract.embedding_size))
    assert [identity for identity, *_ in rows] == ids
    assert [p.name for p in out.parent.iterdir()] == ["gallery.jsonl"]  # no temporary file left


class MergedBehindExport:
    """A real collection whose listing, before its second page, lets another replica (its own
    PostgresGalleries on the same schema) merge identities the export has not reached into ones it has
    written: faces moved behind the export's cursor while it runs."""

    def __init__(self, real, other, merges: list[tuple[str, str]]) -> None:
        self.real, self.other, self.merges = real, other, merges
        self.merged = 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def list_identities(self, limit, after):
        if after is not None and not self.merged:
            for source, target in self.merges:
                self.other.collection("default").merge_identities(source, target)
                self.merged += 1
        return self.real.list_identities(limit, after)


def test_an_export_on_postgres_is_one_snapshot_while_replicas_merge(tmp_path, default_model, postgres):
    """On PostgreSQL replicas may serve while ``gallery export`` runs: merges of identities it has not
    reached yet into ones it has written (another replica's, between two of its pages) leave the file as
    of one moment, with every face. Before, each page and each identity was read on its own, so the
    moved faces were in no line: 30 identities / 60 faces, 5 merges, a file of 25 and 50 (exit 0)."""
    contract = read_contract(default_model)
    rng = np.random.default_rng(12)
    env = postgres.gallery_env()
    settings = Settings(data_dir=tmp_path / "data", database_url=env["FACE_DATABASE_URL"],
                        database_schema=env["FACE_DATABASE_SCHEMA"])
    galleries = opened(settings, default_model)
    other = opened(settings, default_model)
    try:
        collection = galleries.collection("default")
        ids = [f"p{i:02d}" for i in range(30)]
        vectors = {i: unit_vectors(rng, 2, contract.embedding_size) for i in ids}
        collection.import_identities([(i, vectors[i], None) for i in ids])
        exporting = MergedBehindExport(collection, other, [(f"p{25 + i}", f"p{i:02d}") for i in range(5)])
        out = tmp_path / "gallery.jsonl"
        done = export_gallery(exporting, out, 10)
        assert exporting.merged == 5 and other.collection("default").stats().identities == 25
    finally:
        other.close()
        galleries.close()
    assert (done.identities, done.faces) == (30, 60)
    rows = {identity: embeddings for identity, embeddings, *_ in read_gallery_file(out, contract.model_id,
                                                                                    contract.embedding_size)}
    assert sorted(rows) == ids
    assert all(np.array_equal(rows[i], vectors[i]) for i in ids)


# --- gallery files someone else made, and the limits the API keeps ---------------------------------

def vector_b64(values) -> str:
    import base64

    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


def write_gallery_file(path, model, lines: list, end: object = "counted", header: object = None):
    """A gallery file for ``model``: its header (``header``: this line instead), ``lines`` (objects, or
    text or bytes as they are), and the end line export writes (``"counted"``: the counts of the identity
    objects; None: none; else this line)."""
    contract = read_contract(model)
    if header is None:
        header = json.dumps({"format": "face-gallery", "version": 1, "model_id": contract.model_id,
                             "embedding_size": contract.embedding_size, "dtype": "float32"})
    identities = [item for item in lines if isinstance(item, dict)]
    if end == "counted":
        end = json.dumps({"end": True, "identities": len(identities),
                          "faces": sum(len(item["embeddings"]) for item in identities)})
    texts = [header, *(json.dumps(item) if isinstance(item, dict) else item for item in lines),
             *([] if end is None else [end if isinstance(end, (str, bytes)) else json.dumps(end)])]
    path.write_bytes(b"".join((t if isinstance(t, bytes) else t.encode()) + b"\n" for t in texts))
    return path


def assert_refused(r: subprocess.CompletedProcess, *words: str, case: str = "") -> None:
    """Exit 2 with exactly one ``error: ...`` line that says ``words``; no traceback, no log line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (case, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, r.stderr[-2000:])
    assert all(word in lines[0] for word in words), (case, words, lines[0])



def each_refused_storing_nothing(path: Path, data: Path, default_model: Path, cases: list) -> None:
    """Each (name, write_gallery_file's arguments, words of the error) case written to ``path`` and
    imported into ``data``: refused with those words; nothing stored by any of them."""
    for name, file, words in cases:
        write_gallery_file(path, default_model, **file)
        r = run_cli(["--data-dir", str(data), "--model", str(default_model), "import", str(path)])
        assert_refused(r, *words, case=name)
    target = opened(Settings(data_dir=data), default_model)
    assert target.stats().identities == 0
    target.close()

def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_import_refuses_an_identity_id_twice_and_writes_nothing(tmp_path, operator_backend):
    """One identity id on two lines of a file (as written, or equal once the id rule makes it NFC) is
    the file's mistake: refused naming both lines, nothing stored. It was a traceback (IdentityExists
    from the batch's retry) on both backends, and with ``--batch 1`` the second line was silently
    counted as already imported."""
    b = operator_backend
    dim = read_contract(b.model).embedding_size
    rng = np.random.default_rng(20)

    def line(identity: str) -> dict:
        return {"identity_id": identity, "metadata": {}, "embeddings": [vector_b64(unit_vectors(rng, 1, dim)[0])]}

    b.open().close()  # made (a fresh PostgreSQL schema logs its index being built)
    for ids, extra, named in ((["dup", "dup"], [], "'dup'"),
                              (["Cafe\u0301", "Caf\u00e9"], [], "'Caf\u00e9'"),
                              (["dup", "dup"], ["--batch", "1"], "'dup'")):
        path = write_gallery_file(tmp_path / "twice.jsonl", b.model, [line("first"), *(line(i) for i in ids)])
        r = b.run("gallery", "import", str(path), *extra)
        assert_refused(r, "line 4", named, "already appears on line 3")
    galleries = b.open()
    try:
        assert galleries.collection("default").stats().identities == 0  # "first" neither
    finally:
        galleries.close()


def test_export_import_round_trip_keeps_created_at_metadata_and_faces(tmp_path, operator_backend):
    """An export imported again keeps each identity's created_at (the file carries it; the import wrote
    the time of the import), its metadata, each face's enrollment time and its vectors bit for bit."""
    b = operator_backend
    dim = read_contract(b.model).embedding_size
    rng = np.random.default_rng(21)

    def snapshot(collection) -> dict:
        out = {}
        for record in collection.list_identities(100, None):
            details = collection.get_identity(record.identity_id)
            out[record.identity_id] = (record.created_at, record.metadata, [f.created_at for f in details.faces],
                                       collection.identity_embeddings(record.identity_id).tobytes())
        return out

    galleries = b.open()
    try:
        galleries.create_collection("source")
        galleries.create_collection("copy")
        source = galleries.collection("source")
        source.enroll("alice", unit_vectors(rng, 2, dim), {"team": "a", "nested": {"x": [1, 2.5, None, "\u00e9"]}})
        time.sleep(0.05)
        source.enroll("alice", unit_vectors(rng, 1, dim))  # a face added later
        source.enroll("bob", unit_vectors(rng, 1, dim), {})
        before = snapshot(source)
    finally:
        galleries.close()
    time.sleep(0.05)  # the import runs later than any of these were made
    exported = tmp_path / "round.jsonl"
    r = b.run("gallery", "export", str(exported), "--collection", "source")
    assert r.returncode == 0, r.stderr
    r = b.run("gallery", "import", str(exported), "--collection", "copy")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["identities"], json.loads(r.stdout)["faces"]) == (2, 4)
    galleries = b.open()
    try:
        assert snapshot(galleries.collection("copy")) == before
    finally:
        galleries.close()


def test_import_refuses_a_broken_header_bytes_or_number_by_its_line(tmp_path, default_model):
    """A header that is JSON but no object, a byte that is not UTF-8 (near the start, or past the first
    8 KB the file was decoded in) and an enrolled_at too large for a float: one error line naming the
    line, nothing stored. Each was a traceback (AttributeError, UnicodeDecodeError, OverflowError), or
    (a bad byte in the first 8 KB) 'no JSON header line'."""
    data = tmp_path / "data"
    dim = read_contract(default_model).embedding_size
    rng = np.random.default_rng(22)

    def line(identity: str, **more) -> dict:
        return {"identity_id": identity, "metadata": {}, "embeddings": [vector_b64(unit_vectors(rng, 1, dim)[0])],
                **more}

    many = [line(f"p{i:03d}") for i in range(200)]  # ~35 KB: line 202 is well past the first 8 KB
    cases = [
        ("header a list", dict(lines=[line("a")], header="[1, 2]"), ("line 1", "not a JSON object")),
        ("header a string", dict(lines=[line("a")], header='"face-gallery"'), ("line 1", "not a JSON object")),
        ("header not UTF-8", dict(lines=[line("a")], header=b"\xff\xfe" + json.dumps({"format": "face-gallery"}).encode()),
         ("line 1", "not UTF-8")),
        ("byte near the start", dict(lines=[line("a"), b'{"identity_id": "b\xff\xfe", "embeddings": []}']),
         ("line 3", "not UTF-8")),
        ("byte past 8 KB", dict(lines=[*many, b'{"identity_id": "z\xff"}']), ("line 202", "not UTF-8")),
        ("enrolled_at 10**400", dict(lines=[line("a"), line("b", enrolled_at=[10**400])]),
         ("line 3", "enrolled_at is not one Unix time per embedding")),
        # an identity's created_at is kept by the import now, and checked as enrolled_at is
        *((f"created_at {why}", dict(lines=[line("a"), line("b", created_at=at)]), ("line 3", "created_at is not a Unix time"))
          for why, at in (("10**400", 10**400), ("text", "yesterday"), ("true", True), ("negative", -1))),
        ("created_at in the future", dict(lines=[line("a"), line("b", created_at=1e308)]),
         ("line 3", "created_at is in the future")),
    ]
    each_refused_storing_nothing(tmp_path / "broken.jsonl", data, default_model, cases)


def test_import_normalises_huge_values_as_the_api_does(tmp_path, default_model):
    """Finite float32 values near their largest (3e38) are a vector with a direction: stored as the API
    stores the same client vector (its direction, unit length). Their norm overflowed float32 and the
    vector was stored as zeros."""
    from service.http.vectors import normalise

    data = tmp_path / "data"
    dim = read_contract(default_model).embedding_size
    rng = np.random.default_rng(23)
    vectors = {"flat": np.full(dim, 3e38, np.float32),
               "mixed": (rng.uniform(-1, 1, dim) * 3e38).astype(np.float32),
               "tiny": (rng.uniform(-1, 1, dim) * 1e-5).astype(np.float32)}  # short, above the floor (MIN_NORM)
    path = write_gallery_file(tmp_path / "huge.jsonl", default_model,
                              [{"identity_id": name, "embeddings": [vector_b64(v)]} for name, v in vectors.items()])
    r = run_cli(["--data-dir", str(data), "--model", str(default_model), "import", str(path)])
    assert r.returncode == 0, r.stderr
    target = opened(Settings(data_dir=data), default_model)
    try:
        for name, v in vectors.items():
            stored = target.collection("default").identity_embeddings(name)
            np.testing.assert_array_equal(stored, normalise([v.tolist()], dim), err_msg=name)
    finally:
        target.close()


def test_import_checks_the_end_line_and_that_nothing_follows_it(tmp_path, default_model):
    """The end line is the one export writes (``{"end": true, "identities": N, "faces": M}``, counts of
    the lines before it): counts that differ (lines lost, or added), a line after it, or another object
    holding "end" refuse the file, nothing stored. Any object with a truthy "end" ended the import, the
    lines after it were ignored and its counts never read."""
    data = tmp_path / "data"
    dim = read_contract(default_model).embedding_size
    rng = np.random.default_rng(24)

    def line(identity: str, faces: int = 1, **more) -> dict:
        return {"identity_id": identity, "metadata": {},
                "embeddings": [vector_b64(v) for v in unit_vectors(rng, faces, dim)], **more}

    two = [line("a"), line("b", 2)]  # 2 identities, 3 faces
    cases = [
        ("a line lost", dict(lines=two, end={"end": True, "identities": 3, "faces": 4}),
         ("line 4", "end line counts 3 identities and 4 faces", "2 identities and 3 faces")),
        ("faces lost", dict(lines=two, end={"end": True, "identities": 2, "faces": 4}), ("line 4", "end line")),
        ("a line after it", dict(lines=[line("a"), json.dumps({"end": True, "identities": 1, "faces": 1}), line("b")],
                                 end=None), ("line 4", "after the end line (line 3)")),
        ("an identity holding end", dict(lines=[line("a"), line("b", end=1)]), ("line 3", "not the end line")),
        ("end 1", dict(lines=two, end={"end": 1, "identities": 2, "faces": 3}), ("line 4", "not the end line")),
        ("no counts", dict(lines=two, end={"end": True}), ("line 4", "not the end line")),
        ("a count that is true", dict(lines=[line("a")], end={"end": True, "identities": True, "faces": 1}),
         ("line 3", "not the end line")),
        ("an id on it", dict(lines=two, end={"end": True, "identities": 2, "faces": 3, "identity_id": "c"}),
         ("line 4", "not the end line")),
        ("cut", dict(lines=two, end=None), ("ends without its end line",)),
    ]
    each_refused_storing_nothing(tmp_path / "ends.jsonl", data, default_model, cases)
    # the end line as every version's export wrote it
    path = write_gallery_file(tmp_path / "ends.jsonl", default_model, two)
    assert json.loads(path.read_text().splitlines()[-1]) == {"end": True, "identities": 2, "faces": 3}
    r = run_cli(["--data-dir", str(data), "--model", str(default_model), "import", str(path)])
    assert r.returncode == 0 and json.loads(r.stdout)["identities"] == 2, r.stderr


def test_import_and_enroll_keep_to_max_faces_per_identity(tmp_path, operator_backend):
    """FACE_MAX_FACES_PER_IDENTITY holds for the commands as for the API: an import line with more
    embeddings is refused (exit 2, nothing stored) and a person folder with more usable faces is
    skipped (too_many_faces_for_identity; the others are enrolled). Both stored all of them."""
    b = operator_backend
    dim = read_contract(b.model).embedding_size
    rng = np.random.default_rng(25)
    limit = {"FACE_MAX_FACES_PER_IDENTITY": "3"}
    b.open().close()

    path = write_gallery_file(tmp_path / "many.jsonl", b.model, [
        {"identity_id": "few", "embeddings": [vector_b64(v) for v in unit_vectors(rng, 3, dim)]},
        {"identity_id": "many", "embeddings": [vector_b64(v) for v in unit_vectors(rng, 4, dim)]}])
    assert_refused(b.run("gallery", "import", str(path), env=limit), "line 3", "'many'", "4 embeddings",
                   "FACE_MAX_FACES_PER_IDENTITY")

    root = tmp_path / "people"
    for name, copies in ((ENROLLED[1], 4), (ENROLLED[2], 3)):
        (root / name).mkdir(parents=True)
        for n in range(copies):
            shutil.copy(face_files(name)[0], root / name / f"{n}.jpg")
    r = b.run("gallery", "enroll", str(root), env=limit, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["enrolled"], summary["faces"], summary["people_skipped"]) == \
        (1, 3, {"too_many_faces_for_identity": 1}), summary
    galleries = b.open()
    try:
        default = galleries.collection("default")
        assert default.get_identity(ENROLLED[1]) is None and default.get_identity(ENROLLED[2]).record.face_count == 3
        assert default.get_identity("few") is None  # the refused file stored nothing
    finally:
        galleries.close()


def test_export_writes_a_file_only_its_owner_may_read(tmp_path, default_model):
    """A gallery file is biometric data: export makes it 0600 (as backup makes its copy), whatever the
    umask, and an existing file it replaces does not lend it its mode. It was 0644, and a 0600 file
    exported over became 0644."""
    import stat

    data = tmp_path / "data"
    source = opened(Settings(data_dir=data), default_model)
    source.collection("default").enroll("someone", unit_vectors(np.random.default_rng(26), 1,
                                                                  read_contract(default_model).embedding_size))
    source.close()
    fresh, private, readable = tmp_path / "fresh.jsonl", tmp_path / "private.jsonl", tmp_path / "readable.jsonl"
    for path, mode in ((private, 0o600), (readable, 0o644)):
        path.write_text("an older export")
        path.chmod(mode)
    for path in (fresh, private, readable):
        r = run_cli(["--data-dir", str(data), "--model", str(default_model), "export", str(path)])
        assert r.returncode == 0, r.stderr
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(0o600), path.name
        assert json.loads(path.read_text().splitlines()[-1]) == {"end": True, "identities": 1, "faces": 1}


def test_enroll_concurrency_and_import_batch_below_one_are_refused(tmp_path, default_model):
    """``enroll --concurrency 0`` waited forever holding the data dir's lock (a semaphore of 0), -1 was a
    traceback; ``import --batch 0`` is no batch either. Each is a usage error (exit 2) before anything is
    opened."""
    data = tmp_path / "data"
    (tmp_path / "people" / "someone").mkdir(parents=True)
    shutil.copy(face_files(ENROLLED[1])[0], tmp_path / "people" / "someone")
    gallery_file = write_gallery_file(tmp_path / "g.jsonl", default_model, [])
    for args, flag in (([str(tmp_path / "people"), "--concurrency", "0"], "--concurrency"),
                       ([str(tmp_path / "people"), "--concurrency", "-1"], "--concurrency"),
                       (["--batch", "0", str(gallery_file)], "--batch"),
                       (["--batch", "-5", str(gallery_file)], "--batch")):
        command = "enroll" if flag == "--concurrency" else "import"
        r = run_cli(["--data-dir", str(data), "--model", str(default_model), command, *args], timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-1000:])
        assert flag in r.stderr.splitlines()[-1] and "at least 1" in r.stderr.splitlines()[-1], r.stderr
    assert not data.exists()


def test_commands_beside_a_holder_of_the_data_dir_say_one_line(tmp_path, default_model):
    """While a server (here: this process) holds an embedded data dir, export, import and enroll say so
    in their one ``error:`` line; the data dir lock's own log line (a server's) came before it."""
    data = tmp_path / "data"
    (tmp_path / "people" / "someone").mkdir(parents=True)
    shutil.copy(face_files(ENROLLED[1])[0], tmp_path / "people" / "someone")
    gallery_file = write_gallery_file(tmp_path / "g.jsonl", default_model, [])
    holder = opened(Settings(data_dir=data), default_model)
    try:
        for args in (["export", str(tmp_path / "out.jsonl")], ["import", str(gallery_file)],
                     ["enroll", str(tmp_path / "people")]):
            r = run_cli(["--data-dir", str(data), "--model", str(default_model), *args])
            assert_refused(r, "in use by another process", case=args[0])
    finally:
        holder.close()
