"""``privimage evaluate`` on synthetic sets made elsewhere (.npz, image
folder, Parquet) and the refusals that keep its numbers honest: a synthetic
directory missing its images, a real "test split" that is the training data,
non-members that are members.

Tiny 16x16 grayscale data written to tmp_path, the FID network replaced by
the cheap stand-in (FID itself is checked in test_evaluation.py), LR only:
each evaluation takes a few seconds on one thread.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError
from privimage_core.synthesize import read_dataset, write_dataset
from services.evaluate_cli import align_classes, evaluate_dataset
from tests.helpers import shapes, tiny_edm

torch.set_num_threads(1)
# every test here evaluates with the stand-in Inception
pytestmark = pytest.mark.usefixtures("fake_fid_inception")

# shapes(): label 0 = square, 1 = ring. An image folder sorts its classes, so a
# real folder dataset has class_names ["ring", "square"].
FOLDER_NAMES = ["ring", "square"]


def write_folder(ds: ImageSet, root, names=("square", "ring")):
    for i, (im, lab) in enumerate(zip(ds.images, ds.labels)):
        d = root / names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[..., 0]).save(d / f"{i:04d}.png")
    return root


def to_folder_order(ds: ImageSet) -> ImageSet:
    """shapes() relabelled to the folder's class order (0 = ring, 1 = square)."""
    return ImageSet(ds.images, 1 - ds.labels, FOLDER_NAMES, ds.name)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    train = write_folder(shapes(120, seed=80), root / "train")
    test = write_folder(shapes(80, seed=81), root / "test")
    return f"folder:{train}", f"folder:{test}"


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({
        "run": {"output_dir": str(tmp_path / "runs"), "torch_threads": 1},
        "evaluation": {"fid_images": 20, "classifiers": ["lr"], "classifier": "lr",
                       "ceiling_images": 60, "utility_holdout": 10, "detector": False,
                       "mia": False}}))
    return str(p)


def _check_result(res, out, fmt):
    assert res["synthetic_format"] == fmt
    assert res["epsilon"] == "unknown" and res["delta"] == "unknown"
    assert "ledger_epsilon" not in res
    for k in ("fid", "precision", "accuracy_lr", "ceiling_accuracy_lr",
              "utility_synthetic_to_real"):
        assert np.isfinite(res[k]), k
    # the synthetic set is the easy task relabelled to the real class order:
    # a wrong label mapping would score far below chance (about 0.2)
    assert res["accuracy_lr"] > 0.7
    page = (out / "evaluation_report.html").read_text()
    assert "epsilon = unknown (no manifest.json), delta = unknown (no manifest.json)" in page
    assert "NON-PRIVATE" in page
    saved = json.loads((out / "evaluation_metrics.json").read_text())
    assert saved["epsilon"] == "unknown" and saved["real_test"] == res["real_test"]


def test_npz_with_class_names_end_to_end(tmp_path, cfg, real):
    train, test = real
    syn = shapes(100, seed=82)
    p = tmp_path / "other_model.npz"
    # N,H,W (no channel axis), names in the other model's own order
    np.savez(p, images=syn.images[..., 0], labels=syn.labels,
             class_names=np.array(["square", "ring"]))
    res = evaluate_dataset(str(p), train, config=cfg, real_test=test, out_dir=str(tmp_path / "ev"))
    _check_result(res, tmp_path / "ev", "npz")
    assert res["num_synthetic"] == 100


def test_npz_without_class_names_takes_real_names(tmp_path, cfg, real):
    train, test = real
    syn = to_folder_order(shapes(100, seed=83))
    p = tmp_path / "syn.npz"
    np.savez(p, images=syn.images, labels=syn.labels)
    res = evaluate_dataset(str(p), train, config=cfg, real_test=test)
    # default output: beside the .npz
    _check_result(res, tmp_path / "syn_evaluation", "npz")


def test_folder_end_to_end(tmp_path, cfg, real):
    train, test = real
    syn_root = write_folder(shapes(100, seed=84), tmp_path / "gen")
    res = evaluate_dataset(f"folder:{syn_root}", train, config=cfg, real_test=test,
                           out_dir=str(tmp_path / "ev"))
    _check_result(res, tmp_path / "ev", "folder")


