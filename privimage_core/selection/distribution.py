"""Steps 2-3 (paper Sec. 3.3, Theorem 3.1, App. A and C.2).

Query the sensitive dataset's semantic distribution with the Gaussian
mechanism and select the public semantics for pre-training.

For every sensitive image the query function names its top-k1 public
semantics; the image adds 1 to each of those k1 bins of ITS class's histogram
(conditional synthesis, App. C.2: one histogram per sensitive class). Adding or
removing one image changes at most k1 bins by 1 in one class histogram, so the
L2 sensitivity of all histograms together is sqrt(k1) (Theorem 3.1). Gaussian
noise of std sigma_q * sqrt(k1) therefore makes the release a Gaussian
mechanism with noise multiplier sigma_q, recorded in the ledger as one step at
sampling rate 1.

Only the noisy histograms leave this module. The raw counts are a local
variable of :func:`query_semantic_distribution` and are never returned.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from privimage_core.errors import DataError
from privimage_core.privacy.ledger import PrivacyLedger

QUERY_MECHANISM = "semantic_distribution_query"


def class_histograms(topk: np.ndarray, sensitive_labels: np.ndarray, num_public: int,
                     num_classes: int) -> np.ndarray:
    """Raw [num_classes, num_public] counts. SENSITIVE: never log or return it
    outside the query."""
    if topk.ndim != 2 or len(topk) != len(sensitive_labels):
        raise ValueError("topk must be [N, k1] with one row per sensitive image")
    # Each row's top-k labels are distinct (torch.topk), so each image adds at
    # most 1 per bin: the premise of the sqrt(k1) sensitivity.
    counts = np.zeros((num_classes, num_public), dtype=np.float64)
    np.add.at(counts, (np.repeat(sensitive_labels, topk.shape[1]), topk.reshape(-1)), 1.0)
    return counts


def noise_std(k1: int, sigma_q: float) -> float:
    """Noise std = sigma_q * L2 sensitivity, with sensitivity sqrt(k1) (Theorem 3.1)."""
    return sigma_q * math.sqrt(k1)


@dataclass
class SemanticDistribution:
    """The DP output of the query: noisy per-class histograms and the selection
    derived from them (post-processing)."""
    noisy_histograms: np.ndarray  # [num_classes, num_public], noisy
    k1: int
    k2: int
    sigma_q: float
    # sensitive class index -> selected public label ids (top-k2, disjoint)
    selection: dict[int, list[int]]

    def to_json(self, class_names: list[str], public_names: list[str]) -> dict:
        return {
            "k1": self.k1, "k2": self.k2, "sigma_q": self.sigma_q,
            "noise_std": noise_std(self.k1, self.sigma_q),
            "selection": {class_names[c]: [public_names[p] for p in ps]
                          for c, ps in self.selection.items()},
            "noisy_histograms": {class_names[c]: self.noisy_histograms[c].round(2).tolist()
                                 for c in range(len(class_names))},
            "public_labels": list(public_names),
        }


def select_top_k2(noisy: np.ndarray, k2: int) -> dict[int, list[int]]:
    """Top-k2 public semantics per sensitive class, disjoint across classes.

    Greedy over (class, semantic) pairs in decreasing noisy frequency: a
    semantic goes to the class where it is most frequent, so a public image is
    relabelled to exactly one sensitive class. Pure post-processing of the DP
    histogram: costs no budget.
    """
    num_classes, num_public = noisy.shape
    if k2 * num_classes > num_public:
        raise ValueError(f"k2={k2} x {num_classes} classes > {num_public} public semantics")
    chosen: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    taken: set[int] = set()
    order = np.argsort(-noisy, axis=None, kind="stable")
    for flat in order:
        c, p = divmod(int(flat), num_public)
        if p in taken or len(chosen[c]) >= k2:
            continue
        chosen[c].append(p)
        taken.add(p)
        if all(len(v) >= k2 for v in chosen.values()):
            break
    return chosen


def query_semantic_distribution(topk: np.ndarray, sensitive_labels: np.ndarray, num_public: int,
                                num_classes: int, k1: int, k2: int, sigma_q: float,
                                ledger: PrivacyLedger, rng: np.random.Generator | None = None
                                ) -> SemanticDistribution:
    """The DP semantic distribution query (Algorithm 2, lines 3-7).

    The ledger is charged BEFORE anything is released; if the charge would
    exceed the target, nothing is computed. The noise generator is seeded from
    OS entropy unless a generator is passed (tests only): a noise seed derived
    from the logged run seed would make the noise predictable.
    """
    if topk.shape[1] != k1:
        raise ValueError(f"topk has {topk.shape[1]} semantics per image, expected k1={k1}")
    if len(sensitive_labels) == 0:
        raise DataError("the sensitive dataset is empty; point data.sensitive at a non-empty dataset")
    ledger.record_gaussian(QUERY_MECHANISM, sigma_q,
                           note=f"L2 sensitivity sqrt(k1), k1={k1}, noise std {noise_std(k1, sigma_q):.4g}")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    counts = class_histograms(topk, sensitive_labels, num_public, num_classes)
    noisy = counts + rng.normal(0.0, noise_std(k1, sigma_q), size=counts.shape)
    del counts
    return SemanticDistribution(noisy, k1, k2, float(sigma_q), select_top_k2(noisy, k2))


def relabel_selection(public_labels: np.ndarray, selection: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the selected public images and their new (sensitive) labels
    (Algorithm 2, line 8: selected images are relabelled to the class whose
    semantics selected them)."""
    mapping = {p: c for c, ps in selection.items() for p in ps}
    mask = np.isin(public_labels, list(mapping))
    idx = np.nonzero(mask)[0]
    new = np.array([mapping[int(l)] for l in public_labels[idx]], dtype=np.int64)
    return idx, new
