"""Render a procedural public pool as Parquet shards (the `shards:` layout of
docs/data.md): by default ImageNet's size, 1,281,167 images in 1,000 classes,
32x32 RGB, PNG-encoded.

    python scripts/make_public_pool.py --out /tmp/public-pool [--images 1281167]
        [--classes 1000] [--shards 128] [--size 32] [--seed 0] [--workers 2]

Each class is one combination of a shape (10), a colour palette (10) and a
texture (10), so the classes are learnable; every image draws its own
position, scale, rotation, colour jitter, background gradient and pixel
noise. Labels are spread over the classes as evenly as the counts allow and
shuffled across the shards (as ImageNet's shards are), so a selection of a
few classes touches every shard. The output depends only on the arguments
(each shard is drawn from a generator seeded by (seed, shard)). Rendering
is vectorised with numpy over blocks of 256 images (small enough to stay in
cache); PNG encoding (Pillow) is the rest; ``--workers`` processes write one
shard each.

Writes <out>/shard-00000.parquet ... (columns image, label; the class names
in the schema metadata) and <out>/classes.txt. Refuses a non-empty --out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SHAPES = ("disc", "square", "ring", "triangle", "cross", "diamond", "bar", "frame", "ellipse",
          "twodots")
PALETTES = ("ember", "sea", "moss", "violet", "sun", "ice", "rose", "slate", "lime", "rust")
TEXTURES = ("solid", "hstripe8", "hstripe4", "vstripe8", "vstripe4", "diagonal", "check4",
            "check8", "rings", "speckle")
# fg A, fg B, background (RGB) per palette: distinct hues and brightness
_PAL = np.array([
    [(230, 80, 30), (120, 20, 10), (30, 30, 60)], [(30, 140, 220), (10, 50, 110), (220, 210, 180)],
    [(60, 160, 60), (20, 70, 20), (200, 190, 220)], [(150, 60, 200), (70, 20, 100), (210, 230, 200)],
    [(250, 220, 40), (150, 110, 0), (40, 40, 90)], [(200, 240, 250), (90, 150, 190), (60, 30, 30)],
    [(240, 120, 170), (130, 40, 80), (30, 70, 60)], [(120, 130, 150), (40, 45, 60), (240, 230, 200)],
    [(170, 240, 60), (80, 130, 10), (60, 20, 70)], [(190, 90, 40), (90, 40, 10), (170, 200, 230)],
], np.float32)
ROW_GROUP = 1024
CLASS_NAMES_KEY = b"privimage.class_names"  # as privimage_core.data.folders reads it


def class_names(n: int) -> list[str]:
    """Class c = (shape c % 10, palette c // 10 % 10, texture c // 100)."""
    return [f"{SHAPES[c % 10]}-{PALETTES[c // 10 % 10]}-{TEXTURES[c // 100]}" for c in range(n)]


def all_labels(images: int, classes: int, seed: int) -> np.ndarray:
    """Every image's class: counts as even as possible, shuffled by ``seed``."""
    labels = np.arange(images, dtype=np.int32) % classes
    return np.random.default_rng([seed, 1 << 20]).permutation(labels)


def _mask(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[b,H,W] bool: shape ``k`` in each image's own rotated, scaled frame (u, v)."""
    au, av = np.abs(u), np.abs(v)
    if k == 0:
        return u * u + v * v <= 1
    if k == 1:
        return np.maximum(au, av) <= 0.8
    if k == 2:
        rr = u * u + v * v
        return (rr <= 1) & (rr >= 0.25)
    if k == 3:
        return (v <= 0.7) & (v >= -0.9) & (au <= (0.7 - v) * 0.6)
    if k == 4:
        return ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1))
    if k == 5:
        return au + av <= 1
    if k == 6:
        return (au <= 1) & (av <= 0.3)
    if k == 7:
        box = np.maximum(au, av)
        return (box <= 0.9) & (box >= 0.55)
    if k == 8:
        return u * u + 4 * v * v <= 1
    return (au - 0.5) ** 2 + v * v <= 0.16  # two dots


