"""User datasets: an image folder (one subfolder per class) or a Parquet file.

Images are checked against the configured size and channels up front, so a
mismatch fails in seconds with the fix instead of deep inside training.

The class list is declared, never read off the records (imageset.CLASS_SOURCES):
by the caller's ``class_names`` (``data.class_names``), by the Parquet file's
schema metadata (CLASS_NAMES_KEY, or a Hugging Face ClassLabel), or by an
ImageFolder's directory names. Classes without images are kept: their
histogram row is then pure noise. Only a Parquet file with none of these
falls back to the labels it holds ("labels"), which the sensitive set refuses.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow.parquet as pq
import pyarrow.types as pat
from PIL import Image, UnidentifiedImageError

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB"}
# Parquet schema metadata key holding the declared class list (a JSON list of
# names; integer labels index it). subsample.py writes it.
CLASS_NAMES_KEY = b"privimage.class_names"
# Neither names nor counts the offending labels: both would be data-derived.
UNKNOWN_LABELS = ("records with labels outside the declared class list (data.class_names or "
                  "the file's metadata); declare every class")


def _size(image_size) -> tuple[int, int]:
    """(H, W) from an int (square) or a pair."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return int(h), int(w)


def _mode(channels: int, name: str) -> str:
    if channels not in _MODES:
        raise DataError(f"{name}: channels={channels}; set data.channels to 1 (grayscale) or 3 "
                        "(RGB)")
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
        fixes = []
        if img.mode != mode:
            fixes.append(f"data.channels: {3 if img.mode in ('RGB', 'RGBA', 'P') else 1} to "
                         "match the data")
        if img.size != (hw[1], hw[0]) and img.size[0] == img.size[1]:
            fixes.append(f"data.image_size: {img.size[0]} to keep its size")
        fix = "set " + ", or ".join(fixes + [f"data.resize: true to convert to {hw[0]}x{hw[1]} "
                                             f"mode {mode} on load"])
        raise DataError(f"{dataset}: image {where} is {found}, expected {hw[0]}x{hw[1]} mode "
                        f"{mode}; {fix} (docs/data.md)")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _open(src, where: str, dataset: str) -> Image.Image:
    try:
        img = Image.open(src)
        img.load()
        return img
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{dataset}: {where} is not a readable image ({e}); remove or re-encode it") from e


def declare_classes(file_names: list[str] | None, class_names: list[str] | None,
                    dataset: str) -> tuple[list[str] | None, str]:
    """(declared class list, where it comes from): the caller's list, which
    must include the file's (or folder's) own, else that one; (None, "labels")
    when there is neither."""
    if class_names is not None:
        if file_names is not None and not set(file_names) <= set(class_names):
            raise DataError(f"{dataset}: {UNKNOWN_LABELS}")
        return list(class_names), "config"
    if file_names is not None:
        return list(file_names), "metadata"
    return None, "labels"


def _decode(blobs: list[bytes], where: list[str], dataset: str, image_size, channels: int,
            resize: bool) -> np.ndarray:
    if not blobs:
        raise DataError(f"{dataset}: no images found; add images (one subfolder or label per class)")
    hw = _size(image_size)
    return np.stack([_to_array(_open(io.BytesIO(b), w, dataset), w, dataset, hw, channels, resize)
                     for b, w in zip(blobs, where)])


