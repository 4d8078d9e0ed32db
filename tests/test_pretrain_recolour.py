"""pretrain.recolour: public pre-training recolours grayscale public images
at random for an RGB run (privimage_core/pretrain.py, data/colour.py), and
changes nothing for a grayscale run."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.data.colour import is_grayscale
from privimage_core.errors import ConfigError
from privimage_core.methods import Stage
from privimage_core.models import get_family
from privimage_core.pretrain import pretrain, resolve_recolour

rng = np.random.default_rng(0)
GRAY = np.repeat(rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), 3, axis=3)
COLOUR = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


def test_config_default_and_allowed_values():
    assert from_dict({}).pretrain.recolour == "auto"
    assert from_dict({"pretrain": {"recolour": "off"}}).pretrain.recolour == "off"
    with pytest.raises(ConfigError, match="pretrain.recolour must be one of auto, on, off"):
        from_dict({"pretrain": {"recolour": "yes"}})


def test_auto_is_on_for_rgb_with_grayscale_public_images_only():
    assert is_grayscale(GRAY) and is_grayscale(GRAY[..., :1]) and not is_grayscale(COLOUR)
    assert resolve_recolour("auto", 3, GRAY)
    assert not resolve_recolour("auto", 1, GRAY[..., :1])   # grayscale run
    assert not resolve_recolour("auto", 3, COLOUR)          # public images in colour
    assert resolve_recolour("on", 1, GRAY[..., :1]) and not resolve_recolour("off", 3, GRAY)


class _Recorder:
    """A public trainer that keeps the batches it is given."""

    def __init__(self):
        self.batches = []

    def step(self, xb, yb, g):
        self.batches.append(xb.clone())
        return 0.0


def _bars(channels: int, n: int = 8) -> torch.Tensor:
    x = torch.full((n, 1, 28, 28), -1.0)
    for i in range(n):
        x[i, 0, 3 * i:3 * i + 6, 4:24] = 1
    return x.expand(-1, channels, -1, -1).contiguous()


def test_recolour_gives_every_image_two_contrasting_colours_from_the_seed():
    x, y = _bars(3), torch.zeros(8, dtype=torch.long)
    runs = []
    for _ in range(2):
        rec = _Recorder()
        pretrain(rec, lambda: None, x, y, steps=2, batch_size=8, seed=3, recolour=True)
        runs.append(torch.stack(rec.batches))
    assert torch.equal(runs[0], runs[1])  # the run's seed alone decides the colours
    b = runs[0][0]
    assert b.min() >= -1 and b.max() <= 1
    # every image is in colour: its channels differ
    assert ((b[:, 0] != b[:, 1]) | (b[:, 1] != b[:, 2])).flatten(1).any(1).all()
    plain = _Recorder()
    pretrain(plain, lambda: None, x, y, steps=2, batch_size=8, seed=3)
    assert all(torch.equal(p[:, 0], p[:, 2]) for p in plain.batches)  # off: still gray


def _pretrained(x: torch.Tensor, recolour: bool | None) -> dict:
    """A tiny diffusion generator's weights after 3 public steps; ``None``
    calls pretrain() without the argument (its behaviour before the option)."""
    fam = get_family("diffusion")
    torch.manual_seed(0)
    model = fam.make("tiny", {}, 28, x.shape[1], 4)
    tr = fam.public_trainer(model, lr=3e-3, precision="fp32")
    kw = {} if recolour is None else {"recolour": recolour}
    pretrain(tr, lambda: None, x, torch.arange(8) % 4, steps=3, batch_size=8, seed=1, **kw)
    return model.state_dict()


def test_control_grayscale_run_is_bit_identical_with_auto_and_off():
    x = _bars(1)
    imgs = ((x.permute(0, 2, 3, 1) + 1) * 127.5).to(torch.uint8).numpy()
    auto = _pretrained(x, resolve_recolour("auto", 1, imgs))
    off = _pretrained(x, resolve_recolour("off", 1, imgs))
    before = _pretrained(x, None)
    assert all(torch.equal(auto[k], off[k]) and torch.equal(auto[k], before[k]) for k in auto)
    # and on the same public images for an RGB run, auto does change training
    x3 = _bars(3)
    rgb_auto = _pretrained(x3, resolve_recolour("auto", 3, np.repeat(imgs, 3, axis=3)))
    rgb_off = _pretrained(x3, False)
    assert any(not torch.equal(rgb_auto[k], rgb_off[k]) for k in rgb_auto)


def test_recolouring_happens_in_pre_training_only():
    from services import train_loops
    from services.stages import training
    assert "recolour=job.recolour" in inspect.getsource(train_loops.pretrain_loop)
    assert "recolour" not in inspect.getsource(train_loops.finetune_loop)
    assert "recolour" not in inspect.getsource(training.dp_finetune)


def _key(recolour_cfg: str, resolved: bool) -> str:
    from services.stages.training import _pretrain_key
    cfg = from_dict({"data": {"channels": 3, "image_size": 32},
                     "pretrain": {"recolour": recolour_cfg}})
    ctx = SimpleNamespace(cfg=cfg, method=SimpleNamespace(family="diffusion"),
                          class_names=[str(i) for i in range(10)],
                          values={"selection": {0: [1, 2]}})
    return _pretrain_key(ctx, Stage("pretrain", "pretrain", {"data": "selection"}),
                         np.zeros(40), resolved)


def test_cache_key_separates_recoloured_from_plain_pre_training():
    assert _key("auto", True) != _key("auto", False)
    assert _key("on", True) == _key("auto", True)
    # off and an auto that resolved off share the key they had before the option
    assert _key("off", False) == _key("auto", False)
