"""scripts/make_coloured_digits.py: the coloured-MNIST ImageFolders of the
RGB benchmark (benchmarks/rgb_folder.py) and of the RGB end-to-end tests."""
from __future__ import annotations

import numpy as np
from PIL import Image

from privimage_core.data.sources import load_source
from tests.helpers import coloured_digits, repo_script

gen = repo_script("scripts/make_coloured_digits.py")


def test_writes_train_and_test_folders_of_every_digit(tmp_path):
    root = coloured_digits(tmp_path / "d", per_class=3, test_per_class=2)
    for split, n in (("train", 3), ("test", 2)):
        ds = load_source(f"folder:{root / split}", image_size=32, channels=3)
        assert ds.class_names == [str(d) for d in range(10)]
        assert ds.images.shape == (10 * n, 32, 32, 3) and ds.images.dtype == np.uint8
        assert np.bincount(ds.labels, minlength=10).tolist() == [n] * 10
    im = Image.open(next((root / "train" / "7").iterdir()))
    assert im.mode == "RGB" and im.size == (32, 32)


def test_stroke_and_background_contrast_and_both_polarities():
    fg, bg = gen.contrasting_colours(2000, np.random.default_rng(0), min_contrast=0.3)
    dl = (fg - bg) @ gen.LUMA
    assert np.all(np.abs(dl) >= 0.3 * 255) and fg.min() >= 0 and bg.max() <= 255
    assert 0.4 < np.mean(dl < 0) < 0.6  # about half the strokes darker than the background
    assert len(np.unique(bg.round(), axis=0)) > 1900  # the colours vary


def test_each_image_mixes_its_two_colours_by_the_digit():
    gray = np.zeros((2, 32, 32, 1), np.uint8)
    gray[:, 10:20, 14:18] = 255
    rgb = gen.colourise(gray, np.random.default_rng(1))
    for im in rgb:
        stroke, back = im[15, 15].astype(float), im[0, 0].astype(float)
        assert np.all(im[10:20, 14:18] == im[15, 15]) and np.all(im[:5] == im[0, 0])
        assert abs((stroke - back) @ gen.LUMA) >= 0.3 * 255 - 1


def test_seeded_and_refuses_to_overwrite(tmp_path, capsys):
    a = coloured_digits(tmp_path / "a", per_class=2, test_per_class=1, seed=3)
    b = coloured_digits(tmp_path / "b", per_class=2, test_per_class=1, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 30
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert gen.main([str(a), "--per-class", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
