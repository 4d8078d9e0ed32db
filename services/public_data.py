"""The public pool on Ray Data: indexing streamed sources shard by shard, and
streaming their images (the query function's training, the pre-training
images), so that no process holds a large pool whole. The method (index
format, shard digests, reading rows, the query function) is privimage_core's;
this module only drives it, and imports no torch: its functions run in Ray
Data's worker processes. ``workers=0`` does the same in the calling process,
without Ray Data.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray

from privimage_core.data.shards import StreamedSource, ensure_part
from privimage_core.selection.public_index import PublicIndex, ShardReader

# Rows per read: small enough that a read of one class folder does not
# fill the shuffle buffer, large enough to amortise opening a shard.
CHUNK_ROWS = 256
# Reads per Ray Data task: enough that the per-task cost is small against decoding.
READS_PER_TASK = 4
# Images held by the local shuffle buffer of a training stream.
SHUFFLE_BUFFER = 8192


def ray_data_workers(workers: int) -> int:
    """``workers``, or 0 (read in this process) when no CPU is free for a Ray
    Data task: the selector actor holds its own, and on a one-CPU node the
    stream would wait for ever."""
    if workers and ray.is_initialized() and ray.available_resources().get("CPU", 0) < 1:
        return 0
    return workers


def _data_context() -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # the same seed gives the same stream (and so the same query function)
    ctx.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _index_one(item: dict, sources: list[dict], cache_dir: str) -> dict:
    src = StreamedSource.from_dict(sources[item["source"]])
    return {**ensure_part(src, item["shard"], cache_dir), "source": item["source"]}


def index_parts(sources: list[StreamedSource], cache_dir: str,
                workers: int) -> tuple[list[tuple[StreamedSource, list[str]]], dict]:
    """Each streamed source with the digests of its shards' index parts,
    indexing the shards whose part is not cached (a map over the shards);
    and {shards, reused, rows}. Parts appear one by one, so a build that
    stops keeps the shards it finished."""
    items = [{"source": i, "shard": sh} for i, s in enumerate(sources) for sh in s.shards]
    if not items:
        return [], {"shards": 0, "reused": 0, "rows": 0}
    dicts = [s.to_dict() for s in sources]
    workers = ray_data_workers(workers)
    if workers == 0:
        results = [_index_one(it, dicts, cache_dir) for it in items]
    else:
        _data_context()
        # indexing a shard reads one column: a few tasks of many shards each
        blocks = min(len(items), 4 * workers)
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        results = ds.map(_index_one, fn_kwargs={"sources": dicts, "cache_dir": cache_dir},
                         compute=ray.data.TaskPoolStrategy(size=workers)).take_all()
    digest = {(r["source"], r["shard"]): r["digest"] for r in results}
    out = [(s, [digest[(i, sh)] for sh in s.shards]) for i, s in enumerate(sources)]
    return out, {"shards": len(results), "reused": sum(bool(r["reused"]) for r in results),
                 "rows": sum(int(r["rows"]) for r in results)}


def _read_batch(batch: dict, index_dir: str, manifest: dict) -> dict:
    reader = ShardReader(index_dir, manifest)
    images = [reader.read(s, h, np.asarray(r, np.int64))
              for s, h, r in zip(batch["source"], batch["shard"], batch["rows"])]
    return {"image": np.concatenate(images),
            "label": np.concatenate([np.asarray(x, np.int64) for x in batch["labels"]]),
            "pos": np.concatenate([np.asarray(x, np.int64) for x in batch["pos"]])}


def _chunks(index: PublicIndex, table: pa.Table, shuffle_seed: int | None) -> list[dict]:
    chunks = index.chunks(table, CHUNK_ROWS)
    if shuffle_seed is not None:
        chunks = [chunks[i] for i in np.random.default_rng(shuffle_seed).permutation(len(chunks))]
    return chunks


def iter_images(index: PublicIndex, table: pa.Table, workers: int, batch_size: int,
                shuffle_seed: int | None = None, drop_last: bool = False
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(uint8 images, labels, positions in ``table``) batches of ``table``'s
    rows, read shard by shard by ``workers`` Ray Data tasks; shuffled by
    ``shuffle_seed`` (read order and a local buffer), else in read order."""
    chunks = _chunks(index, table, shuffle_seed)
    if not chunks:
        return
    workers = ray_data_workers(workers)
    if workers == 0:
        yield from _iter_local(index, chunks, batch_size, shuffle_seed, drop_last)
        return
    ds = _dataset(index, chunks, workers)
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                             **shuffle_options(shuffle_seed)):
        yield b["image"], b["label"], b["pos"]


def shuffle_options(seed: int | None) -> dict:
    """``iter_batches`` arguments of a stream shuffled by ``seed`` (none for None)."""
    return {} if seed is None else {"local_shuffle_buffer_size": SHUFFLE_BUFFER,
                                    "local_shuffle_seed": seed}


def _dataset(index: PublicIndex, chunks: list[dict], workers: int) -> "ray.data.Dataset":
    _data_context()
    items = [{"source": c["source"], "shard": c["shard"], "rows": c["rows"].tolist(),
              "labels": c["labels"].tolist(), "pos": c["pos"].tolist()} for c in chunks]
    blocks = -(-len(items) // READS_PER_TASK)
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _read_batch, batch_size=1, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=workers),
        fn_kwargs={"index_dir": str(index.directory), "manifest": index.manifest})


def stream_dataset(index: PublicIndex, table: pa.Table, workers: int,
                   shuffle_seed: int | None = None) -> "ray.data.Dataset":
    """The Ray Data dataset of ``table``'s rows (columns image, label, pos)
    read by ``workers`` tasks, its reads in the order ``shuffle_seed`` draws:
    what Ray Train's workers stream (services/public_query.py)."""
    return _dataset(index, _chunks(index, table, shuffle_seed), workers)


def _iter_local(index: PublicIndex, chunks: list[dict], batch_size: int,
                shuffle_seed: int | None, drop_last: bool):
    """``iter_images`` in this process: the same reads and a shuffle buffer."""
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    limit = SHUFFLE_BUFFER if rng is not None else batch_size
    buf: list[tuple] = []
    held = 0
    for i, c in enumerate(chunks):
        buf.append((index.reader.read(c["source"], c["shard"], c["rows"]), c["labels"], c["pos"]))
        held += len(c["rows"])
        last = i == len(chunks) - 1
        if held < limit and not last:
            continue
        x, y, p = (np.concatenate([b[k] for b in buf]) for k in range(3))
        if rng is not None:
            order = rng.permutation(len(y))
            x, y, p = x[order], y[order], p[order]
        keep = len(y) if last else len(y) - len(y) % batch_size
        for a in range(0, keep, batch_size):
            if drop_last and a + batch_size > keep:
                break
            yield x[a:a + batch_size], y[a:a + batch_size], p[a:a + batch_size]
        buf, held = [(x[keep:], y[keep:], p[keep:])], len(y) - keep


def read_images(index: PublicIndex, table: pa.Table, workers: int) -> np.ndarray:
    """uint8 images of ``table``'s rows, in its order (a selection, a
    subsample or a validation set: what fits in memory)."""
    h, w, c = index.manifest["image_shape"]
    out = np.empty((table.num_rows, h, w, c), np.uint8)
    for images, _, pos in iter_images(index, table, workers, batch_size=4096):
        out[pos] = images
    return out
