"""finetune.trainable: DP-SGD on the parameters a pattern names. The others
keep their pre-trained values bit for bit in every clipping mode, the named
ones move, the ledger counts the same steps, a pattern that is not a regular
expression or names nothing is refused before any work, and the pipeline's
release stage honours it (its release equals the pre-trained weights outside
the pattern)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.dp_sgd.finetune import dp_finetune, make_private, restrict_trainable
from privimage_core.errors import ConfigError
from privimage_core.models.diffusion.edm import EDMObjective, EDMPrecond
from privimage_core.models.diffusion.unet import build_unet
from privimage_core.models.ema import EMA
from privimage_core.privacy.ledger import PrivacyLedger
from tests.helpers import tiny_config

torch.set_num_threads(1)
B, SIZE, CLASSES = 4, 8, 3
PATTERN = "norm"


def _model() -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(build_unet("tiny", SIZE, 3, CLASSES))


def _moved_after_dp_sgd(mode: str, pattern: str | None) -> tuple[set, set, int]:
    """(names that moved, all names, ledger steps) after two noisy DP steps."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, SIZE, SIZE, generator=g) * 2 - 1
    y = torch.randint(0, CLASSES, (8,), generator=g)
    restrict_trainable(model, pattern)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    led = PrivacyLedger(1e4, 1e-5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dp = make_private(model, opt, x, y, batch_size=B, noise_multiplier=1.0, max_grad_norm=1.0,
                      ledger=led, grad_sample_mode=mode)
    dp_finetune(dp, EMA(model, 0.9), model, 2, 2, objective=EDMObjective())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return moved, set(before), led.records[0].steps


@pytest.mark.parametrize("mode", ["vmap", "hooks", "ghost"])
def test_only_the_named_parameters_move(mode):
    moved, names, steps = _moved_after_dp_sgd(mode, PATTERN)
    named = {n for n in names if PATTERN in n}
    assert named and named != names
    assert moved == named  # Gaussian noise reaches every trainable one, nothing else
    assert steps == 2
    # control: without the pattern the same steps move parameters outside it
    moved_all, _, _ = _moved_after_dp_sgd(mode, None)
    assert moved_all - named


def test_restrict_trainable_counts_and_refuses_an_empty_match():
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    n = restrict_trainable(model, PATTERN)
    assert 0 < n < total
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert restrict_trainable(model, ".") == n  # it never unfreezes
    with pytest.raises(ValueError, match="matches none of the"):
        restrict_trainable(model, "no_such_layer")


def test_config_refuses_a_bad_or_empty_pattern():
    assert from_dict({}).finetune.trainable is None
    assert from_dict({"finetune": {"trainable": "norm|emb"}}).finetune.trainable == "norm|emb"
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        from_dict({"finetune": {"trainable": "norm("}})
    with pytest.raises(ConfigError, match=r"finetune.trainable 'zzz' matches none of the .* "
                       r"trainable parameter names \(e\.g\. net\..*\) of the module method "
                       r"'privimage'"):
        from_dict({"finetune": {"trainable": "zzz"}})
    with pytest.raises(ConfigError, match="finetune.trainable is empty"):
        from_dict({"finetune": {"trainable": ""}})
    # a GAN's DP stage trains its discriminator, and the released generator
    # learns from it unrestricted: the pattern would not mean what it says
    with pytest.raises(ConfigError, match="method 'dpgan' trains its .* and releases another"):
        from_dict({"method": "dpgan", "finetune": {"trainable": "bias"}})
    # the latent family's release stage trains (part of) the released model
    assert from_dict({"method": "dp_ldm", "finetune": {"trainable": "norm"}})
    # bad generator settings are left to the generator's own check, not a TypeError here
    assert from_dict({"finetune": {"trainable": "norm"},
                      "generator": {"overrides": {"no_such": 1}}})


@pytest.mark.ray
def test_the_release_stage_fine_tunes_only_the_named_parameters(tmp_path, ray_local):
    from services.pipeline import run_pipeline
    cfg = from_dict(tiny_config(tmp_path, **{"finetune.trainable": PATTERN,
                                             "evaluation.canary_audit": False,
                                             "evaluation.memorisation": False}))
    lines: list[str] = []
    s = run_pipeline(cfg, log=lines.append)
    assert any(f"parameters (finetune.trainable '{PATTERN}')" in ln for ln in lines), lines
    run = Path(s["run_dir"])
    pre = torch.load(run / "pretrained_generator.pt", map_location="cpu")
    rel = torch.load(run / "dp_generator.pt", map_location="cpu")
    floats = [k for k, v in pre.items() if v.is_floating_point()]
    same = {k for k in floats if torch.equal(pre[k], rel[k])}
    assert {k for k in floats if PATTERN not in k} <= same
    assert {k for k in floats if PATTERN in k} - same  # the named ones were fine-tuned
    assert s["ledger"]["records"][1]["steps"] == 4
    saved = (run / "config.yaml").read_text()
    assert f"trainable: {PATTERN}" in saved  # recorded with the run