def test_parquet_spec_with_bare_labels(tmp_path, cfg, real):
    """Our own images.parquet without its manifest: integer labels, names
    from the real dataset."""
    train, test = real
    write_dataset(to_folder_order(shapes(100, seed=85)), tmp_path / "s", {})
    (tmp_path / "s" / "manifest.json").unlink()
    res = evaluate_dataset(f"parquet:{tmp_path / 's' / 'images.parquet'}", train, config=cfg,
                           real_test=test, out_dir=str(tmp_path / "ev"))
    _check_result(res, tmp_path / "ev", "parquet")


def test_manifest_epsilon_reaches_report(tmp_path, cfg, real):
    train, test = real
    d = write_dataset(to_folder_order(shapes(60, seed=86)), tmp_path / "run" / "synthetic",
                      {"epsilon": 2.5, "delta": 1e-5, "accountant": "rdp"})
    res = evaluate_dataset(str(d), train, config=cfg, real_test=test)
    assert res["ledger_epsilon"] == 2.5 and res["epsilon"] == 2.5
    assert res["synthetic_format"] == "privimage"
    page = (tmp_path / "run" / "evaluation" / "evaluation_report.html").read_text()
    assert "epsilon = 2.5, delta = 1e-05" in page and "unknown" not in page


# ------------------------------------------------------------------ bad synthetic input

def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_parquet_is_a_data_error(tmp_path, cfg, real):
    train, test = real
    d = write_dataset(shapes(10, seed=87), tmp_path / "synthetic", {"epsilon": 1.0})
    (d / "images.parquet").unlink()
    with pytest.raises(DataError, match="has manifest.json but no images.parquet") as e:
        evaluate_dataset(str(d), train, config=cfg, real_test=test)
    assert "re-run the synthesis" in _one_line(e)
    with pytest.raises(DataError, match="no images.parquet"):
        read_dataset(d)


