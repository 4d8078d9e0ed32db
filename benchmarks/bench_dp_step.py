"""DP fine-tuning step cost relative to a non-private step, same model and batch.

Non-private: forward, backward, Adam. DP: the same through stock Opacus
(hooks per-sample gradients, per-sample clipping, Gaussian noise, Adam), as
privimage_core.dp_finetune.make_private sets it up. Medians over repeats.

    .venv/bin/python benchmarks/bench_dp_step.py [--threads 2] [--batch 64]
Writes benchmarks/results/dp_step-<date>.txt.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from privimage_core.diffusion.edm import EDMPrecond, edm_loss, sample_training_noise
from privimage_core.diffusion.unet import build_unet
from privimage_core.dp_finetune import make_private
from privimage_core.privacy_ledger import PrivacyLedger


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def time_steps(step, repeats: int) -> float:
    step()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench(preset: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (batch,))

    model = EDMPrecond(build_unet(preset, 28, 1, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def plain():
        s, n = sample_training_noise(x)
        loss = edm_loss(model, x, y, s, n).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_plain = time_steps(plain, repeats)

    dmodel = EDMPrecond(build_unet(preset, 28, 1, 10))
    led = PrivacyLedger(1e9, 1e-5)
    dp = make_private(dmodel, torch.optim.Adam(dmodel.parameters(), 1e-3), x, y, batch_size=batch,
                      noise_multiplier=1.0, max_grad_norm=1.0, ledger=led)

    def private():  # one logical step on the fixed batch: clip, noise once, Adam
        s, n = sample_training_noise(x)
        loss = edm_loss(dp.model, x, y, s, n).mean()
        loss.backward()
        dp.optimizer.step()
        dp.optimizer.zero_grad(set_to_none=True)

    t_dp = time_steps(private, repeats)
    params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "params": params, "plain_ms_per_sample": 1000 * t_plain / batch,
            "dp_ms_per_sample": 1000 * t_dp / batch, "ratio": t_dp / t_plain}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--presets", default="tiny,small")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import os
    load0 = os.getloadavg()[0]
    rows = [bench(p, a.batch, a.repeats) for p in a.presets.split(",")]
    load1 = os.getloadavg()[0]
    date = datetime.date.today().isoformat()
    lines = [f"# DP-SGD step cost vs non-private, {date}",
             f"# machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, batch {a.batch} (28x28x1), median of {a.repeats}",
             f"# load average (1 min) {load0:.2f} at start, {load1:.2f} at end: above 2 on this"
             " 2-core machine means other processes shared the CPU; compare ratios, not ms",
             "preset  params   plain ms/sample  DP ms/sample  DP/plain"]
    for r in rows:
        lines.append(f"{r['preset']:<7} {r['params']:>8}  {r['plain_ms_per_sample']:>14.2f}  "
                     f"{r['dp_ms_per_sample']:>12.2f}  {r['ratio']:>8.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / f"dp_step-{date}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
