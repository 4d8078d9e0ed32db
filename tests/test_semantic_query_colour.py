"""semantic_query.colour: a query function trained on a grayscale public pool
that still names a digit's semantics when the digit comes in other stroke
and background colours (selection/semantic_query.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.data.colour import GRAYSCALE_P, RECOLOUR_MIN_CONTRAST, RECOLOUR_P, recolour
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import build_public_pool, load_source
from privimage_core.errors import ConfigError
from privimage_core.selection.semantic_query import (luminance_view, predict_topk,
                                                     resolve_colour, train_semantic_query)
from tests.helpers import repo_script

gen = repo_script("scripts/make_coloured_digits.py")


def _digits(n_per_class: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST test digits at 32x32: as grayscale in RGB, and the same digits
    in random contrasting colours (half of them darker than the background),
    both as model input [N, 3, 32, 32] in [-1, 1]."""
    ds = load_source("mnist", "test", image_size=32, channels=1, max_per_class=n_per_class)
    rgb = gen.colourise(ds.images, np.random.default_rng(seed))
    as_input = lambda a: ImageSet(a, ds.labels, ds.class_names).to_tensor()  # noqa: E731
    return as_input(np.repeat(ds.images, 3, axis=3)), as_input(rgb)


def test_the_key_is_validated_and_its_values_are_the_functions():
    assert from_dict({}).semantic_query.colour == "auto"
    with pytest.raises(ConfigError, match="semantic_query.colour must be one of auto, "
                                          "luminance, augment, none"):
        from_dict({"semantic_query": {"colour": "rgb"}})
    pool = build_public_pool(["glyphs"], 16, 1, max_per_class=2, glyph_opts={"max_fonts": 2})
    with pytest.raises(ValueError, match="colour='rgb'"):
        train_semantic_query(pool, colour="rgb")


def test_auto_reads_a_gray_pool_by_luminance_in_rgb_runs_only():
    rng = np.random.default_rng(0)
    gray1 = rng.integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    gray3 = np.repeat(gray1, 3, axis=-1)  # grayscale stored as RGB: still no colour
    colour = gray3.copy()
    colour[3, 2, 2, 1] ^= 1  # one pixel of one image off gray: a colour pool
    assert resolve_colour("auto", gray3) == "luminance"  # an RGB run, a gray pool
    assert resolve_colour("auto", gray1) == "none"  # a one-channel run: no colour gap
    assert resolve_colour("auto", colour) == "none"
    for mode in ("luminance", "augment", "none"):  # an explicit mode is kept
        assert resolve_colour(mode, colour) == resolve_colour(mode, gray1) == mode


def test_recolour_maps_black_and_white_to_contrasting_colours():
    x = torch.full((4000, 3, 4, 4), -1.0)
    x[:, :, 1:3, 1:3] = 1.0  # a white square on black, in RGB
    a = recolour(x, torch.Generator().manual_seed(0))
    b = recolour(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1  # seeded: public randomness
    bg, fg = a[:, :, 0, 0], a[:, :, 1, 1]
    changed = (a != x).flatten(1).any(1)
    assert abs(changed.float().mean().item() - RECOLOUR_P) < 0.03
    gray = changed & (bg.std(1) < 1e-6) & (fg.std(1) < 1e-6)  # changed, now without colour
    assert abs(gray.float().mean().item() - RECOLOUR_P * GRAYSCALE_P) < 0.03
    coloured = changed & ~gray
    assert ((fg - bg).abs().amax(1)[coloured] >= 2 * RECOLOUR_MIN_CONTRAST - 1e-5).all()
    inverted = (fg.mean(1) < bg.mean(1))[coloured].float().mean().item()
    assert 0.4 < inverted < 0.6  # gains of either sign: as many dark strokes as bright ones


def test_luminance_view_is_the_same_for_a_digit_in_any_colours():
    plain, coloured = _digits(10)
    a, b = luminance_view(plain), luminance_view(coloured)
    assert a.shape == plain.shape
    assert (a - b).abs().mean() < 0.03 and (plain - coloured).abs().mean() > 0.4


@pytest.fixture(scope="module")
def digit_functions():
    """Query functions trained on digit glyphs only (10 public labels, RGB
    32x32, grayscale content) in each colour mode: the same public data,
    seed and settings."""
    torch.set_num_threads(1)
    pool = build_public_pool(["glyphs"], 32, 3, max_per_class=120, seed=0,
                             glyph_opts={"chars": "0123456789", "max_fonts": None, "per_font": 2})
    return {mode: train_semantic_query(pool, width=12, epochs=3, lr=3e-3, seed=0,
                                       colour=mode)[0]
            for mode in ("none", "luminance", "augment")}


def test_colour_robust_function_agrees_on_a_digit_and_its_recoloured_version(digit_functions):
    """The control can fail: the plain function, trained on the same public
    images, changes its answer for most digits once they are recoloured (it
    never saw a dark stroke on a bright background: measured 6% agreement);
    the luminance view keeps it (measured 100%). The augmented function
    keeps it more often than the plain one (measured 32%), far less than the
    view at these few training steps: why it is not the default."""
    plain, coloured = _digits(30)
    agree = {}
    for mode, model in digit_functions.items():
        a = predict_topk(model, plain, k=1)[:, 0]
        agree[mode] = float((a == predict_topk(model, coloured, k=1)[:, 0]).mean())
    assert agree["none"] <= 0.4, agree
    assert agree["luminance"] >= 0.9 and agree["luminance"] >= agree["none"] + 0.5, agree
    assert agree["augment"] >= agree["none"] + 0.15, agree
