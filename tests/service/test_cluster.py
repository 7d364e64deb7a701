"""POST /cluster over real HTTP with real LFW faces and photos, and ``python -m service cluster`` on a
folder, with ``--enroll`` into a real gallery (renamed folders; a names file through a running service)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.model.contract import read_contract
from tests.server import MODEL_CACHE, REPO, ServerProcess

LFW = REPO.parent / "shared" / "data"
CROPS = LFW / "lfw-112" / "images"
PHOTOS = LFW / "lfw-250-subset" / "images"
PEOPLE = ["Colin_Powell", "Tony_Blair", "Gerhard_Schroeder", "Hugo_Chavez"]
PHOTO_PEOPLE = ["Aaron_Peirsol", "Dwayne_Johnson", "Romano_Prodi", "Vanessa_Redgrave"]
LIMIT = 20

pytestmark = pytest.mark.skipif(not CROPS.exists() or not PHOTOS.exists(), reason="needs ../shared/data (LFW)")


def b64(path: Path | bytes) -> str:
    return base64.b64encode(path if isinstance(path, bytes) else path.read_bytes()).decode()


def crops(person: str, n: int = 3) -> list[Path]:
    return sorted((CROPS / person).iterdir())[:n]


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory, default_model):
    proc = ServerProcess(tmp_path_factory.mktemp("cluster") / "data", model=default_model,
                         env={"FACE_CLUSTER_MAX_FACES": str(LIMIT), "FACE_MAX_FACES_PER_REQUEST": "8"})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(cluster_server):
    with httpx.Client(base_url=cluster_server.url, timeout=120) as c:
        yield c


def groups(answer: dict, label_of) -> list[set[str]]:
    """Each cluster as the set of labels of its faces."""
    return [{label_of(face) for face in cluster["faces"]} for cluster in answer["clusters"]]


def test_aligned_faces_of_four_people_are_grouped_by_person(client):
    files = [f for person in PEOPLE for f in crops(person)]  # 12 faces: more than the per-request limit (8)
    order = np.random.default_rng(3).permutation(len(files))  # interleaved, so grouping is not by position
    shuffled = [files[i] for i in order]
    r = client.post("/cluster", json={"images": [b64(f) for f in shuffled]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["faces"] == 12 and answer["method"] == "average-linkage-knn"
    assert answer["model_id"] == read_contract(MODEL_CACHE / "sface-2021dec" / "model.onnx").model_id
    assert 0.4 < answer["threshold"] < 0.55  # the tail's cosine at a false-merge rate of 1e-5
    person = [f.parent.name for f in shuffled]
    assert sorted(map(sorted, groups(answer, lambda face: person[face["image_index"]]))) == [[p] for p in sorted(PEOPLE)]
    assert [c["size"] for c in answer["clusters"]] == [3, 3, 3, 3]
    assert [c["cluster_id"] for c in answer["clusters"]] == [0, 1, 2, 3]
    indices = sorted(face["face_index"] for c in answer["clusters"] for face in c["faces"])
    assert indices == list(range(12))
    assert all(face["face"] is None and face["face_index"] == face["image_index"]
               for c in answer["clusters"] for face in c["faces"])

    # the same faces as embeddings (from /embed) cluster the same way
    vectors = []
    for start in range(0, 12, 8):
        e = client.post("/embed", json={"images": [b64(f) for f in shuffled[start:start + 8]]})
        assert e.status_code == 200, e.text
        vectors += e.json()["embeddings"]
    r = client.post("/cluster", json={"embeddings": vectors, "model_id": answer["model_id"]})
    assert r.status_code == 200, r.text
    assert groups(r.json(), lambda face: person[face["image_index"]]) == groups(answer, lambda f: person[f["image_index"]])
    # a threshold of 1 keeps every face alone; -1 puts all in one cluster
    alone = client.post("/cluster", json={"embeddings": vectors, "model_id": answer["model_id"], "threshold": 1.0})
    assert [c["size"] for c in alone.json()["clusters"]] == [1] * 12 and alone.json()["threshold"] == 1.0
    one = client.post("/cluster", json={"embeddings": vectors, "model_id": answer["model_id"], "threshold": -1.0})
    assert [c["size"] for c in one.json()["clusters"]] == [12]


def test_photos_every_face_with_its_box_and_the_people_grouped(client):
    files = [f for person in PHOTO_PEOPLE for f in sorted((PHOTOS / person).iterdir())[:2]]
    r = client.post("/cluster", files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
                    data={"image_type": "photo"})  # multipart; multi_face defaults to all
    assert r.status_code == 200, r.text
    answer = r.json()
    faces = [face for c in answer["clusters"] for face in c["faces"]]
    assert answer["faces"] == len(faces) >= len(files)
    assert all(face["face"]["image_index"] == face["image_index"] and len(face["face"]["box"]) == 4 for face in faces)
    # the labelled face of each LFW photo is the one nearest its centre; bystanders may be found too
    labelled: dict[int, tuple[float, int]] = {}
    cluster_of = {}
    for cluster in answer["clusters"]:
        for face in cluster["faces"]:
            x, y, w, h = face["face"]["box"]
            distance = (x + w / 2 - 125) ** 2 + (y + h / 2 - 125) ** 2
            if face["image_index"] not in labelled or distance < labelled[face["image_index"]][0]:
                labelled[face["image_index"]] = (distance, face["face_index"])
            cluster_of[face["face_index"]] = cluster["cluster_id"]
    assert sorted(labelled) == list(range(len(files)))
    by_person: dict[str, set[int]] = {}
    for index, (_, face_index) in labelled.items():
        by_person.setdefault(files[index].parent.name, set()).add(cluster_of[face_index])
    assert all(len(clusters) == 1 for clusters in by_person.values()), by_person  # each person's 2 photos together
    assert len(set.union(*by_person.values())) == len(PHOTO_PEOPLE)  # and no two people together


def test_more_faces_than_the_limit_is_413_too_many_faces(client):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(LIMIT + 1, 128))
    r = client.post("/cluster", json={"embeddings": vectors.tolist(), "model_id": "sface@2021dec-int8bq"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_faces", r.text
    assert r.json()["error"]["details"]["limit"] == LIMIT
    crop = crops("Colin_Powell", 1)[0]
    r = client.post("/cluster", files=[("images", ("a.jpg", crop.read_bytes(), "image/jpeg"))] * (LIMIT + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_faces", r.text
    ok = client.post("/cluster", json={"embeddings": vectors[:LIMIT].tolist(), "model_id": "sface@2021dec-int8bq"})
    assert ok.status_code == 200 and ok.json()["faces"] == LIMIT


def test_bad_input_gets_its_code(client):
    model = "sface@2021dec-int8bq"
    crop = b64(crops("Colin_Powell", 1)[0])
    blank = b64(cv2.imencode(".png", np.full((200, 200, 3), 127, np.uint8))[1].tobytes())
    unit = [1.0] + [0.0] * 127
    cases = [
        ({}, 422, "invalid_request"),
        ({"images": [crop], "embeddings": [unit], "model_id": model}, 422, "invalid_request"),
        ({"embeddings": [unit]}, 422, "model_mismatch"),
        ({"embeddings": [unit], "model_id": "other@1"}, 422, "model_mismatch"),
        ({"embeddings": [[1.0, 0.0]], "model_id": model}, 422, "wrong_dimension"),
        ({"embeddings": [[0.0] * 128], "model_id": model}, 422, "invalid_embedding"),
        ({"embeddings": [unit], "model_id": model, "threshold": 2}, 422, "invalid_request"),
        ({"images": [b64(b"not an image at all")]}, 422, "not_an_image"),
        ({"images": [blank], "image_type": "photo"}, 422, "no_face"),
        ({"images": ["%%%"]}, 422, "invalid_base64"),
    ]
    for body, status, code in cases:
        r = client.post("/cluster", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body.keys(), r.text)
    r = client.post("/cluster", content=b"{nope", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_json")
    # one face is one singleton
    r = client.post("/cluster", json={"embeddings": [unit], "model_id": model})
    assert r.status_code == 200 and r.json()["clusters"] == [
        {"cluster_id": 0, "size": 1, "faces": [{"image_index": 0, "face": None, "face_index": 0}]}]


# --- the CLI ---------------------------------------------------------------------------------------

def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "FACE_DATABASE_URL"}
    full = {**base, "FACE_MODEL_CACHE_DIR": str(MODEL_CACHE), "FACE_INTRA_OP_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "service", "cluster", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def event(tmp_path) -> Path:
    """A folder of symlinked LFW faces of three people, mixed in sub-folders, plus a file that is no image."""
    root = tmp_path / "event"
    for i, person in enumerate(PEOPLE[:3]):
        for j, f in enumerate(crops(person, 4)):
            folder = root / f"camera-{(i + j) % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"img-{i}{j}.jpg").symlink_to(f)
    (root / "camera-0" / "broken.jpg").write_bytes(b"not a photo")
    return root


def test_cli_clusters_a_folder_and_enrolls_the_renamed_folders(tmp_path, event, operator_backend):
    """On both backends: the enrollment goes through the gallery interface of the configured backend."""
    output, folders = tmp_path / "out" / "clusters.json", tmp_path / "named"
    output.parent.mkdir()
    r = operator_backend.run("cluster", str(event), "--output", str(output), "--folders", str(folders), timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["faces"] == 12 and summary["photos"] == 13 and summary["skipped"] == {"not_an_image": 1}
    document = json.loads(output.read_text())
    person = {f"img-{i}{j}.jpg": p for i, p in enumerate(PEOPLE[:3]) for j in range(4)}
    got = sorted(sorted({person[Path(face["file"]).name] for face in c["faces"]}) for c in document["clusters"])
    assert got == [[p] for p in sorted(PEOPLE[:3])]
    assert all(c["size"] == 4 for c in document["clusters"])
    assert np.load(output.parent / document["embeddings"]).shape == (12, 128)
    for written in (output, output.parent / document["embeddings"]):  # faces' embeddings: biometric data
        assert stat.S_IMODE(written.stat().st_mode) == 0o600, written  # (0644 before)
    made = sorted(p.name for p in folders.iterdir())
    assert made == ["cluster-0000", "cluster-0001", "cluster-0002"]
    # name two clusters after the person their links show; leave the third unnamed
    names = {}
    for folder in sorted(folders.iterdir())[:2]:
        links = list(folder.iterdir())
        assert len(links) == 4 and all(link.is_symlink() and link.resolve().parent.parent == CROPS.resolve()
                                       for link in links)
        names[folder.name] = links[0].resolve().parent.name.lower()
        folder.rename(folders / names[folder.name])
    # move one face out of the first named folder into the second: it is enrolled there
    first, second = (folders / n for n in names.values())
    moved = sorted(first.iterdir())[0]
    moved.rename(second / moved.name)
    r = operator_backend.run("cluster", "--enroll", str(folders), "--output", str(output))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["enrolled"] == {first.name: 3, second.name: 5}
    galleries = operator_backend.open()
    try:
        gallery = galleries.collection("default")
        assert gallery.identity_count == 2 and gallery.face_count == 8
        assert len(gallery.identity_embeddings(first.name)) == 3
        # the moved face is enrolled under the folder it was moved to
        probe = np.load(output.parent / document["embeddings"])[int(moved.name[5:11])]
        best = gallery.search(probe[None, :], 1)[0][0]
        assert best.identity_id == second.name and best.score > 0.999
        assert gallery_audit(galleries).count("identity.created") == 2  # audited, as every enrollment
    finally:
        galleries.close()


def gallery_audit(galleries) -> list[str]:
    from service.gallery.api import AuditQuery

    return [entry.action for entry in galleries.audit(AuditQuery(limit=100))]


def test_cli_enrolls_a_names_file_through_a_running_service(tmp_path, event, cluster_server, client, default_model):
    output = tmp_path / "clusters.json"
    r = run_cli([str(event), "--output", str(output), "--model", str(default_model)])
    assert r.returncode == 0, r.stderr
    document = json.loads(output.read_text())
    first = document["clusters"][0]
    person = Path(os.readlink(event / first["faces"][0]["file"])).parent.name
    names = tmp_path / "names.tsv"
    names.write_text(f"# cluster_id identity_id\n{first['cluster_id']}\tcli-{person}\n")
    r = run_cli(["--enroll", str(names), "--output", str(output), "--url", cluster_server.url])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["enrolled"] == {f"cli-{person}": 4}
    got = client.get(f"/identities/cli-{person}")
    assert got.status_code == 200 and got.json()["face_count"] == 4
    # a cluster id the file does not have, or an id the gallery refuses: exit 2, nothing enrolled
    names.write_text("999 someone\n")
    r = run_cli(["--enroll", str(names), "--output", str(output), "--url", cluster_server.url])
    assert r.returncode == 2 and "no cluster '999'" in r.stderr
