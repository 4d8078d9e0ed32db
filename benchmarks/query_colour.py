"""Does the semantic query function see digits in colour? (semantic_query.colour)

Without the DP pipeline: the query function is trained on the default
public pool (data.public, public_max_per_class and the glyph options at their
defaults) with each colour mode, at 32x32x3 for coloured digits
(scripts/make_coloured_digits.py) and at the quickstart's 28x28x1 for plain
MNIST, and scored on the question the DP query asks of it. Per sensitive
set:

  agree    the mean over digit classes of the share of a class's images whose
           top-1 public label is that class's most frequent one
  modes    how many distinct public labels are the 10 classes' most frequent
           (the selection gives each public label to one class only)
  digit    classes whose most frequent label is the glyph of the same digit
  signif   significant classes of the DP query (selection.significance_alpha,
           k1 = 1 as the default pool gives) at epsilon 10 and the default
           query share, delta 1e-5, mean over 50 noise draws (a simulation)
  val      the held-out public accuracy, as the images are
  secs     training seconds

It reads the sensitive sets' labels, so it is a non-private validation of
the query function, never part of a run. Appends a block to
benchmarks/results/query-colour-<date>.txt.

    python benchmarks/query_colour.py --digits OUT/train [--seeds 0 1] [--note TEXT]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's privimage_core, not an installed one

import torch  # noqa: E402

import run_summary  # noqa: E402
from machine import cpu_name, git_commit  # noqa: E402
from privimage_core.config import from_dict  # noqa: E402
from privimage_core.data.sources import build_public_pool, load_source  # noqa: E402
from privimage_core.privacy.ledger import PrivacyLedger  # noqa: E402
from privimage_core.privacy.query_budget import calibrate_sigma_q, selection_significance  # noqa: E402
from privimage_core.selection.distribution import query_semantic_distribution  # noqa: E402
from privimage_core.selection.semantic_query import (COLOUR_MODES, predict_topk,  # noqa: E402
                                                     train_semantic_query)

DRAWS, EPSILON, DELTA = 50, 10.0, 1e-5


def scores(top1: np.ndarray, labels: np.ndarray, public_names: list[str], sigma_q: float,
           alpha: float) -> dict:
    """The figures of the module docstring for one sensitive set's top-1 labels."""
    mode = [np.bincount(top1[labels == c]).argmax() for c in range(10)]
    agree = np.mean([(top1[labels == c] == mode[c]).mean() for c in range(10)])
    signif = []
    for d in range(DRAWS):
        dist = query_semantic_distribution(top1[:, None], labels, len(public_names), 10, 1, 1,
                                           sigma_q, PrivacyLedger(1e9, DELTA),
                                           rng=np.random.default_rng(d))
        signif.append(selection_significance(dist.noisy_histograms, dist.selection, 1, sigma_q,
                                             alpha).num_significant)
    return {"agree": float(agree), "modes": len(set(mode)),
            "digit": sum(public_names[m] == f"glyph/{c}" for c, m in enumerate(mode)),
            "signif": float(np.mean(signif)), "mode_names": [public_names[m] for m in mode]}


def measure(pool, sensitive: dict, mode: str, seed: int, sigma_q: float, cfg) -> list[str]:
    q = cfg.semantic_query
    t0 = time.time()
    model, m = train_semantic_query(pool, width=q.width, epochs=q.epochs, batch_size=q.batch_size,
                                    lr=q.lr, val_fraction=q.val_fraction, seed=seed, colour=mode)
    secs = time.time() - t0
    out = []
    for name, ds in sensitive.items():
        top1 = predict_topk(model, ds.to_tensor(), k=1)[:, 0]
        s = scores(top1, ds.labels, pool.class_names, sigma_q, cfg.selection.significance_alpha)
        out.append(f"{name:<22} {mode:<10} {seed:>4} {s['agree']:6.3f} {s['modes']:5d} "
                   f"{s['digit']:5d} {s['signif']:6.1f} {m['public_val_accuracy']:6.3f} "
                   f"{secs:6.0f}  {' '.join(n.split('/')[1] for n in s['mode_names'])}")
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", required=True, help="coloured digits ImageFolder (train split)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--modes", nargs="+", default=list(COLOUR_MODES), choices=COLOUR_MODES)
    ap.add_argument("--epochs", type=int, help="semantic_query.epochs (default: the config's)")
    ap.add_argument("--only", choices=("rgb", "gray"), help="one of the two settings only")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = from_dict({"semantic_query": {"epochs": a.epochs}} if a.epochs else {})
    d = cfg.data
    sigma_q = calibrate_sigma_q(cfg.selection.query_epsilon_share, EPSILON, DELTA)
    glyph_opts = {"max_fonts": d.glyph_max_fonts, "per_font": d.glyph_copies_per_font}
    settings = {  # (image size, channels): the sensitive sets scored at it
        (32, 3): {"coloured digits": load_source(f"folder:{a.digits}", image_size=32, channels=3)},
        (28, 1): {"MNIST test": load_source("mnist", "test"),
                  "MNIST train 400/class": load_source("mnist", "train", max_per_class=400)}}
    lines = [f"# query colour, {time.strftime('%Y-%m-%d')}",
             f"# machine: {cpu_name()}; commit {git_commit()}; semantic_query defaults "
             f"width {cfg.semantic_query.width} epochs {cfg.semantic_query.epochs}; public "
             f"{d.public} at most {d.public_max_per_class}/class; sigma_q {sigma_q:.2f}"]
    lines += [f"# note: {a.note}"] if a.note else []
    lines.append(f"{'sensitive set':<22} {'colour':<10} {'seed':>4} {'agree':>6} {'modes':>5} "
                 f"{'digit':>5} {'signif':>6} {'val':>6} {'secs':>6}  most frequent label per digit")
    print("\n".join(lines), flush=True)  # the measurements print as they come
    for (size, ch), sensitive in settings.items():
        if a.only and (ch == 3) != (a.only == "rgb"):
            continue
        pool = build_public_pool(d.public, size, ch, d.public_max_per_class, cfg.run.seed,
                                 glyph_opts)
        for seed in a.seeds:
            for mode in a.modes:
                lines += measure(pool, sensitive, mode, seed, sigma_q, cfg)
    run_summary.append("query-colour", lines)


if __name__ == "__main__":
    main()
