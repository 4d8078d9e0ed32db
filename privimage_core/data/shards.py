"""Public sources read shard by shard, never whole: a directory of Parquet
shards (``shards:<dir>``) and an ImageFolder (``folder:<dir>``, one shard per
class subfolder). The layout is in docs/data.md ("Sharded public data").

Indexing a shard reads its labels only (a Parquet shard's label column, a
class folder's file listing); pixels are decoded when rows are read
(``read_rows``), at the run's image size and channels. Each shard's index
part is cached under a digest of the shard (``shard_digest``), so a rebuild
reads only new or changed shards and an interrupted build keeps the shards
it finished.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat

from privimage_core.data.folders import (
    IMAGE_EXTS, _file_class_names, _image_bytes, _open, _size, _to_array)
from privimage_core.data.specs import STREAMED_KINDS, parse_or_raise, source_prefix
from privimage_core.errors import DataError

PART_FORMAT = 1  # of the cached per-shard index parts; a change invalidates them
CLASSES_FILE = "classes.txt"
LAYOUT = "docs/data.md, Sharded public data"
IMAGE_COLUMN, LABEL_COLUMN = "image", "label"


@dataclass(frozen=True)
class StreamedSource:
    """One streamed public source: its shards (Parquet file names, or class
    subfolder names) and its declared classes (``<prefix>/<name>`` in the pool)."""
    spec: str
    kind: str
    root: str
    prefix: str
    class_names: tuple[str, ...]
    shards: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StreamedSource":
        return cls(**{**d, "class_names": tuple(d["class_names"]), "shards": tuple(d["shards"])})

    def shard_path(self, shard: str) -> Path:
        return Path(self.root) / shard

    def digest(self, shard: str) -> str:
        """Identity of one shard's index part. A Parquet shard: its name, size,
        modification time and footer (row counts, column chunk sizes and label
        statistics), read without its data; a class folder: its class index
        and the name, size and modification time of every image in it."""
        h = hashlib.sha256(json.dumps([PART_FORMAT, self.kind, shard]).encode())
        path = self.shard_path(shard)
        if self.kind == "shards":
            st = path.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(_footer(path))
        else:
            h.update(str(self.class_names.index(shard)).encode())
            for f in class_files(path):
                st = f.stat()
                h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
        return h.hexdigest()[:32]

    def index_shard(self, shard: str) -> pa.Table:
        """The shard's index part: ``label`` (the source's class index) and
        ``row`` (the record's position in the shard), labels only read."""
        path = self.shard_path(shard)
        if self.kind == "folder":
            n = len(class_files(path))
            return pa.table({"label": pa.array(np.full(n, self.class_names.index(shard), np.int32)),
                             "row": pa.array(np.arange(n, dtype=np.int64))})
        col = pq.read_table(path, columns=[LABEL_COLUMN]).column(LABEL_COLUMN)
        if col.null_count:
            raise DataError(f"data.public {self.spec!r}: shard {shard} has null labels; drop "
                            "those rows or give them a class")
        labels = col.to_numpy().astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise DataError(f"data.public {self.spec!r}: shard {shard} has negative labels; "
                            "store class indices 0..K-1 (line i of classes.txt names label i)")
        return pa.table({"label": pa.array(labels.astype(np.int32)),
                         "row": pa.array(np.arange(len(labels), dtype=np.int64))})

    def read_rows(self, shard: str, rows: np.ndarray, image_size: int,
                  channels: int) -> np.ndarray:
        """uint8 [len(rows), S, S, C] of the given rows of one shard, in that
        order. Parquet shards are converted and resized (centre crop, bicubic,
        as ``data.resize``); a public folder's images must already have the
        run's size and mode, as they always had to."""
        rows = np.asarray(rows, np.int64)
        path = self.shard_path(shard)
        if self.kind == "folder":
            files = class_files(path)
            if len(rows) and (rows.min() < 0 or rows.max() >= len(files)):
                raise DataError(f"data.public {self.spec!r}: {shard} has fewer images than its "
                                "index; it changed after indexing: run again to rebuild the index")
            blobs = [files[r].read_bytes() for r in rows]
            where = [f"{shard}/{files[r].relative_to(path)}" for r in rows]
            resize = False
        else:
            blobs = _read_parquet_rows(path, rows, self.spec)
            where = [f"{shard} row {r}" for r in rows]
            resize = True
        hw = _size(image_size)
        out = np.empty((len(rows), hw[0], hw[1], channels), np.uint8)
        for i, (b, w) in enumerate(zip(blobs, where)):
            out[i] = _to_array(_open(io.BytesIO(b), w, self.prefix), w, self.prefix, hw, channels,
                               resize)
        return out


def class_files(class_dir: Path) -> list[Path]:
    """The images of one class folder, as folders.folder_records lists them."""
    return sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _footer(path: Path) -> bytes:
    """A Parquet file's footer (metadata block and its length), read alone."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        f.seek(-8 - n, os.SEEK_END)
        return f.read(n) + tail


def _read_parquet_rows(path: Path, rows: np.ndarray, spec: str) -> list[bytes]:
    """Encoded images of ``rows``, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
        raise DataError(f"data.public {spec!r}: {path.name} has fewer rows than its index; "
                        "it changed after indexing: run again to rebuild the index")
    group = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group)
    table = pf.read_row_groups(groups.tolist(), columns=[IMAGE_COLUMN])
    # position of each group's first row inside the table of the groups read
    first = dict(zip(groups.tolist(), np.concatenate([[0], np.cumsum(
        [sizes[g] for g in groups])])[:-1].tolist()))
    pos = rows - starts[group] + np.array([first[g] for g in group.tolist()], np.int64)
    return _image_bytes(table.column(IMAGE_COLUMN).take(pa.array(pos)).to_pylist(),
                        path.name, IMAGE_COLUMN)


