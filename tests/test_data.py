"""Data loaders, glyph rendering and the public index (real offline data, tiny synthetic files)."""
import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from privimage_core.data.folders import load_image_folder, load_parquet_images
from privimage_core.data.glyphs import ALL_CHARS, discover_fonts, render_glyphs, select_fonts
from privimage_core.data.idx import load_fashion_mnist, load_mnist, read_idx
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import build_public_pool, load_source, validate_sensitive
from privimage_core.errors import DataError
from privimage_core.selection.public_index import PublicIndex

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist_train():
    return load_mnist("train")


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return head + arr.astype(np.uint8).tobytes()


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, classes, size=8, mode="L", per_class=2):
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size), 40 * ci + i, np.uint8)).convert(mode).save(
                root / cls / f"{i}.png")
    return root


# ---- MNIST / Fashion-MNIST -------------------------------------------------

def test_mnist_real_counts(mnist_train):
    assert mnist_train.images.shape == (60000, 28, 28, 1)
    assert np.bincount(mnist_train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert mnist_train.class_names == [str(i) for i in range(10)]
    assert len(load_mnist("test")) == 10000


def test_fashion_mnist_real_shape():
    ds = load_fashion_mnist("test")
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert np.bincount(ds.labels).tolist() == [1000] * 10


def test_read_idx_raw_gz_variant_and_bad_magic(tmp_path):
    imgs = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28) % 256
    (tmp_path / "t10k-images.idx3-ubyte").write_bytes(_idx_bytes(imgs))  # dotted variant, raw
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # canonical, gzipped
        f.write(_idx_bytes(np.array([1, 2, 3])))
    ds = load_mnist("test", root=tmp_path)
    assert ds.images.shape == (3, 28, 28, 1) and ds.labels.tolist() == [1, 2, 3]
    assert np.array_equal(read_idx(tmp_path / "t10k-images.idx3-ubyte"), imgs)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_missing_mnist_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as e:
        load_mnist("train", root=tmp_path)
    assert str(tmp_path) in str(e.value) and "bash scripts/setup.sh" in str(e.value)
    assert "\n" not in str(e.value)


# ---- glyphs ------------------------------------------------------------------

def test_glyphs_deterministic_62_classes():
    a = render_glyphs(max_fonts=2)
    b = render_glyphs(max_fonts=2)
    assert a.images.shape == (124, 28, 28, 1) and a.num_classes == 62
    assert a.class_names[:3] == ["0", "1", "2"] and a.class_names[-1] == "z"
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.labels, b.labels)
    assert a.images.max() == 255 and a.images[:, 0, :].mean() < 1  # white on black, framed


def test_glyph_augmentation_and_seed_change_pixels():
    plain = render_glyphs(chars="0A", max_fonts=2, augment=False)
    aug = render_glyphs(chars="0A", max_fonts=2, augment=True)
    other = render_glyphs(chars="0A", max_fonts=2, augment=True, seed=1)
    assert not np.array_equal(plain.images, aug.images)
    assert not np.array_equal(aug.images, other.images)


def test_glyph_cache_and_font_discovery(tmp_path):
    fonts = discover_fonts()
    assert len(fonts) >= 10 and fonts == sorted(fonts)
    wrong = [f for f in fonts if "Symbol" in f or "D050000L" in f]  # Latin->Greek / dingbats
    assert not wrong, f"fonts that map Latin letters to other glyphs got in: {wrong}"
    chosen = select_fonts(fonts, 4)
    assert len(chosen) == 4 and select_fonts(fonts, 4) == chosen
    first = render_glyphs(chars="7", max_fonts=3, per_font=2, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("glyphs-*.npz"))) == 1
    again = render_glyphs(chars="7", max_fonts=3, per_font=2, cache_dir=tmp_path)
    assert np.array_equal(first.images, again.images)


