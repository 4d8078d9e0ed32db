"""The tiny end-to-end pipeline (tests/helpers.py tiny_config) with a sharded
public pool (shards:<dir>) instead of the built-in glyphs: the index is built
from the shards' labels, the query function trains from the stream, and
pre-training reads only the selected rows, resized to the run's 28x28
grayscale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from privimage_core.config import from_dict
from tests.helpers import tiny_config
from tests.pool_helpers import make_pool

# minutes on 2 busy cores (the tiny pipeline plus Ray Data start-up): opt-in
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_sharded_public_pool_runs_end_to_end(tmp_path, ray_local):
    from services.pipeline import run_pipeline

    pool = make_pool(tmp_path / "pubpool", images=800, classes=20, shards=4)
    cfg = from_dict(tiny_config(tmp_path, **{"data.public": [f"shards:{pool}"]}))
    logs: list[str] = []
    s = run_pipeline(cfg, log=logs.append)
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    run = Path(s["run_dir"])
    man = json.loads((run / "public_index" / "manifest.json").read_text())
    assert [d["prefix"] for d in man["streamed"]] == ["pubpool"] and man["num_rows"] == 400
    assert not list((run / "public_index").glob("*.npy"))  # no pixel copy of the pool
    assert any("4 shards indexed, 0 of them reused" in line for line in logs)
    state = json.loads((run / "pipeline_state.json").read_text())
    sel = state["stages"]["selection"]["selection"]
    assert len(sel) == 10 and all(len(v) == 1 for v in sel.values())
    pre = state["stages"]["pretrain"]
    # k2 = 1 public label per class at 20 images each (data.public_max_per_class)
    expect = 20 * len({p for ps in sel.values() for p in ps})
    assert pre["images"] == (400 if pre["data"] == "public_pool" else expect)
