"""The public side at ImageNet's scale, on Ray Data: index build, selection,
reading the selected images and the image stream with 1 and 2 read workers,
the query function's training from the stream on Ray Train (local mode, 1
and 2 workers), and the peak RSS of every process (the driver must stay
under 2 GB).

    .venv/bin/python benchmarks/bench_public_scale.py [--pool /tmp/public-pool-full]
        [--images 1281167 --classes 1000] [--workers 1,2] [--stream-images 200000]
        [--train-images 12800] [--out FILE] [--no-summary]

A --pool directory that does not exist is rendered first by
scripts/make_public_pool.py with --images / --classes (timed apart). Writes
benchmarks/results/public-scale-<date>.txt (or --out) and, for the full pool
(1,281,167 x 1,000), the public_* keys of summary.json, with the load
average at the start and the end beside them: on a machine shared with other
work the timings include that contention, and both places say so. A reduced
pool or --no-summary writes the result file only.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from privimage_core.config import RayConfig, SemanticQueryConfig
from privimage_core.data.shards import open_streamed
from privimage_core.selection.public_index import PublicIndex
from services.public_data import index_parts, iter_images, read_images
from services.public_query import train_query_stream
from services.ray_runtime import ensure_ray, shutdown

from machine import cpu_name, git_commit
from summary_json import update

ROOT = Path(__file__).resolve().parents[1]
FULL = (1_281_167, 1000)
GB = 1024 ** 3


class PeakRSS:
    """Peak RSS of this process and of every descendant (the local Ray's
    servers and workers), sampled every ``period`` seconds; Ray names its
    workers by the task they run (their process title)."""

    def __init__(self, period: float = 0.2):
        self.period, self.peak, self.title = period, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for p in [me] + me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    title = " ".join(p.cmdline())[:60] if p is not me else "driver"
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
                if "IDLE" not in title or p.pid not in self.title:
                    self.title[p.pid] = title
            self._stop.wait(self.period)

    def table(self) -> list[tuple[str, int, float]]:
        rows = [(self.title[p], p, v / GB) for p, v in self.peak.items()]
        return sorted(rows, key=lambda r: -r[2])


def _pool(path: Path, images: int, classes: int, log) -> dict:
    if path.is_dir():
        return {}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_public_pool.py"),
                          "--out", str(path), "--images", str(images), "--classes", str(classes)],
                         check=True, capture_output=True, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    log(f"rendered the pool: {json.dumps(info)}")
    return info


def _index(src, workers: int, work: Path) -> tuple[PublicIndex, dict]:
    cache = work / f"parts-{workers}"
    t0 = time.perf_counter()
    parts, stats = index_parts([src], str(cache), workers)
    t1 = time.perf_counter()
    idx = PublicIndex.build_sources(None, parts, work / f"index-{workers}", cache, (32, 32, 3))
    t2 = time.perf_counter()
    return idx, {"parts_seconds": t1 - t0, "table_seconds": t2 - t1, "seconds": t2 - t0,
                 "reused": stats["reused"], "shards": stats["shards"]}


def _stream_rate(index: PublicIndex, n: int, workers: int) -> float:
    rows = np.sort(np.random.default_rng(1).choice(index.num_rows, min(n, index.num_rows),
                                                   replace=False))
    table = index.table.take(rows)
    t0, seen = time.perf_counter(), 0
    for images, _, _ in iter_images(index, table, workers, 256, shuffle_seed=0):
        seen += len(images)
    return seen / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default="/tmp/public-pool-full")
    ap.add_argument("--images", type=int, default=FULL[0])
    ap.add_argument("--classes", type=int, default=FULL[1])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--stream-images", type=int, default=200_000)
    ap.add_argument("--train-images", type=int, default=12_800)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-summary", action="store_true")
    a = ap.parse_args(argv)
    lines: list[str] = []

    def log(s: str, rss_now: bool = True) -> None:
        if rss_now:
            s += f"  [driver RSS now {psutil.Process().memory_info().rss / GB:.2f} GB]"
        print(s, flush=True)
        lines.append(s)

    load0 = os.getloadavg()
    log(f"date {datetime.date.today().isoformat()}  machine {cpu_name()}  commit {git_commit()}  "
        f"cores {os.cpu_count()}  load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    pool = Path(a.pool)
    made = _pool(pool, a.images, a.classes, log)
    src = open_streamed(f"shards:{pool}")
    disk = sum(f.stat().st_size for f in pool.glob("*.parquet"))
    log(f"pool {pool}: {len(src.shards)} shards, {len(src.class_names)} classes, "
        f"{disk / GB:.2f} GiB")
    workers = [int(w) for w in a.workers.split(",")]
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-public-"))
    res: dict = {}
    ensure_ray(RayConfig(), num_cpus=os.cpu_count())
    try:
        # warm-up: Ray Data's first job starts its workers and imports the
        # project there; the timed runs below should not pay for that
        few = dataclasses.replace(src, shards=src.shards[:4])
        index_parts([few], str(work / "warmup"), max(workers))
        with PeakRSS() as rss:
            for w in workers:
                idx, st = _index(src, w, work)
                res[f"index_{w}"] = st
                log(f"index build, {w} worker(s), cold: {st['seconds']:.1f} s (parts "
                    f"{st['parts_seconds']:.1f} s, table {st['table_seconds']:.1f} s), "
                    f"{idx.num_rows / st['seconds']:.0f} images/s")
            shutil.rmtree(idx.directory)
            idx, st = _index(src, workers[-1], work)
            log(f"index build again, every shard's part reused ({st['reused']}/{st['shards']}): "
                f"{st['seconds']:.1f} s")
            t0 = time.perf_counter()
            idx = PublicIndex.open(idx.directory)
            log(f"open the index ({idx.num_rows} rows): {time.perf_counter() - t0:.2f} s")
            n_sel = max(1, len(idx.label_names) // 100)
            ids = np.random.default_rng(0).choice(len(idx.label_names), n_sel, replace=False)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                sel = idx.select(ids.tolist())
                times.append(time.perf_counter() - t0)
            res["select"] = statistics.median(times)
            log(f"select {n_sel} of {len(idx.label_names)} semantics: {sel.num_rows} rows in "
                f"{res['select']:.3f} s (median of 5)")
            for w in workers:
                t0 = time.perf_counter()
                images = read_images(idx, sel.sort_by("id"), w)
                res[f"read_{w}"] = time.perf_counter() - t0
                log(f"read the {len(images)} selected images, {w} worker(s): "
                    f"{res[f'read_{w}']:.1f} s")
                del images
            for w in workers:
                res[f"stream_{w}"] = _stream_rate(idx, a.stream_images, w)
                log(f"image stream (decode only), {w} worker(s): {res[f'stream_{w}']:.0f} images/s")
            for w in [0] + workers:
                q = SemanticQueryConfig(epochs=1, max_images_per_epoch=a.train_images,
                                        val_fraction=1000 / idx.num_rows, train_workers=w)
                _, m = train_query_stream(idx, q, seed=0, workers=1, storage=work / "train")
                res[f"train_{w}"] = m["train_images_per_second"]
                how = (f"{m['train_workers']} Ray Train worker(s)" if m["train_workers"] else
                       "Ray Train's local mode (this process)")
                log(f"query function (small_resnet width {q.width}) from the stream, {how}, "
                    f"1 read task: {m['train_images_per_second']:.0f} images/s over "
                    f"{m['train_images']} images")
    finally:
        shutdown()
        shutil.rmtree(work, ignore_errors=True)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    log(f"peak RSS, driver (getrusage): {driver:.2f} GB ({'under' if driver < 2 else 'OVER'} "
        "the 2 GB the driver must stay under)")
    log("peak RSS of every process (sampled every 0.2 s), GB:")
    for title, pid, gb in rss.table():
        log(f"  {gb:6.2f}  pid {pid:<7} {title}", rss_now=False)
    load1 = os.getloadavg()
    log(f"load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if max(load0[0], load1[0]) >= 0.5:
        log(f"the machine was not idle: other work shared its {os.cpu_count()} cores (1-minute "
            "load above); every timing above includes that contention", rss_now=False)
    full = (idx.num_rows, len(idx.label_names)) == FULL
    out = Path(a.out) if a.out else (ROOT / "benchmarks" / "results" /
                                     f"public-scale-{datetime.date.today().isoformat()}.txt")
    out.write_text("\n".join(lines + [f"pool rendered: {json.dumps(made)}" if made else ""]) + "\n")
    if a.no_summary or not full:
        print(f"wrote {out}; summary.json untouched (reduced pool or --no-summary)")
        return 0
    w1, w2 = workers[0], workers[-1]
    update({"public_scale_images": idx.num_rows,
            "public_scale_load_average": [round(load0[0], 2), round(load1[0], 2)],
            "public_index_seconds": round(res[f"index_{w2}"]["seconds"], 1),
            "public_index_images_per_second": round(idx.num_rows / res[f"index_{w2}"]["seconds"]),
            "public_index_peak_rss_gb": round(driver, 2),
            "public_max_process_peak_rss_gb": round(max(g for _, _, g in rss.table()), 2),
            "public_selection_seconds": round(res["select"], 3),
            "public_selected_read_seconds": round(res[f"read_{w2}"], 1),
            "public_stream_images_per_second_1_worker": round(res[f"stream_{w1}"]),
            "public_stream_images_per_second_2_workers": round(res[f"stream_{w2}"]),
            "public_query_train_images_per_second_1_worker": round(res[f"train_{w1}"]),
            "public_query_train_images_per_second_2_workers": round(res[f"train_{w2}"])})
    print(f"wrote {out} and summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
