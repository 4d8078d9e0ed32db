"""One DP-SGD logical step of dp_ldm's two DP stages against pixel-space
diffusion (privimage / dpdm), same preset, batch and Opacus set-up as the
pipeline (privimage_core.dp_sgd.finetune, vmap per-sample gradients, K = 1).
The latent step includes the encoder's forward inside the per-example loss.
Medians over repeats, seconds per logical step, on MNIST-shaped inputs.

    .venv/bin/python benchmarks/bench_latent_step.py [--batch 256] [--physical 64]
Writes benchmarks/results/latent_step-<date>.txt.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import time
from pathlib import Path

import torch

from privimage_core.config import from_dict
from privimage_core.dp_sgd.finetune import accumulate_grad_samples, make_private
from privimage_core.models import build_model, get_family
from privimage_core.privacy.ledger import PrivacyLedger

ROWS = (("pixel diffusion (privimage, dpdm)", "privimage", None),
        ("dp_ldm latent model (+ encoder)", "dp_ldm", "latent"),
        ("dp_ldm autoencoder", "dp_ldm", "autoencoder"))


def step_seconds(method: str, part: str | None, preset: str, batch: int, physical: int,
                 repeats: int) -> tuple[float, int]:
    cfg = from_dict({"method": method, "generator": {"preset": preset}})
    fam_name = "latent_diffusion" if method == "dp_ldm" else "diffusion"
    fam = get_family(fam_name)
    model = build_model(cfg, fam_name, 10)
    mod = fam.dp_module(model, part)
    params = sum(p.numel() for p in mod.parameters())
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    led = PrivacyLedger(1e6, 1e-5)
    dp = make_private(mod, torch.optim.Adam(mod.parameters(), lr=1e-3), x, y, batch, 1.0, 1.0,
                      led, grad_sample_mode="vmap")
    obj = fam.dp_objective(model, part)
    times = []
    chunks = list(zip(x.split(physical), y.split(physical)))
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(chunks):  # one logical step, virtual steps as BatchMemoryManager
            dp.optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
            accumulate_grad_samples(dp, obj, xb, yb)
            dp.optimizer.step()
            dp.optimizer.zero_grad(set_to_none=True)
        if r:  # the first is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times), params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--physical", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="tiny,small")
    a = ap.parse_args()
    torch.set_num_threads(2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [f"# dp_ldm DP step vs pixel diffusion, {datetime.date.today()}, commit {commit}, "
             f"torch threads 2, logical batch {a.batch}, physical {a.physical}, vmap, K=1",
             "preset | stage | params (M) | s / logical step | vs pixel"]
    for preset in a.presets.split(","):
        base = None
        for label, method, part in ROWS:
            s, n = step_seconds(method, part, preset, a.batch, a.physical, a.repeats)
            base = base or s
            lines.append(f"{preset} | {label} | {n / 1e6:.2f} | {s:.3f} | {s / base:.2f}x")
            print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / f"latent_step-{datetime.date.today()}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
