"""The sweep section of the config (``tune:``) and its checks; re-exported
by privimage_core.config."""
from __future__ import annotations

from dataclasses import dataclass, field

from privimage_core.errors import ConfigError


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class TuneConfig:
    presets: list[str] = field(default_factory=lambda: ["tiny", "small"])
    selection_ratios: list[float] = field(default_factory=lambda: [0.05, 0.1])
    num_samples: int = 1
    metric: str = "accuracy"
    mode: str = "max"
    max_concurrent_trials: int = 1
    # The trial function only drives; its actors and Ray Train workers ask for
    # their own CPUs, so the trial itself holds a small fraction (0 is rejected).
    cpus_per_trial: float = 0.1


def validate_tune(t: TuneConfig) -> None:
    _require(all(0 < r <= 1 for r in t.selection_ratios),
             "tune.selection_ratios must all be in (0, 1]")
    _require(all(pr in ("tiny", "small", "base") for pr in t.presets),
             "tune.presets must be among tiny, small, base")
    _require(t.mode in ("max", "min"), "tune.mode must be 'max' or 'min'")
    _require(t.metric in ("accuracy", "fid"),
             f"tune.metric must be 'accuracy' (mode max) or 'fid' (mode min), got '{t.metric}'")
