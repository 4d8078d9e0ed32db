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
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import numpy as np
import torch
from torch import nn


class DPObjective(Protocol):
    """The per-example loss DP-SGD clips (``dp_sgd/finetune.py``).

    ``draw`` returns every random input ([B, k, ...] per tensor: k = noise
    multiplicity), drawn outside the forward so that ``loss`` is a pure
    function (torch.func.vmap refuses random ops); ``loss`` returns [B],
    averaged over the k draws inside the example (DPDM Sec. 3.2: one clipped
    gradient per example, same cost). For the hooks and ghost clipping modes
    every layer call must see example-major rows: example i's k draws as k
    consecutive rows (``dp_sgd.per_sample_grads.fold_multiplicity``), or one
    call per draw with row i belonging to example i; ghost clipping checks
    this against vmap on random inputs before it trains (``check_clipper``).
    An objective may set ``uses_multiplicity = False`` when its loss draws
    nothing (it then always runs at k = 1)."""

    def draw(self, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             rnd: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class DPStagePlan:
    """What one DP-SGD stage of a family trains (``part``: the stage's
    ``options["part"]``, None for a single-stage family) and with what:
    ``steps`` and ``lr`` of the stage, and ``epsilon_share``: when set, the
    stage's noise is calibrated so that it ALONE costs at most that share of
    the run's epsilon (as the semantic query's share, query_budget.py); the
    last stage (share None) gets what the composed ledger leaves."""
    steps: int
    lr: float
    epsilon_share: float | None = None


def no_part(family: str, part: str | None) -> None:
    if part is not None:
        raise ValueError(f"the {family} family has one DP part; stage part '{part}' is unknown")


class PublicTrainer(ABC):
    """Non-private training on public images (pre-training, Algorithm 2 line 9)."""

    @abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> float:
        """One optimisation step on a minibatch; returns the loss."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's weights (CPU for one without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class ModelFamily(ABC):
    name: ClassVar[str]
    # Config keys of `generator.preset` this family understands.
    presets: ClassVar[tuple[str, ...]]
    # Keyword arguments of DDP for multi-worker pre-training (e.g. a family
    # that trains one part per step needs find_unused_parameters).
    public_ddp_kwargs: ClassVar[dict] = {}

    def options(self, cfg) -> dict:
        """Keyword arguments of ``make`` taken from the run's config (e.g. the
        diffusion family's label dropout); none by default."""
        return {}

    @abstractmethod
    def make(self, preset: str, overrides: dict, image_size: int, channels: int,
             num_classes: int, **options) -> nn.Module:
        """Every network of the family in one module (checkpointed as one state dict)."""

    def dp_stage_plan(self, cfg, part: str | None = None) -> DPStagePlan | None:
        """Steps, learning rate and budget share of the DP stage training
        ``part``; None: the run's config leaves this stage out (e.g. a frozen
        autoencoder). Default: the ``finetune`` section."""
        no_part(self.name, part)
        return DPStagePlan(cfg.finetune.steps, cfg.finetune.resolved_lr(cfg.data.channels))

    def dp_module(self, model: nn.Module, part: str | None = None) -> nn.Module:
        """The part DP-SGD trains on the sensitive data (default: all of it)."""
        no_part(self.name, part)
        return model

    def release_module(self, model: nn.Module) -> nn.Module:
        """The part that is released and sampled from (default: all of it)."""
        return model

    def ema_module(self, model: nn.Module, part: str | None = None) -> nn.Module:
        """The submodule whose EMA a training stage keeps and releases
        (``part`` None: pre-training and a single DP stage). Default: the
        released module."""
        return self.release_module(model)

    @abstractmethod
    def dp_objective(self, model: nn.Module, part: str | None = None,
                     cfg=None) -> DPObjective:
        """The per-example loss DP-SGD clips; ``cfg`` (the run's config, None
        in unit tests: the family's defaults) carries its settings."""

    def after_dp_step(self, model: nn.Module, lr: float) -> Callable[[], None] | None:
        """Post-processing after each noised DP step (a GAN's generator update)."""
        return None

    # Whether ``sample`` takes a classifier-free guidance scale and the
    # trainers the null label (generator.label_dropout) it needs; the config
    # refuses sampling.guidance > 0 for a family without it.
    guidance: ClassVar[bool] = False

    # Arithmetic its public trainer can run (pretrain.resolve_precision).
    public_precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    @abstractmethod
    def public_trainer(self, model: nn.Module, lr: float,
                       precision: str = "fp32") -> PublicTrainer:
        """The non-private trainer of the public stage; ``precision`` is a
        resolved value from ``public_precisions``."""

    @abstractmethod
    def sample(self, release: nn.Module, labels: np.ndarray, num_steps: int, solver: str,
               seed: int, batch_size: int, guidance: float = 0.0,
               progress: Callable[[int], None] | None = None,
               start_index: int = 0) -> np.ndarray:
        """uint8 [N, H, W, C] images for ``labels`` from the released module,
        on the device its weights are on; ``progress(done)`` (optional) hears
        the images finished so far. ``labels[k]`` is image ``start_index + k``
        of ``seed``'s set: each image's randomness depends on the seed and its
        index only, so shards that split the indices (several sampling
        workers) give the images one call over all of them gives."""

    @abstractmethod
    def audit_loss(self, release: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> torch.Tensor:
        """Per-example loss [B] for the membership audit (lower = more member-like)."""

    def reconstructor(self, release: nn.Module) -> Callable | None:
        """``f(x, noise, sigma [B], y) -> x0`` in [-1, 1]: the one-step
        reconstruction of the clean images ``x`` noised at ``sigma`` with
        ``noise`` (iid N(0, 1), x's shape), for the memorisation check's
        reconstruction attack. Default: the denoiser on x + sigma * noise;
        a latent family noises its latents instead; None: not applicable."""
        den = self.denoiser(release)
        if den is None:
            return None
        return lambda x, noise, sigma, y: den(x + sigma.reshape(-1, 1, 1, 1) * noise, sigma, y)

    def denoiser(self, release: nn.Module) -> Callable | None:
        """``f(x_noisy, sigma [B], y) -> x0`` in [-1, 1]: the family's one-step
        reconstruction of a noised image, for the memorisation check's
        reconstruction attack (Carlini et al. 2023); None where the family has
        none (a GAN maps latents to images and cannot denoise a given image)."""
        return None

    def membership_loss(self, release: nn.Module) -> Callable | None:
        """``f(x, y, sigma, noise) -> [B]``: the per-example loss of the
        loss-threshold membership diagnostic (evaluation/diffusion_mia.py) at
        one noise level ``sigma`` with the given ``noise``; None where the
        family has no such loss (the canary audit's ``audit_loss`` still
        covers it)."""
        return None
