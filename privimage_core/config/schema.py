"""The config: one typed, validated object with a section per concern.

A config is a YAML/JSON mapping of sections. The core sections are defined in
``config/sections.py``, ``training.py``, ``evaluation.py``, ``infra.py`` and
``tune.py``; a model family with settings of its own adds its section from
its folder (``models/<family>/config.py``, found through the family
registry), so adding a family touches no config code. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` with a one-line
message naming the key and the fix, before any expensive work starts.
``docs/configuration.md`` lists every key (generated from these classes).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any

from privimage_core.config.evaluation import EvaluationConfig
from privimage_core.config.infra import MetricsConfig, RayConfig, TrackingConfig
from privimage_core.config.sections import (DataConfig, GeneratorConfig, PrivacyConfig,
                                            RunConfig, SamplingConfig, SelectionConfig,
                                            SemanticQueryConfig)
from privimage_core.config.training import FinetuneConfig, PretrainConfig
from privimage_core.config.tune import TuneConfig
from privimage_core.config.types import check_type, require
from privimage_core.errors import ConfigError
from privimage_core.methods import check_guidance, check_method, check_trainable
from privimage_core.models import family_config_sections

# Top-level keys that are values, not sections, with their types.
SCALAR_KEYS: dict[str, type] = {"method": str}


def _sections() -> dict[str, type]:
    """Section name -> settings class, in the order a config file lists them:
    the model families' sections right after ``generator``."""
    before = {"run": RunConfig, "data": DataConfig, "semantic_query": SemanticQueryConfig,
              "selection": SelectionConfig, "privacy": PrivacyConfig,
              "generator": GeneratorConfig}
    after = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "sampling": SamplingConfig,
             "evaluation": EvaluationConfig, "ray": RayConfig, "tracking": TrackingConfig,
             "metrics": MetricsConfig, "tune": TuneConfig}
    families = family_config_sections()
    clash = set(families) & (set(before) | set(after) | set(SCALAR_KEYS))
    if clash:
        raise RuntimeError(f"a model family's config section {sorted(clash)} is a core section")
    return {**before, **families, **after}


SECTIONS: dict[str, type] = _sections()


class _ConfigMethods:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {k: getattr(self, k) for k in SCALAR_KEYS}
        for sec, vals in self.to_dict().items():
            if sec in SCALAR_KEYS:
                continue
            for k, v in vals.items():
                out[f"{sec}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
        return out

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        """A copy with dotted-key overrides applied (e.g. {'generator.preset': 'small'})."""
        d = self.to_dict()
        for key, value in overrides.items():
            if key in SCALAR_KEYS:
                d[key] = value
                continue
            sec, _, name = key.partition(".")
            if sec not in d or name not in d[sec]:
                raise ConfigError(f"unknown config key '{key}'{_did_you_mean(key, all_keys())}; "
                                  "use a dotted key such as 'generator.preset' (every key: "
                                  "docs/configuration.md)")
            d[sec][name] = value
        return from_dict(d)


Config = dataclasses.make_dataclass(
    "Config",
    [("method", str, dataclasses.field(default="privimage"))]
    + [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in SECTIONS.items()],
    bases=(_ConfigMethods,))
Config.__module__ = __name__  # pickled by name (Ray ships configs to its workers)
Config.__doc__ = ("A run's whole configuration: ``method`` (privimage_core/methods.py) and one "
                  "settings object per section of SECTIONS.")


def all_keys() -> list[str]:
    """Every dotted key a config accepts."""
    return list(SCALAR_KEYS) + [f"{sec}.{f.name}" for sec, cls in SECTIONS.items()
                                for f in dataclasses.fields(cls)]


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def from_dict(d: dict | None) -> Config:
    """Build and validate a Config; unknown keys are errors, never ignored."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError("the config must be a mapping of sections (run:, data:, ...)")
    kwargs = {}
    for sec, vals in d.items():
        if sec in SCALAR_KEYS:
            kwargs[sec] = check_type(sec, vals, SCALAR_KEYS[sec])
            continue
        if sec not in SECTIONS:
            raise ConfigError(f"unknown config section '{sec}'{_did_you_mean(sec, SECTIONS)}; "
                              f"valid sections: {', '.join(SECTIONS)}")
        if vals is None:
            continue
        if not isinstance(vals, dict):
            raise ConfigError(f"config section '{sec}' must be a mapping of keys")
        cls = SECTIONS[sec]
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        sub = {}
        for k, v in vals.items():
            if k not in fields:
                raise ConfigError(f"unknown config key '{sec}.{k}'{_did_you_mean(k, fields)}; "
                                  f"valid keys in '{sec}': {', '.join(sorted(fields))}")
            sub[k] = check_type(f"{sec}.{k}", v, hints[k])
        kwargs[sec] = cls(**sub)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML or JSON config file (None: the embedded quickstart defaults)."""
    if path is None:
        cfg = from_dict({})
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing file, "
                              "e.g. --config configs/quickstart.yaml")
        text = p.read_text()
        try:
            if p.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml  # lazy: only YAML files need it
                data = yaml.safe_load(text)
        except Exception as e:  # parse errors: say where
            raise ConfigError(f"config file '{path}' cannot be parsed ({e}); fix its syntax") from e
        cfg = from_dict(data)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg


def validate(cfg: Config) -> None:
    """Every check that needs no data: each section's own ranges, then the
    checks across sections. Data-dependent checks (delta < 1/N) run in
    ``config/resolve.py`` once the sensitive size is known."""
    for sec in SECTIONS:
        getattr(cfg, sec).validate()
    check_method(cfg.method, cfg.generator.preset, cfg.pretrain.resolved_steps(cfg.data.channels),
                 cfg.pretrain.precision)
    check_trainable(cfg)
    check_guidance(cfg)
    require(not (cfg.ray.use_gpu and cfg.evaluation.inception_backend == "openvino"),
            "evaluation.inception_backend is openvino (CPU only) but ray.use_gpu puts the "
            "evaluation on a GPU; set evaluation.inception_backend: auto or torch")
    known = set(cfg.flat())
    for k in cfg.tune.search_space:
        require(k in known, f"tune.search_space key '{k}' is not a config key"
                f"{_did_you_mean(k, known)}; use a dotted key such as 'generator.preset' or "
                "'method'")
