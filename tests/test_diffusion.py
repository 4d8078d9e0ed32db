"""The generator: shapes, presets, Opacus compatibility, loss, sampler, EMA."""
import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from privimage_core.diffusion.edm import EDMPrecond, edm_loss, karras_sigmas, sample, sample_training_noise
from privimage_core.diffusion.ema import EMA
from privimage_core.diffusion.unet import PRESETS, build_unet

torch.set_num_threads(1)


@pytest.mark.parametrize("size,ch", [(28, 1), (32, 3)])
def test_shapes_and_empty_batch(size, ch):
    m = EDMPrecond(build_unet("tiny", size, ch, 10))
    x = torch.randn(3, ch, size, size)
    out = m(x, torch.rand(3) + 0.1, torch.tensor([0, 1, 9]))
    assert out.shape == x.shape
    assert m(x[:0], torch.rand(0), torch.zeros(0, dtype=torch.long)).shape == (0, ch, size, size)


def test_presets_grow_and_are_opacus_valid():
    counts = [sum(p.numel() for p in build_unet(p, 28, 1, 10).parameters()) for p in PRESETS]
    assert counts == sorted(counts) and counts[0] < 1e6
    for p in PRESETS:
        assert ModuleValidator.validate(build_unet(p, 28, 1, 10), strict=False) == []


def test_edm_loss_per_sample_and_opacus_step():
    torch.manual_seed(0)
    m = EDMPrecond(build_unet("tiny", 28, 1, 10))
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (16,))
    s, n = sample_training_noise(x)
    loss = edm_loss(m, x, y, s, n)
    assert loss.shape == (16,) and torch.isfinite(loss).all()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    gm, dopt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=m, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode="hooks")
    xb, yb = x[:8], y[:8]
    s, n = sample_training_noise(xb)
    edm_loss(gm, xb, yb, s, n).mean().backward()
    for p in gm.parameters():
        assert p.grad_sample.shape[0] == 8  # one gradient per sample
    dopt.step()


def test_overfit_few_images():
    torch.manual_seed(0)
    m = EDMPrecond(build_unet("tiny", 28, 1, 2))
    x = torch.zeros(8, 1, 28, 28) - 1
    x[:4, :, 8:20, 12:16] = 1  # a bar
    x[4:, :, 12:16, 8:20] = 1  # a dash
    y = torch.tensor([0] * 4 + [1] * 4)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    fixed = [sample_training_noise(x, generator=g) for _ in range(4)]

    def eval_loss():
        with torch.no_grad():
            return float(np.mean([edm_loss(m, x, y, s, n).mean().item() for s, n in fixed]))

    before = eval_loss()
    for _ in range(60):
        s, n = sample_training_noise(x, generator=g)
        loss = edm_loss(m, x, y, s, n).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before


def test_sampler_deterministic_and_schedule():
    m = EDMPrecond(build_unet("tiny", 28, 1, 10))
    labels = torch.arange(6) % 10
    a = sample(m, labels, num_steps=3, seed=1, batch_size=4)
    b = sample(m, labels, num_steps=3, seed=1, batch_size=4)
    c = sample(m, labels, num_steps=3, seed=2, batch_size=4)
    assert a.dtype == np.uint8 and a.shape == (6, 28, 28, 1)
    assert (a == b).all() and not (a == c).all()
    assert sample(m, labels, num_steps=2, solver="heun").shape == (6, 28, 28, 1)
    t = karras_sigmas(5)
    assert t[0] == pytest.approx(80) and t[-2] == pytest.approx(0.002) and t[-1] == 0


def test_ema_math():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)
    ema.update(lin)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 0.81)
    ema2 = EMA(lin)
    ema2.load_state_dict(ema.state_dict())
    ema2.copy_to(lin)
    assert lin.weight.item() == pytest.approx(0.19)
