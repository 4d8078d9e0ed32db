"""torch.func per-sample gradients (Opacus no_op mode), book-keeping ghost
clipping and noise multiplicity: equal to per-example backprop, equal to the
hooks mode through the whole Opacus step, empty Poisson batches still step,
and the ledger does not depend on the mode."""
from __future__ import annotations

import copy

import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.models.diffusion.edm import EDMObjective, EDMPrecond, edm_loss
from privimage_core.models.ema import EMA
from privimage_core.models.diffusion.unet import build_unet
from privimage_core.dp_sgd.finetune import accumulate_grad_samples, dp_finetune, make_private
from privimage_core.errors import ConfigError
from privimage_core.dp_sgd.per_sample_grads import compute_grad_samples
from privimage_core.privacy.ledger import PrivacyLedger

torch.set_num_threads(1)
B, SIZE, CLASSES = 4, 8, 3


def _model(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    m = EDMPrecond(build_unet("tiny", SIZE, 1, CLASSES))
    # EDM zero-initialises the output layers, which makes most gradients 0 at
    # init; perturb so that every parameter's gradient is informative.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _batch(n: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1, torch.randint(0, CLASSES, (n,),
                                                                              generator=g)


def _loop_grads(model, x, y, rnd, draws=None):
    """Reference: one backward per image of the mean of its K single-draw
    losses (``draws`` restricts the draws, for the control)."""
    k = rnd["sigma"].shape[1]
    draws = range(k) if draws is None else draws
    out = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        losses = [edm_loss(model, x[i:i + 1], y[i:i + 1], rnd["sigma"][i, j:j + 1],
                           rnd["noise"][i, j:j + 1]) for j in draws]
        torch.stack(losses).mean().backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(col) for col in zip(*out)]


def _vmap_grads(model, x, y, rnd):
    compute_grad_samples(model, EDMObjective(), x, y, rnd)
    gs = [p.grad_sample for p in model.parameters()]
    for p in model.parameters():
        p.grad_sample = None
    return gs


def _close(a, b):
    return all(torch.allclose(u, v, rtol=1e-4, atol=1e-6) for u, v in zip(a, b))


@pytest.mark.parametrize("k", [1, 4])
def test_vmap_equals_per_image_backprop(k):
    model = _model()
    x, y = _batch()
    rnd = EDMObjective().draw(x, k)
    assert rnd["sigma"].shape == (B, k) and rnd["noise"].shape == (B, k, 1, SIZE, SIZE)
    got = _vmap_grads(model, x, y, rnd)
    ref = _loop_grads(model, x, y, rnd)
    assert [g.shape for g in got] == [(B, *p.shape) for p in model.parameters()]
    assert _close(got, ref)
    assert all(g.abs().sum() > 0 for g in got)  # no parameter trivially 0 on both sides
    # controls: the batch-mean gradient copied to every example, and (K > 1)
    # one draw instead of the mean of K, must not pass the same comparison
    mean = [r.mean(0, keepdim=True).expand_as(r) for r in ref]
    assert not _close(got, mean)
    if k > 1:
        assert not _close(got, _loop_grads(model, x, y, rnd, draws=[0]))


def _private(mode, model, x, y, sigma=1e-9, clip=0.05, batch=B, ledger=None):
    led = ledger or PrivacyLedger(1e30, 1e-5)  # sigma ~ 0: a huge (finite) epsilon
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return make_private(model, opt, x, y, batch_size=batch, noise_multiplier=sigma,
                        max_grad_norm=clip, ledger=led, grad_sample_mode=mode), led


