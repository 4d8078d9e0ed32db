"""Bad input is refused with one line naming the problem and the fix, before
any expensive work (no Ray, no training) starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privimage_core.config import from_dict
from privimage_core.errors import ConfigError, DataError
from services.pipeline import load_inputs

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, classes: dict[str, int], size=(28, 28), mode="L") -> Path:
    for name, n in classes.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            Image.new(mode, size, 0).save(d / f"{i}.png")
    return root


def _cfg(tmp_path, sensitive, **extra):
    return from_dict({"run": {"output_dir": str(tmp_path / "runs")},
                      "data": {"sensitive": sensitive, "sensitive_test": sensitive, **extra}})


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError) as e:
        load_inputs(_cfg(tmp_path, f"folder:{tmp_path / 'nope'}"))
    assert "nope" in str(e.value) and "\n" not in str(e.value)


def test_empty_class(tmp_path):
    root = _folder(tmp_path / "d", {"a": 3, "b": 0})
    with pytest.raises(DataError, match="'b'|b"):
        load_inputs(_cfg(tmp_path, f"folder:{root}"))


def test_wrong_shape_and_mode(tmp_path):
    root = _folder(tmp_path / "s", {"a": 2, "b": 2}, size=(40, 40))
    with pytest.raises(DataError, match="resize"):
        load_inputs(_cfg(tmp_path, f"folder:{root}"))
    root = _folder(tmp_path / "m", {"a": 2, "b": 2}, mode="RGB")
    with pytest.raises(DataError, match="channels|mode"):
        load_inputs(_cfg(tmp_path, f"folder:{root}"))


def test_delta_too_large_for_n(tmp_path):
    root = _folder(tmp_path / "d", {"a": 30, "b": 30})
    cfg = from_dict({"data": {"sensitive": f"folder:{root}", "sensitive_test": f"folder:{root}"},
                     "privacy": {"target_delta": 0.05}})
    with pytest.raises(ConfigError, match="1/N"):
        load_inputs(cfg)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("privacy:\n  target_epsilon: 0\n")
    p = subprocess.run([sys.executable, "-m", "services.cli", "run", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0
    assert "target_epsilon must be > 0" in p.stderr
    p = subprocess.run([sys.executable, "-m", "services.cli", "validate", "--set",
                        "selection.selection_ratio=1.5"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 2 and "selection_ratio" in p.stderr
    p = subprocess.run([sys.executable, "-m", "services.cli", "validate", "--set",
                        "privacy.bogus=1"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "unknown config key 'privacy.bogus'" in p.stderr
