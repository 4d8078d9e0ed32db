"""The class-conditional GAN family behind ``ModelFamily`` (``privimage_g``
and ``dpgan``; PrivImage App. C, Table 6; Opacus's DCGAN example).

DP-SGD trains only the discriminator D. Each sensitive example's gradient is
that of ONE per-example loss: D's loss on the real (x_i, y_i) plus the mean
of its loss on k fakes drawn for that example (``GANObjective``). The
generator G is updated after every noised D step from D's weights and fresh
latents alone (``GeneratorStep``): post-processing of the DP discriminator,
so it costs no budget and never sees a sensitive gradient.

Losses: ``bce`` is the non-saturating GAN (Goodfellow et al. 2014, as in
DCGAN): D minimises softplus(-D(x)) + softplus(D(G(z))), G minimises
softplus(-D(G(z))). ``hinge`` (Miyato & Koyama 2018): D minimises
relu(1 - D(x)) + relu(1 + D(G(z))), G minimises -D(G(z)). Optimisers are
Adam with betas (0.5, 0.999), DCGAN's choice (Radford et al. 2016, Sec. 4).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privimage_core.models.diffusion.edm import LatentStream
from privimage_core.models.base import ModelFamily, PublicTrainer, no_part
from privimage_core.models.gan.networks import (PRESETS, ConditionalGAN, Discriminator,
                                                Generator, build_gan)

ADAM_BETAS = (0.5, 0.999)


def d_loss_real(kind: str, logit: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logit) if kind == "bce" else F.relu(1.0 - logit)


def d_loss_fake(kind: str, logit: torch.Tensor) -> torch.Tensor:
    return F.softplus(logit) if kind == "bce" else F.relu(1.0 + logit)


def g_loss(kind: str, logit: torch.Tensor) -> torch.Tensor:
    # Non-saturating: G maximises log D(G(z)) rather than minimising
    # log(1 - D(G(z))), whose gradient vanishes while D wins (Goodfellow et al.).
    return F.softplus(-logit) if kind == "bce" else -logit


def _latents(g: Generator, n: int, device, generator: torch.Generator | None = None):
    """(z [n, z_dim], labels [n] uniform over the classes), drawn on the
    generator's device and moved to ``device``."""
    dev = generator.device if generator is not None else device
    z = torch.randn(n, g.z_dim, generator=generator, device=dev).to(device)
    y = torch.randint(0, g.num_classes, (n,), generator=generator, device=dev).to(device)
    return z, y


