"""Frechet distance from Inception features: this project's factorised form
(privimage_core.evaluation.fid.frechet_distance_from_features) against
pytorch-fid's calculate_frechet_distance (scipy sqrtm of the d x d product),
on the same features. Why the project does not call the library in the
pipeline: the measured time per call, and the agreement, are in the result.

Features are random but shaped like the real ones (d = 2048, non-negative,
heavy-tailed as pool3 activations are); n is the number of images per set.

    .venv/bin/python benchmarks/bench_frechet.py [--sizes 200 1000 5000] [--threads 2]
Writes benchmarks/results/frechet-<date>.txt.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 5000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads (set before numpy loads)")
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)

    import numpy as np
    from pytorch_fid.fid_score import calculate_frechet_distance

    from machine import cpu_name
    from privimage_core.evaluation.fid import feature_stats, frechet_distance_from_features

    rng = np.random.default_rng(0)
    rows = []
    load0 = os.getloadavg()[0]
    for n in a.sizes:
        # Two sets that differ a little, as a synthetic set differs from real data.
        f1 = rng.gamma(0.5, 0.6, size=(n, a.dim))
        f2 = rng.gamma(0.5, 0.6, size=(n, a.dim)) * 1.05 + 0.01
        t = time.perf_counter()
        ours = frechet_distance_from_features(f1, f2)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sqrtm's DeprecationWarning / singular-matrix warnings
            ref = float(calculate_frechet_distance(m1, s1, m2, s2))
        t_ref = time.perf_counter() - t
        rows.append((n, ours, ref, abs(ours - ref) / abs(ref), t_ours, t_ref))
        print(rows[-1], flush=True)
    load1 = os.getloadavg()[0]

    lines = [f"# Frechet distance: factorised (ours) vs pytorch-fid sqrtm, {datetime.date.today().isoformat()}",
             f"# machine: {cpu_name()}, {a.threads} BLAS threads, d = {a.dim}, random gamma features",
             f"# load average (1 min) {load0:.2f} at start, {load1:.2f} at end",
             "# the pytorch-fid time includes its mean/covariance (same as ours, from features)",
             "n_per_set  FID_ours      FID_pytorch_fid  rel_diff   ours_s  pytorch_fid_s  speed-up"]
    lines += [f"{n:>9}  {o:>12.6f}  {r:>15.6f}  {d:>8.1e}  {to:>7.2f}  {tr:>13.2f}  {tr / to:>8.1f}"
              for n, o, r, d, to, tr in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / f"frechet-{datetime.date.today().isoformat()}.txt"
    with out.open("a") as f:
        f.write(("\n" if out.exists() and out.stat().st_size else "") + text)


if __name__ == "__main__":
    main()
