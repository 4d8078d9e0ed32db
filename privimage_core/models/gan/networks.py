"""Class-conditional DCGAN-style networks (Radford et al. 2016) for 28x28 and
32x32 images, 1 or 3 channels.

The discriminator is what DP-SGD trains, so it is built from the layers that
both Opacus's per-sample-gradient hooks and ``torch.func.vmap(grad)`` handle:
Conv2d, Linear, Embedding, GroupNorm (per-example statistics; BatchNorm mixes
examples, which breaks per-example clipping) and non-inplace LeakyReLU; no
spectral norm (its power iteration updates a buffer in the forward) and no
randomness in the forward. It is a projection discriminator (Miyato & Koyama
2018): score = w . h(x) + embed(y) . h(x).

The generator is never trained on sensitive data directly, but it also uses
GroupNorm rather than BatchNorm so that an image does not depend on the other
images of its batch (sampling is deterministic per seed at any batch size) and
train/eval modes agree.
"""
from __future__ import annotations

import torch
from torch import nn

from privimage_core.models.diffusion.unet import _groups

# Widths chosen so that the total (G + D) parameter counts sit near the
# diffusion presets; the small one is about the paper's 1.8M Privimage+G
# (Table 1). At 28x28x1, 10 classes (pinned in tests/test_gan_family.py):
# tiny 398,498 (G 253,921 + D 144,577), small 1,729,634 (1,155,393 + 574,241),
# base 4,327,298 (2,593,249 + 1,734,049); at 32x32 about 20% more (G's first
# layer and D's head grow with (s/4)^2).
PRESETS: dict[str, dict] = {
    "tiny": {"z_dim": 32, "g_channels": 32, "d_channels": 24, "extra_blocks": 0},
    "small": {"z_dim": 64, "g_channels": 64, "d_channels": 40, "extra_blocks": 1},
    "base": {"z_dim": 96, "g_channels": 96, "d_channels": 72, "extra_blocks": 1},
}


def _norm_act(c: int, leaky: bool) -> list[nn.Module]:
    act = nn.LeakyReLU(0.2) if leaky else nn.ReLU()
    return [nn.GroupNorm(_groups(c), c), act]


class Generator(nn.Module):
    """G(z, y): [z, embed(y)] -> Linear to (2g, s/4, s/4) -> ``extra_blocks``
    3x3 convs -> two stride-2 transposed convs (DCGAN) -> 3x3 conv -> tanh."""

    def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int,
                 g_channels: int, extra_blocks: int):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the GAN needs image_size divisible by 4, got {image_size}")
        self.image_size, self.channels, self.z_dim = image_size, channels, z_dim
        self.num_classes = num_classes
        self.s0, c2, c1 = image_size // 4, 2 * g_channels, g_channels
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, c2 * self.s0 * self.s0)
        layers: list[nn.Module] = _norm_act(c2, leaky=False)
        for _ in range(extra_blocks):
            layers += [nn.Conv2d(c2, c2, 3, padding=1)] + _norm_act(c2, leaky=False)
        layers += [nn.ConvTranspose2d(c2, c1, 4, 2, 1)] + _norm_act(c1, leaky=False)
        layers += [nn.ConvTranspose2d(c1, c1, 4, 2, 1)] + _norm_act(c1, leaky=False)
        layers += [nn.Conv2d(c1, channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1))
        return self.net(h.view(len(z), -1, self.s0, self.s0))


class Discriminator(nn.Module):
    """D(x, y) -> logit [B]: 3x3 conv, two stride-2 4x4 convs (DCGAN), then
    ``extra_blocks`` 3x3 convs at s/4, flatten, projection head."""

    def __init__(self, image_size: int, channels: int, num_classes: int, d_channels: int,
                 extra_blocks: int):
        super().__init__()
        # Kept so that GeneratorStep can build a hook-free copy of D.
        self.hparams = {"image_size": image_size, "channels": channels,
                        "num_classes": num_classes, "d_channels": d_channels,
                        "extra_blocks": extra_blocks}
        c1, c2, c3 = d_channels, 2 * d_channels, 4 * d_channels
        # DCGAN: no normalisation on the first layer.
        layers: list[nn.Module] = [nn.Conv2d(channels, c1, 3, padding=1), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(c1, c2, 4, 2, 1)] + _norm_act(c2, leaky=True)
        layers += [nn.Conv2d(c2, c3, 4, 2, 1)] + _norm_act(c3, leaky=True)
        for _ in range(extra_blocks):
            layers += [nn.Conv2d(c3, c3, 3, padding=1)] + _norm_act(c3, leaky=True)
        self.net = nn.Sequential(*layers)
        feat = c3 * (image_size // 4) ** 2
        self.head = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat)
        # Zero projection at init (N(0, 1) rows would put |logits| ~ 5-10 and
        # saturate the first steps); its gradient is h, so it learns at once.
        nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Flattened, not pooled: the convolutions see ~12 px each, so a pooled
        # head only judges local strokes (samples were stroke soup whose
        # class did not follow y); a head over every position is DCGAN's final
        # full-map convolution and sees the whole digit.
        h = self.net(x).flatten(1)
        return self.head(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


class ConditionalGAN(nn.Module):
    """Both players in one module, so that a checkpoint is one state dict.
    ``loss``, ``g_every``, ``g_steps`` and ``g_batch`` are training settings
    of the family (see ``family.py``), kept here so every stage reads the
    same ones from the model it is given."""

    def __init__(self, image_size: int, channels: int, num_classes: int, z_dim: int,
                 g_channels: int, d_channels: int, extra_blocks: int, loss: str = "bce",
                 g_every: int = 1, g_steps: int = 1, g_batch: int = 64):
        super().__init__()
        if loss not in ("bce", "hinge"):
            raise ValueError(f"GAN loss must be 'bce' or 'hinge', got '{loss}'")
        if min(g_every, g_steps, g_batch) < 1:
            raise ValueError("g_every, g_steps and g_batch must be >= 1")
        self.generator = Generator(image_size, channels, num_classes, z_dim, g_channels,
                                   extra_blocks)
        self.discriminator = Discriminator(image_size, channels, num_classes, d_channels,
                                           extra_blocks)
        self.loss, self.g_every, self.g_steps, self.g_batch = loss, g_every, g_steps, g_batch

    def forward(self, *args, **kwargs):
        raise TypeError("call .generator(z, y) or .discriminator(x, y)")


def build_gan(preset: str, image_size: int, channels: int, num_classes: int,
              **overrides) -> ConditionalGAN:
    if preset not in PRESETS:
        raise ValueError(f"unknown generator preset '{preset}'; use one of {', '.join(PRESETS)}")
    return ConditionalGAN(image_size, channels, num_classes, **{**PRESETS[preset], **overrides})
