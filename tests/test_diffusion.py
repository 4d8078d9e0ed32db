"""The EDM generator: UNet shapes and presets, Opacus compatibility, loss,
sampler determinism and EMA. Kept tiny (2 shared CPU cores)."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from privimage_core.models.diffusion.edm import (EDMPrecond, edm_loss, karras_sigmas, sample,
                                          sample_training_noise)
from privimage_core.models.ema import EMA, unwrap
from privimage_core.models.diffusion.unet import PRESETS, UNet, build_unet

torch.set_num_threads(1)
# Opacus's full backward hooks warn when the input images do not require grad.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _micro(image_size=28, channels=1, num_classes=10, **kw) -> EDMPrecond:
    """A very small net with every block type (attention included)."""
    args = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(7, 8), patch_size=2, emb_dim=16)
    args.update(kw)
    return EDMPrecond(UNet(image_size, channels, num_classes, **args))


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_shapes(preset, size, channels):
    torch.manual_seed(0)
    net = build_unet(preset, image_size=size, channels=channels, num_classes=10)
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0.1, -0.5]), torch.tensor([3, 9]))
    assert out.shape == x.shape


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_full_resolution_three_levels(size, channels):
    # patch 1, 28 -> 14 -> 7 (32 -> 16 -> 8), attention at the lowest level
    pre = EDMPrecond(UNet(size, channels, 4, base_channels=8, channel_mult=(1, 2, 2),
                          attn_resolutions=(7, 8), emb_dim=16))
    assert sum(type(m).__name__ == "SelfAttention" for m in pre.modules()) == 3
    x = torch.randn(3, channels, size, size)
    assert pre(x, torch.ones(3), torch.tensor([0, 1, 3])).shape == x.shape


def test_preset_sizes_ordered():
    counts = {p: _n(build_unet(p, 28, 1, 10)) for p in PRESETS}
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["medium"] < counts["large"]
    assert len(counts) == 5  # the axis of the paper's Fig. 8, about 0.4M to 30M
    assert 8e6 < counts["medium"] < 12e6 and 25e6 < counts["large"] < 32e6
    assert 0.2e6 < counts["tiny"] < 0.6e6
    assert 1e6 < counts["small"] < 2.5e6
    assert 3.5e6 < counts["base"] < 8e6


def test_bad_sizes_and_presets():
    with pytest.raises(ValueError, match="divisible"):
        UNet(30, 1, 10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="preset"):
        build_unet("huge", 28, 1, 10)


def test_batch_size_zero():
    pre = _micro()
    out = pre(torch.zeros(0, 1, 28, 28), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 1, 28, 28)
    sigma, noise = sample_training_noise(torch.zeros(0, 1, 28, 28))
    loss = edm_loss(pre, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long),
                    sigma, noise)
    assert loss.shape == (0,)


def test_module_validator_clean():
    from opacus.validators import ModuleValidator
    for preset in PRESETS:
        pre = EDMPrecond(build_unet(preset, 28, 1, 10))
        assert ModuleValidator.validate(pre, strict=True) == []


def test_opacus_hooks_per_sample_grads():
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    pre = _micro()
    x = torch.rand(12, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (12,))
    opt = torch.optim.Adam(pre.parameters(), 1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, dp_opt, dp_loader = PrivacyEngine(accountant="rdp").make_private(
            module=pre, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
    xb, yb = next(iter(dp_loader))
    before = [p.detach().clone() for p in pre.parameters()]
    sigma, noise = sample_training_noise(xb, generator=torch.Generator().manual_seed(1))
    loss = edm_loss(model, xb, yb, sigma, noise)  # works through the wrapper
    assert loss.shape == (len(xb),)
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (len(xb), *p.shape), name
    dp_opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, pre.parameters()))


@pytest.mark.parametrize("scale_shift", [False, True])
def test_per_sample_grads_match_single_sample_backprop(scale_shift):
    """Opacus hooks' per-sample gradient == the gradient of that sample alone
    (no BatchNorm-style mixing across the batch, no double-called module)."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    pre = _micro(scale_shift=scale_shift)
    for p in pre.parameters():  # leave zero init: every layer gets a gradient
        p.data.add_(torch.randn_like(p) * 0.02)
    ref = copy.deepcopy(pre)  # same weights, plain autograd (copied before hooks exist)
    gsm = GradSampleModule(pre, batch_first=True, loss_reduction="sum")
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7])
    sigma, noise = torch.tensor([0.2, 1.0, 5.0]), torch.randn(3, 1, 28, 28)
    edm_loss(gsm, x, y, sigma, noise).sum().backward()
    per = {n: p.grad_sample.clone() for n, p in gsm.named_parameters()}
    for i in range(3):
        ref.zero_grad()
        edm_loss(ref, x[i:i + 1], y[i:i + 1], sigma[i:i + 1], noise[i:i + 1]).sum().backward()
        for n, p in ref.named_parameters():
            torch.testing.assert_close(per["_module." + n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_empty_batch_through_opacus():
    """An empty Poisson batch: forward, backward and the DP step (noise only) run."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    pre = _micro()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=pre, optimizer=torch.optim.SGD(pre.parameters(), 0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode="hooks")
    before = [p.detach().clone() for p in pre.parameters()]
    xb = torch.zeros(0, 1, 28, 28)
    sigma, noise = sample_training_noise(xb)
    loss = edm_loss(model, xb, torch.zeros(0, dtype=torch.long), sigma, noise)
    assert loss.shape == (0,)
    loss.sum().backward()
    opt.step()
    opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, pre.parameters()))  # noise added


def test_edm_loss_shape_finite_and_weighting():
    torch.manual_seed(0)
    pre = _micro()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    y = torch.arange(5)
    sigma, noise = sample_training_noise(x, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (5,) and noise.shape == x.shape and (sigma > 0).all()
    loss = edm_loss(pre, x, y, sigma, noise)
    assert loss.shape == (5,) and torch.isfinite(loss).all()
    # zero-initialised output layer: D = c_skip x_noisy, so the loss is analytic
    s, sd = sigma.view(-1, 1, 1, 1), 0.5
    d = sd ** 2 / (s ** 2 + sd ** 2) * (x + s * noise)
    lam = (s ** 2 + sd ** 2) / (s * sd) ** 2
    torch.testing.assert_close(loss, (lam * (d - x) ** 2).flatten(1).mean(1))


def test_training_noise_reproducible():
    x = torch.zeros(4, 1, 8, 8)
    a = sample_training_noise(x, generator=torch.Generator().manual_seed(3))
    b = sample_training_noise(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sig = sample_training_noise(torch.zeros(20000, 1, 1, 1),
                                generator=torch.Generator().manual_seed(0))[0]
    assert abs(sig.log().mean().item() + 1.2) < 0.05 and abs(sig.log().std().item() - 1.2) < 0.05


def test_karras_sigmas():
    t = karras_sigmas(18)
    assert len(t) == 19 and t[-1] == 0
    assert abs(t[0].item() - 80) < 1e-9 and abs(t[-2].item() - 0.002) < 1e-12
    assert (t[:-1] > t[1:]).all()
    assert len(karras_sigmas(1)) == 2


def test_overfit_handful_of_images():
    """A tiny net learns a few images: the EDM loss on fixed noise drops."""
    torch.manual_seed(0)
    pre = _micro(base_channels=16, emb_dim=32)
    x = torch.zeros(8, 1, 28, 28) - 1
    for i in range(8):  # simple bars/blocks in [-1, 1]
        x[i, 0, 3 * i:3 * i + 6, 4:24] = 1
    y = torch.arange(8) % 4
    g = torch.Generator().manual_seed(0)
    xe = x.repeat(4, 1, 1, 1)
    sig_e, noise_e = sample_training_noise(xe, generator=g)
    ye = y.repeat(4)

    def eval_loss():
        with torch.no_grad():
            return edm_loss(pre, xe, ye, sig_e, noise_e).mean().item()

    start = eval_loss()
    opt = torch.optim.Adam(pre.parameters(), 3e-3)
    for _ in range(60):
        sigma, noise = sample_training_noise(x, generator=g)
        loss = edm_loss(pre, x, y, sigma, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < 0.6 * start, (start, end)


def test_sampler_deterministic_and_seeded():
    torch.manual_seed(0)
    pre = _micro()
    for p in pre.parameters():  # a non-trivial net (zero-init output otherwise)
        p.data.normal_(0, 0.05)
    pre.train()
    labels = torch.tensor([0, 1, 2, 3, 4])
    a = sample(pre, labels, num_steps=3, seed=7, batch_size=2, solver="heun")
    assert pre.training  # mode restored
    assert all(p.is_contiguous() for p in pre.parameters())  # channels_last undone
    b = sample(pre, labels, num_steps=3, seed=7, batch_size=2, solver="heun")
    c = sample(pre, labels, num_steps=3, seed=8, batch_size=2, solver="heun")
    assert a.dtype == np.uint8 and a.shape == (5, 28, 28, 1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # latents are per image: batch size and slicing do not change the images
    # (beyond float rounding of the network on different batch shapes)
    d = sample(pre, labels, num_steps=3, seed=7, batch_size=5, solver="heun")
    assert np.abs(a.astype(int) - d.astype(int)).max() <= 1
    e = sample(pre, labels[3:], num_steps=3, seed=7, batch_size=5, solver="heun",
               start_index=3)
    assert np.abs(a[3:].astype(int) - e.astype(int)).max() <= 1
    g = sample(pre, labels, num_steps=3, seed=7, batch_size=2, solver="heun",
               channels_last=False)
    assert np.abs(a.astype(int) - g.astype(int)).max() <= 1
    f = sample(pre, labels, num_steps=3, seed=7, batch_size=5, solver="euler")
    assert f.shape == a.shape and not np.array_equal(f, d)
    assert sample(pre, torch.zeros(0, dtype=torch.long), num_steps=2).shape == (0, 28, 28, 1)
    with pytest.raises(ValueError, match="solver"):
        sample(pre, labels, solver="rk4")


def test_sampler_pixel_scale():
    """A denoiser that always returns a constant image c: the ODE ends at c."""

    class Const(nn.Module):
        channels, image_size = 1, 4

        def forward(self, x, sigma, y):
            return torch.full_like(x, 0.5)

    out = sample(Const(), torch.zeros(2, dtype=torch.long), num_steps=5, solver="euler")
    assert out.shape == (2, 4, 4, 1)
    assert (out == round(1.5 * 127.5)).all()


def test_ema_math_and_unwrap():
    from opacus import GradSampleModule

    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, decay=0.9, warmup=False)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema.update(lin)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 1.1))
    ema.update(lin)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.1 + 0.2))
    # wrapped by Opacus: keys stay the inner model's (no "_module." prefix)
    gsm = GradSampleModule(lin)
    assert unwrap(gsm) is lin
    ema2 = EMA(gsm, decay=0.9, warmup=False)
    assert set(ema2.shadow) == {"weight"}
    ema2.update(gsm)
    fresh = nn.Linear(2, 1, bias=False)
    ema.copy_to(fresh)
    torch.testing.assert_close(fresh.weight, ema.shadow["weight"])
    # state round trip
    restored = EMA(fresh, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 2
    torch.testing.assert_close(restored.shadow["weight"], ema.shadow["weight"])


def test_ema_warmup():
    lin = nn.Linear(1, 1, bias=False)
    ema = EMA(lin, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        lin.weight.fill_(5.0)
    w0 = ema.shadow["weight"].item()
    ema.update(lin)  # mostly follows the model at first: 0.1 w0 + 0.9 * 5
    assert ema.shadow["weight"].item() == pytest.approx(0.1 * w0 + 4.5)
    assert ema.num_updates == 1
    ema.num_updates = 10 ** 6
    assert ema.current_decay() == pytest.approx(0.999)


# ----------------------------------------------------------- pre-training arithmetic

def test_pretrain_precision_resolution(monkeypatch):
    """'auto' takes bf16 only where the family supports it and the hardware
    runs it natively; an explicit bf16 for an fp32-only family is refused."""
    from privimage_core import pretrain as pt
    both = ("fp32", "bf16")
    assert pt.resolve_precision("fp32", "cpu", both) == "fp32"
    assert pt.resolve_precision("bf16", "cpu", both) == "bf16"
    assert pt.resolve_precision("auto", "cpu", ("fp32",)) == "fp32"
    with pytest.raises(ValueError, match="fp32 only"):
        pt.resolve_precision("bf16", "cpu", ("fp32",))
    monkeypatch.setattr(pt, "cpu_has_amx", lambda: True)
    assert pt.resolve_precision("auto", "cpu", both) == "bf16"
    monkeypatch.setattr(pt, "cpu_has_amx", lambda: False)
    assert pt.resolve_precision("auto", "cpu", both) == "fp32"


def test_bf16_public_trainer_learns_in_fp32_weights():
    """The bf16 trainer autocasts the forward only: parameters and Adam's
    state stay fp32, and it learns a few images as the fp32 trainer does
    (the EDM loss at fixed noise drops)."""
    from privimage_core.models import get_family
    fam = get_family("diffusion")
    x = torch.zeros(8, 1, 28, 28) - 1
    for i in range(8):  # simple bars in [-1, 1]
        x[i, 0, 3 * i:3 * i + 6, 4:24] = 1
    y = torch.arange(8) % 4
    xe, ye = x.repeat(4, 1, 1, 1), y.repeat(4)
    sig_e, noise_e = sample_training_noise(xe, generator=torch.Generator().manual_seed(0))
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = fam.make("tiny", {}, 28, 1, 4)

        def eval_loss():
            with torch.no_grad():
                return edm_loss(model, xe, ye, sig_e, noise_e).mean().item()

        start = eval_loss()
        tr = fam.public_trainer(model, lr=3e-3, precision=precision)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        seen = []  # the arithmetic the trainer's forward really ran in
        hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            tr.step(x, y, g)
        hook.remove()
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        end = eval_loss()
        assert end < 0.6 * start, (precision, start, end)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for st in tr.opt.state.values()
                   for v in st.values() if torch.is_tensor(v) and v.numel() > 1)


def test_sampler_reports_progress_per_batch():
    from privimage_core.models import get_family
    fam = get_family("diffusion")
    model = fam.make("tiny", {}, 28, 1, 10)
    seen = []
    out = fam.sample(model, np.arange(7) % 10, num_steps=1, solver="euler", seed=0,
                     batch_size=3, progress=seen.append)
    assert len(out) == 7 and seen == [3, 6, 7]