@pytest.mark.parametrize("k", [1, 3])
def test_opacus_step_vmap_equals_hooks(k):
    """Same batch, same diffusion noise, (almost) no Gaussian noise, clipping
    active: the noised, clipped, averaged gradient is the same in both modes."""
    x, y = _batch()
    base = _model()
    grads, norms = {}, None
    for mode in ("vmap", "hooks", "ghost"):
        dp, led = _private(mode, copy.deepcopy(base), x, y)
        torch.manual_seed(7)  # the objective draws from the global generator
        accumulate_grad_samples(dp, EDMObjective(), x, y, noise_multiplicity=k)
        if mode == "vmap":
            norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1)
                                 for p in dp.optimizer.params]).norm(dim=0)
        dp.optimizer.step()
        grads[mode] = [p.grad.detach().clone() for p in dp.optimizer.params]
        assert led.records[0].steps == 1
    assert (norms > 0.05).all()  # every example is clipped: clipping is exercised
    assert _close(grads["vmap"], grads["hooks"]) and _close(grads["ghost"], grads["hooks"])
    if k > 1:
        # control: hooks without folding the K rows per example clips each row
        # on its own (k times the sensitivity); that must not match
        dp, _ = _private("hooks", copy.deepcopy(base), x, y)
        torch.manual_seed(7)
        obj = EDMObjective()
        (obj.loss(dp.model, x, y, obj.draw(x, k)).sum() / len(x)).backward()
        dp.optimizer.step()
        assert not _close(grads["vmap"], [p.grad for p in dp.optimizer.params])


@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_empty_poisson_batch_still_steps_and_is_recorded(mode):
    x, y = _batch()
    model = _model()
    w0 = [p.detach().clone() for p in model.parameters()]
    led = PrivacyLedger(50.0, 1e-5)
    dp, _ = _private(mode, model, x, y, sigma=1.0, clip=1.0, ledger=led)
    accumulate_grad_samples(dp, EDMObjective(), x[:0], y[:0], noise_multiplicity=2)
    if mode == "vmap":
        assert all(p.grad_sample.shape == (0, *p.shape) for p in dp.optimizer.params)
    else:  # the clipped sum of no example
        assert all(torch.count_nonzero(p.grad) == 0 for p in dp.optimizer.params)
    dp.optimizer.step()
    assert led.records[0].steps == 1 and led.epsilon() > 0
    # the update is pure noise: N(0, (sigma C)^2) / expected batch, not zero
    delta = torch.cat([(a - p.detach()).flatten() for a, p in zip(w0, model.parameters())])
    assert delta.std().item() == pytest.approx(1.0 / B, rel=0.1)


def test_stale_grad_samples_are_refused():
    x, y = _batch()
    dp, _ = _private("vmap", _model(), x, y)
    accumulate_grad_samples(dp, EDMObjective(), x, y)
    with pytest.raises(RuntimeError, match="still holds per-sample gradients"):
        accumulate_grad_samples(dp, EDMObjective(), x, y)


def _run(mode, k, steps=3):
    x, y = _batch(8, seed=3)
    model = _model()
    led = PrivacyLedger(1e4, 1e-5)
    dp, _ = _private(mode, model, x, y, sigma=0.8, clip=1.0, batch=4, ledger=led)
    calls = []
    # physical batch 2 < expected logical batch 4: virtual steps occur, and
    # after_step must run once per logical step only
    done = dp_finetune(dp, EMA(model, 0.9), model, steps, 2, objective=EDMObjective(),
                       noise_multiplicity=k, after_step=lambda: calls.append(led.records[0].steps))
    r = led.records[0]
    return done, calls, (r.steps, r.noise_multiplier, r.sample_rate, led.epsilon())


def test_ledger_is_unchanged_by_the_mode():
    v_done, v_calls, v_led = _run("vmap", 2)
    h_done, h_calls, h_led = _run("hooks", 2)
    g_done, g_calls, g_led = _run("ghost", 2)
    assert v_done == h_done == g_done == 3 and v_led == h_led == g_led
    assert v_led[:3] == (3, 0.8, 0.5)
    assert v_calls == h_calls == g_calls == [1, 2, 3]


def test_config_keys_are_validated():
    cfg = from_dict({"finetune": {"noise_multiplicity": 4, "grad_sample_mode": "hooks"}})
    assert (cfg.finetune.noise_multiplicity, cfg.finetune.grad_sample_mode) == (4, "hooks")
    with pytest.raises(ConfigError, match="finetune.noise_multiplicity must be >= 1"):
        from_dict({"finetune": {"noise_multiplicity": 0}})
    assert from_dict({}).finetune.grad_sample_mode == "auto"
    with pytest.raises(ConfigError,
                       match="finetune.grad_sample_mode must be one of auto, ghost, vmap, hooks"):
        from_dict({"finetune": {"grad_sample_mode": "ew"}})
