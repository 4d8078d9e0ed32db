"""A Parquet index of the public pool.

``index.parquet`` maps each image id to its source, label, label name and
(shard, row), so the semantic query's selection (a set of labels) is a
pyarrow filter over it. Pixels stay where they are: a source loaded in
memory (the built-in datasets, glyphs, a ``parquet:`` file) is written as one
uint8 .npy per source, which readers memory-map; a streamed source
(``shards:``, ``folder:``; data/shards.py) is read from its own shards, only
the rows asked for, decoded at the pool's image shape. Readers need the
manifest only (``ShardReader``), not the index table.
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
from privimage_core.data.shards import StreamedSource, read_part
from privimage_core.errors import DataError
from privimage_core.selection.pool_rows import cap_per_class, codes, read_chunks

FORMAT_VERSION = 2
_FILES = ("index.parquet", "labels.json", "manifest.json")


def content_hash(pool: ImageSet) -> str:
    """Hash of everything the index stores of an in-memory pool."""
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


def _digest(pool: ImageSet | None, streamed, image_shape, max_per_class, seed) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, list(image_shape), max_per_class, seed,
                                   [(s.to_dict(), d) for s, d in streamed]]).encode())
    if pool is not None:
        h.update(content_hash(pool).encode())
    return h.hexdigest()


class ShardReader:
    """Reads rows of the pool's shards; needs the index's manifest only."""

    def __init__(self, directory: str | os.PathLike, manifest: dict | None = None):
        self.directory = Path(directory)
        self.manifest = manifest or json.loads((self.directory / "manifest.json").read_text())
        self.streamed = {d["prefix"]: StreamedSource.from_dict(d)
                         for d in self.manifest.get("streamed", [])}

    def read(self, source: str, shard: str, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), H, W, C] of ``rows`` of one shard, in that order."""
        h, w, c = self.manifest["image_shape"]
        if source in self.streamed:
            return self.streamed[source].read_rows(shard, rows, h, c)
        pixels = np.load(self.directory / shard, mmap_mode="r")
        return np.ascontiguousarray(pixels[np.asarray(rows, np.int64)])


class PublicIndex:
    """Open with ``PublicIndex.open(dir)``; build with ``PublicIndex.build(pool,
    dir)`` (an in-memory pool) or ``PublicIndex.build_sources`` (streamed
    sources too)."""

    def __init__(self, directory: str | os.PathLike, table: pa.Table, label_names: list[str],
                 manifest: dict):
        self.directory = Path(directory)
        self.table = table
        self._label_names = list(label_names)
        self.manifest = manifest
        self.reader = ShardReader(directory, manifest)

    @classmethod
    def build(cls, pool: ImageSet, directory: str | os.PathLike) -> "PublicIndex":
        """Write the index of an in-memory pool, or reuse ``directory`` if it
        already holds this pool."""
        if len(pool) == 0:
            raise DataError(f"{pool.name}: the public pool is empty; list at least one public source")
        return cls.build_sources(pool, [], directory, None, pool.shape)

    @classmethod
    def build_sources(cls, pool: ImageSet | None, streamed: Sequence[tuple[StreamedSource, list]],
                      directory: str | os.PathLike, cache_dir: str | os.PathLike | None,
                      image_shape: Sequence[int], max_per_class: int | None = None,
                      seed: int = 0) -> "PublicIndex":
        """The index of an in-memory pool (its labels first) followed by the
        streamed sources, each given with the digests of its shards' cached
        parts (data/shards.py ``ensure_part``) in shard order, capped at
        ``max_per_class`` images per class as ``subsample_per_class`` caps
        an in-memory source. Reuses ``directory`` when it holds the same."""
        directory = Path(directory)
        digest = _digest(pool, streamed, image_shape, max_per_class, seed)
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
            cols = _Columns()
            if pool is not None:
                _add_memory(cols, pool, tmp)
            for src, digests in streamed:
                _add_streamed(cols, src, digests, cache_dir, max_per_class, seed)
            if not cols.n:
                raise DataError("public pool: no images; list at least one public source "
                                "with images in data.public")
            pq.write_table(cols.table(), tmp / "index.parquet")
            (tmp / "labels.json").write_text(json.dumps(cols.names))
            manifest = {"format_version": FORMAT_VERSION, "content_hash": digest,
                        "num_rows": cols.n, "image_shape": list(image_shape),
                        "sources": cols.sources, "streamed": [s.to_dict() for s, _ in streamed]}
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

    @property
    def streamed(self) -> bool:
        """Whether any source is read from its own shards (not held in memory)."""
        return bool(self.manifest.get("streamed"))

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

    def chunks(self, table: pa.Table | None = None, chunk_rows: int = 1024) -> list[dict]:
        """The reads that fetch ``table``'s rows (default: all), shard by
        shard in row order, at most ``chunk_rows`` each (pool_rows.read_chunks)."""
        return read_chunks(self.table if table is None else table, chunk_rows)

    def load(self, table: pa.Table | None = None) -> ImageSet:
        """Images of ``table`` (default: all rows) in id order, in memory: for
        a selection or a small pool. Labels stay indices into the full
        ``label_names``."""
        table = (self.table if table is None else table).sort_by("id")
        h, w, c = self.manifest["image_shape"]
        images = np.empty((table.num_rows, h, w, c), np.uint8)
        for ch in self.chunks(table, chunk_rows=1 << 30):
            images[ch["pos"]] = self.reader.read(ch["source"], ch["shard"], ch["rows"])
        src, names = codes(table, "source")
        return ImageSet(images, table.column("label").to_numpy().astype(np.int64),
                        self.label_names, "public",
                        {"source": np.asarray(names, dtype=str)[src] if len(src) else
                         np.array([], str), "id": table.column("id").to_numpy()})


