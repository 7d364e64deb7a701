"""bench.compare_report runs, small (the numbers come from the real run in bench/results)."""

from __future__ import annotations

import json

from bench.compare_report import main


def test_compare_report_bench_writes_its_fields(tmp_path):
    out = tmp_path / "compare.json"
    main(["--faces", "400", "--max-probes", "100", "--output", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    assert run["faces"] == 400 and run["report"]["sampled"] and run["report"]["source"]["probes"] == 100
    assert run["report"]["source"]["faces"] == run["report"]["target"]["faces"] == 400
    assert run["compare_seconds"] > 0 and run["peak_traced_mb"] > 0 and run["load_average_before"]
