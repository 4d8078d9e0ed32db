"""The training sections of the config (``pretrain:``, ``finetune:``): the
public pre-training (paper Sec. 3.3) and DP-SGD fine-tuning (Sec. 3.4)
settings and their allowed values."""
from __future__ import annotations

import re
from dataclasses import dataclass

from privimage_core.config.types import require as _require


# Arithmetic of public pre-training (privimage_core/pretrain.resolve_precision):
# "auto" = bf16 autocast where the hardware runs it natively (a CPU with AMX,
# a CUDA GPU with bf16) and the family supports it, else fp32.
PRETRAIN_PRECISIONS = ("auto", "fp32", "bf16")
# Random recolouring of the public images during pre-training only
# (privimage_core/pretrain.resolve_recolour): "auto" = on when data.channels
# is 3 and the public images are grayscale (decided from the public images
# alone), else off.
PRETRAIN_RECOLOUR = ("auto", "on", "off")
# Pre-training steps when ``pretrain.steps`` is null, by data.channels. Colour
# images take longer to learn: recoloured glyphs (every shape in random
# stroke and background colours) drew speckled strokes in several colours
# after the grayscale quickstart's 900 steps, and the CNN score of the
# pre-trained generator alone kept rising up to several thousand steps
# (benchmarks/pretrain_explore.py, results/rgb-explore-*).
PRETRAIN_STEPS_BY_CHANNELS = {1: 900, 3: 7200}


@dataclass
class PretrainConfig:
    # null: by data.channels, 900 for grayscale and 7200 for RGB
    # (PRETRAIN_STEPS_BY_CHANNELS); every run records the number it used.
    steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.995
    # One of PRETRAIN_PRECISIONS. bf16 only changes the public stage's
    # arithmetic (weights and optimizer stay fp32; DP-SGD always runs fp32);
    # its speed and its effect on downstream accuracy were measured on a
    # validation split (benchmarks/results/quality-explore-*).
    precision: str = "auto"
    # One of PRETRAIN_RECOLOUR. On, each public image's black and white are
    # mapped to two random contrasting colours, so a generator pre-trained on
    # grayscale glyphs already draws shapes in any colour pair and DP
    # fine-tuning on coloured sensitive images only has to shift the colours.
    # Public images and the run's seed only: no privacy cost.
    recolour: str = "auto"

    def validate(self) -> None:
        _require(self.steps is None or self.steps >= 0,
                 "pretrain.steps must be >= 0, or null (by data.channels)")
        _require(self.batch_size >= 1, f"pretrain.batch_size must be >= 1, got {self.batch_size}")
        _require(self.precision in PRETRAIN_PRECISIONS,
                 f"pretrain.precision must be one of {', '.join(PRETRAIN_PRECISIONS)}, "
                 f"got '{self.precision}'")
        _require(self.recolour in PRETRAIN_RECOLOUR,
                 f"pretrain.recolour must be one of {', '.join(PRETRAIN_RECOLOUR)}, "
                 f"got '{self.recolour}'")
        _require(0 <= self.ema_decay < 1,
                 f"pretrain.ema_decay must be in [0, 1), got {self.ema_decay}")

    def resolved_steps(self, channels: int) -> int:
        """``steps``, or when null the default for ``channels`` (1 or 3)."""
        return PRETRAIN_STEPS_BY_CHANNELS[channels] if self.steps is None else self.steps


# Per-example clipping engines for DP-SGD (privimage_core/dp_sgd/finetune.make_private):
# "ghost" = book-keeping ghost clipping (privimage_core/dp_sgd/ghost_clipping.py, the
# clipped sum without per-sample gradients), "vmap" = torch.func per-sample
# gradients, "hooks" = Opacus's hooks; "auto" = ghost where every trainable
# layer is one it supports, else vmap.
GRAD_SAMPLE_MODES = ("auto", "ghost", "vmap", "hooks")
# DP fine-tuning learning rate when ``finetune.lr`` is null, by data.channels,
# each chosen on a validation split of its own data (benchmarks/quality_explore.py):
# MNIST for grayscale; coloured digits from the RGB pre-training for colour,
# where 0.004 lowered the pre-trained generator's score (results/rgb-explore-*):
# a few thousand sensitive images leave sigma about twice MNIST's at a larger
# sampling rate, and a smaller step keeps the noise from undoing pre-training.
# Measured on the pixel diffusion family; the GAN and latent families take
# the same numbers (not measured there).
FINETUNE_LR_BY_CHANNELS = {1: 4e-3, 3: 1e-3}