class _Columns:
    """The index's columns, appended a source (or an in-memory pool) at a time."""

    def __init__(self):
        self.names: list[str] = []
        self.sources: list[str] = []
        self.shards: list[str] = []
        self.parts: list[tuple] = []  # (source codes, shard codes, labels, rows)

    @property
    def n(self) -> int:
        return sum(len(p[2]) for p in self.parts)

    def add(self, sources: list[str], source_code: np.ndarray, shards: list[str],
            shard_code: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
        s0, h0 = len(self.sources), len(self.shards)
        self.sources += sources
        self.shards += shards
        self.parts.append((source_code.astype(np.int32) + s0, shard_code.astype(np.int32) + h0,
                           labels.astype(np.int32), rows.astype(np.int64)))

    def table(self) -> pa.Table:
        cat = lambda i: np.concatenate([p[i] for p in self.parts])  # noqa: E731
        labels = cat(2)
        dic = lambda idx, values: pa.DictionaryArray.from_arrays(  # noqa: E731
            pa.array(idx), pa.array(values, pa.string()))
        return pa.table({"id": pa.array(np.arange(len(labels), dtype=np.int64)),
                         "source": dic(cat(0), self.sources), "label": pa.array(labels),
                         "label_name": dic(labels, self.names),
                         "shard": dic(cat(1), self.shards), "row": pa.array(cat(3))})


def _add_memory(cols: _Columns, pool: ImageSet, tmp: Path) -> None:
    """An in-memory pool: one pixel .npy per source, rows in pool order."""
    if len(pool) == 0:
        return
    cols.names = list(pool.class_names)
    sources = _sources(pool)
    names = list(dict.fromkeys(sources.tolist()))  # first-appearance order
    uniq, inv = np.unique(sources, return_inverse=True)
    code = np.array([names.index(u) for u in uniq.tolist()], np.int32)[inv]
    rows = np.empty(len(pool), np.int64)
    for i, src in enumerate(names):
        idx = np.flatnonzero(code == i)
        np.save(tmp / _shard_name(src), np.ascontiguousarray(pool.images[idx]))
        rows[idx] = np.arange(len(idx))
    cols.add(names, code, [_shard_name(s) for s in names], code, pool.labels, rows)


def _add_streamed(cols: _Columns, src: StreamedSource, digests: list, cache_dir,
                  max_per_class: int | None, seed: int) -> None:
    """A streamed source from its cached parts: labels checked against its
    class list, empty classes refused (as build_public_pool does), capped."""
    if len(digests) != len(src.shards):
        raise DataError(f"data.public {src.spec!r}: {len(digests)} index parts for "
                        f"{len(src.shards)} shards; index every shard first")
    labels, rows, shard = [], [], []
    for i, (name, d) in enumerate(zip(src.shards, digests)):
        lab, row = read_part(cache_dir, d)
        if len(lab) and int(lab.max()) >= len(src.class_names):
            raise DataError(f"data.public {src.spec!r}: shard {name} has labels beyond the "
                            f"{len(src.class_names)} declared classes; fix its labels or list "
                            "every class in classes.txt")
        labels.append(lab)
        rows.append(row)
        shard.append(np.full(len(lab), i, np.int32))
    labels, rows, shard = (np.concatenate(a) for a in (labels, rows, shard))
    empty = np.flatnonzero(np.bincount(labels, minlength=len(src.class_names)) == 0)
    if len(empty):
        raise DataError(f"data.public {src.spec!r}: class {src.class_names[empty[0]]!r} has no "
                        "images; add images or remove the class")
    keep = cap_per_class(labels, len(src.class_names), max_per_class, seed)
    offset = len(cols.names)
    cols.names += [f"{src.prefix}/{n}" for n in src.class_names]
    cols.add([src.prefix], np.zeros(len(keep), np.int32), list(src.shards), shard[keep],
             labels[keep] + offset, rows[keep])
