"""A small class-conditional UNet for the EDM denoiser, built for DP-SGD.

Why this shape: the paper (Sec. 6.2, App. B) and DPDM argue for lightly
parameterised generators under DP-SGD (the noise norm grows with the number of
parameters). Every layer is one Opacus's hooks compute per-sample gradients
for natively (Conv2d, GroupNorm, Linear, Embedding); no BatchNorm (it mixes
samples), no module is called twice per forward, and batch size 0 works
(Poisson batches can be empty).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRESETS: dict[str, dict] = {
    # ~0.4M parameters, UNet at half resolution: the 2-core CPU quickstart
    # (about 2 ms per training sample, 100 images/s sampled at 10 steps).
    "tiny": {"base_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attn_resolutions": (), "patch_size": 2},
    # ~1.8M: the size of the paper's generators (Table 5: 1.75-2.0M)
    "small": {"base_channels": 64, "channel_mult": (1, 2), "num_res_blocks": 1,
              "attn_resolutions": (7, 8), "patch_size": 2},
    # ~6M at full resolution: for GPUs
    "base": {"base_channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
             "attn_resolutions": (7, 8), "patch_size": 1},
}


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise level c_noise (no parameters)."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        self.dim = dim
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / half
        freqs = (1.0 / self.max_positions) ** freqs
        a = x.float()[:, None] * freqs[None, :]
        return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (self.skip(x) if self.skip is not None else x)


class SelfAttention(nn.Module):
    """Single-head self-attention with 1x1 convs (hook-friendly)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(c), c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        att = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", att, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def forward(self, x, emb):
        for b, a in zip(self.blocks, self.attn):
            x = a(b(x, emb))
        return x


class UNet(nn.Module):
    def __init__(self, image_size: int = 28, channels: int = 1, num_classes: int = 10,
                 base_channels: int = 32, channel_mult=(1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions=(), dropout: float = 0.0, emb_dim: int | None = None,
                 patch_size: int = 1):
        super().__init__()
        # patch_size > 1 runs the UNet at image_size / patch_size (a strided
        # conv in, a pixel shuffle out): ~patch^2 fewer FLOPs, which is what
        # makes CPU training and sampling practical for the quickstart.
        if image_size % (patch_size * 2 ** (len(channel_mult) - 1)) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by "
                             f"{patch_size * 2 ** (len(channel_mult) - 1)} for patch {patch_size} "
                             f"and {len(channel_mult)} levels")
        self.patch_size = patch_size
        emb_dim = emb_dim or 4 * base_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.noise_emb = PositionalEmbedding(base_channels)
        self.emb_in = nn.Linear(base_channels, emb_dim)
        self.emb_out = nn.Linear(emb_dim, emb_dim)
        self.class_emb = nn.Embedding(num_classes, emb_dim)
        self.conv_in = nn.Conv2d(channels, base_channels, 3, stride=patch_size, padding=1)

        chans = [base_channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        res, cin, skips = image_size // patch_size, base_channels, []
        for i, c in enumerate(chans):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, c, emb_dim, dropout))
                attn.append(SelfAttention(c) if res in attn_resolutions else nn.Identity())
                cin = c
            self.down.append(Level(blocks, attn))
            skips.append(c)
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                res //= 2
        self.mid = Level([ResBlock(cin, cin, emb_dim, dropout)],
                         [SelfAttention(cin) if res in attn_resolutions else nn.Identity()])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            blocks, attn = [], []
            for j in range(num_res_blocks):
                blocks.append(ResBlock(cin + (skips[i] if j == 0 else 0), c, emb_dim, dropout))
                attn.append(SelfAttention(c) if res in attn_resolutions else nn.Identity())
                cin = c
            self.up.append(Level(blocks, attn))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, channels * patch_size ** 2, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor):
        emb = F.silu(self.emb_in(self.noise_emb(c_noise)))
        emb = F.silu(self.emb_out(emb) + self.class_emb(class_labels))
        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, level in enumerate(self.up):
            # skip tensors are made contiguous: a cat of views trips some hooks
            h = level(torch.cat([h, skips.pop()], dim=1).contiguous(), emb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


def build_unet(preset: str, image_size: int, channels: int, num_classes: int, **overrides) -> UNet:
    if preset not in PRESETS:
        raise ValueError(f"unknown generator preset '{preset}'; use one of {', '.join(PRESETS)}")
    kw = {**PRESETS[preset], **overrides}
    return UNet(image_size=image_size, channels=channels, num_classes=num_classes, **kw)
