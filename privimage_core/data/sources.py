"""Named data sources and the concatenated public pool.

A source spec is a string from the config: "mnist", "fashion_mnist",
"glyphs", "folder:<path>" or "parquet:<path>"; the public pool also takes
"shards:<dir>", which data/shards.py reads shard by shard (as it does a
public folder:), never through this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from privimage_core.data.folders import UNKNOWN_LABELS, load_image_folder, load_parquet_images
from privimage_core.data.glyphs import render_glyphs
from privimage_core.data.idx import load_fashion_mnist, load_mnist
from privimage_core.data.imageset import ImageSet
from privimage_core.data.provenance import lineage
from privimage_core.data.shards import open_streamed
from privimage_core.data.specs import is_streamed, parse_or_raise, same_dataset, source_prefix
from privimage_core.errors import DataError

_GLYPH_OPTS = {"chars", "max_fonts", "per_font", "augment", "cache_dir", "fonts", "font_dirs"}
_IDX_OPTS = {"root", "allow_download"}
_USER_OPTS = {"resize", "image_column", "label_column"}


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """[N,H,W,C] uint8 -> [N,S,S,C] with PIL bilinear (deterministic)."""
    if images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, images.shape[3]), np.uint8)
    for i, im in enumerate(images):
        for c in range(images.shape[3]):
            out[i, :, :, c] = np.asarray(Image.fromarray(im[:, :, c]).resize(
                (image_size, image_size), Image.Resampling.BILINEAR))
    return out


def convert_channels(images: np.ndarray, channels: int, name: str = "dataset") -> np.ndarray:
    """Grayscale -> RGB by repeating; RGB -> grayscale with PIL's 'L' weights."""
    have = images.shape[3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=3)
    if have == 3 and channels == 1:
        w = np.array([299, 587, 114], np.uint32)
        return ((images.astype(np.uint32) @ w + 500) // 1000).astype(np.uint8)[..., None]
    raise DataError(f"{name}: cannot convert {have} channels to {channels}; set channels to 1 or 3")


def subsample_per_class(ds: ImageSet, max_per_class: int | None, seed: int = 0) -> ImageSet:
    """At most ``max_per_class`` images of each class, drawn by a Generator seeded
    by (seed, class), kept in original order."""
    if max_per_class is None:
        return ds
    if max_per_class < 1:
        raise DataError(f"{ds.name}: max_per_class={max_per_class}; use a positive number or null")
    keep = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) > max_per_class:
            idx = np.sort(np.random.default_rng([seed, c]).choice(idx, max_per_class, replace=False))
        keep.append(idx)
    return ds.subset(np.sort(np.concatenate(keep)) if keep else np.array([], np.int64))


def _pick(opts: dict, allowed: set, spec: str) -> dict:
    unknown = set(opts) - _GLYPH_OPTS - _IDX_OPTS - _USER_OPTS
    if unknown:
        raise DataError(f"source {spec!r}: unknown option(s) {sorted(unknown)}; "
                        f"allowed: {sorted(_GLYPH_OPTS | _IDX_OPTS | _USER_OPTS)}")
    return {k: v for k, v in opts.items() if k in allowed}


def load_source(spec: str, split: str = "train", image_size: int = 28, channels: int = 1,
                max_per_class: int | None = None, seed: int = 0,
                class_names: list[str] | None = None, **opts) -> ImageSet:
    """Load one source at ``image_size`` x ``image_size`` x ``channels``.

    Glyphs have no split (the same fonts serve any split) and are rendered
    directly at ``image_size``; user folders/Parquet files are used as given.
    ``class_names`` (``data.class_names``) declares a user source's classes;
    built-in sources have fixed ones, which it may only repeat.
    """
    kind, arg = parse_or_raise(spec)
    if kind == "shards":
        raise DataError(f"{spec}: shards:<dir> is a data.public source, read shard by shard "
                        "(data/shards.py); list it in data.public, or use parquet:<dir> to load "
                        "a directory of Parquet files whole")
    if channels not in (1, 3):
        raise DataError(f"{spec}: channels={channels}; set channels to 1 (grayscale) or 3 (RGB)")
    if kind == "glyphs":
        ds = render_glyphs(size=image_size, seed=seed, **_pick(opts, _GLYPH_OPTS, spec))
    elif kind in ("mnist", "fashion_mnist"):
        loader = load_mnist if kind == "mnist" else load_fashion_mnist
        ds = loader(split, **_pick(opts, _IDX_OPTS, spec))
    elif kind == "folder":
        ds = load_image_folder(arg, image_size, channels, class_names=class_names,
                               **_pick(opts, {"resize"}, spec))
    else:
        ds = load_parquet_images(arg, image_size, channels, class_names=class_names,
                                 **_pick(opts, _USER_OPTS, spec))
    classes_from = "builtin" if arg is None else ds.classes_from
    if arg is None and class_names is not None and list(class_names) != ds.class_names:
        raise DataError(f"{spec} has fixed classes and data.class_names differs from them; "
                        f"remove data.class_names or list {spec}'s classes in order")
    ds = subsample_per_class(ds, max_per_class, seed)  # before resizing: less work
    images = convert_channels(resize_images(ds.images, image_size), channels, ds.name)
    return ImageSet(images, ds.labels, ds.class_names, ds.name, ds.meta, classes_from)


