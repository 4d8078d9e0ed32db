"""The registry of model families: ``FAMILY_PACKAGES`` names each one's folder.

A family is one folder under ``privimage_core/models/`` holding its networks
and ``family.py``, whose ``FAMILY`` is a ``ModelFamily`` subclass
(``models/base.py``); an optional ``config.py`` whose ``CONFIG`` is a
dataclass with a ``SECTION`` name adds that section to the run's config
(``privimage_core.config``), validated by the dataclass's ``validate``.
Adding a family is that folder plus one line below: no stage, driver or
config code changes, and the contract tests (tests/test_family_contract.py)
cover it by being registered.

This module stays light (no torch): the config imports it to find the
families' sections, and the command line starts through the config.
"""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

FAMILY_PACKAGES: dict[str, str] = {
    "diffusion": "privimage_core.models.diffusion",
    "gan": "privimage_core.models.gan",
    "latent_diffusion": "privimage_core.models.latent",
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILY_PACKAGES)


def get_family(name: str):
    """The registered family ``name`` (a ``ModelFamily`` instance)."""
    if name not in FAMILY_PACKAGES:
        raise KeyError(f"unknown model family '{name}'; known: {', '.join(FAMILY_NAMES)}")
    return _family_class(name)()


@lru_cache(maxsize=None)
def _family_class(name: str):
    return importlib.import_module(FAMILY_PACKAGES[name] + ".family").FAMILY


@lru_cache(maxsize=None)
def family_config_sections() -> dict[str, type]:
    """{section name: settings dataclass} of every family that has settings
    of its own (a ``config.py`` in its folder), in registry order."""
    out: dict[str, type] = {}
    for name, pkg in FAMILY_PACKAGES.items():
        if importlib.util.find_spec(pkg + ".config") is None:
            continue
        cls = importlib.import_module(pkg + ".config").CONFIG
        section = cls.SECTION
        if section in out:
            raise RuntimeError(f"model families {out[section].__module__} and {pkg} both claim "
                               f"the config section '{section}'")
        out[section] = cls
    return out


def build_model(cfg, family: str, num_classes: int):
    """The family's model for a run's config: the one way every stage,
    worker and actor builds it, so their checkpoints always match."""
    fam = get_family(family)
    g = cfg.generator
    return fam.make(g.preset, g.overrides, cfg.data.image_size, cfg.data.channels, num_classes,
                    **fam.options(cfg))


__all__ = ["FAMILY_NAMES", "FAMILY_PACKAGES", "build_model", "family_config_sections",
           "get_family"]
