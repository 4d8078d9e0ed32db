"""The sensitive class list is declared, never read off the
records; a subsample is a materialised, declared dataset, never drawn in a run."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from privimage_core.config import from_dict
from privimage_core.data.folders import CLASS_NAMES_KEY
from privimage_core.data.provenance import declaration, provenance_path, read_provenance
from privimage_core.data.sources import check_public_specs, load_source, validate_sensitive
from privimage_core.data.subsample import materialise_subsample, source_digest
from privimage_core.errors import ConfigError, DataError
from privimage_core.selection.distribution import class_histograms

NAMES = ["ant", "bee", "cat", "dog"]


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path, labels, metadata_names=None):
    table = pa.table({"image": [_png(10 * i) for i in range(len(labels))], "label": labels})
    if metadata_names is not None:
        table = table.replace_schema_metadata({CLASS_NAMES_KEY: json.dumps(metadata_names)})
    pq.write_table(table, path)
    return f"parquet:{path}"


def _shape(ds):
    """The released histogram's shape, as the query computes it."""
    topk = np.zeros((len(ds), 1), np.int64)
    return class_histograms(topk, ds.labels, 5, ds.num_classes).shape


# "dog" (the maximal label, held by one record) is the record removed.
CASES = {
    "strings+config": (["ant", "bee", "bee", "dog"], None, NAMES),
    "ints+config": ([0, 1, 1, 3], None, NAMES),
    "ints+metadata": ([0, 1, 1, 3], NAMES, None),
    "strings+metadata": (["ant", "bee", "bee", "dog"], NAMES, None),
}


@pytest.mark.parametrize("case", CASES)
def test_removing_the_unique_maximal_record_keeps_classes_and_shape(tmp_path, case):
    labels, meta, declared = CASES[case]
    full = load_source(_parquet(tmp_path / "full.parquet", labels, meta), image_size=8,
                       class_names=declared)
    less = load_source(_parquet(tmp_path / "less.parquet", labels[:-1], meta), image_size=8,
                       class_names=declared)
    assert full.class_names == less.class_names == NAMES
    assert _shape(full) == _shape(less) == (4, 5)
    for ds in (full, less):
        validate_sensitive(ds)  # "cat" (and, in less, "dog") are empty: they flow through
    assert full.labels.tolist() == [0, 1, 1, 3]


def test_undeclared_parquet_classes_are_refused_for_the_sensitive_set(tmp_path):
    """Without a declaration the list would follow the labels (here it
    shrinks when the unique maximal record goes), so it is refused."""
    full = load_source(_parquet(tmp_path / "full.parquet", [0, 1, 1, 3]), image_size=8)
    less = load_source(_parquet(tmp_path / "less.parquet", [0, 1, 1]), image_size=8)
    assert full.num_classes == 4 and less.num_classes == 2  # what the declaration prevents
    for ds in (full, less):
        with pytest.raises(DataError, match="declare it with data.class_names"):
            validate_sensitive(ds)


def test_folder_keeps_a_class_whose_only_image_was_removed(tmp_path):
    root = tmp_path / "pets"
    for cls, n in (("cat", 2), ("dog", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / cls / f"{i}.png")
    full = load_source(f"folder:{root}", image_size=8)
    (root / "dog" / "0.png").unlink()
    less = load_source(f"folder:{root}", image_size=8)
    assert full.class_names == less.class_names == ["cat", "dog"]
    assert _shape(full) == _shape(less)
    validate_sensitive(less)


@pytest.mark.parametrize("labels, declared, meta", [
    (["ant", "zebra"], NAMES, None),        # a string label outside data.class_names
    ([0, 7], NAMES, None),                  # an integer label past it
    ([0, 2], None, ["ant", "bee"]),         # past the file's own declaration
    ([0, 1], ["ant"], ["ant", "bee"]),      # the file declares more than the config
])
def test_unknown_labels_refused_without_naming_or_counting_them(tmp_path, labels, declared, meta):
    spec = _parquet(tmp_path / "unk.parquet", labels, meta)
    with pytest.raises(DataError) as e:
        load_source(spec, image_size=8, class_names=declared)
    msg = str(e.value)
    assert "labels outside the declared class list" in msg and "declare every class" in msg
    assert not any(ch.isdigit() for ch in msg) and "zebra" not in msg and "bee" not in msg
    assert "\n" not in msg


def test_folder_subdirectory_outside_the_declared_list_is_refused(tmp_path):
    (tmp_path / "f" / "secret").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "f" / "secret" / "0.png")
    with pytest.raises(DataError, match="declare every class") as e:
        load_source(f"folder:{tmp_path / 'f'}", image_size=8, class_names=["ant"])
    assert "secret" not in str(e.value)


