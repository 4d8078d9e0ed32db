"""A released generator on disk: its weights and a manifest that rebuilds it.

The manifest (``release.json`` beside the weights) names the model family,
its preset, overrides and the options of the family's ``make``, the image
shape and the class names: everything needed to rebuild the network from the
release alone, whatever the family (as NVlabs/edm's snapshots carry their
network's construction arguments). ``privimage evaluate``, the evaluator and
any other tool load a release through ``load_release``. The manifest holds
public settings and DP outputs only (the class list is declared, never read
off the sensitive labels).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from privimage_core.errors import DataError
from privimage_core.models import get_family

MANIFEST_FILE = "release.json"


@dataclass
class ReleaseManifest:
    family: str
    preset: str
    image_size: int
    channels: int
    class_names: list[str]
    overrides: dict = field(default_factory=dict)
    # Keyword arguments of the family's ``make`` (ModelFamily.options).
    options: dict = field(default_factory=dict)
    method: str | None = None
    weights: str = "dp_generator.pt"

    @classmethod
    def for_run(cls, cfg, family: str, class_names, weights: str) -> "ReleaseManifest":
        """The manifest of a run's model (``models.build_model``'s arguments)."""
        g = cfg.generator
        return cls(family=family, preset=g.preset, image_size=cfg.data.image_size,
                   channels=cfg.data.channels, class_names=list(class_names),
                   overrides=dict(g.overrides), options=get_family(family).options(cfg),
                   method=cfg.method, weights=weights)

    def build(self) -> torch.nn.Module:
        """The family's whole model, untrained."""
        fam = get_family(self.family)
        return fam.make(self.preset, self.overrides, self.image_size, self.channels,
                        len(self.class_names), **self.options)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReleaseManifest":
        known = {f for f in cls.__dataclass_fields__}
        missing = {"family", "preset", "image_size", "channels", "class_names"} - set(d)
        if missing:
            raise DataError(f"release manifest lacks {', '.join(sorted(missing))}; pass the "
                            f"{MANIFEST_FILE} a run wrote")
        return cls(**{k: v for k, v in d.items() if k in known})


def write_release(directory: Path, state: dict, manifest: ReleaseManifest) -> Path:
    """Save ``state`` (the whole model's state dict) as ``manifest.weights``
    in ``directory`` with the manifest beside it; returns the weights path."""
    directory = Path(directory)
    path = directory / manifest.weights
    torch.save(state, path)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2))
    return path


def read_manifest(path: str | Path) -> ReleaseManifest:
    """The manifest of a release given as its directory, its ``release.json``
    or its weights file."""
    p = Path(path)
    m = p if p.name == MANIFEST_FILE else (p if p.is_dir() else p.parent) / MANIFEST_FILE
    if not m.is_file():
        raise DataError(f"no {MANIFEST_FILE} next to '{path}'; pass a release written by "
                        "`privimage run` (its run directory or dp_generator.pt)")
    return ReleaseManifest.from_dict(json.loads(m.read_text()))


def load_release(path: str | Path) -> tuple[object, torch.nn.Module, ReleaseManifest]:
    """(family, released module in eval mode, manifest) of the release at
    ``path`` (its directory, manifest or weights file)."""
    man = read_manifest(path)
    p = Path(path)
    weights = p if p.suffix == ".pt" else (p if p.is_dir() else p.parent) / man.weights
    if not weights.is_file():
        raise DataError(f"release weights '{weights}' do not exist; pass the run's "
                        "dp_generator.pt")
    model = man.build()
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise DataError(f"'{weights}' does not fit its manifest ({man.family} '{man.preset}' at "
                        f"{man.image_size}x{man.image_size}x{man.channels}): "
                        f"{str(e).splitlines()[0]}") from e
    fam = get_family(man.family)
    return fam, fam.release_module(model).eval(), man


__all__ = ["MANIFEST_FILE", "ReleaseManifest", "load_release", "read_manifest",
           "write_release"]
