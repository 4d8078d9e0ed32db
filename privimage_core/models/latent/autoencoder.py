"""The autoencoder of the latent family and the model that holds both parts.

A small convolutional encoder/decoder (seed 003's compression step;
DPImageBench's DP-LDM uses a pre-trained autoencoder the same way): 28x28 ->
7x7 (or 14x14) latents of a few channels, bounded by tanh so that their scale
matches EDM's sigma_data = 0.5 assumption without a data-dependent rescaling
(a rescaling estimated on sensitive latents would be an unnoised statistic).

Opacus-friendly as the UNet is: Conv2d and GroupNorm only (no BatchNorm,
which mixes examples), no module called twice in a forward, batch 0 works.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from privimage_core.models.diffusion.edm import EDMPrecond, edm_loss
from privimage_core.models.diffusion.unet import _groups


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(c), c)


class Autoencoder(nn.Module):
    def __init__(self, channels: int, latent_channels: int, width: int, downsample: int):
        super().__init__()
        levels = int(round(math.log2(downsample)))
        c = 2 * width
        enc: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.SiLU()]
        cin = width
        for _ in range(levels):  # stride-2 4x4 convs: 28 -> 14 -> 7
            enc += [nn.Conv2d(cin, c, 4, stride=2, padding=1), _norm(c), nn.SiLU()]
            cin = c
        enc += [nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU(),
                nn.Conv2d(c, latent_channels, 3, padding=1), nn.Tanh()]
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1), _norm(c), nn.SiLU(),
                                nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU()]
        for i in range(levels):  # nearest up-sampling + conv (no checkerboard artefacts)
            cout = width if i == levels - 1 else c
            dec += [nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(c, cout, 3, padding=1), _norm(cout), nn.SiLU()]
        dec += [nn.Conv2d(width, channels, 3, padding=1), nn.Tanh()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.latent_channels, self.downsample = latent_channels, downsample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example reconstruction loss [B] (mean squared error in [-1, 1])."""
        return ((self.decoder(self.encoder(x)) - x) ** 2).flatten(1).mean(dim=1)


class LatentDiffusion(nn.Module):
    """Both parts in one module (one checkpoint): ``autoencoder`` and
    ``diffusion``, an EDM-preconditioned UNet over the latents. ``forward``
    is the public (non-DP) training loss of one part, so that a
    DDP-wrapped model synchronises whichever part trains."""

    def __init__(self, autoencoder: Autoencoder, diffusion: EDMPrecond, image_size: int,
                 channels: int):
        super().__init__()
        self.autoencoder, self.diffusion = autoencoder, diffusion
        self.image_size, self.channels = image_size, channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.autoencoder.downsample
        return (self.autoencoder.latent_channels, s, s)

    def forward(self, x: torch.Tensor, y: torch.Tensor, part: str,
                sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        if part == "autoencoder":
            return self.autoencoder(x)
        with torch.no_grad():  # the diffusion model learns on fixed latents
            z = self.autoencoder.encode(x)
        return edm_loss(self.diffusion, z, y, sigma, noise)


def latent_unet_kwargs(preset: dict, latent_size: int) -> dict:
    """A pixel preset turned into a latent one: no patching (the latent is
    already small), and as many levels as the latent size can halve into
    (7x7: one level at the preset's widest channels; 14x14: two). A pixel
    preset at 28x28 runs its widest level at 7x7 too, so the latent model
    drops the 14x14 level's cost (benchmarks/results/latent_step-*.txt)."""
    kw = dict(preset, patch_size=1)
    mult = tuple(kw["channel_mult"])
    levels = 1
    while levels < len(mult) and latent_size % (2 ** levels) == 0 and latent_size >= 8 * levels:
        levels += 1
    kw["channel_mult"] = mult[-levels:] if levels == 1 else mult[:levels]
    kw["attn_resolutions"] = tuple(r for r in kw.get("attn_resolutions", ()) if r <= latent_size)
    return kw