def test_without_the_glyph_name_check_dingbats_get_in(monkeypatch, tmp_path):
    """Control for the check above: it is the cmap glyph-name check (fontTools)
    that keeps URW's D050000L dingbats out, and a scan without it is cached
    under another key, never reused by a process that has fontTools."""
    from privimage_core.data import glyphs
    if not any("D050000L" in f for f in glyphs._font_files(glyphs.FONT_DIRS)):
        pytest.skip("fonts-urw-base35 (D050000L) is not installed")
    have = glyphs._have_fonttools
    monkeypatch.setattr(glyphs, "_DISCOVERED", {})  # scan, not an earlier test's memo
    monkeypatch.setattr(glyphs, "_have_fonttools", lambda: False)
    unchecked = discover_fonts(cache_dir=tmp_path)
    assert any("D050000L" in f for f in unchecked)
    monkeypatch.setattr(glyphs, "_have_fonttools", have)
    assert not any("D050000L" in f for f in discover_fonts(cache_dir=tmp_path))
    assert len(list(tmp_path.glob("fonts-*.json"))) == 2


def test_no_fonts_error_names_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install fonts-dejavu-core"):
        render_glyphs(font_dirs=[str(tmp_path)])


# ---- user folders and Parquet ----------------------------------------------

def test_image_folder_loads_sorted_classes(tmp_path):
    root = _folder(tmp_path / "pets", ["dog", "cat"])
    ds = load_image_folder(root, 8, 1)
    assert ds.class_names == ["cat", "dog"] and ds.images.shape == (4, 8, 8, 1)
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.images[2, 0, 0, 0] == 0  # dog was class 0 on disk


def test_image_folder_wrong_mode_and_shape(tmp_path):
    root = _folder(tmp_path / "rgbset", ["a", "b"], size=8, mode="RGB")
    with pytest.raises(DataError, match=r"rgbset.*mode RGB, expected 8x8 mode L.*channels"):
        load_image_folder(root, 8, 1)
    with pytest.raises(DataError, match=r"8x8 mode RGB, expected 16x16 mode RGB.*resize: true"):
        load_image_folder(root, 16, 3)
    ds = load_image_folder(root, 16, 1, resize=True)
    assert ds.images.shape == (4, 16, 16, 1)


def test_image_folder_empty_class_and_missing_path(tmp_path):
    root = _folder(tmp_path / "ds", ["full"])
    (root / "hollow").mkdir()  # the operator declared it: a class, even without images
    ds = load_image_folder(root, 8, 1)
    assert ds.class_names == ["full", "hollow"] and ds.classes_from == "folders"
    assert ds.labels.tolist() == [0, 0]
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8, 1)
    (tmp_path / "void" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(tmp_path / "void", 8, 1)


def test_parquet_bytes_struct_and_string_labels(tmp_path):
    gray = [_png(np.full((8, 8), v, np.uint8), "L") for v in (10, 20, 30)]
    path = tmp_path / "faces.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in gray],
                             "label": ["smile", "frown", "smile"]}), path)
    ds = load_parquet_images(path, 8, 1)
    assert ds.class_names == ["frown", "smile"] and ds.labels.tolist() == [1, 0, 1]
    assert ds.images[:, 0, 0, 0].tolist() == [10, 20, 30]
    assert ds.classes_from == "labels"  # no declaration: read off the labels
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"img": gray, "y": [0, 2, 2]}), raw)
    und = load_parquet_images(raw, 8, 1, image_column="img", label_column="y")
    assert und.class_names == ["0", "1", "2"] and und.classes_from == "labels"
    with pytest.raises(DataError, match=r"raw: image row 0 is 8x8 mode L, expected 28x28.*resize: true"):
        load_parquet_images(raw, 28, 1, image_column="img", label_column="y")
    with pytest.raises(DataError, match="image_column"):
        load_parquet_images(raw, 8, 1)
    with pytest.raises(DataError, match="does not exist"):
        load_parquet_images(tmp_path / "missing.parquet", 8, 1)


# ---- sources, public pool, index --------------------------------------------

def test_load_source_resizes_converts_and_subsamples():
    a = load_source("mnist", "test", image_size=32, channels=3, max_per_class=3, seed=5)
    b = load_source("mnist", "test", image_size=32, channels=3, max_per_class=3, seed=5)
    assert a.images.shape == (30, 32, 32, 3) and np.bincount(a.labels).tolist() == [3] * 10
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.images[..., 0], a.images[..., 2])
    with pytest.raises(DataError, match="unknown data source 'cifar'"):
        load_source("cifar")


