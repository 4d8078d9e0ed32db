"""GPU throughput: a DP-SGD step against a non-private step (ghost clipping and
vmap, as benchmarks/bench_dp_step.py measures them on the CPU), sampling and
FID-Inception images per second, and the wall time of the test suite's tiny
end-to-end run (tests/helpers.tiny_config) with ray.use_gpu on.

    python benchmarks/bench_gpu.py                       # CUDA, full sizes
    python benchmarks/bench_gpu.py --device cpu --smoke  # a few images: checks the script
On CUDA at full sizes it writes benchmarks/results/gpu-<date>.txt (or --out
NAME there) and summary.json's gpu_dp_step_ratio (the tiny preset's ghost
step, the pipeline's default); otherwise it only prints. A copy goes to $OUT
when that is set.
The end-to-end row needs the MNIST files the tests read (PRIVIMAGE_DATA_DIR).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(ROOT))
from bench_dp_step import bench_plain, bench_private, time_steps  # noqa: E402
from machine import cpu_name, git_commit  # noqa: E402
from summary_json import update  # noqa: E402

from privimage_core.config import from_dict  # noqa: E402
from privimage_core.errors import MissingWeightsError  # noqa: E402
from privimage_core.evaluation import fid  # noqa: E402
from privimage_core.models import build_model, get_family  # noqa: E402
from privimage_core.synthesize import generate  # noqa: E402

CLASSES = [str(i) for i in range(10)]


def dp_rows(presets, modes, batch, physical, repeats, device) -> list[tuple]:
    """(preset, mode, seconds per logical step, ratio to the non-private step)."""
    torch.manual_seed(0)
    x = (torch.rand(batch, 1, 28, 28) * 2 - 1).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)
    rows = []
    for preset in presets:
        plain = bench_plain(preset, x, y, physical, repeats)
        rows.append((preset, "plain", plain, 1.0))
        for mode in modes:
            t = bench_private(preset, x, y, physical, repeats, mode, 1)
            rows.append((preset, mode, t, t / plain))
    return rows


def sampling_rate(n: int, num_steps: int, batch: int, repeats: int, device) -> float:
    """Images per second of the default generator (tiny diffusion, Euler)."""
    cfg = from_dict({})
    fam = get_family("diffusion")
    release = fam.release_module(build_model(cfg, "diffusion", 10)).to(device).eval()
    t = time_steps(lambda: generate(fam, release, n, CLASSES, num_steps, "euler",
                                    batch_size=batch), repeats, str(device))
    return n / t


def inception_rate(n: int, repeats: int, device) -> float | str:
    """FID-Inception images per second (28x28 grayscale in, resized to 299)."""
    try:
        model = fid.load_fid_inception()
    except MissingWeightsError as e:
        return f"skipped: {e}"
    imgs = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    t = time_steps(lambda: fid.extract_features(imgs, model, device=device, backend="torch"),
                   repeats, str(device))
    return n / t


def e2e_seconds(device) -> float:
    """Driver wall time of the tests' tiny run, GPUs shared out by ray.gpus_per_worker."""
    from services.pipeline import run_pipeline  # lazy: starts Ray; only this row needs it
    from services.ray_runtime import shutdown
    from tests.helpers import tiny_config

    gpu = torch.device(device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(tiny_config(Path(tmp), **{
            "ray.use_gpu": gpu, "ray.gpus_per_worker": 0.5 if gpu else 1.0,
            "ray.sampling_workers": 2}))
        t0 = time.time()
        try:
            run_pipeline(cfg, log=lambda _: None)
        finally:
            shutdown()
        return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default=None, help="file name under benchmarks/results/")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible; run with --device cpu --smoke to check the script")
    s = a.smoke
    batch, physical, repeats = (8, 4, 1) if s else (256, 128, 5)
    presets = ("tiny",) if s else ("tiny", "small")
    n_sample, steps, n_inc = (8, 2, 8) if s else (2000, 18, 2000)
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    date = datetime.date.today().isoformat()
    lines = [f"# GPU benchmark, {date}, commit {git_commit()}",
             f"# device {dev} ({gpu_name}), host CPU {cpu_name()}, torch {torch.__version__}"
             f"{', SMOKE sizes' if s else ''}",
             f"# DP step: logical batch {batch} (28x28x1) in physical batches of {physical}, "
             f"K = 1, median of {repeats}; ratio: to the non-private step",
             "preset  mode   ms/logical step  ratio"]
    rows = dp_rows(presets, ("ghost", "vmap"), batch, physical, repeats, dev)
    lines += [f"{p:<7} {m:<5} {1000 * t:>16.1f}  {r:>5.2f}" for p, m, t, r in rows]
    rate = sampling_rate(n_sample, steps, 500, repeats, dev)
    lines.append(f"sampling: {rate:.1f} images/s ({n_sample} images, tiny preset, "
                 f"{steps} Euler steps, batch 500)")
    inc = inception_rate(n_inc, repeats, dev)
    lines.append(f"FID Inception: {inc:.1f} images/s ({n_inc} images)" if isinstance(inc, float)
                 else f"FID Inception: {inc}")
    if not a.skip_e2e:
        lines.append(f"tiny end-to-end run (ray.sampling_workers 2): {e2e_seconds(dev):.1f} s "
                     "driver wall time")
    text = "\n".join(lines) + "\n"
    print(text)
    name = a.out or f"gpu-{date}{'-smoke' if s else ''}.txt"
    if os.environ.get("OUT"):  # the device machine's output folder
        (Path(os.environ["OUT"]) / name).write_text(text)
    if dev.type == "cuda" and not s:  # smoke sizes and CPUs measure nothing to keep
        (ROOT / "benchmarks" / "results" / name).write_text(text)
        ghost = next(r for p, m, _, r in rows if p == "tiny" and m == "ghost")
        update({"gpu_dp_step_ratio": round(ghost, 3)}, machine=torch.cuda.get_device_name(dev))


if __name__ == "__main__":
    main()