def _texture(k: int, y, x, cy, cx, ph, rng) -> np.ndarray:
    """[b,H,W] in [0,1]: texture ``k``, the mix between a palette's two
    foreground colours (y, x: [1,H,W] pixel grids; cy, cx, ph: [b,1,1])."""
    wave = lambda coord, period: 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + ph)  # noqa: E731
    check = lambda p: (((y // p) + (x // p)) % 2).astype(np.float32)  # noqa: E731
    b, size = len(ph), y.shape[-1]
    if k == 0:
        return np.zeros((b, size, size), np.float32)
    if k in (1, 2, 3, 4):
        return wave(y if k < 3 else x, 8 if k % 2 else 4)
    if k == 5:
        return wave(x + y, 6)
    if k in (6, 7):
        return np.broadcast_to(check(4 if k == 6 else 8), (b, size, size))
    if k == 8:
        return 0.5 + 0.5 * np.sin(np.sqrt((y - cy) ** 2 + (x - cx) ** 2) * 1.25 + ph)
    return (rng.random((b, size, size)) < 0.5).astype(np.float32)


def render(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 [B, size, size, 3]: one image per label, vectorised over the block."""
    b = len(labels)
    shape, pal, tex = labels % 10, labels // 10 % 10, labels // 100
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r = rng.uniform(0.16, 0.34, b).astype(np.float32) * size
    cy = rng.uniform(0, 1, b).astype(np.float32) * (size - 1.2 * r) + 0.6 * r
    cx = rng.uniform(0, 1, b).astype(np.float32) * (size - 1.2 * r) + 0.6 * r
    th = rng.uniform(0, 2 * np.pi, b).astype(np.float32)
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    c, s = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
    u, v = (dx * c + dy * s) / r[:, None, None], (-dx * s + dy * c) / r[:, None, None]
    mask = np.zeros((b, size, size, 1), bool)
    mix = np.zeros((b, size, size, 1), np.float32)
    ph = rng.uniform(0, 2 * np.pi, (b, 1, 1)).astype(np.float32)
    for k in range(10):  # each kind computed on its own images only
        i = np.flatnonzero(shape == k)
        mask[i, ..., 0] = _mask(k, u[i], v[i])
        j = np.flatnonzero(tex == k)
        mix[j, ..., 0] = _texture(k, yy[None], xx[None], cy[j, None, None], cx[j, None, None],
                                  ph[j], rng)
    jitter = lambda: rng.normal(0, 12, (b, 1, 1, 3)).astype(np.float32)  # noqa: E731
    a = _PAL[pal, 0][:, None, None] + jitter()
    bb = _PAL[pal, 1][:, None, None] + jitter()
    grad = (yy[None] * rng.normal(0, 1.5, (b, 1, 1)) + xx[None] * rng.normal(0, 1.5, (b, 1, 1)))
    bg = _PAL[pal, 2][:, None, None] + jitter() + grad[..., None].astype(np.float32)
    fg = a * (1 - mix) + bb * mix
    img = np.where(mask, fg, bg) + rng.normal(0, 10, (b, size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def write_shard(out: str, shard: int, labels: np.ndarray, seed: int, size: int,
                names: list[str], block: int = 256) -> tuple[int, int]:
    """Render, encode and write one shard; (images, bytes) written."""
    rng = np.random.default_rng([seed, shard])
    blobs: list[bytes] = []
    for i in range(0, len(labels), block):
        blobs += [_png(im) for im in render(labels[i:i + block], rng, size)]
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(labels, pa.int32())})
    table = table.replace_schema_metadata({CLASS_NAMES_KEY: json.dumps(names).encode()})
    path = Path(out) / f"shard-{shard:05d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP, compression="none")
    tmp.rename(path)  # a reader never sees half a shard
    return len(labels), path.stat().st_size


def make_pool(out: str | os.PathLike, images: int = 1_281_167, classes: int = 1000,
              shards: int = 128, size: int = 32, seed: int = 0, workers: int = 2) -> dict:
    out = Path(out)
    if not 1 <= classes <= 1000:
        raise SystemExit(f"--classes must be in [1, 1000] (10 shapes x 10 palettes x 10 "
                         f"textures), got {classes}")
    if images < classes or shards < 1:
        raise SystemExit("--images must be >= --classes and --shards >= 1")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    names = class_names(classes)
    labels = all_labels(images, classes, seed)
    bounds = np.linspace(0, images, min(shards, images) + 1).astype(np.int64)
    t0 = time.time()
    jobs = [(str(out), i, labels[a:b], seed, size, names) for i, (a, b) in
            enumerate(zip(bounds[:-1], bounds[1:]))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(write_shard, *zip(*jobs)))
    else:
        done = [write_shard(*j) for j in jobs]
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    return {"images": sum(n for n, _ in done), "classes": classes, "shards": len(jobs),
            "bytes": sum(b for _, b in done), "seconds": round(time.time() - t0, 1),
            "workers": workers}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    info = make_pool(a.out, a.images, a.classes, a.shards, a.size, a.seed, a.workers)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
