"""The `face` command line (python -m faceclient.cli) against a real server, as a script would run it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from faceclient import FaceClient

from harness.server import free_port
from tests.clients.conftest import ADMIN
from tests.clients.test_client import UNKNOWN_FACE, enroll_rows, lfw, needs_lfw
from tests.conftest import ENROLLED, face_files, unknown_files


def face(served, *args: str, key: str | None = ADMIN, env_url: bool = False, stdin: str | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FACE_URL", "FACE_API_KEY")}
    flags = [] if env_url else ["--url", served.url]
    if env_url:
        env |= {"FACE_URL": served.url, **({"FACE_API_KEY": key} if key else {})}
    elif key:
        flags += ["--key", key]
    return subprocess.run([sys.executable, "-m", "faceclient.cli", *flags, *args], capture_output=True, text=True,
                          timeout=120, env=env, input=stdin, cwd=cwd)


def test_cli_enroll_identify_verify_identities_as_json(any_backend, collection_name, people_dir):
    assert face(any_backend, "collections", "create", collection_name).returncode == 0
    c = ["--collection", collection_name, "--json"]
    (people_dir / ENROLLED[0] / "notes.jpg").write_text("not a photo")  # skipped, reported, not fatal
    enrolled = face(any_backend, *c, "enroll", str(people_dir))
    assert enrolled.returncode == 0, enrolled.stderr
    summary = json.loads(enrolled.stdout)
    assert {k: summary[k] for k in ("people", "enrolled", "already", "faces", "skipped_files", "failed")} == {
        "people": 3, "enrolled": 3, "already": 0, "faces": 6, "skipped_files": 1, "failed": {}}
    assert [(s["file"], s["code"]) for s in summary["persons"][ENROLLED[0]]["skipped"]] == [("notes.jpg", "not_an_image")]
    again = face(any_backend, "--collection", collection_name, "enroll", "--replace", str(people_dir))
    assert again.returncode == 0 and f"skipped\t{ENROLLED[0]}\tnotes.jpg\tnot_an_image" in again.stdout.splitlines()
    photos = [str(face_files(ENROLLED[1])[2]), str(unknown_files()[0])]
    identified = face(any_backend, *c, "identify", *photos, env_url=True)  # FACE_URL / FACE_API_KEY
    assert identified.returncode == 0, identified.stderr
    answers = json.loads(identified.stdout)
    assert [(a["photo"], a["identity_id"]) for a in answers] == [(photos[0], ENROLLED[1]), (photos[1], None)]
    others = ",".join(p for p in ENROLLED[:3] if p != ENROLLED[1])  # the person is not on the list: unknown
    listed_only = json.loads(face(any_backend, *c, "identify", photos[0], "--among", others).stdout)
    assert listed_only[0]["identity_id"] is None and {x["identity_id"] for x in listed_only[0]["candidates"]} <= set(
        ENROLLED[:3]) - {ENROLLED[1]}
    verified = json.loads(face(any_backend, "--json", "verify", photos[0], str(face_files(ENROLLED[1])[0])).stdout)
    assert verified["match"] is True
    listed = json.loads(face(any_backend, *c, "identities", "list").stdout)
    assert [i["identity_id"] for i in listed] == sorted(ENROLLED[:3])
    readable = face(any_backend, "--collection", collection_name, "identities", "list")
    assert readable.stdout.splitlines()[0].startswith(sorted(ENROLLED[:3])[0] + "\t2 faces")
    assert json.loads(face(any_backend, *c, "identities", "delete", ENROLLED[0]).stdout)["deleted_faces"] == 2
    assert collection_name in face(any_backend, "collections", "list").stdout
    assert face(any_backend, "collections", "delete", collection_name).returncode == 0


def test_cli_keys(embedded):
    created = json.loads(face(embedded, "--json", "keys", "create", "read", "--note", "cli").stdout)
    assert created["secret"] and created["role"] == "read"
    assert created["key_id"] in face(embedded, "keys", "list").stdout
    assert face(embedded, "keys", "revoke", created["key_id"]).returncode == 0
    listed = json.loads(face(embedded, "--json", "keys", "list").stdout)
    assert next(k for k in listed if k["key_id"] == created["key_id"])["revoked_at"] is not None


def test_cli_aliases(embedded, collection_name):
    assert face(embedded, "collections", "create", collection_name).returncode == 0
    alias = f"{collection_name}-alias"
    made = json.loads(face(embedded, "--json", "aliases", "set", alias, collection_name).stdout)
    assert (made["alias"], made["collection"]) == (alias, collection_name)
    assert f"{alias}\t{collection_name}" in face(embedded, "aliases", "list").stdout.splitlines()
    in_use = face(embedded, "--json", "collections", "delete", collection_name)
    assert in_use.returncode == 1 and json.loads(in_use.stderr)["error"]["code"] == "collection_in_use"
    assert face(embedded, "aliases", "delete", alias).returncode == 0
    missing = face(embedded, "--json", "aliases", "delete", alias)
    assert missing.returncode == 1 and json.loads(missing.stderr)["error"]["code"] == "alias_not_found"
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_collection_retention(embedded, collection_name):
    made = face(embedded, "collections", "create", collection_name, "--retention-days", "30")
    assert made.returncode == 0 and "faces erased 30 days after enrollment" in made.stdout
    listed = face(embedded, "collections", "list").stdout.splitlines()
    assert any(line.startswith(f"{collection_name}\t") and "30 days after enrollment\tno face limit" in line
               for line in listed)
    shorter = json.loads(face(embedded, "--json", "collections", "retention", collection_name, "0.5").stdout)
    assert shorter["retention_days"] == 0.5
    cleared = face(embedded, "collections", "retention", collection_name, "none")
    assert cleared.returncode == 0 and "faces kept until deleted" in cleared.stdout
    for bad in ("0", "-3", "soon", "nan"):
        refused = face(embedded, "collections", "retention", collection_name, bad)
        assert refused.returncode == 2 and "positive number of days" in refused.stderr, bad
    # collections set: only the settings given change
    limited = json.loads(face(embedded, "--json", "collections", "set", collection_name, "--max-faces", "100",
                              "--identify-fpir", "0.001").stdout)
    assert (limited["max_faces"], limited["identify_fpir"], limited["retention_days"]) == (100, 0.001, None)
    both = face(embedded, "collections", "set", collection_name, "--retention-days", "2", "--max-faces", "none")
    assert both.returncode == 0 and both.stdout.strip() == (
        f"{collection_name}\tfaces erased 2 days after enrollment\tno face limit\tidentify FPIR 0.001")
    for bad, says in ((["--max-faces", "0"], "positive whole number"), (["--identify-fpir", "2"], "between 0 and 1"),
                      ([], "--max-faces")):
        refused = face(embedded, "collections", "set", collection_name, *bad)
        assert refused.returncode == 2 and says in refused.stderr, (bad, refused.stderr)
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_identities_show_and_update(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as client:
        client.create_collection(collection_name)
        face_ids = client.enroll("cli-before", face_files(ENROLLED[0])[:2], metadata={"team": "a", "desk": {"floor": 2}}).face_ids
        client.enroll(ENROLLED[1], face_files(ENROLLED[1])[0])
    c = ["--collection", collection_name]

    shown = face(embedded, *c, "--json", "identities", "show", "cli-before")
    assert shown.returncode == 0, shown.stderr
    identity = json.loads(shown.stdout)
    assert (identity["identity_id"], identity["face_ids"], identity["metadata"]) == (
        "cli-before", face_ids, {"team": "a", "desk": {"floor": 2}})
    readable = face(embedded, *c, "identities", "show", "cli-before").stdout.splitlines()
    head, metadata = readable[0].split("\tmetadata ")
    assert head == "cli-before\t2 faces" and json.loads(metadata) == {"team": "a", "desk": {"floor": 2}}
    assert [line.split("\t")[0] for line in readable[1:]] == [f"face {i}" for i in face_ids]
    assert all(line.endswith("kept until deleted") for line in readable[1:])

    renamed = face(embedded, *c, "identities", "update", "cli-before", "--rename", "cli-after")
    assert renamed.returncode == 0, renamed.stderr
    lines = renamed.stdout.splitlines()
    assert lines[0] == "renamed cli-before to cli-after" and lines[1].startswith("cli-after\t2 faces\tmetadata {")
    assert len(lines) == 4 and lines[2].startswith(f"face {face_ids[0]}\tenrolled ")
    patched = face(embedded, *c, "--json", "identities", "update", "cli-after", "--metadata-patch",
                   '{"team": null, "desk": {"seat": 9}}')
    assert patched.returncode == 0, patched.stderr
    after = json.loads(patched.stdout)
    assert (after["identity_id"], after["metadata"], after["face_ids"]) == (
        "cli-after", {"desk": {"floor": 2, "seat": 9}}, face_ids)
    replaced = json.loads(face(embedded, *c, "--json", "identities", "update", "cli-after", "--metadata",
                               '{"name": "Zoë"}').stdout)
    assert replaced["metadata"] == {"name": "Zoë"}
    assert json.loads(face(embedded, *c, "--json", "identities", "show", "cli-after").stdout) == replaced
    by_prefix = face(embedded, *c, "identities", "list", "--prefix", "cli-")
    assert by_prefix.returncode == 0 and by_prefix.stdout.splitlines() == ["cli-after\t2 faces"], by_prefix

    taken = face(embedded, *c, "--json", "identities", "update", "cli-after", "--rename", ENROLLED[1])
    assert taken.returncode == 1
    error = json.loads(taken.stderr)["error"]
    assert (error["code"], error["status"], error["details"].get("identity_id")) == ("identity_exists", 409, ENROLLED[1])
    for action in (["show", "nobody-here"], ["update", "nobody-here", "--metadata", "{}"]):
        missing = face(embedded, *c, "--json", "identities", *action)
        assert missing.returncode == 1 and json.loads(missing.stderr)["error"]["code"] == "identity_not_found", action
    for bad, says in ((["--metadata", "{not json"], "JSON object"), (["--metadata-patch", "[1, 2]"], "JSON object"),
                      (["--metadata", "{}", "--metadata-patch", "{}"], "not allowed with"), ([], "--rename")):
        refused = face(embedded, *c, "identities", "update", "cli-after", *bad)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr, (bad, refused)
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_exit_codes(embedded):
    missing = face(embedded, "--json", "identities", "delete", "nobody-here")
    assert missing.returncode == 1
    error = json.loads(missing.stderr)["error"]
    assert error["code"] == "identity_not_found" and error["status"] == 404 and error["request_id"]
    assert face(embedded, "collections", "list", key="wrong-key").returncode == 1
    assert face(embedded, "frobnicate").returncode == 2
    assert face(embedded, "verify", "only-one").returncode == 2
    for bad in (["--timeout", "-1"], ["--timeout", "0"], ["--timeout", "nan"], ["--url", "not-a-url"],
                ["--url", "ftp://host"], ["--url", "http://"]):  # usage errors: 2, one line, no traceback
        r = subprocess.run([sys.executable, "-m", "faceclient.cli", *bad, "collections", "list"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error" in r.stderr, (bad, r.returncode, r.stderr)
    for word in ("identities", "faces", "collections", "aliases", "keys"):  # every command says what it is for
        help_text = subprocess.run([sys.executable, "-m", "faceclient.cli", "--help"], capture_output=True,
                                   text=True, timeout=60).stdout
        assert re.search(rf"^    {word}\s+\S", help_text, re.MULTILINE), (word, help_text)
    nowhere = subprocess.run([sys.executable, "-m", "faceclient.cli", "--url", f"http://127.0.0.1:{free_port()}",
                              "--timeout", "2", "collections", "list"], capture_output=True, text=True, timeout=60)
    assert nowhere.returncode == 3 and "error" in nowhere.stderr


@needs_lfw
def test_cli_duplicates_outliers_merge_cluster(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as client:
        client.create_collection(collection_name)
        client.enroll("agassi-a", lfw("Andre_Agassi")[:2], image_type="aligned")
        client.enroll("agassi-b", lfw("Andre_Agassi")[2:4], image_type="aligned")
        client.enroll("al-gore", lfw("Al_Gore")[:3], image_type="aligned")
        mislabelled = client.enroll("al-gore", lfw("Bill_Gates")[4:5], image_type="aligned").face_ids[0]
        client.enroll("bill-gates", lfw("Bill_Gates")[:4], image_type="aligned")
    c = ["--collection", collection_name]

    dup = json.loads(face(embedded, *c, "--json", "duplicates").stdout)
    assert [(p["identity_a"], p["identity_b"]) for p in dup["pairs"]] == [("agassi-a", "agassi-b")]
    assert json.loads(face(embedded, *c, "--json", "duplicates", "--job").stdout)["pairs"] == dup["pairs"]
    readable = face(embedded, *c, "duplicates", "--min-score", "0.2", "--limit", "1").stdout.splitlines()
    assert readable[0].startswith("agassi-a\tagassi-b\tscore ") and readable[-1].startswith("1 pairs from score 0.2000")
    odd = json.loads(face(embedded, *c, "--json", "outliers").stdout)
    assert mislabelled in [f["face_id"] for f in odd["faces"]]
    assert json.loads(face(embedded, *c, "--json", "outliers", "--job").stdout) == odd
    line = next(x for x in face(embedded, *c, "outliers").stdout.splitlines() if f"face {mislabelled}\t" in x)
    assert line.startswith("al-gore\t") and "matches bill-gates" in line

    merged = face(embedded, *c, "merge", "agassi-b", "agassi-a")
    assert merged.returncode == 0 and merged.stdout.strip() == "merged agassi-b into agassi-a\t2 faces moved\t4 faces now"
    again = face(embedded, *c, "--json", "merge", "agassi-b", "agassi-a")
    assert again.returncode == 1 and json.loads(again.stderr)["error"]["code"] == "identity_not_found"
    assert json.loads(face(embedded, *c, "--json", "duplicates").stdout)["pairs"] == []

    photos = [str(p) for p in lfw("Adrien_Brody")[:2] + lfw("Ana_Palacio")[:2]]
    grouped = json.loads(face(embedded, "--json", "cluster", *photos).stdout)
    assert sorted(sorted(f["image_index"] for f in cl["faces"]) for cl in grouped["clusters"]) == [[0, 1], [2, 3]]
    table = face(embedded, "cluster", *photos).stdout.splitlines()
    assert table[-1].startswith("4 faces in 2 clusters\tthreshold ")
    assert {frozenset(x.split("\t")[2].split()) for x in table[:2]} == {frozenset(photos[:2]), frozenset(photos[2:])}
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_faces_delete(embedded, collection_name):
    with FaceClient(embedded.url, ADMIN) as client:
        client.create_collection(collection_name)
        faces = enroll_rows(client, {"cli-gone": 1, "cli-some": 4}, collection_name)
        reader = client.create_key("read", note="cli faces delete").secret
    c = ["--collection", collection_name]
    gone, some, unknown = faces["cli-gone"][0], faces["cli-some"], UNKNOWN_FACE + 7

    readable = face(embedded, *c, "faces", "delete", str(unknown), str(some[0]), str(gone))
    assert readable.returncode == 0, readable.stderr
    assert readable.stdout.splitlines() == sorted([f"deleted face {gone}\tcli-gone\tidentity deleted",
                                                   f"deleted face {some[0]}\tcli-some"]) + [
        f"not found\tface {unknown}", "2 faces deleted\t1 not found\t1 identities deleted"]
    # `-`: the ids from stdin, whitespace-separated (the end of a pipe such as `face --json outliers | jq ...`)
    piped = face(embedded, *c, "--json", "faces", "delete", "-", stdin=f"{some[2]}\n {some[1]}\t{unknown}\n")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == {"deleted": [{"face_id": f, "identity_id": "cli-some", "identity_deleted": False}
                                                    for f in sorted(some[1:3])], "not_found": [unknown]}
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as client:
        assert client.get_identity("cli-some").face_ids == some[3:]
    # the default collection (no --collection): not there, nothing erased
    elsewhere = face(embedded, "--json", "faces", "delete", str(some[3]))
    assert elsewhere.returncode == 0 and json.loads(elsewhere.stdout) == {"deleted": [], "not_found": [some[3]]}
    for args, stdin, says in (([], None, "FACE_ID"), (["x1"], None, "face id"), (["0"], None, "face id"),
                              (["-", "5"], None, "- alone"), (["-"], "  \n", "no face id"), (["-"], "5 five", "stdin")):
        refused = face(embedded, *c, "faces", "delete", *args, stdin=stdin)
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr, (args, refused)
    refused_key = face(embedded, *c, "--json", "faces", "delete", str(some[3]), key=reader)  # needs write
    assert refused_key.returncode == 1 and json.loads(refused_key.stderr)["error"]["status"] == 403
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_faces_crop(embedded, collection_name, tmp_path):
    plain = f"{collection_name}-plain"
    with FaceClient(embedded.url, ADMIN) as client:
        client.create_collection(collection_name, keep_crops=True)
        kept = client.enroll("cli-crop", face_files(ENROLLED[0])[:2], image_type="aligned",
                             collection=collection_name).face_ids
        expected = client.face_crop(kept[0], collection=collection_name)
        client.create_collection(plain)
        unkept = client.enroll("cli-plain", face_files(ENROLLED[1])[0], collection=plain).face_ids[0]
        reader = client.create_key("read", note="cli faces crop").secret
    c = ["--collection", collection_name]
    assert expected.startswith(b"\x89PNG\r\n\x1a\n")

    # the default file, face-ID.png in the current directory; its name printed
    saved = face(embedded, *c, "faces", "crop", str(kept[0]), cwd=tmp_path)
    assert saved.returncode == 0, saved.stderr
    default_file = tmp_path / f"face-{kept[0]}.png"
    assert saved.stdout.splitlines() == [f"face-{kept[0]}.png"] and default_file.read_bytes() == expected
    # never overwritten without --force: exit 2, the file as it was
    default_file.write_bytes(b"mine")
    again = face(embedded, *c, "faces", "crop", str(kept[0]), cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr, again
    assert "Traceback" not in again.stderr and default_file.read_bytes() == b"mine"
    forced = face(embedded, *c, "faces", "crop", str(kept[0]), "--force", cwd=tmp_path)
    assert forced.returncode == 0 and default_file.read_bytes() == expected, forced.stderr
    # -o FILE (--json: what was written)
    other = tmp_path / "second.png"
    written = face(embedded, *c, "--json", "faces", "crop", str(kept[1]), "-o", str(other))
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout) == {"face_id": kept[1], "path": str(other), "bytes": other.stat().st_size}
    assert other.read_bytes().startswith(b"\x89PNG") and other.read_bytes() != expected
    # -o -: the PNG's bytes on stdout and nothing else (also with --json), no file
    env = {k: v for k, v in os.environ.items() if k not in ("FACE_URL", "FACE_API_KEY")}
    for flags in ([], ["--json"]):
        piped = subprocess.run([sys.executable, "-m", "faceclient.cli", "--url", embedded.url, "--key", ADMIN, *c,
                                *flags, "faces", "crop", str(kept[0]), "-o", "-"], capture_output=True, timeout=120,
                               env=env, cwd=tmp_path)
        assert piped.returncode == 0 and piped.stdout == expected and piped.stderr == b"", (flags, piped.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([default_file.name, other.name])

    # errors: nothing written (in a directory of their own: face ids are per collection, unkept may be kept[0]);
    # the API's error: exit 1 with its code; usage errors: exit 2
    nowhere = tmp_path / "errors"
    nowhere.mkdir()
    for args, collection, code in (([str(unkept)], plain, "crop_not_kept"),
                                   ([str(UNKNOWN_FACE)], collection_name, "face_not_found")):
        refused = face(embedded, "--collection", collection, "--json", "faces", "crop", *args, cwd=nowhere)
        assert refused.returncode == 1, refused
        error = json.loads(refused.stderr)["error"]
        assert (error["code"], error["status"]) == (code, 404) and refused.stdout == ""
    forbidden = face(embedded, *c, "--json", "faces", "crop", str(kept[0]), key=reader, cwd=nowhere)
    assert forbidden.returncode == 1 and json.loads(forbidden.stderr)["error"]["status"] == 403  # needs write
    for args in ([], ["0"], ["x1"], ["1", "2"]):
        usage = face(embedded, *c, "faces", "crop", *args, cwd=nowhere)
        assert usage.returncode == 2 and "Traceback" not in usage.stderr, (args, usage)
    assert list(nowhere.iterdir()) == []
    assert face(embedded, "collections", "delete", collection_name).returncode == 0
    assert face(embedded, "collections", "delete", plain).returncode == 0


def test_cli_identities_delete_of_a_dot_id_deletes_nothing(embedded, collection_name):
    """`face --collection C identities delete ..` deleted collection C (httpx resolved the dot segment)."""
    assert face(embedded, "collections", "create", collection_name).returncode == 0
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as client:
        client.enroll(ENROLLED[0], face_files(ENROLLED[0])[0])
    for dots in (".", ".."):
        refused = face(embedded, "--collection", collection_name, "--json", "identities", "delete", dots)
        assert refused.returncode == 1, refused.stderr
        assert json.loads(refused.stderr)["error"]["code"] == "invalid_identity_id"
    listed = json.loads(face(embedded, "--collection", collection_name, "--json", "identities", "list").stdout)
    assert [i["identity_id"] for i in listed] == [ENROLLED[0]]
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_enroll_goes_on_past_a_folder_name_that_is_no_identity_id(embedded, collection_name, people_dir):
    """`face enroll` stopped at a folder the service refuses as an identity id (exit 1, the others not
    enrolled); the person is a `failed` line now, an empty folder too, and the run exits 0."""
    (people_dir / "zero\u200bwidth").mkdir()
    shutil.copy(face_files(ENROLLED[3])[0], people_dir / "zero\u200bwidth")
    (people_dir / "Empty_Person").mkdir()
    assert face(embedded, "collections", "create", collection_name).returncode == 0
    enrolled = face(embedded, "--collection", collection_name, "enroll", "--concurrency", "1", str(people_dir))
    assert enrolled.returncode == 0, enrolled.stderr
    lines = enrolled.stdout.splitlines()
    assert lines[0].startswith("people 5\tenrolled 3\talready 0\tfaces 6\t") and lines[0].endswith("failed 2")
    failed = {line.split("\t")[1]: line.split("\t")[2].split(":")[0] for line in lines[1:] if line.startswith("failed\t")}
    assert failed == {"zero\u200bwidth": "invalid_identity_id", "Empty_Person": "no_images"}
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_never_prints_the_key_or_the_url_password(embedded):
    """A key with a newline was printed by `face` (httpx's LocalProtocolError holds the header), a non-ASCII
    key gave a traceback (exit 1), and the password of http://user:pass@host was in the error line. Now a key
    that cannot be sent is a usage error (exit 2, one line) naming none of it; no line holds the password."""
    secret = "secret-key-0123456789abcdef0123456789"
    for key in (secret + "\n", "secret-clé-0123456789abcdef0123456789"):
        refused = face(embedded, "collections", "list", key=key)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "secret" not in refused.stderr + refused.stdout
    port = free_port()
    for url in (f"http://user:s3cret-password@127.0.0.1:{port}", "http://user:s3cret-password@[::1",
                "ftp://user:s3cret-password@127.0.0.1"):
        failed = subprocess.run([sys.executable, "-m", "faceclient.cli", "--url", url, "collections", "list"],
                                capture_output=True, text=True, timeout=60)
        assert failed.returncode in (2, 3) and "s3cret" not in failed.stderr + failed.stdout, failed.stderr


def test_cli_identify_among_an_empty_list_is_a_usage_error(embedded):
    """--among is an access list: `--among ''` (or `,`) searched the whole gallery (exit 0, the empty list
    dropped); now a usage error (exit 2) and nothing is sent."""
    photo = str(face_files(ENROLLED[0])[0])
    for among in ("", ",", ",,"):
        refused = face(embedded, "identify", photo, "--among", among)
        assert refused.returncode == 2 and "--among" in refused.stderr and refused.stdout == "", refused


def test_cli_identify_exits_1_for_an_error_of_the_request(embedded):
    """`face identify A B --top-k 0` printed invalid_request as each photo's result and exited 0."""
    photos = [str(p) for p in face_files(ENROLLED[1])[:2]]
    refused = face(embedded, "--json", "identify", *photos, "--top-k", "0")
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert json.loads(refused.stderr)["error"]["code"] == "invalid_request"


def test_cli_keys_an_empty_scope_is_not_every_collection(embedded):
    """`face keys list` showed `*` (every collection) for a key scoped to none (`collections: []`), and
    `face keys create read --collections` with no name made such a key; now it shows `none`, and
    --collections needs a name (exit 2)."""
    assert face(embedded, "keys", "create", "read", "--collections", "--note", "empty").returncode == 2
    with FaceClient(embedded.url, ADMIN) as client:
        nowhere = client.create_key("read", collections=[], note="nowhere")
        everywhere = client.create_key("read", note="everywhere")
    lines = {line.split("\t")[0]: line.split("\t") for line in face(embedded, "keys", "list").stdout.splitlines()}
    assert lines[nowhere.key_id][2] == "none" and lines[everywhere.key_id][2] == "*"
    for key in (nowhere, everywhere):
        assert face(embedded, "keys", "revoke", key.key_id).returncode == 0


def test_cli_enroll_reports_a_partly_enrolled_person_and_completes_it_on_a_rerun(embedded, collection_name,
                                                                                 people_dir):
    """A person with some faces stored (an earlier run cut short) was taken as `already` enrolled, its other
    files never sent; one whose request was then refused was a `failed` line (not enrolled) though its faces
    stayed. Now a rerun enrolls such a person again from its folder (a `resumed` line), and one left with
    some faces after an error is a `partial` line, counted apart from `failed`."""
    person = ENROLLED[0]
    shutil.copy(face_files(person)[2], people_dir / person)  # 3 files, where the others have 2
    assert face(embedded, "collections", "create", collection_name, "--max-faces", "4").returncode == 0
    with FaceClient(embedded.url, ADMIN, collection=collection_name) as client:
        client.enroll(person, face_files(person)[0])  # as a run cut short after its first request leaves it
    c = ["--collection", collection_name]
    first = face(embedded, *c, "enroll", "--concurrency", "1", str(people_dir))  # Colin, George, Tony
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()  # Colin's 2 leave room for 1 more: George's 3 (in place of 1), Tony's 2 refused
    assert lines[0] == "people 3\tenrolled 1\talready 0\tfaces 2\tskipped files 0\tpartial 1\tfailed 1", lines
    assert [line.split("\t")[:2] for line in lines[1:]] == [["partial", person], ["failed", ENROLLED[2]]], lines
    assert lines[1].split("\t")[2] == "1 stored, 3 files", lines
    assert lines[1].split("\t")[3].startswith("too_many_faces_for_collection: "), lines
    assert lines[2].split("\t")[2].startswith("too_many_faces_for_collection: "), lines
    assert face(embedded, "collections", "set", collection_name, "--max-faces", "none").returncode == 0
    again = face(embedded, *c, "enroll", str(people_dir))
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0] == "people 3\tenrolled 2\talready 1\tfaces 5\tskipped files 0\tpartial 0\tfailed 0", lines
    assert [line.split("\t")[:2] for line in lines[1:]] == [["resumed", person]], lines
    shown = json.loads(face(embedded, *c, "--json", "identities", "show", person).stdout)
    assert shown["face_count"] == 3
    assert face(embedded, "collections", "delete", collection_name).returncode == 0


def test_cli_a_url_whose_port_is_no_number_is_a_usage_error():
    """`face --url http://127.0.0.1:abc` printed httpx's traceback and exited 1 (the code of an API error).
    Now it is a usage error: exit 2, one line naming --url, never the URL's password (FACE_URL too)."""
    for url in ("http://127.0.0.1:abc", "http://user:s3cret-password@127.0.0.1:abc", "http://127.0.0.1:99999"):
        for flags, env in ((["--url", url], {}), ([], {"FACE_URL": url})):
            r = subprocess.run([sys.executable, "-m", "faceclient.cli", *flags, "collections", "list"],
                               capture_output=True, text=True, timeout=60, env={**os.environ, **env})
            assert r.returncode == 2 and "Traceback" not in r.stderr, (url, r.returncode, r.stderr)
            assert "--url" in r.stderr and "s3cret" not in r.stderr + r.stdout, r.stderr
