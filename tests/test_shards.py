"""The sharded public source (shards:<dir>) and its streaming index, without
Ray: the layout and its one-line errors, the index against a full load, the
per-shard cache (reuse, rebuild, resume), and a selection that reads only the
selected rows and equals the in-memory path's."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from privimage_core.data import shards as shards_mod
from privimage_core.data.shards import ensure_part, open_streamed
from privimage_core.data.sources import build_public_pool, load_source
from privimage_core.errors import DataError
from privimage_core.selection.public_index import PublicIndex
from services.public_data import index_parts
from tests.pool_helpers import make_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pools") / "pool", images=600, classes=12, shards=3)


def _copy(pool, dst):
    shutil.copytree(pool, dst)
    return dst


def _build(src_dir, tmp, cache="cache", max_per_class=None, workers=0):
    src = open_streamed(f"shards:{src_dir}")
    parts, stats = index_parts([src], str(tmp / cache), workers)
    idx = PublicIndex.build_sources(None, parts, tmp / "idx", tmp / cache, (32, 32, 3),
                                    max_per_class, 0)
    return idx, stats


def _write(path, labels, images=None, meta=None, label_type=pa.int32(), row_group=None):
    if images is None:
        images = [_png(i) for i in range(len(labels))]
    t = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, label_type)})
    if meta is not None:
        t = t.replace_schema_metadata({b"privimage.class_names": json.dumps(meta).encode()})
    pq.write_table(t, path, row_group_size=row_group)


def _labels(d):
    """Every label of a pool, read shard by shard in shard order."""
    return np.concatenate([pq.read_table(p, columns=["label"]).column("label").to_numpy()
                           for p in sorted(d.glob("*.parquet"))])


def _png(seed, size=32):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(
        buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ layout

def test_a_generated_pool_opens_with_its_declared_classes(pool, tmp_path):
    src = open_streamed(f"shards:{pool}")
    assert src.prefix == "pool" and len(src.class_names) == 12 and len(src.shards) == 3
    assert src.class_names[0] == "disc-ember-solid"
    # either declaration alone is enough: the metadata without classes.txt ...
    d = _copy(pool, tmp_path / "meta")
    (d / "classes.txt").unlink()
    assert open_streamed(f"shards:{d}").class_names == src.class_names
    # ... and classes.txt without the metadata
    d = _copy(pool, tmp_path / "file")
    for name in src.shards:
        pq.write_table(pq.read_table(d / name).replace_schema_metadata(None), d / name)
    assert open_streamed(f"shards:{d}").class_names == src.class_names


@pytest.mark.parametrize("case, problem, fix", [
    ("nodir", "is not a directory", "point it at a directory"),
    ("empty", "no *.parquet shards", "write shards with columns image and label"),
    ("nolabel", "has no column(s) ['label']", "scripts/label_public_shards.py"),
    ("strlabel", "label column has type string", "store integer class indices"),
    ("noclasses", "no class list", "write classes.txt beside the shards"),
    ("differ", "differs from classes.txt's", "make them equal or remove one"),
    ("repeated", "empty or repeated names", "list each class once"),
    ("notparquet", "is not readable Parquet", "rewrite or remove it"),
])
def test_layout_errors_are_one_line_with_the_fix(tmp_path, case, problem, fix):
    d = tmp_path / "pub"
    d.mkdir()
    (d / "classes.txt").write_text("a\nb\n")
    if case == "nodir":
        d = tmp_path / "missing"
    elif case == "nolabel":
        pq.write_table(pa.table({"image": pa.array([_png(0)], pa.binary())}), d / "s0.parquet")
    elif case == "strlabel":
        _write(d / "s0.parquet", ["a"], label_type=pa.string())
    elif case == "noclasses":
        (d / "classes.txt").unlink()
        _write(d / "s0.parquet", [0, 1])
    elif case == "differ":
        _write(d / "s0.parquet", [0, 1], meta=["a", "c"])
    elif case == "repeated":
        (d / "classes.txt").write_text("a\na\n")
        _write(d / "s0.parquet", [0, 1])
    elif case == "notparquet":
        (d / "s0.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError) as e:
        open_streamed(f"shards:{d}")
    msg = str(e.value)
    assert "\n" not in msg and problem in msg and fix in msg and "data.public" in msg, msg


@pytest.mark.parametrize("labels, problem", [
    ([0, 5], "labels beyond the 2 declared classes"),
    ([0, 0], "class 'b' has no images"),
    ([0, None], "null labels"),
    ([0, -1], "negative labels"),
])
def test_label_errors_surface_when_indexing(tmp_path, labels, problem):
    d = tmp_path / "pub"
    d.mkdir()
    (d / "classes.txt").write_text("a\nb\n")
    _write(d / "s0.parquet", labels)
    with pytest.raises(DataError) as e:
        _build(d, tmp_path)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_shards_is_a_public_source_only(pool):
    with pytest.raises(DataError, match="is a data.public source"):
        load_source(f"shards:{pool}")


# ------------------------------------------------------------------ the index

def test_index_counts_equal_a_full_load(pool, tmp_path):
    idx, stats = _build(pool, tmp_path)
    whole = _labels(pool)
    assert idx.num_rows == len(whole) == stats["rows"] == 600
    assert idx.counts_per_label().tolist() == np.bincount(whole, minlength=12).tolist()
    assert idx.label_names[3] == "pool/triangle-ember-solid"
    # the cap (data.public_max_per_class) keeps at most 20 of each class
    parts, _ = index_parts([open_streamed(f"shards:{pool}")], str(tmp_path / "cache"), 0)
    capped = PublicIndex.build_sources(None, parts, tmp_path / "capped", tmp_path / "cache",
                                       (32, 32, 3), 20, 0)
    assert capped.counts_per_label().tolist() == [20] * 12


def test_selection_reads_only_selected_rows_and_equals_the_in_memory_path(pool, tmp_path,
                                                                          monkeypatch):
    streamed, _ = _build(pool, tmp_path)
    whole = _copy(pool, tmp_path / "pool")  # the same files, for parquet: (no classes.txt)
    (whole / "classes.txt").unlink()
    memory = PublicIndex.build(build_public_pool([f"parquet:{whole}"], 32, 3), tmp_path / "mem")
    assert memory.label_names == streamed.label_names  # same prefix, same classes
    opened = []
    real_open = shards_mod._open
    monkeypatch.setattr(shards_mod, "_open", lambda *a: opened.append(1) or real_open(*a))
    sel_s, sel_m = streamed.select([2, 7]), memory.select([2, 7])
    a, b = streamed.load(sel_s), memory.load(sel_m)
    assert len(opened) == sel_s.num_rows == int(streamed.counts_per_label()[[2, 7]].sum())
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.meta["id"].tolist() == b.meta["id"].tolist()
    # control: the whole pool decodes every row
    opened.clear()
    streamed.load()
    assert len(opened) == 600


def test_rows_come_from_their_row_groups_in_the_order_asked(tmp_path):
    d = tmp_path / "pub"
    d.mkdir()
    (d / "classes.txt").write_text("a\nb\n")
    imgs = [_png(i) for i in range(30)]
    _write(d / "s0.parquet", [i % 2 for i in range(30)], images=imgs, row_group=7)
    src = open_streamed(f"shards:{d}")
    rows = np.array([29, 0, 8, 7, 15, 14])
    got = src.read_rows("s0.parquet", rows, 32, 3)
    want = np.stack([np.asarray(Image.open(io.BytesIO(imgs[r]))) for r in rows])
    assert np.array_equal(got, want)
    # resized and converted on read, as data.resize does
    assert src.read_rows("s0.parquet", rows, 16, 1).shape == (6, 16, 16, 1)


# ------------------------------------------------------------------ the per-shard cache

def test_cache_reuses_unchanged_shards_and_rebuilds_a_changed_one(pool, tmp_path):
    d = _copy(pool, tmp_path / "pool")
    first, stats = _build(d, tmp_path)
    assert stats == {"shards": 3, "reused": 0, "rows": 600}
    _, again = _build(d, tmp_path)
    assert again["reused"] == 3
    # rewrite one shard with other labels (same row count, same size)
    name = open_streamed(f"shards:{d}").shards[1]
    old = pq.read_table(d / name)
    flipped = old.set_column(1, "label", pa.array((11 - old.column("label").to_numpy())
                                                  .astype(np.int32)))
    pq.write_table(flipped, d / name, row_group_size=1024, compression="none")
    rebuilt, stats = _build(d, tmp_path)
    assert stats["reused"] == 2
    want = np.bincount(_labels(d), minlength=12)
    assert rebuilt.counts_per_label().tolist() == want.tolist()
    assert want.tolist() != first.counts_per_label().tolist()  # the change was visible
    # a copy that keeps the modification time (cp -p, rsync -t) is still
    # told apart by its size and footer
    st = os.stat(d / name)
    pq.write_table(flipped.slice(0, 150), d / name)
    os.utime(d / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _build(d, tmp_path)[0].num_rows == 550


def test_an_interrupted_build_resumes_from_the_shards_it_finished(pool, tmp_path):
    d = _copy(pool, tmp_path / "pool")
    names = open_streamed(f"shards:{d}").shards
    good = pq.read_table(d / names[2])
    bad = good.set_column(1, "label", pa.array([None] * good.num_rows, pa.int32()))
    pq.write_table(bad, d / names[2])
    with pytest.raises(DataError, match="null labels"):
        _build(d, tmp_path)
    assert len(list((tmp_path / "cache").glob("part-*.parquet"))) == 2  # shards 0 and 1 kept
    pq.write_table(good, d / names[2])
    idx, stats = _build(d, tmp_path)
    assert stats["reused"] == 2 and idx.num_rows == 600
    # control: a cold cache reuses nothing
    assert _build(d, tmp_path, cache="cold")[1]["reused"] == 0


def test_ensure_part_writes_whole_parts_only(pool, tmp_path):
    src = open_streamed(f"shards:{pool}")
    info = ensure_part(src, src.shards[0], tmp_path)
    assert not info["reused"] and ensure_part(src, src.shards[0], tmp_path)["reused"]
    assert [p.name for p in tmp_path.iterdir()] == [f"part-{info['digest']}.parquet"]


# ------------------------------------------------------------------ a public ImageFolder

def test_a_public_folder_is_indexed_from_its_listing_one_shard_per_class(tmp_path, monkeypatch):
    root = tmp_path / "pics"
    for c, n in (("cat", 3), ("dog", 2), ("owl", 4)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((28, 28), 10 * i + len(c), np.uint8)).save(root / c / f"{i}.png")
    opened = []
    real_open = shards_mod._open
    monkeypatch.setattr(shards_mod, "_open", lambda *a: opened.append(1) or real_open(*a))
    src = open_streamed(f"folder:{root}")
    parts, stats = index_parts([src], str(tmp_path / "cache"), 0)
    idx = PublicIndex.build_sources(None, parts, tmp_path / "idx", tmp_path / "cache", (28, 28, 1))
    assert not opened  # indexing decoded no image
    assert idx.label_names == ["pics/cat", "pics/dog", "pics/owl"] and stats["shards"] == 3
    assert idx.counts_per_label().tolist() == [3, 2, 4]
    # the same images as the in-memory folder: path reads
    mem = build_public_pool([f"folder:{root}"], 28, 1)
    assert np.array_equal(idx.load().images, mem.images)
    # a new image rebuilds its class's part only
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "dog" / "9.png")
    assert index_parts([open_streamed(f"folder:{root}")], str(tmp_path / "cache"), 0)[1][
        "reused"] == 2
    # a public folder's images must have the run's size, as they always had to
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "owl" / "big.png")
    src = open_streamed(f"folder:{root}")
    with pytest.raises(DataError, match=r"owl/big.png is 30x30 mode L, expected 28x28 mode L; "
                                        r"set data.image_size: 30 .* or data.resize: true"):
        src.read_rows("owl", np.arange(5), 28, 1)
    # an image removed after indexing: one line that says to index again
    with pytest.raises(DataError, match="cat has fewer images than its index"):
        src.read_rows("cat", np.arange(4), 28, 1)


# ------------------------------------------------------------------ public data without labels

def _unlabelled(pool, d):
    """The pool's shards without their label column (and without classes.txt)."""
    d.mkdir()
    for p in sorted(pool.glob("*.parquet")):
        pq.write_table(pq.read_table(p, columns=["image"]), d / p.name, row_group_size=100)
    return d