def build_public_pool(specs: Sequence[str], image_size: int, channels: int,
                      max_per_class: int | None = None, seed: int = 0,
                      glyph_opts: dict | None = None) -> ImageSet:
    """Concatenate public sources; class names become ``<prefix>/<name>`` and
    ``meta['source']`` holds each image's prefix (np.str_ array)."""
    if not specs:
        raise DataError("public pool: no sources given; list at least one, e.g. [glyphs]")
    prefixes = _distinct_prefixes(specs)
    images, labels, names, sources = [], [], [], []
    for spec, prefix in zip(specs, prefixes):
        opts = dict(glyph_opts or {}) if spec == "glyphs" else {}
        ds = load_source(spec, "train", image_size, channels, max_per_class, seed, **opts)
        # Public data may name its classes; an empty one would be selected
        # for pre-training with nothing to pre-train on.
        empty = np.flatnonzero(np.bincount(ds.labels, minlength=ds.num_classes) == 0)
        if len(empty):
            raise DataError(f"data.public {spec!r}: class {ds.class_names[empty[0]]!r} has no "
                            "images; add images or remove the class")
        images.append(ds.images)
        labels.append(ds.labels + len(names))
        names += [f"{prefix}/{n}" for n in ds.class_names]
        sources.append(np.full(len(ds), prefix))
    return ImageSet(np.concatenate(images), np.concatenate(labels), names, "public",
                    {"source": np.concatenate(sources), "sources": prefixes})


def check_prefixes(specs: Sequence[str]) -> list[str]:
    """Each public source's class namespace; refused when two share one."""
    return _distinct_prefixes(specs)


def _distinct_prefixes(specs: Sequence[str]) -> list[str]:
    """Each source's class namespace; refused when two sources share one."""
    prefixes = [source_prefix(s) for s in specs]
    dup = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if dup:
        raise DataError(f"public pool: sources share the prefix {dup[0]!r}; "
                        "list each source once and give user folders/files distinct names")
    return prefixes


def check_public_specs(specs: Sequence[str], sensitive: str) -> None:
    """Cheap checks of the public pool's sources, before any work starts:
    known kinds, distinct prefixes, user paths that exist, and none of them
    the sensitive dataset itself (pre-training on it would bypass DP), nor
    a source the sensitive dataset was materialised from (subsample.py).
    An empty pool is refused by the config validation already."""
    origins = lineage(sensitive)
    for spec in specs:
        try:
            kind, arg = parse_or_raise(spec)
        except DataError as e:
            raise DataError(f"data.public: {e}") from None
        if arg is not None and not Path(arg).exists():
            raise DataError(f"data.public: {spec!r} does not exist; fix the path or remove it "
                            "from data.public")
        if same_dataset(spec, sensitive):
            raise DataError(f"data.public lists {spec!r}, the sensitive dataset itself; public "
                            "pre-training data must not contain the sensitive data: remove it")
        if any(same_dataset(spec, o) for o in origins[1:]):
            raise DataError(f"data.public lists {spec!r}, which the sensitive dataset was drawn "
                            "from (see its provenance); public pre-training data must not "
                            "contain the sensitive data: remove it")
        if is_streamed(spec):
            open_streamed(spec)  # the shard layout, from names and schemas only
    _distinct_prefixes(specs)


def validate_sensitive(ds: ImageSet) -> None:
    """Refuse a sensitive set that is empty, whose class list was read off its
    own labels (a record with a unique or maximal label would change the
    histogram's shape, k2 and the generator: declare the list), or with labels
    outside it. Classes without images pass: their histogram row is pure
    noise. No message names or counts a class or label of the data."""
    if len(ds) == 0 or ds.num_classes == 0:
        raise DataError(f"{ds.name}: the sensitive dataset is empty; point the config at a dataset with images")
    if ds.classes_from == "labels":
        raise DataError(f"{ds.name}: the class list would be read off the sensitive labels; "
                        "declare it with data.class_names (or use a file that embeds it, e.g. "
                        "from privimage data subsample)")
    if ds.labels.min() < 0 or ds.labels.max() >= ds.num_classes:
        raise DataError(f"{ds.name}: {UNKNOWN_LABELS}")
