"""A Parquet-backed index of the public pool.

Pixels live in one uint8 .npy per source so workers can memory-map them
instead of shipping arrays around; ``index.parquet`` maps each image id to
its label and (shard, row), so the semantic query's selection (a set of
labels) becomes a cheap pyarrow filter.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError

FORMAT_VERSION = 1
_FILES = ("index.parquet", "labels.json", "manifest.json")


def content_hash(pool: ImageSet) -> str:
    """Hash of everything the index stores, to detect a stale directory."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}".encode())
    h.update(json.dumps([list(pool.class_names), list(pool.images.shape)]).encode())
    h.update(np.ascontiguousarray(pool.images).data)
    h.update(np.ascontiguousarray(pool.labels, dtype=np.int64).data)
    h.update("\0".join(map(str, _sources(pool))).encode())
    return h.hexdigest()


def _sources(pool: ImageSet) -> np.ndarray:
    src = pool.meta.get("source")
    if src is None:
        return np.full(len(pool), pool.name)
    src = np.asarray(src).astype(str)
    if src.shape != (len(pool),):
        raise DataError(f"{pool.name}: meta['source'] has {src.shape[0] if src.ndim else 0} entries "
                        f"for {len(pool)} images; rebuild the pool with build_public_pool")
    return src


def _stored_hash(directory: Path) -> str | None:
    try:
        return json.loads((directory / "manifest.json").read_text()).get("content_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _shard_name(source: str) -> str:
    return "pixels-" + re.sub(r"[^A-Za-z0-9_.-]", "_", source) + ".npy"


class PublicIndex:
    """Open with ``PublicIndex.open(dir)``; build with ``PublicIndex.build(pool, dir)``."""

    def __init__(self, directory: str | os.PathLike, table: pa.Table, label_names: list[str],
                 manifest: dict):
        self.directory = Path(directory)
        self.table = table
        self._label_names = list(label_names)
        self.manifest = manifest

    @classmethod
    def build(cls, pool: ImageSet, directory: str | os.PathLike) -> "PublicIndex":
        """Write the index, or reuse ``directory`` if it already holds this pool."""
        directory = Path(directory)
        if len(pool) == 0:
            raise DataError(f"{pool.name}: the public pool is empty; list at least one public source")
        digest = content_hash(pool)
        if _stored_hash(directory) == digest:
            try:
                return cls.open(directory)
            except DataError:
                pass  # a broken index is rebuilt below
        elif (directory / "manifest.json").is_file():
            pass  # an index of another pool: replaced below
        elif directory.exists() and any(directory.iterdir()):
            raise DataError(f"public index: {directory} exists and is not a public index; "
                            "choose an empty or new directory")

        # Write beside the target and swap it in, so a reader never sees half an index.
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            sources = _sources(pool)
            shard = np.empty(len(pool), dtype=object)
            row = np.empty(len(pool), dtype=np.int64)
            for src in dict.fromkeys(sources):  # first-appearance order
                idx = np.flatnonzero(sources == src)
                np.save(tmp / _shard_name(src), np.ascontiguousarray(pool.images[idx]))
                shard[idx] = _shard_name(src)
                row[idx] = np.arange(len(idx))
            names = np.asarray(pool.class_names, dtype=object)
            table = pa.table({
                "id": pa.array(np.arange(len(pool), dtype=np.int64)),
                "source": pa.array(sources.tolist(), pa.string()),
                "label": pa.array(pool.labels.astype(np.int32)),
                "label_name": pa.array(names[pool.labels].tolist(), pa.string()),
                "shard": pa.array(shard.tolist(), pa.string()),
                "row": pa.array(row),
            })
            pq.write_table(table, tmp / "index.parquet")
            (tmp / "labels.json").write_text(json.dumps(list(pool.class_names)))
            manifest = {"format_version": FORMAT_VERSION, "content_hash": digest,
                        "num_rows": len(pool), "image_shape": list(pool.shape),
                        "sources": list(dict.fromkeys(sources.tolist()))}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if directory.exists():
                shutil.rmtree(directory)
            try:
                os.replace(tmp, directory)
            except OSError:
                # Another worker swapped in its copy first; fine if it is the same pool.
                if _stored_hash(directory) != digest:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "PublicIndex":
        directory = Path(directory)
        missing = [f for f in _FILES if not (directory / f).is_file()]
        if missing:
            raise DataError(f"public index {directory}: missing {', '.join(missing)}; "
                            "build it with PublicIndex.build(pool, directory)")
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"public index {directory}: format {manifest.get('format_version')} "
                            f"!= {FORMAT_VERSION}; delete the directory and rebuild it")
        names = json.loads((directory / "labels.json").read_text())
        return cls(directory, pq.read_table(directory / "index.parquet"), names, manifest)

    @property
    def label_names(self) -> list[str]:
        return list(self._label_names)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def counts_per_label(self) -> np.ndarray:
        labels = self.table.column("label").to_numpy()
        return np.bincount(labels, minlength=len(self._label_names)).astype(np.int64)

    def select(self, label_ids: Sequence[int | str]) -> pa.Table:
        """Rows whose label is in ``label_ids`` (indices, or names from label_names)."""
        lookup = {n: i for i, n in enumerate(self._label_names)}
        ids = []
        for v in label_ids:
            if isinstance(v, str):
                if v not in lookup:
                    raise DataError(f"public index: unknown label {v!r}; use one of label_names")
                v = lookup[v]
            ids.append(int(v))
        mask = pc.is_in(self.table.column("label"), value_set=pa.array(ids, pa.int32()))
        return self.table.filter(mask)

    def load(self, table: pa.Table | None = None) -> ImageSet:
        """Images of ``table`` (default: all rows) in id order, read via mmap.
        Labels stay indices into the full ``label_names``."""
        table = self.table if table is None else table
        table = table.sort_by("id")
        shards = table.column("shard").to_numpy(zero_copy_only=False)
        rows = table.column("row").to_numpy()
        h, w, c = self.manifest["image_shape"]
        images = np.empty((table.num_rows, h, w, c), np.uint8)
        for name in np.unique(shards):
            pos = np.flatnonzero(shards == name)
            pixels = np.load(self.directory / name, mmap_mode="r")
            images[pos] = pixels[rows[pos]]
        return ImageSet(images, table.column("label").to_numpy().astype(np.int64),
                        self.label_names, "public",
                        {"source": table.column("source").to_numpy(zero_copy_only=False).astype(str),
                         "id": table.column("id").to_numpy()})
