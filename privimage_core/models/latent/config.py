"""The ``latent:`` config section of the latent-diffusion family (method
``dp_ldm``; seed 003, Ge, Zhang & Sun 2024; DPImageBench's DP-LDM). The
family registry adds it to the run's config (``privimage_core.models``);
only this family reads it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from privimage_core.config.types import require as _require

# How the autoencoder meets the sensitive data: "dp" fine-tunes it with
# DP-SGD (the seed's DP-aware compression, its own ledger mechanism);
# "frozen" keeps the public pre-trained one (no budget spent on it).
AUTOENCODER_MODES = ("dp", "frozen")
# Spatial down-sampling of the autoencoder: 28x28 -> 14x14 or 7x7 latents.
DOWNSAMPLE_FACTORS = (2, 4)


@dataclass
class LatentConfig:
    SECTION: ClassVar[str] = "latent"

    # Latent channels and down-sampling: 4 x 7 x 7 = 196 numbers for MNIST,
    # a quarter of the pixels, so each DP step's UNet runs on 7x7.
    channels: int = 4
    downsample: int = 4
    # Width of the autoencoder's first convolution (doubles once).
    width: int = 32
    # Share of ``pretrain.steps`` spent on the autoencoder (reconstruction
    # loss) before the latent diffusion model trains on its frozen latents.
    autoencoder_pretrain_share: float = 0.3
    autoencoder: str = "dp"
    # The autoencoder's DP stage (when autoencoder: dp): steps (of
    # finetune.batch_size, Poisson), learning rate, and its share of epsilon
    # (calibrated alone, like selection.query_epsilon_share); the latent
    # model's DP stage gets what the composed ledger leaves.
    autoencoder_dp_steps: int = 10
    autoencoder_dp_lr: float = 1e-3
    autoencoder_epsilon_share: float = 0.1

    def validate(self) -> None:
        """Range checks (one-line errors naming the key and the fix)."""
        _require(self.channels >= 1,
                 f"latent.channels must be >= 1, got {self.channels}; set e.g. 4")
        _require(self.downsample in DOWNSAMPLE_FACTORS,
                 f"latent.downsample must be one of {DOWNSAMPLE_FACTORS}, got {self.downsample}")
        _require(self.width >= 4, f"latent.width must be >= 4, got {self.width}; set e.g. 32")
        _require(0 < self.autoencoder_pretrain_share < 1,
                 f"latent.autoencoder_pretrain_share must be in (0, 1), got "
                 f"{self.autoencoder_pretrain_share}; set e.g. 0.3")
        _require(self.autoencoder in AUTOENCODER_MODES,
                 f"latent.autoencoder must be one of {', '.join(AUTOENCODER_MODES)}, got "
                 f"'{self.autoencoder}'")
        _require(self.autoencoder_dp_steps >= 1,
                 f"latent.autoencoder_dp_steps must be >= 1, got {self.autoencoder_dp_steps}")
        _require(self.autoencoder_dp_lr > 0, "latent.autoencoder_dp_lr must be > 0")
        _require(0 < self.autoencoder_epsilon_share < 1,
                 f"latent.autoencoder_epsilon_share must be in (0, 1), got "
                 f"{self.autoencoder_epsilon_share}; set e.g. 0.1")


CONFIG = LatentConfig
