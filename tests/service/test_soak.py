"""A small real soak (bench/soak.py): mixed clients against a real server, consistency checks, a kill -9 round.

The full one (32 clients, 10 minutes, 3 kill rounds) is ``python -m bench.soak``; see bench/README.
"""

from __future__ import annotations

import pytest

from bench.soak import LFW, run

pytestmark = pytest.mark.skipif(not (LFW / "identities.tsv").exists(), reason="needs the LFW crops in ../shared/data")


def test_small_soak_is_clean(tmp_path, default_model):
    result = run(clients=4, duration=12, kill_rounds=1, people=80, seed=1, data_dir=tmp_path / "data",
                 sample_every=2, env={"FACE_SNAPSHOT_INTERVAL_S": "2", "FACE_COMPACT_MIN_TOMBSTONES": "5"},
                 save_result=False)
    assert set(result["routes"]) == {"enroll", "identify", "verify", "embed", "delete"}
    unexpected = [c for c in result["codes"] if c["code"] not in ("ok", "identity_not_found")]
    assert not unexpected, (unexpected, result["server_log_errors"])
    assert result["server_errors"] == 0 and result["violation_count"] == 0, result["violations"]
    assert result["server_log_errors"] == [], result["server_log_errors"]
    assert result["consistency"]["problem_count"] == 0, result["consistency"]["problems"]
    assert result["consistency"]["checked_top1"] == result["consistency"]["listed"] > 0
    (round_,) = result["kill_rounds"]
    assert round_["acknowledged"] > 0 and round_["lost_count"] == 0 and not round_["deleted_resurrected"]
    assert round_["index_live"] == round_["faces"]
