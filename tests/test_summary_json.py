"""benchmarks/summary_json.update: each figure keeps the date, commit and
machine that measured it when another machine writes other keys later."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import summary_json  # noqa: E402


def test_a_figure_keeps_the_machine_that_measured_it(tmp_path, monkeypatch):
    monkeypatch.setattr(summary_json, "PATH", tmp_path / "summary.json")
    summary_json.update({"dp_step_ratio_tiny": 1.3}, machine="AMD EPYC")
    out = summary_json.update({"gpu_dp_step_ratio": 1.1}, machine="NVIDIA H100")
    assert out["machine"] == "NVIDIA H100"  # the last write
    assert out["provenance"]["dp_step_ratio_tiny"]["machine"] == "AMD EPYC"
    assert out["provenance"]["gpu_dp_step_ratio"]["machine"] == "NVIDIA H100"
    assert json.loads((tmp_path / "summary.json").read_text()) == out
    with pytest.raises(KeyError, match="not a summary key"):
        summary_json.update({"made_up": 1})


def test_the_committed_summary_names_only_known_keys():
    cur = json.loads(summary_json.PATH.read_text())
    meta = {"date", "commit", "machine", "provenance"}
    assert set(cur) - meta <= set(summary_json.KEYS)
