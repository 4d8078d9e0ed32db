"""A deterministic public glyph dataset rendered from the installed fonts.

Characters 0-9A-Za-z drawn in every usable font give a public pool that needs
no download. Each image is framed like MNIST (glyph fit in a 20x20 box,
centred in 28x28 by centre of mass, white on black) so a model pre-trained on
it transfers to handwritten-digit-like sensitive data.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from privimage_core.data.idx import data_dir
from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError

DIGITS = string.digits
UPPER = string.ascii_uppercase
LOWER = string.ascii_lowercase
ALL_CHARS = DIGITS + UPPER + LOWER
FONT_DIRS = ("/usr/share/fonts",)
FONT_EXTS = (".ttf", ".otf", ".ttc")  # Type 1 copies (.pfb) duplicate the urw-base35 OTFs
# Fonts whose cmap maps Latin letters to pictures, keycaps or decorated initials:
# their glyphs would be label noise.
# "symbol" and "dingbat" also inside CamelCase names (OpenSymbol, ZapfDingbats).
_EXCLUDE_NAMES = re.compile(r"(symbol|dingbat)|\b(keyboard|initials|ornaments?|emoji|icons?)\b", re.I)
_GENERIC_GLYPH = re.compile(r"^(glyph|gid|cid|g|index)\d+$")
_DIGIT_NAMES = "zero one two three four five six seven eight nine".split()
RENDER_PX = 64          # draw large, then downsample: anti-aliased strokes like MNIST's
RENDER_VERSION = 1      # bump when rendering changes so npz caches are not reused
NO_FONTS_FIX = ("run `apt-get install fonts-dejavu-core fonts-liberation fonts-urw-base35` "
                "or `bash scripts/setup.sh`")
_DISCOVERED: dict[str, list[str]] = {}
last_render_stats: dict = {}  # renders/sec of the latest render_glyphs call (benchmarks read it)


def _font_files(dirs: Sequence[str]) -> list[str]:
    out = set()
    for d in dirs:
        for base, _, files in os.walk(d):
            out.update(os.path.realpath(os.path.join(base, f)) for f in files
                       if f.lower().endswith(FONT_EXTS))
    return sorted(out)


def _have_fonttools() -> bool:
    try:
        # lazy: fontTools is needed only when glyphs are rendered; this probes for it
        import fontTools.ttLib  # noqa: F401
    except ImportError:
        return False
    return True


def _names_match(font_path: str, chars: str) -> bool:
    """True unless the cmap sends a char to a glyph named for another char
    (Standard Symbols maps 'A' to 'Alpha', D050000L maps it to a dingbat).
    Needs fontTools (in requirements.txt, also a matplotlib dependency);
    without it the check passes and such fonts get in as label noise."""
    if not _have_fonttools():
        return True
    # lazy: fontTools is needed only when glyphs are rendered
    from fontTools.ttLib import TTFont
    try:
        cmap = TTFont(font_path, lazy=True, fontNumber=0).getBestCmap() or {}
    except Exception:  # unreadable cmap: its letters cannot be checked, leave it out
        return False
    for c in chars:
        name = cmap.get(ord(c))
        if name is None:
            return False
        want = _DIGIT_NAMES[int(c)] if c in DIGITS else c
        base = name.split(".")[0]
        if base not in (want, f"uni{ord(c):04X}", f"u{ord(c):04X}") and not _GENERIC_GLYPH.match(name):
            return False
    return True


def _renders_all(font_path: str, chars: str) -> tuple[str, str] | None:
    """(family, style) if PIL draws every char as a non-empty, non-.notdef glyph."""
    try:
        font = ImageFont.truetype(font_path, 32)
        family, style = font.getname()
    except OSError:
        return None
    if _EXCLUDE_NAMES.search(f"{family} {style}") or _EXCLUDE_NAMES.search(os.path.basename(font_path)):
        return None
    notdef = font.getmask("\ue000")  # a private-use codepoint no text font maps
    notdef_key = (notdef.size, bytes(notdef))
    for c in chars:
        m = font.getmask(c)
        if m.getbbox() is None or (m.size, bytes(m)) == notdef_key:
            return None
    return family, style


def discover_fonts(dirs: Sequence[str] = FONT_DIRS, chars: str = ALL_CHARS,
                   cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Sorted paths of fonts that render every char in ``chars``.

    One file per (family, style) is kept. The result is cached in memory and in
    ``cache_dir`` (default: the data dir), keyed by the font files' sizes and
    mtimes, because checking ~200 fonts takes a few seconds.
    """
    files = _font_files(dirs)
    stamp = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    # The key names the filter too: a list scanned without fontTools (no glyph
    # name check) must not be reused by a process that has it, nor the reverse.
    key = hashlib.sha256(json.dumps([RENDER_VERSION, chars, stamp, _have_fonttools()])
                         .encode()).hexdigest()[:16]
    if key in _DISCOVERED:
        return list(_DISCOVERED[key])
    cache_file = Path(cache_dir or data_dir()) / f"fonts-{key}.json"
    try:
        fonts = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        seen, fonts = set(), []
        for p in files:
            name = _renders_all(p, chars)
            if name is None or name in seen or not _names_match(p, chars):
                continue
            seen.add(name)
            fonts.append(p)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(fonts))
        except OSError:
            pass  # a read-only data dir only costs the rescan
    _DISCOVERED[key] = fonts
    return list(fonts)


