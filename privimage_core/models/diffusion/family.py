"""The diffusion model family behind the ``ModelFamily`` interface.

Pre-training and DP fine-tuning minimise the same EDM loss (Karras et al.
2022, as DPDM uses it); the per-example DP loss averages it over k noise
draws (noise multiplicity, DPDM Sec. 3.2). Sampling is EDM's deterministic
ODE solver; the audit scores the denoising loss at fixed noise levels.
"""
from __future__ import annotations

import torch
from torch import nn

from privimage_core.models.base import ModelFamily, PublicTrainer, module_device, no_part
from privimage_core.models.diffusion.edm import (EDMObjective, EDMPrecond, denoising_loss_fn,
                                                 edm_loss, sample, sample_training_noise)
from privimage_core.models.diffusion.unet import PRESETS, build_unet


def _null_label(model: nn.Module) -> int:
    """The class id reserved for 'no label' (classifier-free guidance)."""
    for m in model.modules():
        if isinstance(m, EDMPrecond):
            return int(m.null_label)
    raise TypeError("not an EDM diffusion model")


def _precond(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, EDMPrecond))


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance: D = (1 + w) D(x | y) - w D(x | null), the
    conditional and unconditional passes batched together."""

    def __init__(self, precond: nn.Module, guidance: float):
        super().__init__()
        self.precond, self.w, self.null = precond, float(guidance), _null_label(precond)

    def forward(self, x, sigma, class_labels):
        b = x.shape[0]
        d = self.precond(torch.cat([x, x]), torch.cat([sigma, sigma]),
                         torch.cat([class_labels, torch.full_like(class_labels, self.null)]))
        return (1 + self.w) * d[:b] - self.w * d[b:]


class _EDMTrainer(PublicTrainer):
    def __init__(self, model: nn.Module, lr: float, label_dropout: float,
                 precision: str = "fp32"):
        self.model = model.train()
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.label_dropout, self.null = label_dropout, _null_label(model)
        self.bf16 = precision == "bf16"

    def step(self, x, y, generator):
        sigma, noise = sample_training_noise(x, generator=generator)
        if self.label_dropout:
            drop = torch.rand(len(y), generator=generator).to(y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null), y)
        # bf16 autocast around the forward only: weights, gradients and Adam
        # stay fp32 (public data, no privacy consequence).
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = edm_loss(self.model, x, y, sigma, noise).float().mean()
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

    guidance = True

    def options(self, cfg) -> dict:
        return {"label_dropout": cfg.generator.label_dropout}

    def make(self, preset, overrides, image_size, channels, num_classes, label_dropout=0.0):
        # One extra class embedding: the null label of classifier-free guidance.
        net = build_unet(preset, image_size=image_size, channels=channels,
                         num_classes=num_classes + 1, **overrides)
        model = EDMPrecond(net)
        model.null_label, model.label_dropout = num_classes, float(label_dropout)
        return model

    def dp_objective(self, model, part=None, cfg=None):
        no_part(self.name, part)
        levels = {} if cfg is None else {"p_mean": cfg.finetune.noise_level_mean,
                                         "p_std": cfg.finetune.noise_level_std}
        return EDMObjective(label_dropout=getattr(_precond(model), "label_dropout", 0.0),
                            null_label=_null_label(model), **levels)

    public_precisions = ("fp32", "bf16")

    def public_trainer(self, model, lr, precision="fp32"):
        return _EDMTrainer(model, lr, getattr(_precond(model), "label_dropout", 0.0), precision)

    def sample(self, release, labels, num_steps, solver, seed, batch_size, guidance=0.0,
               progress=None, start_index=0):
        net = GuidedDenoiser(release, guidance) if guidance else release
        return sample(net, torch.as_tensor(labels), num_steps=num_steps, seed=seed,
                      batch_size=batch_size, solver=solver, device=module_device(release),
                      start_index=start_index, progress=progress)

    def audit_loss(self, release, x, y, seed=0):
        # Fixed public noise (seeded): the same draws for members and non-members.
        g = torch.Generator().manual_seed(seed)
        sigma, noise = sample_training_noise(x, generator=g)
        with torch.no_grad():
            return edm_loss(release, x, y, sigma, noise)

    def denoiser(self, release):
        # D(x; sigma) of EDM is the x0 prediction itself (EDM Eq. 2-3).
        def denoise(x_noisy, sigma, y):
            with torch.no_grad():
                return release(x_noisy, sigma, y)

        return denoise

    def membership_loss(self, release):
        return denoising_loss_fn(release)


FAMILY = DiffusionFamily