def test_public_pool_namespaces_and_index_round_trip(tmp_path):
    _folder(tmp_path / "mine", ["x", "y"], size=28)
    pool = build_public_pool(["glyphs", "fashion_mnist", f"folder:{tmp_path / 'mine'}"], 28, 1,
                             max_per_class=2, glyph_opts={"chars": "0A", "max_fonts": 2})
    assert pool.class_names[:2] == ["glyph/0", "glyph/A"]
    assert "fmnist/Bag" in pool.class_names and pool.class_names[-2:] == ["mine/x", "mine/y"]
    assert pool.meta["source"].tolist() == ["glyph"] * 4 + ["fmnist"] * 20 + ["mine"] * 4

    index = PublicIndex.build(pool, tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "index.parquet", "labels.json", "manifest.json",
        "pixels-fmnist.npy", "pixels-glyph.npy", "pixels-mine.npy"]
    opened = PublicIndex.open(tmp_path / "idx")
    assert opened.num_rows == 28 and opened.label_names == pool.class_names
    assert opened.counts_per_label().tolist() == np.bincount(pool.labels).tolist()
    sel = opened.select([1, "fmnist/Bag", len(pool.class_names) - 1])
    assert sel.num_rows == 6 and set(sel.column("label_name").to_pylist()) == {
        "glyph/A", "fmnist/Bag", "mine/y"}
    part = opened.load(sel)
    rows = np.flatnonzero(np.isin(pool.labels, [1, pool.class_names.index("fmnist/Bag"), len(pool.class_names) - 1]))
    assert np.array_equal(part.images, pool.images[rows]) and np.array_equal(part.labels, pool.labels[rows])
    full = opened.load()
    assert np.array_equal(full.images, pool.images) and full.meta["source"].tolist() == pool.meta["source"].tolist()

    stamp = os.stat(tmp_path / "idx" / "index.parquet").st_mtime_ns
    PublicIndex.build(pool, tmp_path / "idx")  # same content: reused, not rewritten
    assert os.stat(tmp_path / "idx" / "index.parquet").st_mtime_ns == stamp
    smaller = pool.subset(np.arange(4))
    smaller.meta["source"] = pool.meta["source"][:4]
    assert PublicIndex.build(smaller, tmp_path / "idx").num_rows == 4
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["num_rows"] == 4
    with pytest.raises(DataError, match="PublicIndex.build"):
        PublicIndex.open(tmp_path / "nothing")


def test_validate_sensitive_keeps_empty_classes_refuses_derived_lists():
    imgs = np.zeros((3, 4, 4, 1), np.uint8)
    validate_sensitive(ImageSet(imgs, np.array([0, 0, 2]), ["a", "b", "c"], "sens"))  # b: empty
    derived = ImageSet(imgs, np.array([0, 0, 2]), ["0", "1", "2"], "sens", classes_from="labels")
    with pytest.raises(DataError, match="read off the sensitive labels; declare it with "
                                        "data.class_names"):
        validate_sensitive(derived)
    with pytest.raises(DataError, match="the sensitive dataset is empty"):
        validate_sensitive(ImageSet(imgs[:0], np.array([], np.int64), ["a"], "sens"))


def test_builtin_class_names_may_only_repeat_the_fixed_list():
    ds = load_source("mnist", "test", class_names=[str(i) for i in range(10)])
    assert ds.classes_from == "builtin"
    with pytest.raises(DataError, match="mnist has fixed classes.*remove data.class_names"):
        load_source("mnist", "test", class_names=["a", "b"])


def test_public_pool_refuses_an_empty_public_class(tmp_path):
    root = _folder(tmp_path / "pub", ["x"], size=28)
    (root / "y").mkdir()
    with pytest.raises(DataError, match="class 'y' has no images"):
        build_public_pool([f"folder:{root}"], 28, 1)


def test_core_data_does_not_import_ray():
    code = ("import sys, privimage_core.data.sources, privimage_core.selection.public_index; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
