"""Public data without labels, labelled by a pre-trained classifier's
predictions, written in the ``shards:`` layout (docs/data.md, "Public data
without labels"). The labels are then the classifier's semantics, not the
data's own: every output shard says so in its schema metadata (LABELS_KEY).

The input is read a shard at a time, never whole: a directory of Parquet
shards with an ``image`` column and no ``label`` column (one output shard per
input shard), or a tree of image files (FILES_PER_SHARD files per output
shard, in path order). Two passes: the predictions of each input shard are
cached under ``<out>/.predictions/`` (the costly part; a run that stopped
resumes from the shards it finished), then each output shard is written
with the classes that were predicted at least once (a class with no image
would be refused by the index), named in ``classes.txt``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from privimage_core.data.folders import (
    CLASS_NAMES_KEY, IMAGE_EXTS, _image_bytes, _open, _size, _to_array)
from privimage_core.data.shards import CLASSES_FILE, IMAGE_COLUMN, LABEL_COLUMN
from privimage_core.errors import DataError

LABELS_KEY = b"privimage.labels"  # who labelled the shard's images
FILES_PER_SHARD = 10_000
ROW_GROUP = 1024


class _Unit:
    """One input shard: a Parquet file's image column, or a run of image files."""

    def __init__(self, name: str, parquet: Path | None = None, files: list[Path] | None = None):
        self.name, self.parquet, self.files = name, parquet, files

    def identity(self) -> list:
        """What the unit's images are: its files' paths, sizes and mtimes."""
        stats = [self.parquet] if self.files is None else self.files
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in stats]

    def blobs(self, batch: int) -> Iterator[list[bytes]]:
        if self.files is not None:
            for a in range(0, len(self.files), batch):
                yield [f.read_bytes() for f in self.files[a:a + batch]]
            return
        for rb in pq.ParquetFile(self.parquet).iter_batches(batch_size=batch,
                                                            columns=[IMAGE_COLUMN]):
            yield _image_bytes(rb.column(0).to_pylist(), self.name, IMAGE_COLUMN)


def _units(src: Path) -> list[_Unit]:
    shards = sorted(p for p in src.glob("*.parquet") if p.is_file())
    if shards:
        for p in shards:
            names = pq.read_schema(p).names
            if IMAGE_COLUMN not in names:
                raise DataError(f"{p.name} has no column {IMAGE_COLUMN!r} (has {names}); write "
                                "the encoded image bytes there")
            if LABEL_COLUMN in names:
                raise DataError(f"{p.name} already has a {LABEL_COLUMN!r} column; use the "
                                "shards as they are (shards:<dir>) or drop the column first")
        return [_Unit(p.stem, parquet=p) for p in shards]
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"{src}: no *.parquet shards and no image files; point --src at "
                        "unlabelled public data")
    return [_Unit(f"shard-{i // FILES_PER_SHARD:05d}", files=files[i:i + FILES_PER_SHARD])
            for i in range(0, len(files), FILES_PER_SHARD)]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    write(tmp)
    os.replace(tmp, path)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array)


def label_shards(src: str | os.PathLike, out: str | os.PathLike,
                 predict: Callable[[np.ndarray], np.ndarray], class_names: list[str],
                 note: str, image_size: int = 32, channels: int = 3,
                 batch: int = 256) -> dict:
    """Label the unlabelled public images under ``src`` with ``predict``
    (uint8 [N, S, S, C] images at the run's ``image_size`` and ``channels``
    -> indices into ``class_names``) and write them to ``out`` as Parquet
    shards (the images' bytes unchanged) with a ``label`` column, the
    predicted classes in ``classes.txt`` and ``note`` (the classifier) in
    each shard's metadata. Returns {images, shards, classes}."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src:
        raise DataError(f"--out {out} is the input directory; write the labelled shards elsewhere")
    units = _units(src)
    cache = out / ".predictions"
    cache.mkdir(parents=True, exist_ok=True)
    hw = _size(image_size)
    # a unit's cached predictions are reused only for the same images, the
    # same classifier (its note names the weights' digest) and class list
    setting = json.dumps([note, class_names, image_size, channels])
    preds = []
    for u in units:
        key = hashlib.sha256(json.dumps([setting, u.identity()]).encode()).hexdigest()[:16]
        path = cache / f"{u.name}-{key}.npy"
        if not path.is_file():
            labels = []
            for blobs in u.blobs(batch):
                x = np.stack([_to_array(_open(io.BytesIO(b), u.name, str(src)), u.name, str(src),
                                        hw, channels, True) for b in blobs])
                labels.append(np.asarray(predict(x), np.int64))
            labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
                raise DataError("the classifier predicted an index outside its class names; "
                                "check the class names file")
            _atomic(path, lambda t: _save(t, labels))
        preds.append(np.load(path))
    used = np.unique(np.concatenate(preds))
    names = [class_names[i] for i in used]
    remap = np.full(len(class_names), -1, np.int64)
    remap[used] = np.arange(len(used))
    meta = {CLASS_NAMES_KEY: json.dumps(names).encode(), LABELS_KEY: note.encode()}
    for u, p in zip(units, preds):
        blobs = [b for chunk in u.blobs(4096) for b in chunk]
        table = pa.table({IMAGE_COLUMN: pa.array(blobs, pa.binary()),
                          LABEL_COLUMN: pa.array(remap[p].astype(np.int32))})
        _atomic(out / f"{u.name}.parquet", lambda t: pq.write_table(
            table.replace_schema_metadata(meta), t, row_group_size=ROW_GROUP))
    _atomic(out / CLASSES_FILE, lambda t: t.write_text("\n".join(names) + "\n"))
    return {"images": int(sum(len(p) for p in preds)), "shards": len(units),
            "classes": len(names)}
