"""EDM (Karras et al. 2022) preconditioning, training loss and deterministic
sampler, as DPDM uses for DP diffusion models.

Noise levels and noise are drawn OUTSIDE the model's forward
(``sample_training_noise``), so the per-example loss is a pure function of
(x, y, sigma, noise): what per-sample-gradient machinery needs.
Images live in [-1, 1] (``ImageSet.to_tensor``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y)   (EDM, Table 1)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise, class_labels)


def sample_training_noise(x: torch.Tensor, generator: torch.Generator | None = None,
                          p_mean: float = -1.2, p_std: float = 1.2):
    """sigma ~ LogNormal(p_mean, p_std) per image, and Gaussian noise like x (EDM Sec. 5)."""
    b = x.shape[0]
    rnd = torch.randn(b, generator=generator, dtype=x.dtype).to(x.device)
    sigma = (rnd * p_std + p_mean).exp()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return sigma, noise


def edm_loss(precond: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B]: lambda(sigma) * mean_pixels (D(x + sigma n; sigma) - x)^2,
    lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Eq. 8)."""
    sd = getattr(precond, "sigma_data", None)
    if sd is None:  # wrapped (Opacus GradSampleModule / DPDDP): find the precond
        sd = _find_sigma_data(precond)
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s ** 2 + sd ** 2) / (s * sd) ** 2
    d = precond(x + s * noise, sigma, y)
    return (weight * (d - x) ** 2).flatten(1).mean(dim=1)


def _find_sigma_data(m: nn.Module) -> float:
    for mod in m.modules():
        if isinstance(mod, EDMPrecond):
            return mod.sigma_data
    raise TypeError("edm_loss needs an EDMPrecond model (possibly wrapped)")


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> torch.Tensor:
    """EDM Eq. 5 time steps, with a final 0 appended."""
    if num_steps == 1:
        t = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64)
        t = (sigma_max ** (1 / rho) + i / (num_steps - 1)
             * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.inference_mode()
def sample(precond: nn.Module, class_labels: torch.Tensor, num_steps: int = 18, seed: int = 0,
           batch_size: int = 500, solver: str = "euler", device: str = "cpu",
           image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Deterministic EDM sampler (Algorithm 1 of EDM: Heun's 2nd order, or
    Euler). Returns uint8 [N, H, W, C]; the same seed gives the same images."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got '{solver}'")
    net = precond.net if hasattr(precond, "net") else precond
    if image_shape is None:
        c = net.conv_in.in_channels
        hw = getattr(net, "image_size", None)
        image_shape = (c, hw, hw) if hw else None
    precond.eval()
    t_steps = karras_sigmas(num_steps).to(device)
    gen = torch.Generator().manual_seed(seed)
    outs = []
    labels = class_labels.long()
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(device)
        x = torch.randn((len(y), *image_shape), generator=gen, dtype=torch.float64).to(device)
        x = x * t_steps[0]
        for j in range(num_steps):
            t_cur, t_next = t_steps[j], t_steps[j + 1]
            den = precond(x.float(), t_cur.float().repeat(len(y)), y).double()
            d_cur = (x - den) / t_cur
            x_next = x + (t_next - t_cur) * d_cur
            if solver == "heun" and j < num_steps - 1:
                den2 = precond(x_next.float(), t_next.float().repeat(len(y)), y).double()
                d2 = (x_next - den2) / t_next
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d2)
            x = x_next
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        outs.append(img.permute(0, 2, 3, 1).cpu().numpy())
    if not outs:
        return np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), np.uint8)
    return np.concatenate(outs)
