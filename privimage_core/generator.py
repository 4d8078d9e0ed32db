"""Build the class-conditional diffusion generator (an EDM-preconditioned
UNet, privimage_core/models/diffusion) from the generator config, and
(de)serialise weights for checkpoints and release."""
from __future__ import annotations

import io

import torch

from privimage_core.config import GeneratorConfig


def build_generator(gcfg: GeneratorConfig, image_size: int, channels: int,
                    num_classes: int) -> torch.nn.Module:
    from privimage_core.models import get_family
    return get_family("diffusion").make(gcfg.preset, gcfg.overrides, image_size, channels,
                                        num_classes, label_dropout=gcfg.label_dropout)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(b: bytes) -> dict:
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