def test_unlabelled_shards_are_labelled_by_the_classifier_and_then_indexed(pool, tmp_path):
    from privimage_core.data.label_shards import LABELS_KEY, label_shards
    src = _unlabelled(pool, tmp_path / "raw")
    names = ["dark", "unused", "bright"]
    calls = []

    def predict(x):  # a stand-in classifier: bright or dark images
        calls.append(len(x))
        return np.where(x.reshape(len(x), -1).mean(1) > 128, 2, 0)

    info = label_shards(src, tmp_path / "out", predict, names, "stand-in", 32, 3, batch=64)
    assert info["images"] == 600 and info["shards"] == 3 and sum(calls) == 600
    out = open_streamed(f"shards:{tmp_path / 'out'}")
    tables = {s: pq.read_table(tmp_path / "out" / s) for s in out.shards}
    preds = {s: predict(out.read_rows(s, np.arange(t.num_rows), 32, 3)) for s, t in tables.items()}
    used = sorted(set(np.concatenate(list(preds.values())).tolist()))
    assert list(out.class_names) == [names[i] for i in used]  # never-predicted classes dropped
    assert pq.read_schema(tmp_path / "out" / out.shards[0]).metadata[LABELS_KEY] == b"stand-in"
    # labels are the images' predictions, the bytes unchanged, in the input's order
    for s, t in tables.items():
        assert t.column("image").to_pylist() == pq.read_table(src / s).column("image").to_pylist()
        assert t.column("label").to_numpy().tolist() == [used.index(v) for v in preds[s]]
    idx, _ = _build(tmp_path / "out", tmp_path)
    assert idx.num_rows == 600
    # a second run resumes from the cached predictions: no image is classified again
    calls.clear()
    label_shards(src, tmp_path / "out", predict, names, "stand-in", 32, 3)
    assert not calls
    # control: another classifier (another note) is never served those labels
    label_shards(src, tmp_path / "out", predict, names, "stand-in v2", 32, 3)
    assert sum(calls) == 600
    # refused: labelled input, and writing over the input
    with pytest.raises(DataError, match="already has a 'label' column"):
        label_shards(pool, tmp_path / "o2", predict, names, "x")
    with pytest.raises(DataError, match="is the input directory"):
        label_shards(src, src, predict, names, "x")