def test_sensitive_max_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"sensitive_max": 1000}})
    msg = str(e.value)
    assert msg.startswith("data.sensitive_max") and "add/remove-one" in msg
    assert "privimage data subsample --source SPEC --n N --out PATH.parquet" in msg
    assert "data.sensitive: parquet:PATH.parquet" in msg and "\n" not in msg
    assert from_dict({"data": {"sensitive_max": None}}).data.sensitive_max is None


@pytest.mark.parametrize("bad", [[], ["a", "a"], ["a", " "]])
def test_class_names_config_validation(bad):
    with pytest.raises(ConfigError, match="data.class_names must list distinct, non-empty"):
        from_dict({"data": {"class_names": bad}})


def test_materialised_mnist_subsample_reads_back_with_classes_and_provenance(tmp_path):
    out = materialise_subsample("mnist", 60, tmp_path / "sub" / "mnist60.parquet", seed=3,
                                split="test")
    src = load_source("mnist", "test")
    rows = np.sort(np.random.default_rng(3).choice(len(src), 60, replace=False))
    back = load_source(f"parquet:{out}")
    assert np.array_equal(back.images, src.images[rows])
    assert np.array_equal(back.labels, src.labels[rows])
    assert back.class_names == src.class_names and back.classes_from == "metadata"
    validate_sensitive(back)
    prov = read_provenance(f"parquet:{out}")
    assert provenance_path(out).is_file()
    assert {k: prov[k] for k in ("source", "split", "n", "seed", "class_names")} == {
        "source": "mnist", "split": "test", "n": 60, "seed": 3, "class_names": src.class_names}
    assert prov["digest_sha256"] == source_digest(f"parquet:{out}")
    assert prov["digest_sha256"] != source_digest("mnist", "test")
    stated = declaration(f"parquet:{out}")
    assert stated["n"] == 60 and "outside the DP boundary" in stated["statement"]
    assert "digest_sha256" not in stated  # the digest stays local
    with pytest.raises(DataError, match="already exists"):
        materialise_subsample("mnist", 60, out, seed=4, split="test")


def test_subsample_of_user_data_keeps_bytes_and_declared_classes(tmp_path):
    labels = ["bee", "ant", "bee", "bee", "ant"]
    spec = _parquet(tmp_path / "user.parquet", labels)
    with pytest.raises(DataError, match="does not declare its classes.*--class-names"):
        materialise_subsample(spec, 3, tmp_path / "a.parquet", seed=0)
    out = materialise_subsample(spec, 3, tmp_path / "b.parquet", seed=1, class_names=NAMES)
    rows = np.sort(np.random.default_rng(1).choice(5, 3, replace=False))
    table = pq.read_table(out)
    assert table.column("image").to_pylist() == [_png(10 * i) for i in rows]
    back = load_source(f"parquet:{out}", image_size=8)
    assert back.class_names == NAMES and [NAMES[v] for v in back.labels] == [labels[i] for i in rows]
    assert read_provenance(f"parquet:{out}")["split"] is None
    with pytest.raises(DataError, match="not below the 5 records"):
        materialise_subsample(spec, 5, tmp_path / "c.parquet", class_names=NAMES)
    with pytest.raises(DataError, match="must end in .parquet"):
        materialise_subsample(spec, 2, tmp_path / "d.npz", class_names=NAMES)


def test_digest_ignores_row_order_and_sees_one_record(tmp_path):
    a = _parquet(tmp_path / "a.parquet", ["ant", "bee", "cat"])
    table = pq.read_table(tmp_path / "a.parquet")
    pq.write_table(table.take([2, 0, 1]), tmp_path / "shuffled.parquet")
    pq.write_table(table.take([0, 1]), tmp_path / "less.parquet")
    assert source_digest(a) == source_digest(f"parquet:{tmp_path / 'shuffled.parquet'}")
    assert source_digest(a) != source_digest(f"parquet:{tmp_path / 'less.parquet'}")


def test_public_pool_may_not_hold_the_source_of_a_materialised_subsample(tmp_path):
    out = materialise_subsample("mnist", 20, tmp_path / "s.parquet", seed=0, split="test")
    with pytest.raises(DataError, match="which the sensitive dataset was drawn from"):
        check_public_specs(["glyphs", "mnist"], f"parquet:{out}")
    check_public_specs(["glyphs", "fashion_mnist"], f"parquet:{out}")
