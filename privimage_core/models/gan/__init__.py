"""Class-conditional GAN family (``generator.family: gan``): the generator for
``privimage_g`` and ``dpgan``; DP-SGD trains its discriminator."""
from privimage_core.models.gan.family import GANFamily, GANObjective, GeneratorStep

__all__ = ["GANFamily", "GANObjective", "GeneratorStep"]
