"""benchmarks/merge_compare.py: the trials of several sweeps (one per seed)
become one row per method and budget, each budget ranked on its own; an
unfinished trial is left out, a release at chance level counts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import merge_compare  # noqa: E402


def _trial(root: Path, name: str, method: str, eps: float, seed: int, acc: float,
           status: str = "finished") -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "status": status, "method": method, "accuracy": acc, "fid": 100.0 + seed,
        "epsilon": eps - 0.01, "total_seconds": 60.0,
        "evaluation": {"kid": 0.1, "canary_eps_lb": 0.0, "canary_eps_max": 4.41,
                       "memorisation_dcr_pixel_verdict": -1.0}}))
    (d / "pipeline_state.json").write_text(json.dumps({"config": {
        "privacy": {"target_epsilon": eps}, "run": {"seed": seed},
        "evaluation": {"fid_images": 500}}}))


def test_sweeps_merge_by_method_and_budget(tmp_path):
    for seed in (0, 1):
        sweep = tmp_path / f"seed{seed}"
        _trial(sweep, "a", "privimage", 1.0, seed, 0.60 + 0.02 * seed)
        _trial(sweep, "b", "dpdm", 1.0, seed, 0.70)
        _trial(sweep, "c", "privimage", 10.0, seed, 0.90)
        _trial(sweep, "d", "dpdm", 10.0, seed, 0.20)
    _trial(tmp_path / "seed1", "e", "dpgan", 10.0, 1, 0.99, status="stopped")
    _trial(tmp_path / "seed1", "f", "dpgan", 1.0, 1, 0.10, status="failed")  # at chance
    ts = merge_compare.trials([str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    assert len(ts) == 9  # the stopped trial is not a result; the one at chance is
    rows = merge_compare.table(ts)[2:]
    assert rows[0].startswith("| privimage | 1 | 61.0 ± 1.4 | 0: 60.0, 1: 62.0 | 100.0 ± 0.0 | 100.5 ± 0.7")
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| privimage", "1"], ["| dpdm", "1"], ["| dpgan", "1"], ["| privimage", "10"],
        ["| dpdm", "10"]]
    assert "| 1: 10.0 (at chance: failed) |" in rows[2]
    assert merge_compare.ordering(ts) == ["epsilon 1: dpdm 70.0 > privimage 61.0 > dpgan 10.0",
                                          "epsilon 10: privimage 90.0 > dpdm 20.0"]