def select_fonts(fonts: Sequence[str], max_fonts: int | None) -> list[str]:
    """Deterministic spread over families: take the first font of evenly spaced
    (sorted) families, then second fonts, ..., so few fonts still vary in style."""
    fonts = sorted(fonts)
    if max_fonts is None or max_fonts >= len(fonts):
        return fonts
    if max_fonts < 1:
        raise DataError(f"glyphs: max_fonts={max_fonts}; use a positive number or null for all fonts")
    families: dict[str, list[str]] = defaultdict(list)
    for p in fonts:
        families[ImageFont.truetype(p, 8).getname()[0]].append(p)
    ordered = [families[f] for f in sorted(families)]
    chosen: list[str] = []
    for rnd in range(max(len(v) for v in ordered)):
        layer = [v[rnd] for v in ordered if rnd < len(v)]
        k = min(len(layer), max_fonts - len(chosen))
        chosen += [layer[i * len(layer) // k] for i in range(k)]
        if len(chosen) == max_fonts:
            break
    return sorted(chosen)


def _draw(font: ImageFont.FreeTypeFont, ch: str) -> Image.Image:
    left, top, right, bottom = font.getbbox(ch)
    img = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(img).text((4 - left, 4 - top), ch, fill=255, font=font)
    return img.crop(img.getbbox())


def _augment_hi(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Stroke width, rotation and shear at render resolution (draws a fixed
    number of values so the stream stays aligned whatever branch is taken)."""
    stroke, angle, shear = rng.random(), rng.uniform(-10, 10), rng.uniform(-0.25, 0.25)
    if stroke < 0.25:
        img = img.filter(ImageFilter.MaxFilter(5))
    elif stroke < 0.4:
        thin = img.filter(ImageFilter.MinFilter(3))
        img = thin if thin.getbbox() else img  # hairline fonts would vanish
    w, h = img.size
    a = np.deg2rad(angle)
    fwd = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, shear], [0, 1]])
    corners = fwd @ np.array([[0, w, 0, w], [0, 0, h, h]], dtype=float)
    lo, hi = corners.min(1), corners.max(1)
    inv = np.linalg.inv(fwd)
    off = inv @ lo  # output pixel (0,0) maps to input inv @ lo
    size = (int(np.ceil(hi[0] - lo[0])) + 1, int(np.ceil(hi[1] - lo[1])) + 1)
    img = img.transform(size, Image.Transform.AFFINE,
                        (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                        resample=Image.Resampling.BICUBIC)
    return img.crop(img.getbbox()) if img.getbbox() else img


def _frame(glyph: Image.Image, size: int, scale: float) -> np.ndarray:
    """Fit into a (20/28*size)-box preserving aspect ratio; centre by mass."""
    box = min(size - 2, size * 20 / 28 * scale)
    w, h = glyph.size
    f = box / max(w, h)
    small = glyph.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.float32)
    ys, xs = np.indices(arr.shape)
    mass = arr.sum() or 1.0
    cy, cx = (ys * arr).sum() / mass, (xs * arr).sum() / mass
    # Keep a 1-pixel margin (box <= size-2 allows it) so skewed glyphs stay whole.
    top = int(np.clip(round(size / 2 - 0.5 - cy), 1, size - 1 - arr.shape[0]))
    left = int(np.clip(round(size / 2 - 0.5 - cx), 1, size - 1 - arr.shape[1]))
    out = np.zeros((size, size), np.float32)
    out[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
    return out


def _render_one(base: Image.Image, size: int, augment: bool, rng: np.random.Generator) -> np.ndarray:
    if not augment:
        return np.clip(np.rint(_frame(base, size, 1.0)), 0, 255).astype(np.uint8)
    img = _augment_hi(base, rng)
    scale, blur, radius = rng.uniform(0.85, 1.1), rng.random(), rng.uniform(0.3, 0.7)
    out = Image.fromarray(np.clip(np.rint(_frame(img, size, scale)), 0, 255).astype(np.uint8))
    if blur < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(out, dtype=np.uint8)


def _cache_key(chars, fonts, per_font, size, seed, augment) -> str:
    ident = [RENDER_VERSION, chars, per_font, size, seed, bool(augment),
             [(os.path.basename(p), os.path.getsize(p)) for p in fonts]]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]


def render_glyphs(chars: str = ALL_CHARS, max_fonts: int | None = None, per_font: int = 1,
                  size: int = 28, seed: int = 0, augment: bool = True,
                  cache_dir: str | os.PathLike | None = None,
                  fonts: Sequence[str] | None = None,
                  font_dirs: Sequence[str] = FONT_DIRS) -> ImageSet:
    """Render ``per_font`` copies of each char in each selected font.

    Classes are the chars themselves, in ``chars`` order. Augmentation of
    (font, copy, char) draws from a Generator seeded by (seed, crc32 of the font
    file name, copy, codepoint), so output is byte-identical across runs and
    does not shift when other fonts are added or removed.
    """
    if not chars or len(set(chars)) != len(chars):
        raise DataError(f"glyphs: chars {chars!r} must be non-empty and without repeats; "
                        "pass e.g. '0123456789'")
    if per_font < 1 or size < 8:
        raise DataError(f"glyphs: per_font={per_font}, size={size}; use per_font >= 1 and size >= 8")
    available = list(fonts) if fonts is not None else discover_fonts(font_dirs, chars)
    if not available:
        raise DataError(f"glyphs: no usable fonts (ttf/otf covering {chars[:12]}...) under "
                        f"{', '.join(font_dirs)}; {NO_FONTS_FIX}")
    chosen = select_fonts(available, max_fonts)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"glyphs-{_cache_key(chars, chosen, per_font, size, seed, augment)}.npz"
        if cache_file.is_file():
            z = np.load(cache_file)
            return ImageSet(z["images"], z["labels"], list(chars), "glyphs",
                            {"fonts": [os.path.basename(p) for p in chosen]})

    t0 = time.perf_counter()
    images = np.zeros((len(chosen) * per_font * len(chars), size, size, 1), np.uint8)
    labels = np.tile(np.arange(len(chars), dtype=np.int64), len(chosen) * per_font)
    i = 0
    for path in chosen:
        font = ImageFont.truetype(path, RENDER_PX)
        bases = [_draw(font, c) for c in chars]
        fkey = zlib.crc32(os.path.basename(path).encode())
        for copy in range(per_font):
            for c, base in zip(chars, bases):
                rng = np.random.default_rng([seed, fkey, copy, ord(c)])
                images[i, :, :, 0] = _render_one(base, size, augment, rng)
                i += 1
    elapsed = time.perf_counter() - t0
    last_render_stats.update(renders=i, seconds=elapsed, renders_per_sec=i / max(elapsed, 1e-9))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache_file)  # atomic: concurrent workers never read half a file
    return ImageSet(images, labels, list(chars), "glyphs",
                    {"fonts": [os.path.basename(p) for p in chosen]})
