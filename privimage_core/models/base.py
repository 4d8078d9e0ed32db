"""The model-family interface: what the method stages need from a generator.

A family is one object (registered by name in ``privimage_core.models``) that
knows how to build its networks, train them on PUBLIC data without DP, expose
the part that DP-SGD trains on SENSITIVE data with a per-example loss whose
randomness is drawn outside the forward pass, sample, and score examples for
the membership audit. The stages (pre-training, DP fine-tuning, synthesis,
evaluation) only talk to this interface, so adding a family (NVlabs/edm's
swappable loss objects, Opacus's registries) touches no driver code.

Two-player families (a GAN) train their discriminator with DP-SGD; the
generator's updates read only the discriminator and fresh latents, so they
are post-processing of the DP discriminator (PrivImage App. C; Opacus's
DCGAN example) and run in ``after_dp_step``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Protocol

import numpy as np
import torch
from torch import nn


class DPObjective(Protocol):
    """The per-example loss DP-SGD clips. ``draw`` returns every random input
    ([B, k, ...] per tensor: k = noise multiplicity), drawn outside the
    forward so that ``loss`` is a pure function (torch.func.vmap refuses
    random ops); ``loss`` returns [B], averaged over the k draws inside the
    example (DPDM Sec. 3.2: one clipped gradient per example, same cost)."""

    def draw(self, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             rnd: dict[str, torch.Tensor]) -> torch.Tensor: ...


class PublicTrainer(ABC):
    """Non-private training on public images (pre-training, Algorithm 2 line 9)."""

    @abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
        """One optimisation step on a minibatch; returns the loss."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class ModelFamily(ABC):
    name: ClassVar[str]
    # Config keys of `generator.preset` this family understands.
    presets: ClassVar[tuple[str, ...]]

    def options(self, cfg) -> dict:
        """Keyword arguments of ``make`` taken from the run's config (e.g. the
        diffusion family's label dropout); none by default."""
        return {}

    @abstractmethod
    def make(self, preset: str, overrides: dict, image_size: int, channels: int,
             num_classes: int, **options) -> nn.Module:
        """Every network of the family in one module (checkpointed as one state dict)."""

    def dp_module(self, model: nn.Module) -> nn.Module:
        """The part DP-SGD trains on the sensitive data (default: all of it)."""
        return model

    def release_module(self, model: nn.Module) -> nn.Module:
        """The part that is released and sampled from (EMA'd; default: all of it)."""
        return model

    @abstractmethod
    def dp_objective(self, model: nn.Module) -> DPObjective: ...

    def after_dp_step(self, model: nn.Module, lr: float) -> Callable[[], None] | None:
        """Post-processing after each noised DP step (a GAN's generator update)."""
        return None

    @abstractmethod
    def public_trainer(self, model: nn.Module, lr: float) -> PublicTrainer: ...

    @abstractmethod
    def sample(self, release: nn.Module, labels: np.ndarray, num_steps: int, solver: str,
               seed: int, batch_size: int, guidance: float = 0.0) -> np.ndarray:
        """uint8 [N, H, W, C] images for ``labels`` from the released module."""

    @abstractmethod
    def audit_loss(self, release: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> torch.Tensor:
        """Per-example loss [B] for the membership audit (lower = more member-like)."""

    def denoiser(self, release: nn.Module) -> Callable | None:
        """``f(x_noisy, sigma [B], y) -> x0`` in [-1, 1]: the family's one-step
        reconstruction of a noised image, for the memorisation check's
        reconstruction attack (Carlini et al. 2023); None where the family has
        none (a GAN maps latents to images and cannot denoise a given image)."""
        return None
