"""The diffusion model family behind the ``ModelFamily`` interface.

Pre-training and DP fine-tuning minimise the same EDM loss (Karras et al.
2022, as DPDM uses it); the per-example DP loss averages it over k noise
draws (noise multiplicity, DPDM Sec. 3.2). Sampling is EDM's deterministic
ODE solver; the audit scores the denoising loss at fixed noise levels.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from privimage_core.diffusion.edm import EDMPrecond, edm_loss, sample, sample_training_noise
from privimage_core.diffusion.unet import PRESETS, build_unet
from privimage_core.models.base import ModelFamily, PublicTrainer


class EDMObjective:
    """Per-example EDM loss with k noise levels and noises per image."""

    def draw(self, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        xs = x.unsqueeze(1).expand(-1, k, *x.shape[1:]).reshape(-1, *x.shape[1:])
        sigma, noise = sample_training_noise(xs)
        return {"sigma": sigma.view(len(x), k), "noise": noise.view(len(x), k, *x.shape[1:])}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             rnd: dict[str, torch.Tensor]) -> torch.Tensor:
        b, k = rnd["sigma"].shape
        xs = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        ys = y.unsqueeze(1).expand(b, k).reshape(-1)
        per = edm_loss(model, xs, ys, rnd["sigma"].reshape(-1), rnd["noise"].reshape(xs.shape))
        return per.view(b, k).mean(1)


class _EDMTrainer(PublicTrainer):
    def __init__(self, model: nn.Module, lr: float):
        self.model = model.train()
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(self, x, y, generator):
        sigma, noise = sample_training_noise(x, generator=generator)
        loss = edm_loss(self.model, x, y, sigma, noise).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.item())

    def state_dict(self):
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])


class DiffusionFamily(ModelFamily):
    name = "diffusion"
    presets = tuple(PRESETS)

    def make(self, preset, overrides, image_size, channels, num_classes):
        net = build_unet(preset, image_size=image_size, channels=channels,
                         num_classes=num_classes, **overrides)
        return EDMPrecond(net)

    def dp_objective(self, model):
        return EDMObjective()

    def public_trainer(self, model, lr):
        return _EDMTrainer(model, lr)

    def sample(self, release, labels, num_steps, solver, seed, batch_size, guidance=0.0):
        if guidance:
            raise ValueError("classifier-free guidance is not available for the diffusion "
                             "family yet; set sampling.guidance: 0")
        return sample(release, torch.as_tensor(labels), num_steps=num_steps, seed=seed,
                      batch_size=batch_size, solver=solver)

    def audit_loss(self, release, x, y, seed=0):
        # Fixed public noise (seeded): the same draws for members and non-members.
        g = torch.Generator().manual_seed(seed)
        sigma, noise = sample_training_noise(x, generator=g)
        with torch.no_grad():
            return edm_loss(release, x, y, sigma, noise)
