"""Materialise a subsample of a source as the declared sensitive dataset.

A subsample drawn inside a DP run breaks add/remove-one DP: removing one
record shifts which records a seeded positional draw selects (hundreds to
thousands of them), so the released outputs move by far more than one
record's sensitivity. Choosing a subsample is therefore the operator's act,
done once and outside the DP boundary (``privimage data subsample``): the
chosen records are written to a Parquet file that then IS the sensitive
dataset (``data.sensitive: parquet:PATH``), with its class list in the schema
metadata and a provenance record beside it. The DP guarantee of the runs on
that file covers its records; the records not drawn are not read by them.

The digest (:func:`source_digest`) identifies a dataset's records for the
lifetime ledger; see privimage_core/privacy/lifetime.py for why it may be
stored locally but never released.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from privimage_core.data.folders import CLASS_NAMES_KEY, folder_records, parquet_records
from privimage_core.data.provenance import STATEMENT, provenance_path
from privimage_core.data.sources import load_source
from privimage_core.data.specs import is_user_source, parse_spec
from privimage_core.errors import DataError


@dataclass
class Records:
    """A source's records as stored: encoded images (user sources) or pixel
    arrays (built-ins), with labels indexing a declared class list."""
    labels: np.ndarray
    class_names: list[str]
    classes_from: str
    encoded: list[bytes] | None = None
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        if self.pixels is None:
            img = Image.open(io.BytesIO(self.encoded[i]))
            img.load()
            return img
        arr = self.pixels[i]
        return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)

    def encoded_image(self, i: int) -> bytes:
        """The record's bytes as stored; built-ins are encoded as PNG (lossless)."""
        if self.pixels is None:
            return self.encoded[i]
        buf = io.BytesIO()
        self.image(i).save(buf, format="PNG")
        return buf.getvalue()


def read_records(spec: str, split: str = "train", class_names: list[str] | None = None
                 ) -> Records:
    """The records of ``spec`` without resizing or re-encoding them."""
    parsed = parse_spec(spec)
    if parsed is None:
        load_source(spec)  # raises the standard "unknown data source" message
    kind, arg = parsed
    if arg is None:
        ds = load_source(spec, split, class_names=class_names)  # native 28x28x1
        return Records(ds.labels, ds.class_names, ds.classes_from, pixels=ds.images)
    if kind == "folder":
        files, labels, names, source = folder_records(arg, class_names)
        return Records(labels, names, source, encoded=[p.read_bytes() for p in files])
    blobs, labels, names, source = parquet_records(arg, class_names=class_names)
    return Records(labels, names, source, encoded=blobs)


def _digest(rec: Records, rows) -> str:
    """SHA-256 over the sorted per-record digests of (label name, decoded
    pixels): independent of the row order and of a lossless re-encoding, so
    a materialised built-in subsample has the digests of its source records."""
    per = []
    for i in rows:
        img = rec.image(i)
        h = hashlib.sha256(rec.class_names[rec.labels[i]].encode() + b"\0")
        h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}\0".encode())
        h.update(img.tobytes())
        per.append(h.digest())
    return hashlib.sha256(b"".join(sorted(per))).hexdigest()


def source_digest(spec: str, split: str = "train", class_names: list[str] | None = None) -> str:
    """Content digest of a dataset's images and labels (the lifetime ledger's key)."""
    rec = read_records(spec, split, class_names)
    return _digest(rec, range(len(rec)))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def materialise_subsample(spec: str, n: int, out_path: str | os.PathLike, seed: int = 0,
                          split: str = "train", class_names: list[str] | None = None) -> Path:
    """Write ``n`` records of ``spec``, drawn uniformly without replacement by
    ``np.random.default_rng(seed)`` and kept in source order, to ``out_path``
    (readable as ``parquet:<out_path>``: columns image, label, label_name;
    the class list in the schema metadata) and a provenance record (source,
    n, seed, date, digest) beside it. Returns ``out_path``.

    Not a mechanism: the operator declares the file to be the dataset."""
    out = Path(out_path)
    if out.suffix != ".parquet":
        raise DataError(f"subsample output {out} must end in .parquet; pass --out PATH.parquet")
    prov_path = provenance_path(out)
    if out.exists() or prov_path.exists():
        # overwriting a declared dataset would silently swap the records its
        # runs' guarantees (and its lifetime ledger) refer to
        raise DataError(f"{out} (or its provenance) already exists; choose a new --out path")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"subsample size n={n!r}; pass a positive integer --n")
    rec = read_records(spec, split, class_names)
    if rec.classes_from == "labels":
        raise DataError(f"{spec} does not declare its classes; pass the class list "
                        "(--class-names) so the subsample can embed it")
    if n >= len(rec):
        raise DataError(f"n={n} is not below the {len(rec)} records of {spec}; use {spec} "
                        "itself as data.sensitive, or pass a smaller --n")
    rows = np.sort(np.random.default_rng(seed).choice(len(rec), n, replace=False))
    table = pa.table({
        "image": pa.array([rec.encoded_image(i) for i in rows], type=pa.binary()),
        "label": pa.array(rec.labels[rows], type=pa.int64()),
        "label_name": pa.array([rec.class_names[rec.labels[i]] for i in rows], type=pa.string()),
    }).replace_schema_metadata({CLASS_NAMES_KEY: json.dumps(rec.class_names).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {
        "source": spec.strip(), "split": None if is_user_source(spec) else split,
        "n": int(n), "seed": int(seed),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "class_names": rec.class_names, "classes_from": rec.classes_from,
        "digest_sha256": _digest(rec, rows), "statement": STATEMENT,
    }
    _write_atomic(out, lambda p: pq.write_table(table, p))
    _write_atomic(prov_path, lambda p: p.write_text(json.dumps(provenance, indent=2)))
    return out
