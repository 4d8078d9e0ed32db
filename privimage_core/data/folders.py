"""User datasets: an image folder (one subfolder per class) or a Parquet file.

Images are checked against the configured size and channels up front, so a
mismatch fails in seconds with the fix instead of deep inside training.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB"}


def _size(image_size) -> tuple[int, int]:
    """(H, W) from an int (square) or a pair."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return int(h), int(w)


def _mode(channels: int, name: str) -> str:
    if channels not in _MODES:
        raise DataError(f"{name}: channels={channels}; set channels to 1 (grayscale) or 3 (RGB)")
    return _MODES[channels]


def _fit(img: Image.Image, hw: tuple[int, int], mode: str) -> Image.Image:
    """Convert mode, centre-crop to the target aspect ratio, then resize, so
    non-square photos are not stretched."""
    img = img.convert(mode)
    h, w = hw
    iw, ih = img.size
    if iw * h != ih * w:
        cw, ch = (round(ih * w / h), ih) if iw * h > ih * w else (iw, round(iw * h / w))
        left, top = (iw - cw) // 2, (ih - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return img


def _to_array(img: Image.Image, where: str, dataset: str, hw: tuple[int, int], channels: int,
              resize: bool) -> np.ndarray:
    mode = _mode(channels, dataset)
    if resize:
        img = _fit(img, hw, mode)
    elif img.mode != mode or img.size != (hw[1], hw[0]):
        found = f"{img.size[1]}x{img.size[0]} mode {img.mode}"
        fix = ("set `resize: true` to convert and resize on load" if img.mode == mode else
               f"set `channels` to match the data, or `resize: true` to convert to {mode}")
        raise DataError(f"{dataset}: image {where} is {found}, expected {hw[0]}x{hw[1]} mode {mode}; {fix}")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _open(src, where: str, dataset: str) -> Image.Image:
    try:
        img = Image.open(src)
        img.load()
        return img
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{dataset}: {where} is not a readable image ({e}); remove or re-encode it") from e


def _check_nonempty(dataset: str, class_names: list[str], labels: np.ndarray) -> None:
    counts = np.bincount(labels, minlength=len(class_names)) if len(labels) else np.zeros(len(class_names), int)
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if not class_names:
        raise DataError(f"{dataset}: no classes found; add one subfolder (or label value) per class")
    if empty:
        raise DataError(f"{dataset}: class {empty[0]!r} has no images; add images or remove the class")


def load_image_folder(root: str | os.PathLike, image_size, channels: int,
                      resize: bool = False) -> ImageSet:
    """torchvision ImageFolder layout: root/<class>/**/<image>, classes sorted."""
    root = Path(root)
    dataset = root.name or str(root)
    if not root.is_dir():
        raise DataError(f"{dataset}: folder {root} does not exist; fix the path or create "
                        "it with one subfolder of images per class")
    hw = _size(image_size)
    _mode(channels, dataset)
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    images, labels = [], []
    for label, cls in enumerate(class_names):
        files = sorted(p for p in (root / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        for p in files:
            rel = str(p.relative_to(root))
            images.append(_to_array(_open(p, rel, dataset), rel, dataset, hw, channels, resize))
            labels.append(label)
    labels_arr = np.asarray(labels, dtype=np.int64)
    _check_nonempty(dataset, class_names, labels_arr)
    return ImageSet(np.stack(images), labels_arr, class_names, dataset, {"root": str(root)})


def _hf_class_names(schema, label_column: str) -> list[str] | None:
    """Class names from a Hugging Face datasets ClassLabel, if the file has one."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feat = json.loads(meta)["info"]["features"][label_column]
        return [str(n) for n in feat["names"]] if "names" in feat else None
    except (KeyError, TypeError, ValueError):
        return None


def _image_bytes(values: Iterable, dataset: str, column: str) -> list[bytes]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, dict):  # HF datasets Image feature: {'bytes': ..., 'path': ...}
            v = v.get("bytes")
        if not isinstance(v, (bytes, bytearray)):
            raise DataError(f"{dataset}: row {i} of column {column!r} holds {type(v).__name__}, "
                            "expected PNG/JPEG bytes or a struct with 'bytes'; re-export the images as bytes")
        out.append(bytes(v))
    return out


def load_parquet_images(path: str | os.PathLike, image_size, channels: int, resize: bool = False,
                        image_column: str = "image", label_column: str = "label") -> ImageSet:
    """Parquet file (or directory of files) with encoded images and labels.

    Integer labels index the class names stored by Hugging Face datasets, else
    classes "0".."max"; string labels become sorted class names.
    """
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    path = Path(path)
    dataset = path.stem or str(path)
    if not path.exists():
        raise DataError(f"{dataset}: Parquet file {path} does not exist; fix the path")
    hw = _size(image_size)
    _mode(channels, dataset)
    try:
        schema = pq.read_schema(path) if path.is_file() else pq.ParquetDataset(path).schema
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise DataError(f"{dataset}: {path} is not readable Parquet ({e}); check the file") from e
    missing = [c for c in (image_column, label_column) if c not in schema.names]
    if missing:
        raise DataError(f"{dataset}: column(s) {missing} not in {path} (has {schema.names}); "
                        "set image_column / label_column")
    table = pq.read_table(path, columns=[image_column, label_column])
    label_type = table.schema.field(label_column).type
    raw_labels = table.column(label_column).to_pylist()
    if any(v is None for v in raw_labels):
        raise DataError(f"{dataset}: column {label_column!r} has null labels; drop those rows")
    if pat.is_integer(label_type):
        labels = np.asarray(raw_labels, dtype=np.int64)
        names = _hf_class_names(table.schema, label_column) or \
            [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{dataset}: labels span [{labels.min()}, {labels.max()}] but there are "
                            f"{len(names)} classes; fix the label column")
    elif pat.is_string(label_type) or pat.is_large_string(label_type):
        names = sorted(set(raw_labels))
        lookup = {n: i for i, n in enumerate(names)}
        labels = np.asarray([lookup[v] for v in raw_labels], dtype=np.int64)
    else:
        raise DataError(f"{dataset}: label column {label_column!r} has type {label_type}; "
                        "use integer or string labels")
    blobs = _image_bytes(table.column(image_column).to_pylist(), dataset, image_column)
    images = [_to_array(_open(io.BytesIO(b), f"row {i}", dataset), f"row {i}", dataset, hw,
                        channels, resize) for i, b in enumerate(blobs)]
    _check_nonempty(dataset, names, labels)
    return ImageSet(np.stack(images), labels, names, dataset, {"path": str(path)})
