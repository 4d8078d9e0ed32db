"""Write ImageFolders of coloured MNIST digits: a sensitive RGB dataset whose
digits a grayscale public pool (glyphs, Fashion-MNIST) only recognises
through a colour-robust semantic query function (semantic_query.colour).

    python scripts/make_coloured_digits.py OUT [--per-class 400] [--test-per-class 100]
                                               [--size 32] [--seed 0] [--min-contrast 0.3]

writes OUT/train/<digit>/<i>.png (from MNIST train, --per-class images per
digit) and OUT/test/<digit>/<i>.png (from MNIST test), RGB at --size x
--size. Each image gets its own stroke and background colour, drawn
uniformly from the RGB cube and redrawn until their luminances (Rec. 601)
differ by at least --min-contrast of the full range, so the digit is always
visible; about half the images have a darker stroke than background. Every
draw comes from --seed: the same command writes the same files. The data is
generated, never committed. Use it as

    privimage run --set data.sensitive=folder:OUT/train --set data.sensitive_test=folder:OUT/test \\
        --set data.channels=3 --set data.image_size=32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from privimage_core.data.sources import load_source  # noqa: E402 (after sys.path)

LUMA = np.array([0.299, 0.587, 0.114])


def contrasting_colours(n: int, rng: np.random.Generator,
                        min_contrast: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (stroke, background) pairs of RGB colours in [0, 255], float
    [n, 3] each, whose luminances differ by at least ``min_contrast`` * 255."""
    if not 0 <= min_contrast < 0.9:
        raise ValueError(f"min_contrast={min_contrast}; use a value in [0, 0.9)")
    fg, bg = np.empty((n, 3)), np.empty((n, 3))
    todo = np.arange(n)
    while len(todo):
        f, b = rng.uniform(0, 255, (len(todo), 3)), rng.uniform(0, 255, (len(todo), 3))
        ok = np.abs((f - b) @ LUMA) >= min_contrast * 255
        fg[todo[ok]], bg[todo[ok]] = f[ok], b[ok]
        todo = todo[~ok]
    return fg, bg


def colourise(gray: np.ndarray, rng: np.random.Generator,
              min_contrast: float = 0.3) -> np.ndarray:
    """Grayscale digits [N, H, W] or [N, H, W, 1] uint8 (stroke bright) ->
    [N, H, W, 3] uint8: each pixel mixes its image's background and stroke
    colours by its gray level."""
    m = gray.reshape(gray.shape[:3])[..., None].astype(np.float64) / 255.0
    fg, bg = contrasting_colours(len(gray), rng, min_contrast)
    out = bg[:, None, None, :] * (1 - m) + fg[:, None, None, :] * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_split(out: Path, split: str, per_class: int, size: int, seed: int,
                min_contrast: float = 0.3) -> int:
    """One ImageFolder (``out/<digit>/<i>.png``) of ``per_class`` MNIST
    ``split`` images per digit, coloured; returns the number written."""
    from PIL import Image  # lazy: only writing needs Pillow

    ds = load_source("mnist", split, image_size=size, channels=1, max_per_class=per_class,
                     seed=seed)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    rgb = colourise(ds.images, rng, min_contrast)
    for c, name in enumerate(ds.class_names):
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (im, y) in enumerate(zip(rgb, ds.labels)):
        Image.fromarray(im, "RGB").save(out / ds.class_names[y] / f"{i:05d}.png")
    return len(rgb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output directory (gets train/ and test/)")
    ap.add_argument("--per-class", type=int, default=400, help="train images per digit")
    ap.add_argument("--test-per-class", type=int, default=100, help="test images per digit")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-contrast", type=float, default=0.3,
                    help="least luminance difference of stroke and background (0..1 of the range)")
    a = ap.parse_args(argv)
    for split in ("train", "test"):
        d = a.out / split
        if d.exists() and any(d.iterdir()):
            print(f"{d} exists and is not empty; remove it or pick another output directory",
                  file=sys.stderr)
            return 2
    for split, n in (("train", a.per_class), ("test", a.test_per_class)):
        count = write_split(a.out / split, split, n, a.size, a.seed, a.min_contrast)
        print(f"{split}: {count} images in {a.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
