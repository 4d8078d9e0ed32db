"""Per-layer kernels of book-keeping ghost clipping (privimage_core/dp_sgd/ghost_clipping.py):
the per-example squared norm of one convolution's weight gradient, by each
path the module can take, against the plain batch weight gradient.

  ghost    Gram matrices of the input patches and of the output gradient
  shifted  per-example gradients by shifted batched matmuls over a flat padded
           channels-last layout (an alternative, removed from the module:
           slower than grouped here)
  grouped  per-example gradients by the grouped-convolution weight-gradient kernel
  unfold   per-example gradients by F.unfold + bmm (the textbook way; not used)
  wgrad    the non-private batch weight gradient of the same layer (reference)
and the patch matrix itself: _conv_patches (stacked shifted views) vs F.unfold.

    .venv/bin/python benchmarks/bench_ghost_kernels.py [--threads 2] [--batch 64]
Writes benchmarks/results/ghost-kernels-<date>.txt (or --out NAME there).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from machine import cpu_name, git_commit
from privimage_core.dp_sgd import ghost_clipping as G

# (C_in, C_out, H): the small preset's 3x3 convolutions at 28x28 with patch 2
SHAPES = [(4, 64, 14), (64, 64, 14), (192, 64, 14), (64, 128, 7), (128, 128, 7), (256, 128, 7)]


def median_ms(f, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def _shifted_grads(m: nn.Conv2d, x, g, b: int, k: int):
    """Per-example weight gradients [B, p, C, 3, 3] of a stride-1 conv: each
    example's k padded rows in one flat channels-last sequence, g zero-padded
    alike, so a kernel shift is a slice and one bmm per shift."""
    ho, wo = g.shape[2], g.shape[3]
    xp = F.pad(x, (1, 1, 1, 1))
    hp, wp = xp.shape[2], xp.shape[3]
    n = hp * wp
    xf = F.pad(xp.permute(0, 2, 3, 1).reshape(b, k * n, -1), (0, 0, 0, 2 * wp + 2))
    gf = F.pad(g, (0, wp - wo, 0, hp - ho)).reshape(b, k, m.out_channels, n)
    gf = gf.transpose(1, 2).reshape(b, m.out_channels, k * n)
    return torch.stack([torch.bmm(gf, xf[:, i * wp + j:i * wp + j + k * n])
                        for i in range(3) for j in range(3)], dim=-1)


def paths(m: nn.Conv2d, x, g, b: int, k: int) -> dict:
    def per_group(z):
        return z.reshape(b, k, *z.shape[1:]).transpose(0, 1).reshape(k, -1, *z.shape[2:])

    def sq(per):
        return per.reshape(b, -1).pow(2).sum(1)

    return {
        "ghost": lambda: G._gram_dot(G._tokens(G._conv_patches(m, x), b),
                                     G._tokens(g.flatten(2).transpose(1, 2), b)),
        "shifted": lambda: sq(_shifted_grads(m, x, g, b, k)),
        "grouped": lambda: sq(torch.nn.grad.conv2d_weight(
            per_group(x), (b * m.out_channels, m.in_channels, 3, 3), per_group(g), padding=1,
            groups=b)),
        "unfold": lambda: sq(torch.bmm(G._tokens(g.flatten(2).transpose(1, 2), b).transpose(1, 2),
                                       G._tokens(F.unfold(x, 3, padding=1).transpose(1, 2), b))),
        "wgrad": lambda: torch.nn.grad.conv2d_weight(x, m.weight.shape, g, padding=1),
        "patches": lambda: G._conv_patches(m, x),
        "F.unfold": lambda: F.unfold(x, 3, padding=1).transpose(1, 2).contiguous(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    date = datetime.date.today().isoformat()
    names = list(paths(nn.Conv2d(1, 1, 3, padding=1), None, None, 1, 1))
    lines = [f"# ghost-clipping kernels, {date}, commit {git_commit()}",
             f"# machine: {cpu_name()}, {a.threads} torch threads, torch {torch.__version__}, "
             f"batch {a.batch} examples x K rows, 3x3 convolutions, median of {a.repeats}, ms",
             "# the module's rule picks ghost where T (d + p) < p d, else grouped; "
             "'rule' names its pick",
             "C_in C_out  H  K  rule     " + "  ".join(f"{n:>8}" for n in names)]
    for k in (1, 4):
        for cin, cout, h in SHAPES:
            m = nn.Conv2d(cin, cout, 3, padding=1)
            x, g = torch.randn(a.batch * k, cin, h, h), torch.randn(a.batch * k, cout, h, h)
            t = {n: median_ms(f, a.repeats) for n, f in paths(m, x, g, a.batch, k).items()}
            rule = "ghost" if G._ghost_cheaper(h * h * k, cin * 9, cout) else "grouped"
            lines.append(f"{cin:>4} {cout:>5} {h:>2} {k:>2}  {rule:<7}  "
                         + "  ".join(f"{t[n]:>8.1f}" for n in names))
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / (a.out or f"ghost-kernels-{date}.txt")
    out.write_text(text)


if __name__ == "__main__":
    main()
