"""The EDM diffusion family (Privimage+D, PDP-Diffusion, DPDM): an
EDM-preconditioned class-conditional UNet (privimage_core/diffusion/)."""
from privimage_core.models.diffusion.family import DiffusionFamily

__all__ = ["DiffusionFamily"]
