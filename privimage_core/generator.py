"""Build the class-conditional generator (an EDM-preconditioned UNet) from
the config, and (de)serialise its weights for checkpoints and release."""
from __future__ import annotations

import io

import torch

from privimage_core.config import GeneratorConfig
from privimage_core.diffusion.edm import EDMPrecond
from privimage_core.diffusion.unet import build_unet


def build_generator(gcfg: GeneratorConfig, image_size: int, channels: int,
                    num_classes: int) -> EDMPrecond:
    net = build_unet(gcfg.preset, image_size=image_size, channels=channels,
                     num_classes=num_classes, **gcfg.overrides)
    return EDMPrecond(net)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(b: bytes) -> dict:
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
