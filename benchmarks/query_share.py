"""The budget split's cost and what it buys (selection.query_epsilon_share).

For each target epsilon and share: the calibrated query noise sigma_q, its
noise std per histogram bin (k1 = 1, the quickstart's), the significance
threshold tau for 10 classes x 72 public labels at alpha 0.05, and DP-SGD's
calibrated noise multiplier for the quickstart's plan (N = 60,000, logical
batch 512, 60 steps) against a free query (no query at all). Accountant
only: seconds on a CPU.

    .venv/bin/python benchmarks/query_share.py
"""
from __future__ import annotations

from scipy.stats import norm

from privimage_core.privacy.plan import plan_noise
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.privacy.query_budget import calibrate_sigma_q
from privimage_core.selection.distribution import QUERY_MECHANISM

N, B, STEPS, DELTA, CELLS = 60_000, 512, 60, 1e-5, 10 * 72


def dp_sgd_sigma(eps: float, sigma_q: float | None) -> float:
    led = PrivacyLedger(eps, DELTA)
    if sigma_q is not None:
        led.record_gaussian(QUERY_MECHANISM, sigma_q)
    return plan_noise(led, N, B, STEPS, None)[0]


def main() -> None:
    print("eps  share  sigma_q  noise_std  tau(alpha .05)  dp_sgd_sigma  vs_free_query")
    for eps in (1.0, 10.0):
        free = dp_sgd_sigma(eps, None)
        for share in (0.01, 0.02, 0.05, 0.1, 0.2):
            sq = calibrate_sigma_q(share, eps, DELTA)
            tau = sq * norm.isf(0.05 / CELLS)
            s = dp_sgd_sigma(eps, sq)
            print(f"{eps:4g}  {share:5.2f}  {sq:7.2f}  {sq:9.2f}  {tau:14.1f}  {s:12.4f}  "
                  f"{100 * (s / free - 1):+.1f}%")
        s = dp_sgd_sigma(eps, 100.0)
        print(f"{eps:4g}  fixed sigma_q=100 (the old default): tau {100 * norm.isf(0.05 / CELLS):.0f}, "
              f"dp_sgd_sigma {s:.4f} ({100 * (s / free - 1):+.1f}%)")


if __name__ == "__main__":
    main()
