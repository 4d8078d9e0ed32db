"""The provenance record of a dataset materialised by ``privimage data
subsample`` (data/subsample.py): where it lies, what a run may release of it
(``declaration``) and the chain of sources it came from (``lineage``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from privimage_core.data.specs import parse_spec
from privimage_core.errors import DataError

PROVENANCE_SUFFIX = ".provenance.json"
# What the released manifest says about a materialised dataset (declaration()).
STATEMENT = ("the sensitive dataset is this subsample, chosen by the operator outside the DP "
             "boundary; the DP guarantee covers its records")


def provenance_path(path: str | os.PathLike) -> Path:
    """Where the provenance record of a materialised Parquet file lies."""
    return Path(path).with_suffix(PROVENANCE_SUFFIX)


def read_provenance(spec: str) -> dict | None:
    """The provenance record of a ``parquet:`` spec materialised here, else None."""
    parsed = parse_spec(spec)
    if parsed is None or parsed[0] != "parquet":
        return None
    path = provenance_path(parsed[1])
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not readable JSON ({e}); restore it from the materialised "
                        "dataset's copy") from None


def declaration(spec: str) -> dict | None:
    """What a run may release about its sensitive dataset's provenance: the
    provenance without its digest (the digest is a perfect test between
    neighbouring datasets; it stays local). None for a dataset not
    materialised here."""
    prov = read_provenance(spec)
    if prov is None:
        return None
    return {k: prov.get(k) for k in ("source", "split", "n", "seed", "created", "statement")}


def lineage(spec: str) -> list[str]:
    """``spec`` and the sources it was materialised from, nearest first."""
    out, seen = [spec], {spec.strip()}
    while (prov := read_provenance(out[-1])) is not None and prov.get("source") not in seen:
        out.append(prov["source"])
        seen.add(prov["source"])
    return out


def dataset_identity(spec: str, split: str = "train", declared: str | None = None) -> str:
    """What the lifetime ledger follows a dataset by: the operator's
    ``declared`` identity when given (shared by every version and copy of a
    dataset), else the origin of ``spec``: the source a materialised
    subsample was drawn from (recursively), a user folder's or file's
    absolute path, a built-in dataset's name and split. So a folder that
    gains or loses images, or a subsample of it, stays on one ledger; a copy
    elsewhere does not (declare an identity for that)."""
    if declared is not None:
        return f"declared:{declared.strip()}"
    chain = lineage(spec)
    root = chain[-1]
    if len(chain) > 1:  # the split the nearest record was drawn from
        split = read_provenance(chain[-2]).get("split") or split
    parsed = parse_spec(root)
    if parsed is None:
        raise DataError(f"unknown data source {root!r}; cannot identify it for the lifetime "
                        "ledger")
    kind, arg = parsed
    if arg is None:
        return f"builtin:{kind}:{split}"
    return f"{kind}:{Path(arg).expanduser().resolve()}"
