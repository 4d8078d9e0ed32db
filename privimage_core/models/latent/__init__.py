"""The latent-diffusion family (method dp_ldm): an autoencoder and an EDM
diffusion model over its latents, each with its own DP-SGD stage."""
from privimage_core.models.latent.family import LatentDiffusionFamily

__all__ = ["LatentDiffusionFamily"]
