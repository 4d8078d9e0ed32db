"""Book-keeping ghost clipping (privimage_core/dp_sgd/ghost_clipping.py): the
per-example norms and the clipped sum equal those of per-example backprop,
for every layer kind it supports (ghost and instantiated convolutions,
attention's 1x1 convolutions, Linear, Embedding, GroupNorm), with noise
multiplicity and with a layer called several times per forward (a GAN
discriminator); "auto" falls back to vmap on a layer it does not support.
Under DDP (noise added once): tests/test_privacy.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from privimage_core.dp_sgd import ghost_clipping
from privimage_core.models.diffusion.edm import EDMObjective, EDMPrecond, edm_loss
from privimage_core.models.diffusion.unet import build_unet
from privimage_core.dp_sgd.finetune import check_clipper, make_private, resolve_grad_sample_mode
from privimage_core.dp_sgd.ghost_clipping import BookKeepingClipper, unsupported_parameters
from privimage_core.models import get_family
from privimage_core.privacy.ledger import PrivacyLedger

torch.set_num_threads(1)


def _unet(preset="small", size=16, classes=3, seed=0):
    torch.manual_seed(seed)
    m = EDMPrecond(build_unet(preset, size, 1, classes))
    with torch.no_grad():  # EDM's zero-initialised layers would give zero gradients
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _loop(model, loss_of, n):
    """Reference: one backward per example."""
    out = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss_of(i).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return torch.stack(out).double()


def _clipped_reference(per, clip):
    norms = per.norm(dim=1)
    c = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, (c[:, None] * per).sum(0)


def _ghost(model, loss_all, b, clip):
    bk = BookKeepingClipper(model)
    norms = bk.clipped_grad(loss_all, b, clip).double()
    return norms, torch.cat([p.grad.flatten() for p in model.parameters()]).double()


@pytest.mark.parametrize("k", [1, 3])
def test_unet_norms_and_clipped_sum_equal_per_example_backprop(k):
    # "small" at 16x16 has attention at 8x8, convolutions on both sides of
    # the ghost/instantiate rule, the class Embedding and the noise MLP
    model, obj = _unet(), EDMObjective()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 3, (5,), generator=g)
    rnd = obj.draw(x, k)
    per = _loop(model, lambda i: obj.loss(model, x[i:i + 1], y[i:i + 1],
                                          {n: v[i:i + 1] for n, v in rnd.items()}).sum(), 5)
    clip = float(per.norm(dim=1).median())  # some examples clipped, some not
    ref_norms, ref_sum = _clipped_reference(per, clip)
    norms, got = _ghost(model, lambda: obj.loss(model, x, y, rnd), 5, clip)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, ref_sum, rtol=1e-4, atol=1e-6)
    assert (ref_norms > clip).any() and (ref_norms < clip).any()


def test_frozen_weights_are_left_out_of_norm_and_update():
    """A layer with a frozen weight and a trainable bias (fine-tuning a
    subset, benchmarks/quality_explore.py --train-params): the norm is that
    of the trainable parameters' gradient only, and frozen ones get none."""
    model, obj = _unet("tiny", 8), EDMObjective()
    for name, p in model.named_parameters():
        if name.endswith("weight") and ("conv" in name or "emb" in name):
            p.requires_grad_(False)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    rnd = obj.draw(x, 2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    per = []
    for i in range(4):
        model.zero_grad(set_to_none=True)
        obj.loss(model, x[i:i + 1], y[i:i + 1], {n: v[i:i + 1] for n, v in rnd.items()}).sum().backward()
        per.append(torch.cat([p.grad.flatten() for p in trainable]))
    model.zero_grad(set_to_none=True)
    per = torch.stack(per).double()
    clip = float(per.norm(dim=1).median())
    ref_norms, ref_sum = _clipped_reference(per, clip)
    norms = BookKeepingClipper(model).clipped_grad(lambda: obj.loss(model, x, y, rnd), 4, clip)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in trainable]).double(), ref_sum,
                               rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_a_missing_layer_norm_is_caught(monkeypatch):
    """Control: a clipper that leaves GroupNorm out of the norm clips too
    little and must fail the comparison above."""
    real = ghost_clipping._norms_and_sum

    def without_groupnorm(m, x, g, b):
        sq, fn = real(m, x, g, b)
        return (torch.zeros_like(sq) if isinstance(m, nn.GroupNorm) else sq), fn

    monkeypatch.setattr(ghost_clipping, "_norms_and_sum", without_groupnorm)
    model, obj = _unet(), EDMObjective()
    x, y = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0])
    rnd = obj.draw(x, 1)
    per = _loop(model, lambda i: obj.loss(model, x[i:i + 1], y[i:i + 1],
                                          {n: v[i:i + 1] for n, v in rnd.items()}).sum(), 4)
    ref_norms, _ = _clipped_reference(per, 1.0)
    norms, _ = _ghost(model, lambda: obj.loss(model, x, y, rnd), 4, 1.0)
    assert not torch.allclose(norms, ref_norms, rtol=1e-5)


