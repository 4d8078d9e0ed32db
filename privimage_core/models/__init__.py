"""Registry of model families: ``generator.family`` names one of these.

Adding a family = one folder implementing ``ModelFamily`` plus one line here;
no stage or driver code changes.
"""
from __future__ import annotations

from privimage_core.models.base import DPObjective, ModelFamily, PublicTrainer

_FACTORIES = {
    "diffusion": lambda: __import__("privimage_core.models.diffusion",
                                    fromlist=["DiffusionFamily"]).DiffusionFamily(),
    "gan": lambda: __import__("privimage_core.models.gan", fromlist=["GANFamily"]).GANFamily(),
    "latent_diffusion": lambda: __import__("privimage_core.models.latent",
                                           fromlist=["LatentDiffusionFamily"]
                                           ).LatentDiffusionFamily(),
}

FAMILY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_family(name: str) -> ModelFamily:
    if name not in _FACTORIES:
        raise KeyError(f"unknown model family '{name}'; known: {', '.join(FAMILY_NAMES)}")
    return _FACTORIES[name]()


def build_model(cfg, family: str, num_classes: int):
    """The family's model for a run's config: the one way every stage,
    worker and actor builds it, so their checkpoints always match."""
    fam = get_family(family)
    g = cfg.generator
    return fam.make(g.preset, g.overrides, cfg.data.image_size, cfg.data.channels, num_classes,
                    **fam.options(cfg))


__all__ = ["DPObjective", "FAMILY_NAMES", "ModelFamily", "PublicTrainer", "build_model",
           "get_family"]
