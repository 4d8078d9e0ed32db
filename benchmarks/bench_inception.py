"""FID Inception throughput on this CPU by batch size and memory format, and
the largest feature difference against the NCHW batch-100 reference (the
setting before 2026-12-03); then each backend of ``extract_features``
(torch, OpenVINO) at its default batch. Appends to
benchmarks/results/inception-<date>.txt.

    .venv/bin/python benchmarks/bench_inception.py --note "idle machine"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import run_summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from privimage_core.evaluation import fid
    model = fid.load_fid_inception()
    x = (np.random.default_rng(0).random((a.images, 28, 28, 1)) * 255).astype(np.uint8)

    @torch.inference_mode()
    def run(bs: int, channels_last: bool) -> tuple[float, np.ndarray]:
        t, out = time.perf_counter(), []
        for i in range(0, len(x), bs):
            inp = fid.preprocess(x[i:i + bs])
            if channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            out.append(model(inp).reshape(len(inp), -1).double().numpy())
        return len(x) / (time.perf_counter() - t), np.concatenate(out)

    run(8, True)  # warm-up (TorchScript profiling runs)
    _, ref = run(100, False)
    rows = ["batch  channels_last  images_per_s  max_abs_diff_vs_nchw100"]
    for bs in (100, 32, 16, 8, 4):
        for cl in (False, True):
            ips, f = run(bs, cl)
            rows.append(f"{bs:>5}  {str(cl):>13}  {ips:>12.2f}  {np.abs(f - ref).max():.2e}")
    from privimage_core.evaluation import inception_openvino as ovi
    backends = ["torch"] + (["openvino"] if ovi.available() else [])
    for backend in backends:
        fid.extract_features(x[:16], model, backend=backend)  # warm-up / compile once
        t = time.perf_counter()
        f = fid.extract_features(x, model, backend=backend)
        ips = len(x) / (time.perf_counter() - t)
        rel = (np.linalg.norm(f - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()
        rows.append(f"# extract_features backend={backend}: {ips:.2f} images/s, max relative "
                    f"feature difference vs nchw100 {rel:.1e}")
    import datetime
    from machine import cpu_name, git_commit
    header = [f"# FID Inception throughput, {datetime.date.today().isoformat()}, commit {git_commit()}",
              f"# machine: {cpu_name()}; {a.images} MNIST-size images upsampled to 299, "
              f"{a.threads} threads"] + ([f"# note: {a.note}"] if a.note else [])
    run_summary.append("inception", header + rows)


if __name__ == "__main__":
    main()