def test_gan_discriminator_called_per_draw_equals_per_example_backprop():
    fam = get_family("gan")
    torch.manual_seed(0)
    gan = fam.make("tiny", {}, 28, 1, 10)
    d, obj = fam.dp_module(gan), fam.dp_objective(gan)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (4,), generator=g)
    rnd = obj.draw(x, 2)  # D runs 1 + 2 times per forward
    per = _loop(d, lambda i: obj.loss(d, x[i:i + 1], y[i:i + 1],
                                      {n: v[i:i + 1] for n, v in rnd.items()}).sum(), 4)
    clip = float(per.norm(dim=1).median())
    ref_norms, ref_sum = _clipped_reference(per, clip)
    norms, got = _ghost(d, lambda: obj.loss(d, x, y, rnd), 4, clip)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, ref_sum, rtol=1e-4, atol=1e-6)


def test_auto_uses_ghost_only_where_every_layer_is_supported():
    assert resolve_grad_sample_mode("auto", _unet("tiny", 8)) == "ghost"
    ln = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm(6))
    assert resolve_grad_sample_mode("auto", ln) == "vmap"
    assert resolve_grad_sample_mode("hooks", ln) == "hooks"
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"cannot clip 1\.weight \(a LayerNorm parameter\), 1\.bias .*use grad_sample_mode vmap"):
        make_private(ln, torch.optim.SGD(ln.parameters(), lr=0.1), x, y, batch_size=2,
                     noise_multiplier=1.0, max_grad_norm=1.0, ledger=PrivacyLedger(10, 1e-5),
                     grad_sample_mode="ghost")


class _MLP(nn.Module):
    """Linear on [N, L, d] input, GroupNorm on [N, C], an Embedding."""

    def __init__(self, tied=False, padding_idx=None):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.emb = nn.Embedding(3, 8, padding_idx=padding_idx)
        self.b = nn.Linear(8, 8)
        if tied:
            self.c = nn.Linear(8, 8)
            self.c.weight = self.b.weight

    def forward(self, x, y):
        h = self.a(x).mean(1)                       # [N, 8] from [N, L, 6]
        h = self.norm(h) + self.emb(y)
        out = self.b(torch.tanh(h))
        return self.c(out) if hasattr(self, "c") else out


def test_linear_on_tokens_groupnorm_on_vectors_and_embedding_equal_backprop():
    torch.manual_seed(3)
    model = _MLP()
    x, y = torch.randn(5, 4, 6), torch.tensor([0, 1, 2, 1, 1])
    per = _loop(model, lambda i: model(x[i:i + 1], y[i:i + 1]).pow(2).sum(), 5)
    clip = float(per.norm(dim=1).median())
    ref_norms, ref_sum = _clipped_reference(per, clip)
    norms, got = _ghost(model, lambda: model(x, y).pow(2).sum(1), 5, clip)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, ref_sum, rtol=1e-4, atol=1e-6)


