"""A small class-conditional UNet for the EDM denoiser, built for DP-SGD on CPU.

Why this shape:
- Small on purpose. The paper (Sec. 6.2, App. B) and DPDM (Dockhorn et al.
  2022) argue for lightly parameterised generators under DP-SGD: the norm of
  the Gaussian noise added to the clipped gradient grows with the number of
  parameters, so a few million parameters do better than 80M.
- Opacus-friendly. Every parametrised layer is one that Opacus's ``hooks``
  mode computes per-sample gradients for natively (Conv2d, GroupNorm, Linear,
  Embedding); no BatchNorm (it mixes samples), no module is called twice in a
  forward (a second call would overwrite the activations its hook captured),
  no in-place op on a tensor a hook keeps, and batch size 0 works (Poisson
  batches can be empty).
- Cheap on CPU. With ``patch_size=2`` the UNet runs at half resolution
  (pixel-unshuffle in, pixel-shuffle out, as in patch-based diffusion
  backbones), about 4x fewer FLOPs than full resolution. Down-sampling is 2x2
  average pooling and up-sampling is nearest-neighbour; the convolution that
  follows each resampling is the first convolution of the next residual
  block, as in the UNet blocks of EDM's DDPM++/NCSN++ networks (Karras et
  al. 2022), so no extra full-width convolution is spent on resampling.
- Class and noise level condition every residual block through a scale and
  shift of its second GroupNorm (adaptive group norm of ADM, Dhariwal and
  Nichol 2021; ``adaptive_scale`` in EDM's code): on MNIST a classifier
  trained on real digits recognised more of its samples than of those of
  the additive (DDPM++) embedding at equal steps (single runs).
- EDM's DDPM++ details that speed up training: zero-initialised last
  convolution of every residual block, attention projection and output layer
  (each block starts as the identity and the denoiser as D(x) = c_skip x), and
  residual sums scaled by sqrt(1/2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Parameter counts (1 channel, 10 classes; tests/test_diffusion.py checks them):
#   tiny 0.40M, small 1.79M, base 4.48M, medium 10.1M, large 27.9M: the axis of
#   the paper's Fig. 8 (model size against quality, DP diffusion 1.75M-6.1M in
#   Table 1 and larger models in Sec. 6.2); medium and large are for GPUs.
PRESETS: dict[str, dict] = {
    # The 2-core CPU quickstart: half resolution (14x14 -> 7x7 for MNIST,
    # 16 -> 8 for 32x32), one block per level, no attention: at 7x7 the
    # convolutions already see the whole image, and attention cost ~20% of the
    # CPU training and sampling time.
    "tiny": {"base_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
             "attn_resolutions": (), "patch_size": 2},
    # About DPDM's 1.8M-parameter model (the paper's Table 1), still at half
    # resolution so that it trains on a few CPU cores.
    "small": {"base_channels": 64, "channel_mult": (1, 2), "num_res_blocks": 1,
              "attn_resolutions": (7, 8), "patch_size": 2},
    # Full resolution, three levels (28 -> 14 -> 7, 32 -> 16 -> 8), two blocks
    # per level: towards the paper's 6.1M Privimage+D model (Sec. 6.2); for GPUs.
    "base": {"base_channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
             "attn_resolutions": (7, 8), "patch_size": 1},
    # The same three-level shape, wider: Fig. 8's larger models.
    "medium": {"base_channels": 96, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
               "attn_resolutions": (7, 8), "patch_size": 1},
    "large": {"base_channels": 160, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
              "attn_resolutions": (7, 8), "patch_size": 1},
}

_SKIP_SCALE = 1.0 / math.sqrt(2.0)


def _groups(c: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Largest group count <= max_groups dividing c with >= 4 channels per group."""
    for g in range(min(max_groups, c // min_channels_per_group), 0, -1):
        if c % g == 0:
            return g
    return 1


def _space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """F.pixel_unshuffle as reshapes: torch 2.14's pixel_unshuffle returns its
    input unchanged for an empty batch, and B = 0 must work (Poisson batches)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def _depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """F.pixel_shuffle (inverse of _space_to_depth) as reshapes."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (p * p), h * p, w * p)


def _zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise level c_noise = ln(sigma)/4
    (no parameters), as in EDM's DDPM++ configuration."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        if dim % 2:
            raise ValueError(f"noise embedding width must be even, got {dim}")
        self.dim = dim
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / half
        freqs = (1.0 / self.max_positions) ** freqs
        a = x.float()[:, None] * freqs[None, :]
        return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, embedding, GN-SiLU-dropout-conv (zero init), scaled residual.

    The embedding (noise level + class) enters either as a per-channel bias
    added after the first convolution (DDPM++), or, with ``scale_shift``, as
    a per-channel scale and shift of the second normalisation,
    GN(h) * (1 + scale) + shift (ADM's adaptive group norm), which conditions
    more strongly (see the module docstring)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0,
                 scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        s = self.skip(x) if self.skip is not None else x
        return (h + s) * _SKIP_SCALE


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels, built from 1x1 convolutions
    (per-sample gradients via Opacus's Conv2d sampler) and plain matmuls (no
    parameters, so nothing for the hooks to do). 64 channels per head as in EDM."""

    def __init__(self, c: int, channels_per_head: int = 64):
        super().__init__()
        self.heads = max(1, c // channels_per_head)
        if c % self.heads:
            self.heads = 1
        self.norm = nn.GroupNorm(_groups(c), c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = _zero_init(nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b * self.heads, 3, d, h * w).unbind(1)
        att = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(d), dim=-1)  # [bH, i, j]
        out = torch.bmm(v, att.transpose(1, 2)).reshape(b, c, h, w)  # out_i = sum_j att_ij v_j
        return (x + self.proj(out)) * _SKIP_SCALE


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for b, a in zip(self.blocks, self.attn):
            x = a(b(x, emb))
        return x


class UNet(nn.Module):
    """F(x, c_noise, class_labels) of the EDM denoiser.

    ``image_size`` must be divisible by ``patch_size * 2**(len(channel_mult)-1)``.
    ``attn_resolutions`` are the (UNet-internal) resolutions that get attention,
    e.g. 7 for 28x28 with patch 2 and two levels, or patch 1 and three levels.
    """

    def __init__(self, image_size: int = 28, channels: int = 1, num_classes: int = 10,
                 base_channels: int = 32, channel_mult=(1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions=(7,), dropout: float = 0.0, emb_dim: int | None = None,
                 patch_size: int = 1, scale_shift: bool = True):
        super().__init__()
        factor = patch_size * 2 ** (len(channel_mult) - 1)
        if image_size % factor != 0:
            raise ValueError(f"image_size {image_size} must be divisible by {factor} "
                             f"(patch_size {patch_size}, {len(channel_mult)} levels)")
        if num_classes < 1 or num_res_blocks < 1:
            raise ValueError("num_classes and num_res_blocks must be >= 1")
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        emb_dim = emb_dim or 4 * base_channels
        attn_resolutions = tuple(attn_resolutions)

        # Noise level: sinusoidal features of c_noise -> 2-layer MLP; class
        # label: a learned embedding added before the last activation (EDM's
        # mapping network adds the label embedding to the noise embedding).
        self.noise_emb = PositionalEmbedding(base_channels)
        self.emb_in = nn.Linear(base_channels, emb_dim)
        self.emb_out = nn.Linear(emb_dim, emb_dim)
        self.class_emb = nn.Embedding(num_classes, emb_dim)

        self.conv_in = nn.Conv2d(channels * patch_size ** 2, base_channels, 3, padding=1)
        chans = [base_channels * m for m in channel_mult]
        res, cin, skips = image_size // patch_size, base_channels, []
        self.down = nn.ModuleList()
        for i, c in enumerate(chans):
            if i > 0:
                res //= 2  # 2x2 average pool before this level
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, c, emb_dim, dropout, scale_shift))
                attn.append(SelfAttention(c) if res in attn_resolutions else nn.Identity())
                cin = c
            self.down.append(Level(blocks, attn))
            skips.append(c)
        self.mid = Level([ResBlock(cin, cin, emb_dim, dropout, scale_shift)],
                         [SelfAttention(cin) if res in attn_resolutions else nn.Identity()])
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            c = chans[i]
            blocks, attn = [], []
            for j in range(num_res_blocks):
                # the first block takes the level's skip; after a nearest
                # up-sampling its conv1 is the "conv after upsample"
                blocks.append(ResBlock(cin + (skips[i] if j == 0 else 0), c, emb_dim, dropout,
                                       scale_shift))
                attn.append(SelfAttention(c) if res in attn_resolutions else nn.Identity())
                cin = c
            self.up.append(Level(blocks, attn))
            res *= 2
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = _zero_init(nn.Conv2d(cin, channels * patch_size ** 2, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.emb_in(self.noise_emb(c_noise)))
        emb = F.silu(self.emb_out(emb) + self.class_emb(class_labels))
        if self.patch_size > 1:
            x = _space_to_depth(x, self.patch_size)
        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = level(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for j, level in enumerate(self.up):
            if j > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = level(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return _depth_to_space(out, self.patch_size) if self.patch_size > 1 else out


def build_unet(preset: str, image_size: int, channels: int, num_classes: int,
               **overrides) -> UNet:
    """A UNet from a named preset, with any UNet argument overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown generator preset '{preset}'; use one of {', '.join(PRESETS)}")
    kw = {**PRESETS[preset], **overrides}
    return UNet(image_size=image_size, channels=channels, num_classes=num_classes, **kw)