class GANObjective:
    """The per-example discriminator loss DP-SGD clips.

    Why pairing fakes with real examples keeps the sensitivity at the clip
    norm C: example i's clipped gradient is that of
    l_i = l_real(D; x_i, y_i) + mean_j l_fake(D; G(z_ij, c_ij), c_ij), where
    z_ij, c_ij are fresh public randomness and G is a function of the public
    pre-training and of earlier DP releases of D only. Adding or removing
    example i adds or removes exactly one term of norm <= C (its fakes go
    with it); no other term changes. So one noised step per logical batch is
    the Gaussian mechanism the accountant counts (unlike Opacus's DCGAN
    example, which takes a separate noised step on the fakes), and the fakes
    grow with the Poisson batch, keeping the real/fake balance of each step.
    """

    def __init__(self, gan: ConditionalGAN):
        self.generator = gan.generator
        self.kind = gan.loss

    def draw(self, x: torch.Tensor, k: int,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """k fakes per real example: {"fake": [B, k, C, H, W], "fake_y": [B, k]}.
        G runs here, under no_grad, outside the per-example function: the
        sensitive loss never differentiates through G."""
        if k < 1:
            raise ValueError(f"noise multiplicity must be >= 1, got {k}")
        b = len(x)
        z, fy = _latents(self.generator, b * k, x.device, generator)
        with torch.no_grad():
            # An empty Poisson batch draws no fakes (GroupNorm refuses 0 images).
            fake = self.generator(z, fy) if b else x.new_zeros((0, *x.shape[1:]))
        return {"fake": fake.view(b, k, *fake.shape[1:]), "fake_y": fy.view(b, k)}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             rnd: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] per-example D loss; ``model`` is D (or any callable D(x, y)).

        A pure function of its inputs. D is called once on the reals and once
        per fake draw j, each time on B images, so that under Opacus's hooks
        row i of every call belongs to example i: the hooks sum the rows of
        repeated forwards (as for tied weights), giving example i's whole
        gradient in one grad_sample row before clipping. Under vmap, call it
        with a batch of one example."""
        fake, fake_y = rnd["fake"], rnd["fake_y"]
        k = fake_y.shape[1]
        real = d_loss_real(self.kind, model(x, y))
        fakes = sum(d_loss_fake(self.kind, model(fake[:, j], fake_y[:, j])) for j in range(k))
        return real + fakes / k


class GeneratorStep:
    """The generator's update after a D step (the ``after_dp_step`` closure).

    Every ``gan.g_every``-th call takes ``gan.g_steps`` Adam steps on
    ``gan.g_batch`` fresh latents against a frozen copy of D's current
    weights. The copy (a plain Discriminator, no Opacus hooks) keeps G's
    backward out of D: no .grad and no grad_sample on D's parameters, and no
    activations left in Opacus's hooks. Checkpoint it with
    ``state_dict()`` / ``load_state_dict()`` (Adam moments, the call count
    and the latent generator's state), beside the model's state dict.
    """

    def __init__(self, gan: ConditionalGAN, lr: float, seed: int = 0):
        self.gan = gan
        self.opt = torch.optim.Adam(gan.generator.parameters(), lr=lr, betas=ADAM_BETAS)
        self.critic = Discriminator(**gan.discriminator.hparams).requires_grad_(False)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.calls = 0

    def __call__(self, generator: torch.Generator | None = None) -> float | None:
        """One tick; returns the last G loss when G was updated, else None.
        ``generator`` (default: this object's own) draws the latents."""
        self.calls += 1
        if self.calls % self.gan.g_every:
            return None
        g, d = self.gan.generator, self.gan.discriminator
        dev = next(d.parameters()).device
        self.critic.to(dev)
        with torch.no_grad():
            for ps, pd in zip(self.critic.parameters(), d.parameters()):
                ps.copy_(pd)
        for _ in range(self.gan.g_steps):
            z, y = _latents(g, self.gan.g_batch, dev, generator or self.gen)
            loss = g_loss(self.gan.loss, self.critic(g(z, y), y)).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.item())

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "calls": self.calls, "rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.calls = int(state["calls"])
        self.gen.set_state(state["rng"])


class _GANTrainer(PublicTrainer):
    """Non-private alternation on public images: one D step per ``step``
    (one fake per real image), then a generator tick (``GeneratorStep``)."""

    def __init__(self, gan: ConditionalGAN, lr: float):
        self.gan = gan
        self.objective = GANObjective(gan)
        self.d_opt = torch.optim.Adam(gan.discriminator.parameters(), lr=lr, betas=ADAM_BETAS)
        self.g_step = GeneratorStep(gan, lr)

    def step(self, x, y, generator):
        rnd = self.objective.draw(x, 1, generator=generator)
        loss = self.objective.loss(self.gan.discriminator, x, y, rnd).mean()
        self.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.d_opt.step()
        self.g_step(generator)
        return float(loss.item())

    def state_dict(self):
        return {"d_opt": self.d_opt.state_dict(), "g_step": self.g_step.state_dict()}

    def load_state_dict(self, state):
        self.d_opt.load_state_dict(state["d_opt"])
        self.g_step.load_state_dict(state["g_step"])


def _find_generator(release: nn.Module) -> Generator:
    for m in release.modules():  # possibly wrapped (DDP) or the whole GAN
        if isinstance(m, Generator):
            return m
    raise TypeError("the GAN family samples from a Generator module")


def generate(release: nn.Module, labels, seed: int, batch_size: int,
             progress=None, start_index: int = 0) -> torch.Tensor:
    """Float images in [-1, 1], [N, C, H, W] on the generator's device.
    Image i's latent is the i-th draw of ``LatentStream(seed)``, so the images
    do not depend on the batch size (GroupNorm is per image); ``labels[k]``
    is image ``start_index + k`` (a shard of a larger set)."""
    g = _find_generator(release)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    dev = next(g.parameters()).device
    latents = LatentStream(seed, (g.z_dim,), start_index)
    outs = [torch.zeros(0, g.channels, g.image_size, g.image_size, device=dev)]
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            y = labels[i:i + batch_size].to(dev)
            outs.append(g(latents.next(len(y)).float().to(dev), y).clamp(-1, 1))
            if progress is not None:
                progress(i + len(y))
    return torch.cat(outs)


class GANFamily(ModelFamily):
    name = "gan"
    presets = tuple(PRESETS)
    # Generated images per class that the membership score compares against.
    audit_samples = 128

    def make(self, preset, overrides, image_size, channels, num_classes):
        """``overrides``: network widths (z_dim, g_channels, d_channels,
        extra_blocks) and training settings: loss ('bce' | 'hinge'),
        g_every (D steps per G update; the paper's 'update ratio', Table 6),
        g_steps (G steps per update), g_batch (latents per G step)."""
        return build_gan(preset, image_size, channels, num_classes, **overrides)

    def dp_module(self, model, part=None):
        no_part(self.name, part)
        return model.discriminator

    def release_module(self, model):
        return model.generator

    def dp_objective(self, model, part=None, cfg=None):
        no_part(self.name, part)
        return GANObjective(model)

    def after_dp_step(self, model, lr):
        # Latent seed from torch's global RNG: dp_finetune re-seeds it from
        # entropy; G's latents are public randomness either way.
        return GeneratorStep(model, lr, seed=int(torch.randint(0, 2 ** 62, (1,))))

    def public_trainer(self, model, lr, precision="fp32"):  # fp32 only
        return _GANTrainer(model, lr)

    def sample(self, release, labels, num_steps, solver, seed, batch_size, guidance=0.0,
               progress=None, start_index=0):
        """One generator pass per image: ``num_steps`` and ``solver`` (the
        diffusion sampler's settings) are ignored."""
        if guidance:
            raise ValueError("classifier-free guidance does not apply to the GAN family; "
                             "set sampling.guidance: 0")
        was_training = release.training
        release.eval()
        try:
            x = generate(release, labels, seed, batch_size, progress, start_index)
        finally:
            release.train(was_training)
        img = ((x + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def audit_loss(self, release, x, y, seed=0):
        """Squared distance (mean over pixels) from x to the nearest of
        ``audit_samples`` generated images of class y, seeded (GAN-Leaks'
        full black-box attack, Chen et al. CCS 2020). The released generator
        has no per-example loss on x, and the discriminator that saw the
        data is not released, so this is what the audit can score; it is a
        WEAK attack (a lower bound far below what a white-box or
        discriminator-based attacker could get)."""
        g = _find_generator(release)
        m = self.audit_samples
        labels = np.repeat(np.arange(g.num_classes), m)
        ref = generate(release, labels, seed, batch_size=512).flatten(1)
        ref = ref.view(g.num_classes, m, -1)
        flat = x.to(ref.device, ref.dtype).flatten(1)
        y = y.to(ref.device).long()
        out = torch.empty(len(flat), device=ref.device)
        for c in y.unique().tolist():  # per class: memory B_c x m, not B x m x pixels
            idx = (y == c).nonzero().squeeze(1)
            out[idx] = torch.cdist(flat[idx], ref[c]).min(dim=1).values ** 2 / flat.shape[1]
        return out.to(x.device)


FAMILY = GANFamily