@dataclass
class FinetuneConfig:
    """DP-SGD fine-tuning (Sec. 3.4, Algorithm 1)."""
    # Planned optimizer steps; training stops earlier if the budget would be exceeded.
    steps: int = 60
    # Expected logical batch size: the Poisson rate is 1 / ceil(n / batch_size)
    # for the dataset's public size n (privacy/dataset_size.py).
    batch_size: int = 512
    # Physical batch for memory (BatchMemoryManager virtual steps).
    physical_batch_size: int = 128
    # null: by data.channels, 0.004 for grayscale and 0.001 for RGB
    # (FINETUNE_LR_BY_CHANNELS); every run records the number it used.
    lr: float | None = None
    max_grad_norm: float = 1.0
    # None: calibrated from the target epsilon after the query's cost.
    noise_multiplier: float | None = None
    # Few DP steps: a short EMA horizon, else the EMA stays at the pre-trained weights.
    ema_decay: float = 0.9
    # DPDM noise multiplicity: noise draws per image, averaged inside its loss
    # before clipping (same privacy cost, lower gradient variance, K x compute).
    noise_multiplicity: int = 1
    # One of GRAD_SAMPLE_MODES; their cost against a non-private step is
    # measured by benchmarks/bench_dp_step.py.
    grad_sample_mode: str = "auto"
    # Noise levels drawn in the DP fine-tuning loss of the pixel diffusion
    # family: ln(sigma) ~ N(mean, std^2) (EDM's training distribution). EDM's
    # -1.2 spends most draws on nearly clean images, whose gradients carry
    # little under DP noise; DPDM (Dockhorn et al. 2022, Sec. 3.3) also moves
    # the DP loss towards larger sigma. Chosen on a validation split
    # (benchmarks/quality_explore.py). Pre-training keeps EDM's -1.2; the
    # latent family keeps it too (not measured there).
    noise_level_mean: float = 0.0
    noise_level_std: float = 1.2
    # A regular expression over the parameter names of the module the release
    # stage trains with DP-SGD (re.search; e.g. "norm|emb|conv_in|conv_out"):
    # only those are fine-tuned, the rest keep their pre-trained public values.
    # null: every parameter (dp_sgd/finetune.restrict_trainable says why fewer
    # can help; `privimage validate` checks the pattern matches one).
    trainable: str | None = None

    def validate(self) -> None:
        _require(self.trainable != "",
                 "finetune.trainable is empty; give a pattern (e.g. 'norm|emb') or set null "
                 "to train every parameter")
        _require(self.trainable is None or _compiles(self.trainable),
                 f"finetune.trainable '{self.trainable}' is not a valid regular expression; "
                 "fix it (e.g. 'norm|emb') or set null to train every parameter")
        _require(self.steps >= 1 and self.batch_size >= 1 and self.physical_batch_size >= 1,
                 "finetune.steps, batch_size and physical_batch_size must be >= 1")
        _require(self.lr is None or self.lr > 0,
                 f"finetune.lr must be > 0 or null (by data.channels), got {self.lr}")
        _require(self.max_grad_norm > 0,
                 f"finetune.max_grad_norm must be > 0, got {self.max_grad_norm}")
        _require(self.noise_level_std > 0 and -5 <= self.noise_level_mean <= 3,
                 f"finetune.noise_level_mean must be in [-5, 3] and noise_level_std > 0, got "
                 f"{self.noise_level_mean}, {self.noise_level_std}; set e.g. 0.0 and 1.2")
        _require(self.noise_multiplier is None or self.noise_multiplier > 0,
                 "finetune.noise_multiplier must be > 0 or null (calibrated)")
        _require(self.noise_multiplicity >= 1,
                 f"finetune.noise_multiplicity must be >= 1, got {self.noise_multiplicity}; "
                 "set e.g. 1")
        _require(self.grad_sample_mode in GRAD_SAMPLE_MODES,
                 f"finetune.grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                 f"got '{self.grad_sample_mode}'")
        _require(0 <= self.ema_decay < 1,
                 f"finetune.ema_decay must be in [0, 1), got {self.ema_decay}")

    def resolved_lr(self, channels: int) -> float:
        """``lr``, or when null the default for ``channels`` (1 or 3)."""
        return FINETUNE_LR_BY_CHANNELS[channels] if self.lr is None else self.lr


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True
