"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"):
the unbiased squared MMD between Inception features with the cubic
polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets
(as in their reference code and torch-fidelity: 100 subsets of up to 1,000).

Unlike FID it is unbiased at any sample size, so small-N values are
comparable with large-N ones; its standard deviation over subsets comes with it.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.image.kid import poly_mmd


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """torchmetrics' unbiased polynomial MMD^2, in float64 (its KID computes
    the same from its own Inception; here the features are already computed
    once for FID, KID and precision/recall)."""
    return float(poly_mmd(torch.from_numpy(y), torch.from_numpy(x), degree=3, coef=1.0))


def kernel_inception_distance(f_syn: np.ndarray, f_real: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over ``subsets`` random subsets.

    With fewer than 2 x subset_size images a side the subsets hold half of
    the smaller side: subsets of ALL the images would all be the same set and
    give a standard deviation of 0 that says nothing (the quickstart's 200
    images did). The std is then that of a half-size estimate, an upper bound
    on the full-size one's."""
    f_syn, f_real = np.asarray(f_syn, np.float64), np.asarray(f_real, np.float64)
    n = min(len(f_syn), len(f_real))
    size = subset_size if n >= 2 * subset_size else n // 2
    if size < 2:
        raise ValueError("KID needs at least 4 images per side (subsets of half of them)")
    rng = np.random.default_rng(seed)
    vals = [_mmd2_unbiased(f_syn[rng.choice(len(f_syn), size, replace=False)],
                           f_real[rng.choice(len(f_real), size, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))
