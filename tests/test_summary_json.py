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


def test_fid5k_files_a_list_and_refuses_below_protocol(tmp_path, monkeypatch):
    """benchmarks/fid5k.py: quickstart_fid_5k becomes a list (an old single
    figure is dropped, not mixed in), later runs append, and an evaluation
    below 5,000 images per side files nothing."""
    import fid5k
    monkeypatch.setattr(summary_json, "PATH", tmp_path / "summary.json")
    (tmp_path / "summary.json").write_text(json.dumps({"quickstart_fid_5k": 104.47}))
    full = {"fid": 100.123, "fid_images": 5000}
    fid5k.file_series("quickstart", full, new_series=False)
    fid5k.file_series("quickstart", {**full, "fid": 90.0}, new_series=False)
    assert json.loads((tmp_path / "summary.json").read_text())["quickstart_fid_5k"] == [100.12, 90.0]
    with pytest.raises(SystemExit, match="below the protocol"):
        fid5k.refuse_below_protocol({"fid": 80.0, "fid_images": 500}, tmp_path / "m.json")
    fid5k.refuse_below_protocol(full, tmp_path / "m.json")  # no exception