def folder_records(root: str | os.PathLike, class_names: list[str] | None = None
                   ) -> tuple[list[Path], np.ndarray, list[str], str]:
    """(image files, labels, class names, classes_from) of an ImageFolder,
    root/<class>/**/<image>, classes sorted unless declared."""
    root = Path(root)
    dataset = root.name or str(root)
    if not root.is_dir():
        raise DataError(f"{dataset}: folder {root} does not exist; fix the path or create "
                        "it with one subfolder of images per class")
    # The directory names are the operator's declaration, not derived from a
    # record: whoever laid out the folder chose them, and removing an image
    # never removes its directory, so an empty directory still counts.
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    names, source = declare_classes(dirs, class_names, dataset)
    if source == "metadata":
        source = "folders"
    if not names:
        raise DataError(f"{dataset}: no classes found; add one subfolder per class")
    files, labels = [], []
    for cls in dirs:
        found = sorted(p for p in (root / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        files += found
        labels += [names.index(cls)] * len(found)
    return files, np.asarray(labels, dtype=np.int64), names, source


def load_image_folder(root: str | os.PathLike, image_size, channels: int,
                      resize: bool = False, class_names: list[str] | None = None) -> ImageSet:
    """torchvision ImageFolder layout: root/<class>/**/<image>, classes sorted
    (or ``class_names``, which must include every subfolder)."""
    root = Path(root)
    dataset = root.name or str(root)
    files, labels, names, source = folder_records(root, class_names)
    _mode(channels, dataset)
    where = [str(p.relative_to(root)) for p in files]
    images = _decode([p.read_bytes() for p in files], where, dataset, image_size, channels, resize)
    return ImageSet(images, labels, names, dataset, {"root": str(root)}, source)


def _file_class_names(schema, label_column: str) -> list[str] | None:
    """The class list the file declares: ours (CLASS_NAMES_KEY), else a
    Hugging Face datasets ClassLabel; None when it declares none."""
    meta = schema.metadata or {}
    if CLASS_NAMES_KEY in meta:
        try:
            names = json.loads(meta[CLASS_NAMES_KEY])
        except ValueError:
            names = None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise DataError(f"Parquet metadata {CLASS_NAMES_KEY.decode()} is not a list of class "
                            "names; rewrite the file with privimage data subsample")
        return names
    if not meta.get(b"huggingface"):
        return None
    try:
        feat = json.loads(meta[b"huggingface"])["info"]["features"][label_column]
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


def _map_labels(raw: list, is_int: bool, file_names: list[str] | None, names: list[str] | None,
                dataset: str) -> tuple[np.ndarray, list[str]]:
    """Labels as indices into the declared ``names`` (integer labels index the
    file's names, else ``names`` directly); without a declaration the list is
    read off the labels: "0".."max" or the sorted distinct strings."""
    if names is None:
        if is_int:
            ints = np.asarray(raw, dtype=np.int64)
            if len(ints) and ints.min() < 0:
                raise DataError(f"{dataset}: negative labels; use labels 0..K-1")
            return ints, [str(i) for i in range(int(ints.max()) + 1 if len(ints) else 0)]
        names = sorted(set(raw))
    lookup = {n: i for i, n in enumerate(names)}
    if is_int:
        by_index = file_names if file_names is not None else names
        raw = [by_index[v] if 0 <= v < len(by_index) else None for v in raw]
    labels = [lookup.get(v, -1) for v in raw]
    if any(v < 0 for v in labels):
        raise DataError(f"{dataset}: {UNKNOWN_LABELS}")
    return np.asarray(labels, dtype=np.int64), names


def parquet_records(path: str | os.PathLike, image_column: str = "image",
                    label_column: str = "label", class_names: list[str] | None = None
                    ) -> tuple[list[bytes], np.ndarray, list[str], str]:
    """(encoded images, labels, class names, classes_from) of a Parquet file
    (or directory of files) with an image column and a label column."""
    path = Path(path)
    dataset = path.stem or str(path)
    if not path.exists():
        raise DataError(f"{dataset}: Parquet file {path} does not exist; fix the path")
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
    is_int = pat.is_integer(label_type)
    if not (is_int or pat.is_string(label_type) or pat.is_large_string(label_type)):
        raise DataError(f"{dataset}: label column {label_column!r} has type {label_type}; "
                        "use integer or string labels")
    raw = table.column(label_column).to_pylist()
    if any(v is None for v in raw):
        raise DataError(f"{dataset}: column {label_column!r} has null labels; drop those rows")
    file_names = _file_class_names(schema, label_column)
    names, source = declare_classes(file_names, class_names, dataset)
    labels, names = _map_labels(raw, is_int, file_names, names, dataset)
    if not names:
        raise DataError(f"{dataset}: no classes found; declare them with data.class_names")
    blobs = _image_bytes(table.column(image_column).to_pylist(), dataset, image_column)
    return blobs, labels, names, source


def load_parquet_images(path: str | os.PathLike, image_size, channels: int, resize: bool = False,
                        image_column: str = "image", label_column: str = "label",
                        class_names: list[str] | None = None) -> ImageSet:
    """Parquet file (or directory of files) with encoded images and labels,
    classes declared as in :func:`parquet_records`."""
    path = Path(path)
    dataset = path.stem or str(path)
    _mode(channels, dataset)
    blobs, labels, names, source = parquet_records(path, image_column, label_column, class_names)
    images = _decode(blobs, [f"row {i}" for i in range(len(blobs))], dataset, image_size,
                     channels, resize)
    return ImageSet(images, labels, names, dataset, {"path": str(path)}, source)
