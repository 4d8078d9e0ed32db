"""What one evaluation reads and writes: the inputs every metric group
shares (``EvaluationContext``) and the result it fills (``EvaluationResult``).

Which real data is read, and why every number here is NON-PRIVATE (it
describes the release; nothing it computes is trained into the release):

* real TEST split: classifiers are tested on all of it; its first
  ``fid_images`` images are the FID / precision-recall reference (a fixed
  prefix, so its Inception features are cached by content hash across runs);
  of the rest, a seeded random part is the detector's real class and another,
  disjoint part the membership diagnostic's NON-MEMBERS (the generator never
  saw the test split).
* real TRAIN split = the SENSITIVE data (optional): a random subset of
  ``ceiling_images`` trains the "train on real" ceiling classifiers, and a
  random subset of ``mia_members`` images are the diagnostic's MEMBERS (the
  pipeline fine-tunes on the whole sensitive set, so every image is a member).
  Neither is ever returned or written: only the numbers.
* synthetic set: with the utility matrix on, a seeded hold-out of
  ``utility_holdout`` images is kept out of the synthetic-trained classifiers
  and serves as the synthetic TEST set (synthetic -> synthetic,
  real -> synthetic); LR and MLP train on at most ``sklearn_max_images``.

Memorisation checks (``memorisation_*``; evaluation/memorisation.py): members
= the SENSITIVE training set (all of it for DCR in pixel space, class-matched
samples otherwise); held-out = a seeded random part of the test split outside
every part above in use (disjoint, no selection). Only numbers and verdicts
come back, plus, with ``memorisation_show_pairs``, a grid that DOES show
training images.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from privimage_core.config.evaluation import EvaluationConfig
from privimage_core.data.imageset import ImageSet

NON_PRIVATE_NOTE = ("Evaluation on real data is NON-PRIVATE: the metrics below read the real test "
                    "split and, for the 'train on real' ceiling and the membership audit, the "
                    "sensitive training set. They describe the release; they are not covered by "
                    "its (epsilon, delta) guarantee. No real image appears in this report.")


@dataclass
class EvaluationResult:
    metrics: dict[str, float] = field(default_factory=dict)
    # ROC of the membership diagnostic (fpr, tpr), for the report's plot
    roc: tuple[np.ndarray, np.ndarray] | None = None
    # The privacy check's verdict (the canary audit, evaluation/canary_audit.py):
    # audit_ok False = violation, True = consistent, None = inconclusive / not run.
    audit_message: str | None = None
    audit_ok: bool | None = None
    # The canary audit's full result (operator only: the run dir, never MLflow).
    canary: dict | None = None
    notes: list[str] = field(default_factory=list)
    # what each metric read (for the report's table)
    config: dict = field(default_factory=dict)
    # memorisation checks: verdict messages, settings, optional pair grid (PNG)
    memorisation: dict = field(default_factory=dict)
    # Why the release failed, when it did (its headline classifier at chance).
    failure: str | None = None


def split_real_test(n_test: int, n_fid: int, n_detector: int, n_nonmembers: int,
                    seed: int) -> dict[str, np.ndarray]:
    """Indices of the test split's parts: 'fid' = the first n_fid (fixed, for
    the feature cache); 'detector' and 'nonmembers' = disjoint seeded random
    parts of the rest (shrunk, non-members first, when the split is small)."""
    fid_idx = np.arange(min(n_fid, n_test))
    rest = np.random.default_rng([seed, 7]).permutation(np.arange(len(fid_idx), n_test))
    n_non = min(n_nonmembers, len(rest))
    non = np.sort(rest[:n_non])
    det = np.sort(rest[n_non:n_non + n_detector])
    return {"fid": fid_idx, "nonmembers": non, "detector": det}


def subset(ds: ImageSet, idx, name: str) -> ImageSet:
    return ds.subset(np.asarray(idx, dtype=np.int64), name=name)


@dataclass
class EvaluationContext:
    """The inputs of one evaluation (see ``suite.run_evaluation``) and the
    result its metric groups (``metric_groups.py``) fill in."""
    ecfg: EvaluationConfig
    synthetic: ImageSet
    real_test: ImageSet
    seed: int
    parts: dict[str, np.ndarray]
    real_train: ImageSet | None = None
    family: object | None = None     # a ModelFamily
    release: object | None = None    # its released module
    ledger_epsilon: float | None = None
    # The canary audit's claim: the epsilon of the mechanisms canaries entered.
    audit_epsilon: float | None = None
    delta: float | None = None
    fid_cache_dir: str | None = None
    log: Callable[[str], None] = lambda s: None
    progress: Callable[[int, int], None] | None = None
    # Where the Inception passes and the CNNs run ("cpu" or a CUDA device).
    device: str = "cpu"
    res: EvaluationResult = field(default_factory=EvaluationResult)

    @property
    def m(self) -> dict[str, float]:
        return self.res.metrics

    @contextmanager
    def timed(self, name: str):
        """Time a metric into ``<name>_seconds`` (the report's table; not the log)."""
        t0 = time.time()
        yield
        self.m[f"{name}_seconds"] = time.time() - t0

    def skip(self, what: str, why: str) -> None:
        """A metric that cannot run is skipped with a note, never silently."""
        self.res.notes.append(f"{what} skipped: {why}")
        self.log(f"[evaluate] {what} skipped: {why}")