def test_cli_prints_one_line_for_missing_parquet(tmp_path, capsys):
    from services.cli import main

    d = write_dataset(shapes(10, seed=87), tmp_path / "synthetic", {})
    (d / "images.parquet").unlink()
    assert main(["evaluate", "--synthetic", str(d), "--real", "mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no images.parquet" in err and "\n" not in err


@pytest.mark.parametrize("setup,match", [
    ("missing", "does not exist"),
    ("no_manifest_folder", "pass folder:"),
    ("no_manifest_parquet", "has images.parquet but no manifest.json; pass parquet:"),
    ("bad_manifest", "not a readable JSON manifest"),
    ("tampered", "does not match its manifest"),
    ("npz_float", "expected uint8"),
    ("npz_nchw", "looks like N,C,H,W"),
    ("npz_no_labels", r"has no labels array"),
    ("npz_label_count", "give one name per class index"),
    ("npz_pickle", "holds Python objects"),
    ("npz_garbage", "not a readable .npz"),
])
def test_bad_synthetic_inputs(tmp_path, setup, match):
    ds = shapes(10, seed=88)
    if setup == "missing":
        path = tmp_path / "nope"
    elif setup == "no_manifest_folder":
        path = write_folder(ds, tmp_path / "f")
    elif setup in ("no_manifest_parquet", "bad_manifest", "tampered"):
        path = write_dataset(ds, tmp_path / "s", {})
        if setup == "no_manifest_parquet":
            (path / "manifest.json").unlink()
        elif setup == "bad_manifest":
            (path / "manifest.json").write_text("{ not json")
        else:
            other = write_dataset(shapes(10, seed=89), tmp_path / "o", {})
            shutil.copy(other / "images.parquet", path / "images.parquet")
    else:
        path = tmp_path / "x.npz"
        arrays = {"images": ds.images, "labels": ds.labels}
        if setup == "npz_float":
            arrays["images"] = ds.images / 255.0
        elif setup == "npz_nchw":
            arrays["images"] = ds.images.transpose(0, 3, 1, 2)
        elif setup == "npz_no_labels":
            del arrays["labels"]
        elif setup == "npz_label_count":
            arrays["class_names"] = np.array(["only"])
        elif setup == "npz_pickle":
            arrays["class_names"] = np.array(["a", 1], dtype=object)
        if setup == "npz_garbage":
            path.write_bytes(b"not a zip file")
        else:
            np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as e:
        read_dataset(path)
    _one_line(e)


def test_unnamed_labels_must_fit_real_classes():
    syn = ImageSet(np.zeros((3, 4, 4, 1), np.uint8), [0, 1, 2], ["0", "1", "2"],
                   meta={"named": False})
    with pytest.raises(DataError, match="labels go up to 2 but folder:x has 2 classes") as e:
        align_classes(syn, FOLDER_NAMES, "folder:x")
    assert "save class_names" in _one_line(e)
    named = ImageSet(syn.images, [0, 1, 0], ["ring", "cat"], meta={"named": True})
    with pytest.raises(DataError, match=r"synthetic classes \['cat'\] are not among"):
        align_classes(named, FOLDER_NAMES, "folder:x")
    # a named subset in another order is remapped by name
    sub = align_classes(ImageSet(syn.images, [0, 0, 0], ["square"]), FOLDER_NAMES, "folder:x")
    assert sub.class_names == FOLDER_NAMES and sub.labels.tolist() == [1, 1, 1]


# ------------------------------------------------------------------ train/test overlap

@pytest.fixture
def syn_npz(tmp_path):
    syn = to_folder_order(shapes(40, seed=90))
    p = tmp_path / "syn.npz"
    np.savez(p, images=syn.images, labels=syn.labels)
    return str(p)


def test_user_real_source_needs_separate_test(tmp_path, cfg, real, syn_npz, monkeypatch):
    train, _ = real
    import privimage_core.synthesize as synth

    def boom(*a, **k):
        raise AssertionError("read the synthetic data before refusing the specs")

    monkeypatch.setattr(synth, "read_dataset", boom)  # the refusal comes first
    with pytest.raises(DataError, match="has no test split") as e:
        evaluate_dataset(syn_npz, train, config=cfg)
    assert "--real-test" in _one_line(e)
    path = train.split(":", 1)[1]
    for same in (train, f"folder:{path}/", f"folder:{path}/../train"):
        with pytest.raises(DataError, match="names the same files as --real"):
            evaluate_dataset(syn_npz, train, config=cfg, real_test=same)


def test_copied_training_images_refused_as_test(tmp_path, cfg, real, syn_npz):
    train, test = real
    copy = tmp_path / "copy"
    shutil.copytree(train.split(":", 1)[1], copy)
    with pytest.raises(DataError, match="identical to training images") as e:
        evaluate_dataset(syn_npz, train, config=cfg, real_test=f"folder:{copy}")
    _one_line(e)
    # a partial leak is caught too
    mixed = tmp_path / "mixed"
    shutil.copytree(test.split(":", 1)[1], mixed)
    leaked = next((copy / "ring").iterdir())
    shutil.copy(leaked, mixed / "ring" / "leak.png")
    with pytest.raises(DataError, match=r"^1 of the 81 real test images"):
        evaluate_dataset(syn_npz, train, config=cfg, real_test=f"folder:{mixed}")


def test_mia_refuses_members_as_nonmembers():
    from privimage_core.evaluation.diffusion_mia import diffusion_mia

    members = shapes(8, seed=91)
    others = shapes(8, seed=92)
    with pytest.raises(DataError, match="non-members must be held-out data") as e:
        diffusion_mia(tiny_edm(), members, members)
    assert _one_line(e).startswith("8 non-member image(s) are identical")
    # one shared image is enough, wherever it sits
    leak = ImageSet(np.concatenate([others.images[:7], members.images[3:4]]),
                    np.r_[others.labels[:7], members.labels[3]], others.class_names)
    with pytest.raises(DataError, match="^1 non-member image"):
        diffusion_mia(tiny_edm(), members, leak)
