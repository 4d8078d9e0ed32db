"""EDM (Karras et al. 2022) preconditioning, training loss and deterministic
sampler, as DPDM (Dockhorn et al. 2022) uses for DP diffusion models.

Noise levels and noise are drawn OUTSIDE the model's forward
(``sample_training_noise``), so the per-example loss is a pure function of
(x, y, sigma, noise): what per-sample-gradient machinery (Opacus hooks,
``torch.func.vmap``, which refuses random ops inside) needs.
Images live in [-1, 1] (``ImageSet.to_tensor``); sigma_data = 0.5 is EDM's
value for data in that range.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y)   (EDM, Table 1).

    c_skip, c_out and c_in keep the network's input and training target at
    unit variance for every sigma; c_noise = ln(sigma) / 4.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            # one row per sample, so every layer sees batch B (per-sample grads)
            sigma = sigma.expand(x.shape[0])
        s = sigma.reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1.0 / (sd2 + s ** 2).sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise, class_labels)


def sample_training_noise(x: torch.Tensor, generator: torch.Generator | None = None,
                          p_mean: float = -1.2, p_std: float = 1.2):
    """(sigma [B], noise like x): ln(sigma) ~ N(p_mean, p_std^2) per image (EDM
    Sec. 5, Table 1), and standard Gaussian noise. Drawn on the generator's
    device (CPU for a CPU generator) and moved to x's device."""
    b = x.shape[0]
    dev = generator.device if generator is not None else x.device
    rnd = torch.randn(b, generator=generator, dtype=x.dtype, device=dev)
    sigma = (rnd * p_std + p_mean).exp().to(x.device)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev).to(x.device)
    return sigma, noise


