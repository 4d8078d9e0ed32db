"""The latent-diffusion family (method dp_ldm, seed 003): its two DP parts'
per-example gradients, the encoder inside the latent stage's per-example
loss, the budget split between the DP stages, public pre-training phases,
sampling through the decoder, and the config's one-line refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

from privimage_core.config import from_dict
from privimage_core.errors import ConfigError
from privimage_core.methods import get_method
from privimage_core.models import build_model, get_family
from privimage_core.privacy.plan import planned_ledger

torch.set_num_threads(1)
FAM = get_family("latent_diffusion")


def _model(seed=0, **latent):
    torch.manual_seed(seed)
    cfg = from_dict({"method": "dp_ldm", "latent": {"width": 8, **latent},
                     "generator": {"overrides": {"base_channels": 8}}})
    return cfg, build_model(cfg, "latent_diffusion", 10)


def _batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("part", ["autoencoder", "latent"])
def test_vmap_per_example_grads_equal_a_per_example_loop(part):
    """The per-sample gradients DP-SGD clips (vmap over the part's params)
    are each example's own gradient; the latent stage's loss encodes x
    itself, so only pixels go in."""
    _, m = _model()
    mod, obj = FAM.dp_module(m, part), FAM.dp_objective(m, part)
    x, y = _batch()
    rnd = obj.draw(x, 1)
    params = {n: p.detach() for n, p in mod.named_parameters()}

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = mod

        def forward(self, xi, yi, ri):
            return obj.loss(self.model, xi[None], yi[None], {k: v[None] for k, v in ri.items()})[0]

    one = One()
    per = vmap(grad(lambda p, a, b, r: functional_call(one, {f"model.{k}": v for k, v in p.items()},
                                                       (a, b, r))),
               in_dims=(None, 0, 0, 0))(params, x, y, rnd)
    for i in range(len(x)):
        mod.zero_grad(set_to_none=True)
        obj.loss(mod, x[i:i + 1], y[i:i + 1], {k: v[i:i + 1] for k, v in rnd.items()}).sum().backward()
        for n, p in mod.named_parameters():
            torch.testing.assert_close(per[n][i], p.grad, rtol=1e-4, atol=1e-6)
    # (the UNet's zero-initialised output layer leaves most first gradients 0)
    name = max(params, key=lambda n: float(per[n][0].abs().sum()))
    assert not torch.allclose(per[name][0], per[name][1])


def test_latent_stage_trains_only_the_diffusion_model_on_encoded_latents():
    _, m = _model()
    obj = FAM.dp_objective(m, "latent")
    x, y = _batch()
    rnd = obj.draw(x, 3)
    assert rnd["noise"].shape == (4, 3, *m.latent_shape) == (4, 3, 4, 7, 7)
    obj.loss(m.diffusion, x, y, rnd).sum().backward()
    assert all(p.grad is None for p in m.autoencoder.parameters())
    assert any(p.grad is not None for p in m.diffusion.parameters())
    # the loss depends on the pixels through the encoder: other pixels, other loss
    x2 = x.flip(-1)
    assert not torch.allclose(obj.loss(m.diffusion, x, y, rnd), obj.loss(m.diffusion, x2, y, rnd))
    assert FAM.dp_module(m, "autoencoder") is m.autoencoder
    with pytest.raises(ValueError, match="part"):
        FAM.dp_module(m, None)


def test_budget_split_between_the_query_and_two_dp_sgd_stages():
    """The autoencoder's stage alone costs at most its share; the latent
    stage gets the rest; the composition fits the target. Frozen: no
    autoencoder mechanism and all of the rest to the latent model."""
    from privimage_core.privacy.ledger import PrivacyLedger

    cfg, _ = _model()
    led = planned_ledger(cfg, get_method("dp_ldm"), 60_000, 1e-5)
    names = [r.name for r in led.records]
    assert names == ["semantic_distribution_query", "dp_sgd_finetune_autoencoder",
                     "dp_sgd_finetune"]
    ae = led.records[1]
    alone = PrivacyLedger(10.0, 1e-5)
    alone.records.append(copy.deepcopy(ae))
    share = cfg.latent.autoencoder_epsilon_share
    assert 0.8 * share * 10 < alone.epsilon() <= share * 10 + 1e-9
    assert ae.steps == cfg.latent.autoencoder_dp_steps
    assert led.records[2].steps == cfg.finetune.steps
    assert 9.5 < led.epsilon() <= 10.0 + 1e-9
    frozen = from_dict({**cfg.to_dict(), "latent": {**cfg.to_dict()["latent"],
                                                     "autoencoder": "frozen"}})
    led2 = planned_ledger(frozen, get_method("dp_ldm"), 60_000, 1e-5)
    assert [r.name for r in led2.records] == ["semantic_distribution_query", "dp_sgd_finetune"]
    # the latent model's noise is never higher when the autoencoder spends
    # nothing (under RDP composition a short stage's marginal cost is small)
    assert led2.records[1].noise_multiplier <= led.records[2].noise_multiplier


def test_public_pretraining_trains_the_autoencoder_first_then_the_latent_model():
    _, m = _model(autoencoder_pretrain_share=0.5)
    m.ae_pretrain_steps = 2
    tr = FAM.public_trainer(m, 1e-3)
    x, y = _batch(8)
    g = torch.Generator().manual_seed(0)
    snap = lambda mod: [p.detach().clone() for p in mod.parameters()]  # noqa: E731
    dm0 = snap(m.diffusion)
    tr.step(x, y, g), tr.step(x, y, g)
    assert all(torch.equal(a, b) for a, b in zip(dm0, snap(m.diffusion)))
    ae1 = snap(m.autoencoder)
    tr.step(x, y, g)
    assert all(torch.equal(a, b) for a, b in zip(ae1, snap(m.autoencoder)))
    assert not all(torch.equal(a, b) for a, b in zip(dm0, snap(m.diffusion)))
    again = FAM.public_trainer(m, 1e-3)
    again.load_state_dict(tr.state_dict())
    assert again.t == 3


def test_sampling_decodes_latents_deterministically_per_seed():
    _, m = _model()
    a = FAM.sample(m, [0, 1, 2], num_steps=3, solver="euler", seed=5, batch_size=2)
    b = FAM.sample(m, [0, 1, 2], num_steps=3, solver="euler", seed=5, batch_size=3)
    assert a.shape == (3, 28, 28, 1) and a.dtype.name == "uint8"
    assert (a.astype(int) - b.astype(int)).__abs__().max() <= 1
    assert FAM.sample(m, [], num_steps=2, solver="euler", seed=0, batch_size=2).shape == (0, 28, 28, 1)
    x, y = _batch()
    torch.testing.assert_close(FAM.audit_loss(m, x, y, seed=3), FAM.audit_loss(m, x, y, seed=3))


@pytest.mark.parametrize("over,match", [
    ({"latent": {"downsample": 3}}, "latent.downsample must be one of"),
    ({"latent": {"autoencoder": "dpp"}}, "latent.autoencoder must be one of dp, frozen"),
    ({"latent": {"autoencoder_epsilon_share": 1.0}}, "autoencoder_epsilon_share must be in"),
    ({"latent": {"chanels": 4}}, "unknown config key 'latent.chanels'"),
    ({"generator": {"preset": "large"}}, "not a preset of the latent_diffusion family"),
])
def test_bad_latent_settings_are_one_line_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"method": "dp_ldm", **over})


def test_image_size_must_divide_by_the_downsampling():
    # the config keeps image sizes multiples of 4; a direct library call may not
    with pytest.raises(ConfigError, match="not divisible by latent.downsample"):
        FAM.make("tiny", {}, 30, 1, 10, downsample=4)


def test_reconstruction_attack_runs_in_latent_space():
    """Noise the latent, denoise once, decode: pixel-shaped output, the same
    result for the same noise, and a real dependence on the noise level."""
    _, m = _model()
    rec = FAM.reconstructor(m)
    x, y = _batch()
    noise = torch.randn_like(x)
    lo, hi = torch.full((4,), 0.1), torch.full((4,), 5.0)
    a = rec(x, noise, lo, y)
    assert a.shape == x.shape and torch.equal(a, rec(x, noise, lo, y))
    assert not torch.allclose(a, rec(x, noise, hi, y))


def test_autoencoder_stage_runs_at_k1_whatever_the_noise_multiplicity():
    """A deterministic loss has nothing to average: with noise multiplicity 4
    the hooks mode still gets one gradient row per example (it would refuse
    B rows where it expects B x 4)."""
    from privimage_core.dp_sgd.finetune import accumulate_grad_samples, make_private
    from privimage_core.privacy.ledger import PrivacyLedger

    _, m = _model()
    mod = FAM.dp_module(m, "autoencoder")
    x, y = _batch(6)
    dp = make_private(mod, torch.optim.Adam(mod.parameters()), x, y, 6, 1.0, 1.0,
                      PrivacyLedger(10.0, 1e-5), grad_sample_mode="hooks")
    accumulate_grad_samples(dp, FAM.dp_objective(m, "autoencoder"), x, y, noise_multiplicity=4)
    assert all(p.grad_sample.shape[0] == 6 for p in dp.optimizer.params)
