"""bench.migration runs, small, on both backends: a keep_crops collection seeded through the backend,
migrated by the real job over real HTTP while a paced reader identifies on it (the numbers come from
the real runs in bench/results; here only what must hold at any size)."""

from __future__ import annotations

import json

import pytest

from bench.migration import DATA, main


@pytest.mark.skipif(not (DATA / "images").is_dir(), reason="needs ../shared/data/lfw-112 (the bench's crops)")
@pytest.mark.parametrize("backend", ["embedded", "postgres"])
def test_migration_bench_migrates_and_measures(backend, tmp_path, request):
    out = tmp_path / "migration.json"
    pg = request.getfixturevalue("postgres") if backend == "postgres" else None
    main(["--faces", "90", "--faces-per-identity", "3", "--crops", "30", "--backends", backend, "--before-s", "2",
          "--identify-rps", "10", "--batch-size", "16", "--workdir", str(tmp_path), "--output", str(out)], pg=pg)
    payload = json.loads(out.read_text())
    assert payload["machine"]["cores"] and payload["load_average"]["start"]
    result = payload["results"][backend]
    assert result["seed"] == {**result["seed"], "identities": 30, "faces": 90}
    migration = result["migration"]
    assert migration["state"] == "done" and migration["error"] is None
    assert migration["faces"] == 90 and migration["faces_per_s"] > 0
    assert result["progress_samples"][-1]["phase"] == "done"
    # the job's compare phase ran: every face of the 30 three-face identities is a paired probe
    assert migration["report"]["paired_probes"] == 90
    assert result["extrapolated_1m"]["hours_whole_job"] > 0
    identify = result["identify"]
    assert identify["before"]["requests"] >= 10
    assert all(not phase["errors"] for phase in identify.values())
    disk = result["disk"]
    # a sealed crop: the PNG of a 112x112 LFW crop (~21 kB) + 32 bytes of magic, nonce and tag
    assert 10_000 < disk["sealed_crop_bytes_mean"] < 40_000
    # both collections keep every face's crop: each grew by at least its crops
    assert disk["a_bytes_per_face"] > 0.9 * disk["sealed_crop_bytes_mean"]
    assert disk["b_bytes_per_face"] > 0.9 * disk["sealed_crop_bytes_mean"]