def test_what_the_per_layer_sum_cannot_clip_is_refused():
    """Tied weights (the example's gradient is the sum of two layers' parts:
    summing their squared norms would undercount it, up to sqrt(2) C) and an
    Embedding whose padding row gets no gradient fall back to vmap."""
    tied = _MLP(tied=True)
    assert any("shared by several layers" in n for n in unsupported_parameters(tied))
    assert resolve_grad_sample_mode("auto", tied) == "vmap"
    padded = _MLP(padding_idx=0)
    assert unsupported_parameters(padded) == [
        "emb.weight (padding_idx, sparse, scale_grad_by_freq or max_norm)"]
    assert unsupported_parameters(_MLP()) == []


def test_an_in_place_op_on_a_layer_output_is_refused():
    lin = nn.Linear(4, 3)

    def loss():
        h = lin(torch.randn(2, 4))
        h.mul_(5)  # the recorded output's gradient would be that of 5 * h
        return h.sum(1)

    with pytest.raises(RuntimeError, match="modified in place"):
        BookKeepingClipper(lin).clipped_grad(loss, 2, 1.0)
    # the failed call left nothing behind: the next one works
    torch.testing.assert_close(BookKeepingClipper(lin).clipped_grad(
        lambda: lin(torch.ones(2, 4)).sum(1), 2, 1e9), torch.full((2,), 15 ** 0.5))


class _DrawMajorObjective:
    """Control: the EDM loss with its k draws laid out draw-major (all
    examples' first draws, then all second draws), the layout the ghost mode
    would group wrongly: rows 0 and 1 are two different examples."""

    def draw(self, x, k):
        return EDMObjective().draw(x, k)

    def loss(self, model, x, y, rnd):
        b, k = rnd["sigma"].shape
        noise = rnd["noise"].transpose(0, 1).reshape(b * k, *x.shape[1:])
        rows = edm_loss(model, x.repeat(k, 1, 1, 1), y.repeat(k), rnd["sigma"].t().reshape(-1),
                        noise)
        return rows.reshape(k, b).mean(0)


def test_the_pre_training_check_refuses_a_non_example_major_objective():
    model = _unet("tiny", 8)
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.zeros(16, dtype=torch.long)
    dp = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, batch_size=4,
                      noise_multiplier=1.0, max_grad_norm=1.0, ledger=PrivacyLedger(10, 1e-5),
                      grad_sample_mode="auto")
    assert dp.grad_sample_mode == "ghost"
    check_clipper(dp, EDMObjective(), 2)  # the EDM objective passes
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None
               for p in model.parameters())
    with pytest.raises(RuntimeError, match="not example-major"):
        check_clipper(dp, _DrawMajorObjective(), 2)


def test_an_optimizer_over_other_parameters_is_refused():
    """The fast-clipping optimizer noises p.grad unclipped: a parameter the
    clipper does not see must not reach it (Opacus's make_private refuses)."""
    model, extra = _unet("tiny", 8), nn.Parameter(torch.zeros(3))
    x, y = torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="different than optimizer"):
        make_private(model, torch.optim.SGD([*model.parameters(), extra], lr=0.1), x, y,
                     batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0,
                     ledger=PrivacyLedger(10, 1e-5), grad_sample_mode="ghost")


def test_an_embedding_with_max_norm_is_refused():
    """max_norm renormalises rows in the forward: refused, so auto falls back
    to vmap; the same Embedding without it is supported (the control)."""
    assert unsupported_parameters(nn.Embedding(5, 4)) == []
    assert unsupported_parameters(nn.Embedding(5, 4, max_norm=1.0)) == [
        "weight (padding_idx, sparse, scale_grad_by_freq or max_norm)"]