def open_streamed(spec: str) -> StreamedSource:
    """The streamed source named by ``spec`` (``shards:`` or ``folder:``),
    its layout checked from file names, schemas and the classes file only."""
    kind, arg = parse_or_raise(spec)
    if kind not in STREAMED_KINDS:
        raise DataError(f"data.public {spec!r} is not read shard by shard; use shards:<dir> or "
                        "folder:<dir>")
    root = Path(arg).resolve()
    if not root.is_dir():
        raise DataError(f"data.public {spec!r}: {arg} is not a directory; point it at a "
                        f"directory of {'Parquet shards' if kind == 'shards' else 'class folders'}")
    if kind == "folder":
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names:
            raise DataError(f"data.public {spec!r}: no classes found; add one subfolder per class")
        return StreamedSource(spec, kind, str(root), source_prefix(spec), tuple(names), tuple(names))
    shards = sorted(p.name for p in root.glob("*.parquet") if p.is_file())
    if not shards:
        raise DataError(f"data.public {spec!r}: no *.parquet shards in {arg}; write shards with "
                        f"columns image and label ({LAYOUT})")
    names = _declared_classes(spec, root, shards)
    return StreamedSource(spec, kind, str(root), source_prefix(spec), tuple(names), tuple(shards))


def _declared_classes(spec: str, root: Path, shards: list[str]) -> list[str]:
    """The class list: classes.txt beside the shards (line i names label i),
    or the shards' schema metadata, which must agree with each other and
    with the file; every shard's columns checked on the way."""
    declared, where = None, None
    if (root / CLASSES_FILE).is_file():
        declared = [ln.strip() for ln in (root / CLASSES_FILE).read_text().splitlines()]
        while declared and not declared[-1]:
            declared.pop()
        where = CLASSES_FILE
    for name in shards:
        try:
            schema = pq.read_schema(root / name)
        except Exception as e:  # pyarrow raises several types for non-Parquet input
            raise DataError(f"data.public {spec!r}: shard {name} is not readable Parquet ({e}); "
                            "rewrite or remove it") from e
        _check_columns(spec, name, schema)
        names = _file_class_names(schema, LABEL_COLUMN)
        if names is None:
            continue
        if declared is None:
            declared, where = names, f"{name}'s metadata"
        elif names != declared:
            raise DataError(f"data.public {spec!r}: the class list of shard {name}'s metadata "
                            f"differs from {where}'s; make them equal or remove one")
    if not declared:
        raise DataError(f"data.public {spec!r}: no class list; write {CLASSES_FILE} beside the "
                        "shards (line i names label i) or the schema metadata key "
                        f"privimage.class_names ({LAYOUT})")
    if not all(declared) or len(set(declared)) != len(declared):
        raise DataError(f"data.public {spec!r}: the class list in {where} has empty or repeated "
                        "names; list each class once, line i naming label i")
    return declared


def _check_columns(spec: str, name: str, schema: pa.Schema) -> None:
    missing = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c not in schema.names]
    if missing:
        unlabelled = (", or label the images by a pre-trained classifier's predictions with "
                      "scripts/label_public_shards.py") if missing == [LABEL_COLUMN] else ""
        raise DataError(f"data.public {spec!r}: shard {name} has no column(s) {missing} (has "
                        f"{schema.names}); write image (encoded bytes) and label (class "
                        f"index){unlabelled}")
    lt = schema.field(LABEL_COLUMN).type
    if not pat.is_integer(lt):
        raise DataError(f"data.public {spec!r}: shard {name}'s label column has type {lt}; store "
                        f"integer class indices and the names in {CLASSES_FILE}")
    it = schema.field(IMAGE_COLUMN).type
    if not (pat.is_binary(it) or pat.is_large_binary(it) or pat.is_struct(it)):
        raise DataError(f"data.public {spec!r}: shard {name}'s image column has type {it}; store "
                        "the encoded image bytes (PNG, JPEG)")


def part_path(cache_dir: str | os.PathLike, digest: str) -> Path:
    return Path(cache_dir) / f"part-{digest}.parquet"


def ensure_part(source: StreamedSource, shard: str, cache_dir: str | os.PathLike) -> dict:
    """Index one shard unless its part is cached: {shard, digest, rows, reused}.
    The part appears atomically, so an interrupted build leaves whole parts."""
    digest = source.digest(shard)
    path = part_path(cache_dir, digest)
    if path.is_file():
        return {"shard": shard, "digest": digest, "rows": pq.read_metadata(path).num_rows,
                "reused": True}
    table = source.index_shard(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return {"shard": shard, "digest": digest, "rows": table.num_rows, "reused": False}


def read_part(cache_dir: str | os.PathLike, digest: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, rows int64) of a cached part."""
    t = pq.read_table(part_path(cache_dir, digest))
    return t.column("label").to_numpy(), t.column("row").to_numpy()

