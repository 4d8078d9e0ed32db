"""The semantic query's share of the budget and what its answer can support.

Budget split. The paper fixes the query's noise multiplier (sigma_q); a fixed
sigma_q is a noise std of sigma_q * sqrt(k1) per bin whatever N is, so on a
small dataset (400 images per class) the histogram is noise. Here the user
states the query's SHARE of epsilon instead: sigma_q is the smallest noise
multiplier whose Gaussian mechanism, released alone at the run's delta, costs
at most ``share * target_epsilon`` (the same Opacus accountant and bisection
that calibrate DP-SGD, so the plan and the run agree). DP-SGD then gets the
rest of the COMPOSED budget: its noise is calibrated against the ledger that
already holds the query (composition is sub-additive in RDP, so DP-SGD gets a
little more than (1 - share) of epsilon). An explicit ``selection.sigma_q``
still wins, for the paper's setting.

Significance. Whether the noisy histogram says anything is decided from the
noisy values and public parameters only (post-processing: no budget, no
sensitive read). Under "no signal" a cell is N(0, s^2) with s = sigma_q *
sqrt(k1); across the C x P cells, a noisy count above
    tau = s * Phi^{-1}(1 - alpha / (C * P))
occurs with probability at most alpha (Bonferroni). A class whose best
selected semantic is below tau has a selection that cannot be told from noise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.selection.distribution import noise_std


def fallback_plan(sig: "Significance", policy: str) -> str | None:
    """None (use the selection as is), 'drop_classes' or 'public_pool'."""
    if sig.all_significant or policy == "keep":
        return None
    if policy == "fail":
        return "fail"
    return "public_pool" if 2 * sig.num_significant < len(sig.significant) else "drop_classes"


def calibrate_sigma_q(share: float, target_epsilon: float, delta: float,
                      accountant: str = "rdp") -> float:
    """Smallest sigma_q with epsilon(query alone, delta) <= share * target."""
    return PrivacyLedger(share * target_epsilon, delta, accountant).calibrate_noise(
        sample_rate=1.0, steps=1)


def resolve_sigma_q(sigma_q: float | None, share: float, target_epsilon: float, delta: float,
                    accountant: str = "rdp") -> float:
    """The query's noise multiplier: explicit, or calibrated from the share.
    A pure function of the config and public quantities: the run's plan
    (privacy_plan.planned_ledger) and the query itself call it alike."""
    if sigma_q is not None:
        return float(sigma_q)
    return calibrate_sigma_q(share, target_epsilon, delta, accountant)


@dataclass
class Significance:
    threshold: float          # tau: a noisy count above it is unlikely under no signal
    noise_std: float
    alpha: float
    significant: list[bool]   # per sensitive class: best selected count > tau
    best_selected: list[float]  # per class, the largest noisy count it selected (DP output)

    @property
    def all_significant(self) -> bool:
        return all(self.significant)

    @property
    def num_significant(self) -> int:
        return int(sum(self.significant))

    def message(self, class_names: list[str]) -> str:
        weak = [n for n, ok in zip(class_names, self.significant) if not ok]
        head = (f"selection significance: {self.num_significant}/{len(self.significant)} classes "
                f"have a selected semantic above the noise threshold {self.threshold:.1f} "
                f"(noise std {self.noise_std:.1f}, alpha {self.alpha:g})")
        if not weak:
            return head
        shown = ", ".join(weak[:8]) + (", ..." if len(weak) > 8 else "")
        return (head + f"; cannot be told from noise for: {shown}. Raise "
                "selection.query_epsilon_share or privacy.target_epsilon, or use more data")

    def to_dict(self) -> dict:
        return {**asdict(self), "num_significant": self.num_significant}


def selection_significance(noisy: np.ndarray, selection: dict[int, list[int]], k1: int,
                           sigma_q: float, alpha: float) -> Significance:
    """Decided from the noisy histograms, the selection (both DP outputs) and
    public parameters (k1, sigma_q, the shape): post-processing."""
    noisy = np.asarray(noisy, dtype=np.float64)
    cells = noisy.size
    s = noise_std(k1, sigma_q)
    tau = float(s * norm.isf(alpha / cells))
    best = [float(max(noisy[c, p] for p in selection[c])) if selection.get(c) else -math.inf
            for c in range(noisy.shape[0])]
    return Significance(tau, float(s), float(alpha), [b > tau for b in best], best)
