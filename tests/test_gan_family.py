"""The GAN model family: networks, the per-example DP discriminator loss
(vmap and Opacus hooks), the generator's post-processing step, sampling,
the audit score and a short public-training quality smoke test."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from privimage_core.models import get_family
from privimage_core.models.gan.family import GeneratorStep
from privimage_core.models.gan.family import generate

torch.set_num_threads(1)

# Narrow widths: the tests check wiring and maths, not capacity.
NARROW = {"z_dim": 8, "g_channels": 8, "d_channels": 8}


def _gan(size=28, channels=1, classes=10, seed=0, **over):
    torch.manual_seed(seed)
    return get_family("gan").make("tiny", {**NARROW, **over}, size, channels, classes)


def _batch(b=6, size=28, channels=1, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, channels, size, size, generator=g) * 2 - 1,
            torch.randint(0, classes, (b,), generator=g))


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("preset,g_params,d_params", [
    ("tiny", 253_921, 144_577), ("small", 1_155_393, 574_241), ("base", 2_593_249, 1_734_049)])
def test_preset_shapes_and_parameter_counts(preset, g_params, d_params):
    fam = get_family("gan")
    gan = fam.make(preset, {}, 28, 1, 10)
    assert (_count(gan.generator), _count(gan.discriminator)) == (g_params, d_params)
    assert fam.release_module(gan) is gan.generator and fam.dp_module(gan) is gan.discriminator
    for size, ch in ((28, 1), (32, 3)):
        gan = fam.make(preset, {}, size, ch, 7)
        z = torch.randn(3, gan.generator.z_dim)
        img = gan.generator(z, torch.tensor([0, 3, 6]))
        assert img.shape == (3, ch, size, size) and img.abs().max() <= 1
        assert gan.discriminator(img, torch.tensor([0, 3, 6])).shape == (3,)
    # Comparable to the diffusion presets (~0.4M, ~1.8M, ~4.5M).
    total = g_params + d_params
    assert {"tiny": 0.3e6, "small": 1.5e6, "base": 3.8e6}[preset] < total < \
        {"tiny": 0.5e6, "small": 2.1e6, "base": 5.0e6}[preset]


def test_make_rejects_bad_settings():
    fam = get_family("gan")
    with pytest.raises(ValueError, match="preset"):
        fam.make("huge", {}, 28, 1, 10)
    with pytest.raises(ValueError, match="loss"):
        fam.make("tiny", {"loss": "wasserstein"}, 28, 1, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        fam.make("tiny", {}, 30, 1, 10)


def test_draw_shapes_fakes_independent_of_data_and_labels_uniform():
    gan = _gan()
    obj = get_family("gan").dp_objective(gan)
    x, _ = _batch(5)
    rnd = obj.draw(x, 3, generator=torch.Generator().manual_seed(2))
    assert rnd["fake"].shape == (5, 3, 1, 28, 28) and rnd["fake_y"].shape == (5, 3)
    assert all(p.grad is None for p in gan.generator.parameters())
    # The fakes are a function of the public randomness and G, not of x.
    other = obj.draw(torch.zeros_like(x), 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rnd["fake"], other["fake"])
    empty = obj.draw(x[:0], 2)
    assert empty["fake"].shape == (0, 2, 1, 28, 28)
    assert obj.loss(gan.discriminator, x[:0], x.new_zeros(0, dtype=torch.long), empty).shape == (0,)
    # Fake labels uniform over the classes: 2,000 draws, 200 expected per class
    # (sd ~13; the bound is 5 sd).
    labels = obj.draw(torch.zeros(500, 1, 28, 28), 4)["fake_y"]
    counts = torch.bincount(labels.flatten(), minlength=10)
    assert counts.sum() == 2000 and (counts - 200).abs().max() < 67


@pytest.mark.parametrize("kind", ["bce", "hinge"])
def test_loss_is_pure_and_vmap_grads_equal_a_per_example_loop(kind):
    gan = _gan(loss=kind)
    d, obj = gan.discriminator, get_family("gan").dp_objective(gan)
    x, y = _batch(4)
    rnd = obj.draw(x, 2)
    out = obj.loss(d, x, y, rnd)
    assert out.shape == (4,) and torch.equal(out, obj.loss(d, x, y, rnd))
    params = {n: p.detach() for n, p in d.named_parameters()}

    def one(p, xi, yi, fi, fyi):
        def call(a, b):
            return functional_call(d, p, (a, b))
        return obj.loss(call, xi[None], yi[None], {"fake": fi[None], "fake_y": fyi[None]})[0]

    per = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, x, y, rnd["fake"], rnd["fake_y"])
    for i in range(4):
        d.zero_grad(set_to_none=True)
        sub = {k: v[i:i + 1] for k, v in rnd.items()}
        obj.loss(d, x[i:i + 1], y[i:i + 1], sub).sum().backward()
        for n, p in d.named_parameters():
            torch.testing.assert_close(per[n][i], p.grad, rtol=1e-4, atol=1e-6)
    # The examples differ, so a batch-summed gradient would not pass the loop.
    assert not torch.allclose(per["head.weight"][0], per["head.weight"][1])


def _loop_grads(d, obj, x, y, rnd):
    out = []
    for i in range(len(x)):
        d.zero_grad(set_to_none=True)
        obj.loss(d, x[i:i + 1], y[i:i + 1], {k: v[i:i + 1] for k, v in rnd.items()}).sum().backward()
        out.append({n: p.grad.clone() for n, p in d.named_parameters()})
    d.zero_grad(set_to_none=True)
    return out


def test_opacus_hooks_give_each_example_its_real_plus_fakes_gradient():
    from opacus import GradSampleModule

    gan = _gan()
    obj = get_family("gan").dp_objective(gan)
    x, y = _batch(5)
    rnd = obj.draw(x, 3)
    expect = _loop_grads(gan.discriminator, obj, x, y, rnd)
    gsm = GradSampleModule(gan.discriminator, loss_reduction="sum")
    obj.loss(gsm, x, y, rnd).sum().backward()
    for n, p in gan.discriminator.named_parameters():
        assert p.grad_sample.shape[0] == 5
        for i in range(5):
            torch.testing.assert_close(p.grad_sample[i], expect[i][n], rtol=1e-4, atol=1e-6)
    gsm._close()


def test_dp_step_then_generator_step_keeps_g_off_the_sensitive_batch():
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    fam = get_family("gan")
    gan = _gan()
    obj = fam.dp_objective(gan)
    x, y = _batch(16)
    d_opt = torch.optim.Adam(fam.dp_module(gan).parameters(), lr=1e-3)
    dp_model, dp_opt, loader = PrivacyEngine().make_private(
        module=fam.dp_module(gan), optimizer=d_opt, poisson_sampling=False,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=0.01, max_grad_norm=1.0, grad_sample_mode="hooks")
    after = fam.after_dp_step(gan, lr=1e-3)
    g_ids = {id(p) for p in gan.generator.parameters()}
    assert not g_ids & {id(p) for grp in dp_opt.param_groups for p in grp["params"]}
    for xb, yb in loader:  # two DP steps, each followed by the generator step
        g_before = [p.detach().clone() for p in gan.generator.parameters()]
        d_before = [p.detach().clone() for p in gan.discriminator.parameters()]
        obj.loss(dp_model, xb, yb, obj.draw(xb, 2)).mean().backward()
        for p in gan.generator.parameters():
            assert p.grad is None and getattr(p, "grad_sample", None) is None
        assert all(p.grad_sample.shape[0] == len(xb) for p in gan.discriminator.parameters())
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
        d_after_dp = [p.detach().clone() for p in gan.discriminator.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(d_before, d_after_dp))
        assert after() is not None
        assert any(not torch.equal(a, b.detach()) for a, b in zip(g_before, gan.generator.parameters()))
        # G's update read D but left it alone: same weights, no grads, no hook state.
        for a, p in zip(d_after_dp, gan.discriminator.parameters()):
            assert torch.equal(a, p.detach()) and p.grad is None
            assert getattr(p, "grad_sample", None) is None
        assert all(not getattr(m, "activations", []) for m in gan.discriminator.modules())


def test_generator_step_every_and_checkpoint_roundtrip():
    gan = _gan(g_every=2)
    twin = copy.deepcopy(gan)
    step = GeneratorStep(gan, lr=1e-3, seed=5)
    w0 = gan.generator.fc.weight.detach().clone()
    assert step() is None and torch.equal(w0, gan.generator.fc.weight)  # call 1 of 2
    assert step() is not None and not torch.equal(w0, gan.generator.fc.weight)
    step()
    step()  # the reference: four calls, two updates

    part = GeneratorStep(twin, lr=1e-3, seed=5)
    part()
    part()
    state = copy.deepcopy(part.state_dict())
    resumed_model, fresh_model = copy.deepcopy(twin), copy.deepcopy(twin)
    resumed = GeneratorStep(resumed_model, lr=1e-3, seed=123)
    resumed.load_state_dict(state)
    fresh = GeneratorStep(fresh_model, lr=1e-3, seed=123)
    for s in (resumed, fresh):
        s()
        s()
    for a, b in zip(gan.generator.parameters(), resumed_model.generator.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Without the state (Adam moments, call count, latent stream) it differs.
    assert not torch.equal(gan.generator.fc.weight, fresh_model.generator.fc.weight)


def test_public_trainer_resumes_exactly():
    fam = get_family("gan")
    gan = _gan()
    twin = copy.deepcopy(gan)
    x, y = _batch(8)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    full = fam.public_trainer(gan, 1e-3)
    for g in gens:
        assert np.isfinite(full.step(x, y, copy.deepcopy(g)))
    first = fam.public_trainer(twin, 1e-3)
    first.step(x, y, copy.deepcopy(gens[0]))
    resumed_model = copy.deepcopy(twin)
    resumed = fam.public_trainer(resumed_model, 1e-3)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    resumed.step(x, y, copy.deepcopy(gens[1]))
    for a, b in zip(gan.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sampling_is_deterministic_per_seed_and_follows_labels():
    fam = get_family("gan")
    g = _gan(size=32, channels=3).generator
    labels = np.repeat(np.arange(10), 3)
    a = fam.sample(g, labels, num_steps=0, solver="ignored", seed=3, batch_size=7)
    assert a.shape == (30, 32, 32, 3) and a.dtype == np.uint8
    # Same seed, another batch size: the same images (per-image latents, GroupNorm).
    b = fam.sample(g, labels, num_steps=18, solver="heun", seed=3, batch_size=64)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not np.array_equal(a, fam.sample(g, labels, 0, "", seed=4, batch_size=64))
    # The label conditions the image: same latents, other labels, other images.
    c = fam.sample(g, (labels + 1) % 10, 0, "", seed=3, batch_size=64)
    assert not np.array_equal(a, c)
    assert fam.sample(g, np.zeros(0, int), 0, "", seed=3, batch_size=4).shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match="guidance"):
        fam.sample(g, labels, 0, "", seed=3, batch_size=4, guidance=1.0)


def test_audit_loss_scores_generated_images_as_members_deterministically():
    fam = get_family("gan")
    fam.audit_samples = 16
    g = _gan().generator
    ref = generate(g, np.repeat(np.arange(10), 16), seed=7, batch_size=64)
    labels = torch.tensor([2, 2, 5, 9])
    # Exact copies of reference images of their class: distance 0.
    members = ref[torch.tensor([2 * 16 + 3, 2 * 16 + 15, 5 * 16, 9 * 16 + 8])]
    others, _ = _batch(4)
    s_mem = fam.audit_loss(g, members, labels, seed=7)
    s_oth = fam.audit_loss(g, others, labels, seed=7)
    assert s_mem.shape == (4,) and s_mem.max() < 1e-6 < s_oth.min()
    assert torch.equal(s_oth, fam.audit_loss(g, others, labels, seed=7))
    assert not torch.equal(s_mem, fam.audit_loss(g, members, labels, seed=8))


def _class_mean_match(g, real_means):
    """(mean correlation of each class's generated mean image with its real
    mean, fraction of classes whose generated mean is closest to their own)."""
    labels = torch.arange(10).repeat_interleave(20)
    fake = generate(g, labels.numpy(), seed=1, batch_size=200)
    fm = torch.stack([fake[labels == c].mean(0).flatten() for c in range(10)])
    corr = torch.corrcoef(torch.cat([fm, real_means]))[:10, 10:]
    return corr.diag().mean().item(), (corr.argmax(1) == torch.arange(10)).float().mean().item()


def test_public_training_on_mnist_learns_class_conditional_digits():
    """~25-50 s on one shared core: 300 D+G steps of batch 32 on 2,000 MNIST
    images with 16-wide networks."""
    from privimage_core.data.sources import load_source

    ds = load_source("mnist", split="train", image_size=28, channels=1, max_per_class=200, seed=0)
    x, y = ds.to_tensor(), torch.as_tensor(ds.labels)
    real_means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])
    torch.manual_seed(0)
    fam = get_family("gan")
    gan = fam.make("tiny", {"g_channels": 16, "d_channels": 16, "g_batch": 32}, 28, 1, 10)
    corr0, _ = _class_mean_match(gan.generator, real_means)
    trainer = fam.public_trainer(gan, 1e-3)
    for s in range(300):
        g = torch.Generator().manual_seed(s)
        idx = torch.randint(0, len(x), (32,), generator=g)
        trainer.step(x[idx], y[idx], g)
    corr, match = _class_mean_match(gan.generator, real_means)
    # Measured: corr -0.03 at init, 0.78 and 10/10 classes at 200-400 steps.
    assert corr > max(0.5, corr0 + 0.3) and match >= 0.7, (corr0, corr, match)
