"""DP fine-tuning step cost relative to a non-private step, same model and batch.

Non-private: forward, backward, Adam over the logical batch in physical
chunks. DP: one logical step through stock Opacus as
privimage_core.dp_sgd.finetune sets it up (per-sample gradients by Opacus hooks
or torch.func vmap and per-sample clipping, or book-keeping ghost clipping
without per-sample gradients; virtual steps over the physical
chunks, Gaussian noise once, Adam), with noise multiplicity K (K diffusion
draws per image, averaged inside its loss). Medians over repeats.

    .venv/bin/python benchmarks/bench_dp_step.py [--threads 2] [--batch 256] [--physical 64]
        [--rows vmap:1,ghost:1,vmap:4,ghost:4] [--repeats 3]
Writes benchmarks/results/dp_step-<date>.txt (or --out NAME there).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from privimage_core.models.diffusion.edm import EDMObjective, EDMPrecond
from privimage_core.models.diffusion.unet import build_unet
from privimage_core.dp_sgd.finetune import accumulate_grad_samples, make_private
from privimage_core.privacy.ledger import PrivacyLedger

from machine import cpu_name, git_commit
from summary_json import update


def time_steps(step, repeats: int, device: str = "cpu") -> float:
    # CUDA kernels run asynchronously: wait for them before reading the clock
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    step()  # warm-up
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def chunks(x, y, physical: int):
    return list(zip(x.split(physical), y.split(physical)))


def bench_plain(preset: str, x, y, physical: int, repeats: int, k: int = 1) -> float:
    """Non-private step; ``k`` noise draws per image (B * k rows, the same
    rows a DP step with noise multiplicity k computes), on x's device."""
    model = EDMPrecond(build_unet(preset, 28, 1, 10)).to(x.device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    obj = EDMObjective()

    def step():
        opt.zero_grad(set_to_none=True)
        for xb, yb in chunks(x, y, physical):
            (obj.loss(model, xb, yb, obj.draw(xb, k)).sum() / len(x)).backward()
        opt.step()

    return time_steps(step, repeats, str(x.device))


def bench_private(preset: str, x, y, physical: int, repeats: int, mode: str, k: int) -> float:
    model = EDMPrecond(build_unet(preset, 28, 1, 10)).to(x.device)
    dp = make_private(model, torch.optim.Adam(model.parameters(), 1e-3), x, y,
                      batch_size=len(x), noise_multiplier=1.0, max_grad_norm=1.0,
                      ledger=PrivacyLedger(1e9, 1e-5), grad_sample_mode=mode)
    obj = EDMObjective()

    def step():  # one logical step on the fixed batch, physical chunks as BatchMemoryManager
        parts = chunks(x, y, physical)
        for i, (xb, yb) in enumerate(parts):
            dp.optimizer.signal_skip_step(do_skip=i < len(parts) - 1)
            accumulate_grad_samples(dp, obj, xb, yb, noise_multiplicity=k)
            dp.optimizer.step()
            dp.optimizer.zero_grad(set_to_none=True)

    return time_steps(step, repeats, str(x.device))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--physical", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--out", default=None, help="file name under benchmarks/results/")
    ap.add_argument("--rows", default="vmap:1,ghost:1,vmap:4,ghost:4",
                    help="mode:K pairs, e.g. hooks:1,vmap:1,ghost:1,vmap:4,ghost:4")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [(m, int(k)) for m, k in (r.split(":") for r in a.rows.split(","))]
    load0 = os.getloadavg()[0]
    t_start = time.time()
    torch.manual_seed(0)
    x = torch.rand(a.batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (a.batch,))
    date = datetime.date.today().isoformat()
    lines = [f"# DP-SGD step cost vs non-private, {date}, commit {git_commit()}",
             f"# machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, logical batch {a.batch} (28x28x1) in physical "
             f"batches of {a.physical}, median of {a.repeats}",
             "# ratio: to a non-private step at K = 1; same-K ratio: to a non-private step on "
             "the same B * K rows (the cost of privacy alone)",
             "preset  params   mode   K  ms/logical step  ms/image  ratio  same-K ratio"]
    rows_t: dict[str, list] = {}
    for preset in a.presets.split(","):
        params = sum(p.numel() for p in build_unet(preset, 28, 1, 10).parameters())
        plain = {k: bench_plain(preset, x, y, a.physical, a.repeats, k)
                 for k in sorted({1} | {k for _, k in rows})}
        t_plain = plain[1]
        found = [("plain", k, t) for k, t in plain.items()]
        found += [(m, k, bench_private(preset, x, y, a.physical, a.repeats, m, k))
                  for m, k in rows]
        rows_t[preset] = found
        for m, k, t in found:
            lines.append(f"{preset:<7} {params:>8}  {m:<5} {k:>2}  {1000 * t:>15.0f}  "
                         f"{1000 * t / a.batch:>8.2f}  {t / t_plain:>5.2f}  {t / plain[k]:>12.2f}")
    load1 = os.getloadavg()[0]
    lines.insert(2, f"# load average (1 min) {load0:.2f} at start, {load1:.2f} at end "
                    f"({time.time() - t_start:.0f} s): above the core count means other "
                    "processes shared the CPU; compare ratios, not ms")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / (a.out or f"dp_step-{date}.txt")
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    # the pipeline's default mode (finetune.grad_sample_mode auto = ghost for
    # the UNet); vmap where no ghost row was measured
    ratios = {}
    for preset, found in rows_t.items():
        t = {(m, k): t for m, k, t in found}
        if preset not in ("tiny", "small"):
            continue
        for k in sorted({k for m, k, _ in found if m != "plain"}):
            mode = "ghost" if ("ghost", k) in t else "vmap"
            if (mode, k) in t:  # K > 1: against the non-private step on the same rows
                key = f"dp_step_ratio_{preset}" + (f"_k{k}" if k > 1 else "")
                ratios[key] = round(t[(mode, k)] / t[("plain", k)], 3)
    if ratios:
        update(ratios)


if __name__ == "__main__":
    main()
