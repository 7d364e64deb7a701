"""bench.collections_embedded runs, small: both of its parts, on a real EmbeddedGalleries made from
Settings (the numbers come from the real runs in bench/results; here only what must hold at any size)."""

from __future__ import annotations

import json

from bench.collections_embedded import main


def test_beside_part_answers_within_each_collection_and_closes_the_idle_one(tmp_path):
    out = tmp_path / "beside.json"
    main(["--part", "beside", "--faces", "2000", "--small-faces", "200", "--probes", "100", "--idle-s", "0.5",
          "--reopens", "2", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["faces"] == 2000 and result["config"]["small_probes_known"] == 50
    # half the small collection's probes are people only the big one holds: exact within "small" is the
    # reference, so an answer from the big collection would be a miss
    assert result["results"]["small"]["recall_at_1"] >= 0.99
    assert result["results"]["big"]["recall_at_1"] >= 0.99
    assert result["idle"]["closed"] and result["idle"]["open_collections"] == ["default"]
    assert result["idle"]["small_gallery_objects_alive"] == 0
    assert len(result["idle"]["first_call_opening_small_ms"]) == 2
    assert result["targets"]["small_closed_when_idle"]
    assert result["machine"]["load_average_before"] and result["rss_mb"]["big_open"] > 0


def test_costs_part_still_writes_its_fields(tmp_path):
    out = tmp_path / "costs.json"
    main(["--faces", "2000", "--collections", "2", "--faces-per-collection", "100", "--rounds", "2",
          "--probes", "20", "--output", str(out)])
    result = json.loads(out.read_text())
    assert set(result) >= {"machine", "load_average", "config", "search_us_median_of_rounds", "enroll_ms_median", "idle"}
    assert result["idle"]["collections_open_after_filling"] == 3
    assert result["idle"]["gallery_objects_alive_after_idle_close"] == 1  # the default collection only
