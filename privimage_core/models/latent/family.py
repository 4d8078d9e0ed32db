"""The latent-diffusion family behind the ``ModelFamily`` interface (method
``dp_ldm``; seed 003, Ge, Zhang & Sun 2024).

Two parts, each its own DP stage (``Stage.options["part"]``):
- ``autoencoder``: pre-trained on public images (reconstruction loss), then
  fine-tuned with DP-SGD on the sensitive images (the seed's DP-aware
  compression) or kept frozen (``latent.autoencoder``);
- ``latent``: an EDM diffusion model over the latents, pre-trained on the
  public images' latents and fine-tuned with DP-SGD on the sensitive ones.
  The encoder runs INSIDE the per-example loss DP-SGD clips, on the worker
  that holds the sensitive images: their latents are never computed, stored
  or sent anywhere outside the mechanism.
Pre-training spends ``latent.autoencoder_pretrain_share`` of its steps on the
autoencoder first, so the diffusion model learns the latents of the final
encoder. Sampling runs EDM's ODE in latent space and decodes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from privimage_core.models.diffusion.edm import EDMObjective, EDMPrecond, edm_loss, sample, \
    sample_training_noise
from privimage_core.models.ema import unwrap
from privimage_core.models.diffusion.unet import PRESETS as PIXEL_PRESETS, UNet
from privimage_core.errors import ConfigError
from privimage_core.models.base import DPStagePlan, ModelFamily, PublicTrainer, module_device
from privimage_core.models.diffusion.family import GuidedDenoiser
from privimage_core.models.latent.autoencoder import (Autoencoder, LatentDiffusion,
                                                      latent_unet_kwargs)

# The DP stages' parts (Stage.options["part"] of method dp_ldm).
PARTS = ("autoencoder", "latent")
PRESET_NAMES = ("tiny", "small", "base")


def _inner(model: nn.Module) -> LatentDiffusion:
    m = unwrap(model)
    if not isinstance(m, LatentDiffusion):
        raise TypeError("not a latent diffusion model")
    return m


def _part(part: str | None) -> str:
    if part not in PARTS:
        raise ValueError(f"a latent-diffusion DP stage needs options part in {PARTS}, got {part!r}")
    return part


class AutoencoderObjective:
    """Per-example reconstruction loss: deterministic, so no draws and no
    noise multiplicity (``uses_multiplicity``)."""
    uses_multiplicity = False

    def draw(self, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, model, x, y, rnd):
        return model(x)


class LatentObjective:
    """The EDM objective on latents encoded inside the per-example loss by
    the (frozen in this stage) encoder."""

    def __init__(self, model: LatentDiffusion, base: EDMObjective):
        self.encoder, self.base, self.shape = model.autoencoder, base, model.latent_shape

    def draw(self, x, k):
        return self.base.draw(x.new_empty((x.shape[0], *self.shape)), k)

    def loss(self, model, x, y, rnd):
        with torch.no_grad():
            z = self.encoder.encode(x)
        return self.base.loss(model, z, y, rnd)


class _LatentTrainer(PublicTrainer):
    def __init__(self, model: nn.Module, lr: float):
        self.model = model.train()  # possibly DDP-wrapped: its forward syncs the part
        inner = _inner(model)
        self.ae_opt = torch.optim.Adam(inner.autoencoder.parameters(), lr=lr)
        self.dm_opt = torch.optim.Adam(inner.diffusion.parameters(), lr=lr)
        self.ae_steps, self.shape = inner.ae_pretrain_steps, inner.latent_shape
        self.null, self.label_dropout = inner.diffusion.null_label, inner.diffusion.label_dropout
        self.t = 0

    def step(self, x, y, generator):
        if self.t < self.ae_steps:
            opt, loss = self.ae_opt, self.model(x, y, "autoencoder").mean()
        else:
            sigma, noise = sample_training_noise(x.new_empty((len(x), *self.shape)),
                                                 generator=generator)
            if self.label_dropout:
                drop = torch.rand(len(y), generator=generator).to(y.device) < self.label_dropout
                y = torch.where(drop, torch.full_like(y, self.null), y)
            opt, loss = self.dm_opt, self.model(x, y, "latent", sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.t += 1
        return float(loss.item())

    def state_dict(self):
        return {"ae": self.ae_opt.state_dict(), "dm": self.dm_opt.state_dict(), "t": self.t}

    def load_state_dict(self, state):
        self.ae_opt.load_state_dict(state["ae"])
        self.dm_opt.load_state_dict(state["dm"])
        self.t = int(state["t"])


class LatentDiffusionFamily(ModelFamily):
    name = "latent_diffusion"
    presets = PRESET_NAMES
    # Pre-training trains one part per step: DDP must not wait for the other.
    public_ddp_kwargs = {"find_unused_parameters": True}
    guidance = True

    def options(self, cfg) -> dict:
        c = cfg.latent
        return {"label_dropout": cfg.generator.label_dropout, "latent_channels": c.channels,
                "downsample": c.downsample, "width": c.width,
                "ae_pretrain_steps": int(round(c.autoencoder_pretrain_share
                                               * cfg.pretrain.resolved_steps(cfg.data.channels)))}

    def make(self, preset, overrides, image_size, channels, num_classes, label_dropout=0.0,
             latent_channels=4, downsample=4, width=32, ae_pretrain_steps=0):
        if image_size % downsample:
            raise ConfigError(f"data.image_size {image_size} is not divisible by "
                              f"latent.downsample {downsample}; set latent.downsample to 2 or 4 "
                              "dividing it")
        size = image_size // downsample
        kw = {**latent_unet_kwargs(PIXEL_PRESETS[preset], size), **overrides}
        net = UNet(image_size=size, channels=latent_channels, num_classes=num_classes + 1, **kw)
        diffusion = EDMPrecond(net)
        diffusion.null_label, diffusion.label_dropout = num_classes, float(label_dropout)
        model = LatentDiffusion(Autoencoder(channels, latent_channels, width, downsample),
                                diffusion, image_size, channels)
        model.ae_pretrain_steps = int(ae_pretrain_steps)
        return model

    def dp_stage_plan(self, cfg, part=None):
        if _part(part) == "autoencoder":
            c = cfg.latent
            if c.autoencoder == "frozen":
                return None
            return DPStagePlan(c.autoencoder_dp_steps, c.autoencoder_dp_lr,
                               c.autoencoder_epsilon_share)
        return DPStagePlan(cfg.finetune.steps, cfg.finetune.resolved_lr(cfg.data.channels))

    def dp_module(self, model, part=None):
        m = _inner(model)
        return m.autoencoder if _part(part) == "autoencoder" else m.diffusion

    def ema_module(self, model, part=None):
        # Pre-training (part None) keeps the EMA of the diffusion model only:
        # it learned the latents of the autoencoder's final raw weights.
        m = _inner(model)
        return m.autoencoder if part == "autoencoder" else m.diffusion

    def dp_objective(self, model, part=None, cfg=None):
        m = _inner(model)
        if _part(part) == "autoencoder":
            return AutoencoderObjective()
        d = m.diffusion
        return LatentObjective(m, EDMObjective(label_dropout=d.label_dropout,
                                               null_label=d.null_label))

    def public_trainer(self, model, lr, precision="fp32"):  # fp32 only
        return _LatentTrainer(model, lr)

    def sample(self, release, labels, num_steps, solver, seed, batch_size, guidance=0.0,
               progress=None, start_index=0):
        m = _inner(release)
        net = GuidedDenoiser(m.diffusion, guidance) if guidance else m.diffusion
        return sample(net, torch.as_tensor(labels), num_steps=num_steps, seed=seed,
                      batch_size=batch_size, solver=solver, image_shape=m.latent_shape,
                      device=module_device(m.diffusion), start_index=start_index,
                      decode=m.autoencoder.decode, progress=progress)

    def audit_loss(self, release, x, y, seed=0):
        # The latent model's denoising loss at fixed public noise (seeded).
        m = _inner(release)
        with torch.no_grad():
            z = m.autoencoder.encode(x)
            g = torch.Generator().manual_seed(seed)
            sigma, noise = sample_training_noise(z, generator=g)
            return edm_loss(m.diffusion, z, y, sigma, noise)

    def reconstructor(self, release):
        """The reconstruction attack in latent space (Carlini et al. 2023,
        denoising partly noised targets): encode x, noise the latent at
        sigma, denoise in one step, decode. The latent noise is the first
        C*h*w entries of the pixel noise given (still iid N(0, 1), and still
        common to a member and its held-out pair)."""
        m = _inner(release)
        size = int(np.prod(m.latent_shape))
        if size > m.channels * m.image_size ** 2:
            return None

        def reconstruct(x, noise, sigma, y):
            with torch.no_grad():
                z = m.autoencoder.encode(x)
                n = noise.flatten(1)[:, :size].reshape(z.shape)
                z0 = m.diffusion(z + sigma.reshape(-1, 1, 1, 1) * n, sigma, y)
                return m.autoencoder.decode(z0)

        return reconstruct


FAMILY = LatentDiffusionFamily
__all__ = ["FAMILY", "LatentDiffusionFamily", "PARTS"]
