"""Row arithmetic over the public index's table, vectorised so that it stays
cheap at ImageNet's 1.28M rows: the per-class cap, and the plan of reads
(which rows of which shard) that fetches a set of rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def codes(table: pa.Table, column: str) -> tuple[np.ndarray, list[str]]:
    """(int codes, values) of a string column, dictionary-encoded or not."""
    col = table.column(column)
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros(0, np.int64), []
    return arr.indices.to_numpy().astype(np.int64), arr.dictionary.to_pylist()


def cap_per_class(labels: np.ndarray, num_classes: int, cap: int | None,
                  seed: int) -> np.ndarray:
    """Sorted positions keeping at most ``cap`` rows of each class: the rows
    sources.subsample_per_class keeps of the same labels (a draw seeded by
    (seed, class) among the class's rows in order)."""
    if cap is None:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    keep = []
    for c in np.flatnonzero(np.diff(bounds) > cap):
        idx = order[bounds[c]:bounds[c + 1]]
        keep.append(np.random.default_rng([seed, int(c)]).choice(idx, cap, replace=False))
    small = np.repeat(np.diff(bounds) <= cap, np.diff(bounds))
    keep.append(order[small])
    return np.sort(np.concatenate(keep))


def read_chunks(table: pa.Table, chunk_rows: int) -> list[dict]:
    """Reads fetching ``table``'s rows: grouped by (source, shard), rows in
    ascending order within a shard (neighbouring rows share Parquet row
    groups), at most ``chunk_rows`` per read. Each read: source, shard,
    rows, labels, ids, and pos (the rows' positions in ``table``)."""
    src, src_names = codes(table, "source")
    shard, shard_names = codes(table, "shard")
    rows = table.column("row").to_numpy()
    labels = table.column("label").to_numpy().astype(np.int64)
    ids = table.column("id").to_numpy()
    order = np.lexsort((rows, shard, src))
    key = src[order] * (len(shard_names) + 1) + shard[order]
    cuts = np.flatnonzero(np.diff(key)) + 1
    out = []
    for group in np.split(order, cuts) if len(order) else []:
        for a in range(0, len(group), chunk_rows):
            pos = group[a:a + chunk_rows]
            out.append({"source": src_names[src[pos[0]]], "shard": shard_names[shard[pos[0]]],
                        "rows": rows[pos], "labels": labels[pos], "ids": ids[pos], "pos": pos})
    return out
