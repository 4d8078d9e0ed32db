"""CPU cost of the EDM generator presets: what the quickstart budget is built on.

For each preset at 28x28x1, 10 classes:
- parameters and forward MACs per image;
- non-private training step (forward + backward + Adam), batch 64, ms/sample;
- Opacus DP-SGD step (make_private, grad_sample_mode="hooks", Poisson
  sampling off so every batch is exactly 64, max_grad_norm 1, noise 1:
  forward + backward with per-sample gradients + clip + noise + Adam), ms/sample,
  and its ratio to the non-private step;
- sampling throughput (images/s) at num_steps=18 for Euler (18 network
  evaluations) and Heun (35), batch 500: measured as the median time of one
  batch-500 network evaluation under inference mode times the evaluation
  count; for tiny it is also checked end to end with ``sample``.
Also the tiny preset's pre-training step at batch 128 (the quickstart's).

Medians over repeats, 2 threads by default (``--threads 2 1`` adds a
1-thread table). The machine is shared: the load average at start and end is
recorded; numbers under load are pessimistic, for 2 threads much more so
(with the default spinning OpenMP waits, one descheduled thread stalls the
other at every parallel region).

    python benchmarks/bench_generator.py [--presets tiny small base] [--repeats 5] [--threads 2 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from privimage_core.models.diffusion.edm import EDMPrecond, edm_loss, sample, sample_training_noise  # noqa: E402
from privimage_core.models.diffusion.unet import build_unet  # noqa: E402

SIZE, CH, NCLS, BATCH, SAMPLE_BATCH = 28, 1, 10, 64, 500


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _macs(net: torch.nn.Module) -> int:
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += out[0].numel() * mod.in_channels * k // mod.groups
        elif isinstance(mod, torch.nn.Linear):
            total[0] += mod.in_features * mod.out_features

    hs = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.no_grad():
        net(torch.zeros(1, CH, SIZE, SIZE), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    for h in hs:
        h.remove()
    return total[0]


def _batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, CH, SIZE, SIZE, generator=g) * 2 - 1
    y = torch.randint(0, NCLS, (n,), generator=g)
    return x, y


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_train(preset: str, repeats: int, batch: int = BATCH) -> float:
    torch.manual_seed(0)
    pre = EDMPrecond(build_unet(preset, SIZE, CH, NCLS))
    opt = torch.optim.Adam(pre.parameters(), 1e-4)
    x, y = _batch(batch)
    g = torch.Generator().manual_seed(1)

    def step():
        sigma, noise = sample_training_noise(x, generator=g)
        loss = edm_loss(pre, x, y, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _median_time(step, repeats) / batch


def bench_dp(preset: str, repeats: int) -> float:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    pre = EDMPrecond(build_unet(preset, SIZE, CH, NCLS))
    opt = torch.optim.Adam(pre.parameters(), 1e-4)
    x, y = _batch(BATCH * 4)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, dp_opt, dp_loader = PrivacyEngine(accountant="rdp").make_private(
            module=pre, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
    xb, yb = next(iter(dp_loader))
    assert len(xb) == BATCH
    g = torch.Generator().manual_seed(1)

    def step():
        sigma, noise = sample_training_noise(xb, generator=g)
        loss = edm_loss(model, xb, yb, sigma, noise).mean()
        loss.backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's full-backward-hook notice
        return _median_time(step, repeats) / BATCH


def bench_eval(preset: str, repeats: int, warmup: int = 1) -> float:
    """Seconds per batch-500 network evaluation (inference mode)."""
    torch.manual_seed(0)
    pre = EDMPrecond(build_unet(preset, SIZE, CH, NCLS)).eval()
    for p in pre.parameters():  # like a trained net: no exactly-zero (zero-init) layers
        p.data.add_(torch.randn_like(p) * 1e-3)
    x, y = _batch(SAMPLE_BATCH)
    sigma = torch.full((SAMPLE_BATCH,), 1.0)

    def fwd():
        with torch.inference_mode():
            pre(x, sigma, y)

    return _median_time(fwd, repeats, warmup)


def bench_sample_end_to_end(preset: str, solver: str) -> float:
    torch.manual_seed(0)
    pre = EDMPrecond(build_unet(preset, SIZE, CH, NCLS))
    labels = torch.arange(SAMPLE_BATCH) % NCLS
    t = time.perf_counter()
    sample(pre, labels, num_steps=18, seed=0, batch_size=SAMPLE_BATCH, solver=solver)
    return SAMPLE_BATCH / (time.perf_counter() - t)


def run_table(presets: list[str], repeats: int, threads: int, log) -> list[str]:
    torch.set_num_threads(threads)
    rows, extra = [], []
    for preset in presets:
        # fewer repeats for the bigger models: the whole run stays within minutes
        reps = {"tiny": repeats, "small": max(2, repeats - 2)}.get(preset, 2)
        net = build_unet(preset, SIZE, CH, NCLS)
        params, macs = sum(p.numel() for p in net.parameters()), _macs(net)
        tr = bench_train(preset, reps)
        dp = bench_dp(preset, reps)
        ev = bench_eval(preset, 2, warmup=1 if preset != "base" else 0)
        rows.append((preset, params, macs, tr, dp, SAMPLE_BATCH / (18 * ev),
                     SAMPLE_BATCH / (35 * ev)))
        log(f"{threads} threads, {preset}: done")
        if preset == "tiny":
            extra.append(f"tiny pre-training step, batch 128: "
                         f"{bench_train('tiny', reps, batch=128) * 128:.2f} s/step")
            extra.append(f"tiny end-to-end sample() 500 images, 18 Euler steps: "
                         f"{bench_sample_end_to_end('tiny', 'euler'):.1f} img/s")
    lines = [
        f"## {threads} thread(s)",
        "",
        "| preset | params | fwd MMAC/img | train ms/sample | DP (hooks) ms/sample | DP/train "
        "| sample img/s euler-18 | sample img/s heun-18 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, params, macs, tr, dp, euler, heun in rows:
        lines.append(f"| {preset} | {params / 1e6:.3f}M | {macs / 1e6:.1f} | {tr * 1e3:.2f} | "
                     f"{dp * 1e3:.2f} | {dp / tr:.2f} | {euler:.1f} | {heun:.1f} |")
    return lines + [""] + extra + [""]


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="one table per thread count (e.g. --threads 2 1)")
    ap.add_argument("--out", default=None, help="results file (appended to)")
    args = ap.parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()

    def log(msg):
        print(f"[{time.time() - t0:.0f} s] {msg}", file=sys.stderr, flush=True)

    lines = [
        f"# EDM generator cost, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"# machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        f"# shared machine: load average at start {load0[0]:.2f} (1 min); other processes "
        "may have used the CPU, which slows multi-threaded runs the most",
        "# image 28x28x1, 10 classes; train/DP batch 64; sampling batch 500, num_steps=18",
        "# medians; sampling img/s = 500 / (evaluations x median batch-500 evaluation time)",
        "",
    ]
    for th in args.threads:
        lines += run_table(args.presets, args.repeats, th, log)
    load1 = os.getloadavg()
    lines.append(f"# load average at end {load1[0]:.2f} (1 min); total {time.time() - t0:.0f} s")
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                            f"generator-{time.strftime('%Y-%m-%d')}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    # append: on a shared machine one day's runs differ with the load; keep them all
    sep = "\n" if out.exists() and out.stat().st_size else ""
    with out.open("a") as f:
        f.write(sep + text)
    print(text)
    return out


if __name__ == "__main__":
    main()