def edm_loss(precond: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B]: lambda(sigma) * mean_pixels (D(x + sigma n; sigma) - x)^2,
    lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Eq. 2, Table 1),
    which makes the effective training target of F unit-weighted at every sigma.

    ``precond`` may be an EDMPrecond or one wrapped by Opacus / DDP."""
    sd = _find_sigma_data(precond)
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s ** 2 + sd ** 2) / (s * sd) ** 2
    d = precond(x + s * noise, sigma, y)
    return (weight * (d - x) ** 2).flatten(1).mean(dim=1)


class EDMObjective:
    """The EDM loss as a DP-SGD objective (``privimage_core.dp_sgd.finetune.DPObjective``)
    with DPDM's noise multiplicity (Dockhorn et al. 2022, Sec. 3.2): each image
    gets k noise levels and noises and its loss is the mean of the k losses, so
    it still contributes ONE gradient to clip and the privacy cost is that of
    k = 1, while the gradient's variance over the diffusion noise drops."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, label_dropout: float = 0.0,
                 null_label: int | None = None):
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        # Classifier-free guidance (Ho & Salimans 2022): a share of the draws
        # trains the unconditional model on the reserved null label.
        self.label_dropout, self.null_label = float(label_dropout), null_label
        if label_dropout and null_label is None:
            raise ValueError("label_dropout needs the model's null_label")

    def draw(self, x: torch.Tensor, k: int,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{"sigma": [B, k], "noise": [B, k, C, H, W]}. At k = 1 this consumes the
        random stream exactly as ``sample_training_noise(x)`` does."""
        b = x.shape[0]
        rows = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        sigma, noise = sample_training_noise(rows, generator, self.p_mean, self.p_std)
        out = {"sigma": sigma.reshape(b, k), "noise": noise.reshape(b, k, *x.shape[1:])}
        if self.label_dropout:  # drawn after the noise: k=1 streams stay as they were
            dev = generator.device if generator is not None else x.device
            u = torch.rand(b, k, generator=generator, device=dev).to(x.device)
            out["drop"] = u < self.label_dropout
        return out

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             rnd: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example loss [B], the mean over the k draws. The network sees
        the B * k rows example-major (rows i*k .. i*k + k-1 are example i),
        which Opacus's hooks mode relies on to fold row gradients per example."""
        b, k = rnd["sigma"].shape
        shape = x.shape[1:]
        rows = x.unsqueeze(1).expand(b, k, *shape).reshape(b * k, *shape)
        labels = y.unsqueeze(1).expand(b, k).reshape(b * k)
        if "drop" in rnd:
            labels = torch.where(rnd["drop"].reshape(b * k),
                                 torch.full_like(labels, self.null_label), labels)
        per_row = edm_loss(model, rows, labels, rnd["sigma"].reshape(b * k),
                           rnd["noise"].reshape(b * k, *shape))
        return per_row.reshape(b, k).mean(dim=1)


def _find_sigma_data(m: nn.Module) -> float:
    if isinstance(m, EDMPrecond):
        return m.sigma_data
    for mod in m.modules():  # wrapped (GradSampleModule, DPDDP, DDP)
        if isinstance(mod, EDMPrecond):
            return mod.sigma_data
    raise TypeError("edm_loss needs an EDMPrecond model (possibly wrapped)")


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> torch.Tensor:
    """EDM Eq. 5 noise levels (float64, decreasing from sigma_max to sigma_min),
    with a final 0 appended: ``num_steps + 1`` values."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        t = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(num_steps, dtype=torch.float64)
        t = (sigma_max ** (1 / rho) + i / (num_steps - 1)
             * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def _image_shape(precond: nn.Module) -> tuple[int, int, int]:
    for mod in precond.modules():
        if hasattr(mod, "image_size") and hasattr(mod, "channels"):
            return (int(mod.channels), int(mod.image_size), int(mod.image_size))
    raise ValueError("cannot infer the image shape from the model; pass image_shape=(C, H, W)")


class LatentStream:
    """Standard normal latents, image by image, from one ``torch.Generator``
    seeded with ``seed``.

    Image i's latents are the i-th per-image draw of the stream, so they do
    not depend on the batch size, and a shard starting at image ``start``
    (e.g. one of several Ray actors) gets exactly the images a single run
    would (the first ``start`` draws are skipped: a few microseconds each).
    One stream rather than one generator per (seed, image): torch's CPU
    generator keeps only the low 32 bits of a seed (seeds equal modulo 2**32
    give the same images), so per-image seeds packed into 64 bits collide."""

    def __init__(self, seed: int, shape: tuple[int, int, int], start: int = 0):
        self.shape = tuple(shape)
        self.gen = torch.Generator().manual_seed(int(seed))
        scratch = torch.empty(self.shape, dtype=torch.float64)
        for _ in range(int(start)):
            torch.randn(self.shape, generator=self.gen, dtype=torch.float64, out=scratch)

    def next(self, n: int) -> torch.Tensor:
        out = torch.empty((n, *self.shape), dtype=torch.float64)
        for k in range(n):
            torch.randn(self.shape, generator=self.gen, dtype=torch.float64, out=out[k])
        return out


def sample(precond: nn.Module, class_labels, num_steps: int = 18, seed: int = 0,
           batch_size: int = 500, solver: str = "heun", device: str | torch.device = "cpu",
           image_shape: tuple[int, int, int] | None = None, start_index: int = 0,
           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           channels_last: bool | None = None,
           decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
           progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Deterministic EDM sampler (EDM Algorithm 1): Heun's 2nd-order method
    (2 * num_steps - 1 network evaluations) or Euler (num_steps evaluations)
    on the probability-flow ODE, over ``karras_sigmas``.

    Returns uint8 [N, H, W, C], pixels (x + 1) * 127.5 clamped and rounded.
    The same seed gives the same images: the latents are drawn per image (see
    ``LatentStream``), so the batch size changes only float rounding inside
    the network, and ``start_index`` gives the images of a shard starting
    there. The model must already be on ``device``; its train/eval mode and
    memory format are restored afterwards.

    ``channels_last`` (default: on for CPU) runs the convolutions in NHWC,
    10-20% faster with oneDNN on this project's CPUs. The weights are converted
    in place (same Parameter objects, so optimisers and Opacus hooks are
    unaffected) and converted back at the end.

    ``decode`` maps the final ODE state (float32) to images in [-1, 1]: a
    latent model's decoder (models/latent/); None: the state is the image.
    ``progress(done)`` is called with the images finished after each batch.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got '{solver}'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = tuple(image_shape) if image_shape is not None else _image_shape(precond)
    labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.long).reshape(-1)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).to(device)
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    was_training = precond.training
    precond.eval()
    outs = []
    latents = LatentStream(seed, shape, start_index)
    try:
        if channels_last:
            precond.to(memory_format=fmt)
        with torch.inference_mode():
            for i in range(0, len(labels), batch_size):
                y = labels[i:i + batch_size].to(device)
                b = len(y)
                # The ODE state is kept in float64 (as EDM's sampler does); the
                # network runs in float32.
                x = latents.next(b).to(device) * t_steps[0]
                for j in range(num_steps):
                    t_cur, t_next = t_steps[j], t_steps[j + 1]
                    den = precond(x.float().contiguous(memory_format=fmt),
                                  t_cur.float().expand(b), y).double()
                    d_cur = (x - den) / t_cur
                    x_next = x + (t_next - t_cur) * d_cur
                    if solver == "heun" and j < num_steps - 1:
                        # 2nd-order correction, skipped on the last step to
                        # sigma = 0 (EDM Algorithm 1, line 9)
                        den2 = precond(x_next.float().contiguous(memory_format=fmt),
                                       t_next.float().expand(b), y).double()
                        d_next = (x_next - den2) / t_next
                        x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
                    x = x_next
                x = decode(x.float()) if decode is not None else x
                img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                outs.append(img.permute(0, 2, 3, 1).contiguous().cpu().numpy())
                if progress is not None:
                    progress(i + b)
    finally:
        if channels_last:
            precond.to(memory_format=torch.contiguous_format)
        precond.train(was_training)
    if not outs:
        if decode is not None:
            shape = tuple(decode(torch.zeros(1, *shape)).shape[1:])
        return np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
    return np.concatenate(outs)


def denoising_loss_fn(precond: torch.nn.Module):
    """per_example_loss_fn(x, y, sigma, noise) -> [B] EDM loss of ``precond``
    at one noise level, for ``loss_threshold_scores``."""

    def fn(x, y, sigma, noise):
        s = torch.full((len(x),), float(sigma), dtype=x.dtype)
        return edm_loss(precond, x, y, s, noise)

    return fn
