"""The sweep section of the config (``tune:``) and its checks; re-exported
by privimage_core.config.

A sweep's search space is any set of dotted config keys (or top-level keys
such as ``method``), each with a list of values: the grid is their product.
``privimage compare`` is the same sweep with ``compare_by`` naming the keys
whose values label the rows of its table (the rest, e.g. ``run.seed``, are
repetitions averaged into mean +- std).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from privimage_core.config.types import require as _require

TUNE_METRICS = {"accuracy": "max", "fid": "min", "kid": "min"}


@dataclass
class TuneConfig:
    search_space: dict = field(default_factory=lambda: {
        "generator.preset": ["tiny", "small"], "selection.selection_ratio": [0.1, 0.2]})
    num_samples: int = 1
    metric: str = "accuracy"
    mode: str = "max"
    max_concurrent_trials: int = 1
    # The trial function only drives; its actors and Ray Train workers ask for
    # their own CPUs, so the trial itself holds a small fraction (0 is rejected).
    cpus_per_trial: float = 0.1
    # A budget for the whole sweep: each trial's target (epsilon, delta) is
    # set to (sweep_epsilon / T, delta / T) for T distinct trials (basic
    # composition, which always fits); the RDP composition of what the trials
    # actually spent is reported beside it and is never larger. None: each
    # trial keeps privacy.target_epsilon and the composition is only reported.
    sweep_epsilon: float | None = None
    # privimage compare: the keys that label a table row (default: every key
    # of the search space but run.seed).
    compare_by: list[str] | None = None

    def validate(self) -> None:
        """Its own ranges; that the swept keys are config keys is checked with
        the whole config (config/schema.py)."""
        _require(isinstance(self.search_space, dict) and len(self.search_space) > 0,
                 "tune.search_space must map dotted config keys to lists of values, e.g. "
                 "{generator.preset: [tiny, small]}")
        for k, vals in self.search_space.items():
            _require(isinstance(vals, list) and len(vals) > 0,
                     f"tune.search_space['{k}'] must be a non-empty list of values")
            _require(not k.startswith("tune."), "tune.search_space cannot sweep tune.* itself")
        _require(self.mode in ("max", "min"), "tune.mode must be 'max' or 'min'")
        _require(self.metric in TUNE_METRICS,
                 f"tune.metric must be one of {', '.join(TUNE_METRICS)}, got '{self.metric}'")
        _require(self.num_samples >= 1, "tune.num_samples must be >= 1")
        _require(self.sweep_epsilon is None or self.sweep_epsilon > 0,
                 "tune.sweep_epsilon must be > 0 or null")
        for k in self.compare_by or []:
            _require(k in self.search_space,
                     f"tune.compare_by key '{k}' is not in tune.search_space")