def test_a_tree_of_image_files_is_labelled_by_a_torchvision_classifier(tmp_path):
    import subprocess
    import sys

    import torch

    from privimage_core.selection.pretrained import build_network
    from tests.pool_helpers import ROOT
    raw = tmp_path / "raw" / "nested"
    raw.mkdir(parents=True)
    for i in range(12):
        Image.open(io.BytesIO(_png(i, size=40))).save(raw / f"{i:02d}.png")
    torch.manual_seed(0)
    torch.save(build_network("resnet18", 4).state_dict(), tmp_path / "w.pt")
    (tmp_path / "names.txt").write_text("w\nx\ny\nz\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "label_public_shards.py"), "--src",
         str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--weights", str(tmp_path / "w.pt"),
         "--architecture", "resnet18", "--classes", str(tmp_path / "names.txt"),
         "--input-size", "32"], capture_output=True, text=True, check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["images"] == 12 and info["shards"] == 1 and "predicted by resnet18 w.pt" in \
        info["labels"]
    src = open_streamed(f"shards:{tmp_path / 'out'}")
    assert set(src.class_names) <= {"w", "x", "y", "z"} and len(src.class_names) == info["classes"]
    assert src.read_rows(src.shards[0], np.arange(12), 32, 3).shape == (12, 32, 32, 3)
