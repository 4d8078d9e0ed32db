"""Typed, validated configuration: the one place every setting is defined.

A config is a YAML/JSON mapping with the sections below. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` with a one-line
message naming the key and the fix, before any expensive work starts.
``resolve()`` fills derived defaults so that every run can record its full,
resolved configuration.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privimage_core.config_evaluation import EvaluationConfig, validate_evaluation
from privimage_core.config_infra import MetricsConfig, RayConfig, TrackingConfig
from privimage_core.config_latent import LatentConfig, validate_latent
from privimage_core.config_training import (  # noqa: F401 (re-exported)
    GRAD_SAMPLE_MODES, PRETRAIN_PRECISIONS, FinetuneConfig, PretrainConfig, validate_training)
from privimage_core.config_tune import TuneConfig, validate_tune
from privimage_core.config_types import check_type as _check_type
from privimage_core.config_types import require as _require
from privimage_core.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "privimage"
    seed: int = 0
    # Where the run writes its outputs (index, checkpoints, synthetic data).
    output_dir: str = "runs"
    # Offline data root (MNIST IDX files, caches); env PRIVIMAGE_DATA_DIR wins if unset.
    data_dir: str | None = None
    # Threads torch may use per process (0 = torch default).
    torch_threads: int = 2
    # The lifetime ledgers (one per sensitive dataset digest, composed over
    # every run on it); None: <output_dir>/lifetime_ledgers.
    ledger_store: str | None = None
    # Reuse budget-free public stages (pre-training) across runs and sweep
    # trials: cached under <output_dir>/cache by a digest of all they depend on.
    cache_public: bool = True


@dataclass
class DataConfig:
    sensitive: str = "mnist"
    # Real test split for evaluation (non-private: it never trains anything).
    sensitive_test: str | None = None
    public: list[str] = field(default_factory=lambda: ["glyphs", "fashion_mnist"])
    image_size: int = 28
    channels: int = 1
    resize: bool = False
    # Cap on images per public class (deterministic subsample); None = all.
    public_max_per_class: int | None = 300
    # The sensitive classes, declared (never read off the sensitive labels):
    # a user dataset's labels are mapped onto this list, a class without
    # images is kept. None: the file's metadata or the folder's subfolders
    # (built-in datasets have fixed lists).
    class_names: list[str] | None = None
    # Refused when set (SENSITIVE_MAX_REFUSED); kept as a key so that old
    # configs get that message instead of "unknown key".
    sensitive_max: int | None = None
    glyph_max_fonts: int | None = None
    glyph_copies_per_font: int = 2


SENSITIVE_MAX_REFUSED = (
    "data.sensitive_max is refused: a subsample drawn inside the run breaks add/remove-one DP "
    "(removing one record changes which records are drawn); make the subsample the declared "
    "dataset: privimage data subsample --source SPEC --n N --out PATH.parquet, then set "
    "data.sensitive: parquet:PATH.parquet")


@dataclass
class SemanticQueryConfig:
    """The semantic query function of Sec. 3.2 (a classifier on public labels)."""
    width: int = 16
    epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    val_fraction: float = 0.1


@dataclass
class SelectionConfig:
    """Sec. 3.3: DP semantic distribution query and top-k2 selection."""
    # Fraction of public semantics selected in total (Table 8): k2 per class is
    # floor(ratio * num_public_labels / num_sensitive_classes), at least 1.
    selection_ratio: float = 0.1
    # Explicit k2 overrides the ratio.
    k2: int | None = None
    # Semantics queried per sensitive image; the paper sets k1 = k2 (App. A).
    k1: int | None = None
    # The query's share of privacy.target_epsilon (privimage_core/query_budget.py):
    # sigma_q is calibrated so the query alone costs at most share * epsilon;
    # DP-SGD gets the rest of the composed budget. 0.1 by measurement
    # (benchmarks/results/query-share-2026-12-03.txt): under RDP composition
    # it raises DP-SGD's noise by 0.3% against a free query (0.2: 0.9%), and
    # at epsilon 10 a class's best semantic needs only ~16 votes to count
    # (noise std 4; the old fixed sigma_q = 100 needed ~380).
    query_epsilon_share: float = 0.1
    # An explicit noise multiplier of the histogram query (noise std
    # sigma_q * sqrt(k1)) wins over the share; the paper's setting.
    sigma_q: float | None = None
    # The significance check of the noisy histogram (query_budget.py): a
    # class's selection counts when its best noisy count exceeds the level a
    # no-signal histogram reaches with probability alpha (Bonferroni).
    significance_alpha: float = 0.05
    # When any class fails it: one of query_budget.ON_INSIGNIFICANT.
    on_insignificant: str = "fallback"


@dataclass
class PrivacyConfig:
    target_epsilon: float = 10.0
    # None: 1e-5, or 0.1/N when N is so small that 1e-5 >= 1/N (resolve_delta).
    target_delta: float | None = None
    accountant: str = "rdp"
    # A budget for ALL runs on the same sensitive data (lifetime ledger): a
    # run whose plan would take the composition past it is refused before it
    # reads the data. None: every run is composed and reported, none refused.
    lifetime_epsilon: float | None = None


@dataclass
class GeneratorConfig:
    preset: str = "tiny"
    # Overrides of the preset's UNet arguments (e.g. base_channels).
    overrides: dict = field(default_factory=dict)
    # Classifier-free guidance (diffusion): the share of training examples
    # whose label is replaced by the null label, in pre-training and DP-SGD.
    label_dropout: float = 0.0


@dataclass
class SamplingConfig:
    # 5,000: enough for a comparable FID (evaluation.fid_images) and for the
    # downstream classifiers.
    num_images: int = 5000
    num_steps: int = 18
    solver: str = "euler"
    batch_size: int = 500
    # Classifier-free guidance scale w: D = (1 + w) D(x|y) - w D(x|null);
    # 0 = plain conditional sampling (needs generator.label_dropout > 0).
    guidance: float = 0.0


@dataclass
class Config:
    # The method: a list of stages and a model family (privimage_core/methods.py).
    method: str = "privimage"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    semantic_query: SemanticQueryConfig = field(default_factory=SemanticQueryConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {"method": self.method}
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
                raise ConfigError(f"unknown config key '{key}'; use a dotted key such as "
                                  "'generator.preset' (see configs/quickstart.yaml)")
            d[sec][name] = value
        return from_dict(d)


# Top-level keys that are values, not sections.
SCALAR_KEYS: dict[str, type] = {"method": str}


def from_dict(d: dict | None) -> Config:
    """Build and validate a Config; unknown keys are errors, never ignored."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError("the config must be a mapping of sections (run:, data:, ...)")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for sec, vals in d.items():
        if sec in SCALAR_KEYS:
            kwargs[sec] = _check_type(sec, vals, SCALAR_KEYS[sec])
            continue
        if sec not in sections:
            raise ConfigError(f"unknown config section '{sec}'; valid sections: "
                              f"{', '.join(sections)}")
        if vals is None:
            continue
        if not isinstance(vals, dict):
            raise ConfigError(f"config section '{sec}' must be a mapping of keys")
        cls = typing.get_type_hints(Config)[sec]
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        sub = {}
        for k, v in vals.items():
            if k not in fields:
                raise ConfigError(f"unknown config key '{sec}.{k}'; valid keys in '{sec}': "
                                  f"{', '.join(sorted(fields))}")
            sub[k] = _check_type(f"{sec}.{k}", v, hints[k])
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
                import yaml
                data = yaml.safe_load(text)
        except Exception as e:  # parse errors: say where
            raise ConfigError(f"config file '{path}' cannot be parsed ({e}); fix its syntax") from e
        cfg = from_dict(data)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that need no data. Data-dependent checks (delta < 1/N) run
    in :func:`validate_against_data` once the sensitive size is known."""
    p = cfg.privacy
    _require(p.target_epsilon > 0 and math.isfinite(p.target_epsilon),
             f"privacy.target_epsilon must be > 0, got {p.target_epsilon}; set e.g. 10")
    _require(p.lifetime_epsilon is None or p.lifetime_epsilon > 0,
             f"privacy.lifetime_epsilon must be > 0 or null, got {p.lifetime_epsilon}")
    if p.target_delta is not None:
        _require(0 < p.target_delta < 1,
                 f"privacy.target_delta must be in (0, 1), got {p.target_delta}; set e.g. 1e-5")
    _require(p.accountant in ("rdp", "prv"),
             f"privacy.accountant must be 'rdp' or 'prv', got '{p.accountant}'")
    s = cfg.selection
    _require(0 < s.selection_ratio <= 1,
             f"selection.selection_ratio must be in (0, 1], got {s.selection_ratio}; set e.g. 0.1")
    _require(s.sigma_q is None or s.sigma_q > 0,
             f"selection.sigma_q must be > 0 or null (calibrated from the share), got {s.sigma_q}")
    _require(0 < s.query_epsilon_share < 1,
             f"selection.query_epsilon_share must be in (0, 1), got {s.query_epsilon_share}; "
             "set e.g. 0.05")
    _require(0 < s.significance_alpha < 1,
             f"selection.significance_alpha must be in (0, 1), got {s.significance_alpha}")
    from privimage_core.query_budget import ON_INSIGNIFICANT
    _require(s.on_insignificant in ON_INSIGNIFICANT,
             f"selection.on_insignificant must be one of {', '.join(ON_INSIGNIFICANT)}, "
             f"got '{s.on_insignificant}'")
    for k in ("k1", "k2"):
        v = getattr(s, k)
        _require(v is None or v >= 1, f"selection.{k} must be >= 1 or null, got {v}")
    d = cfg.data
    _require(d.channels in (1, 3), f"data.channels must be 1 or 3, got {d.channels}")
    _require(8 <= d.image_size <= 256 and d.image_size % 4 == 0,
             f"data.image_size must be a multiple of 4 in [8, 256], got {d.image_size}")
    _require(len(d.public) > 0, "data.public must name at least one public source, e.g. [glyphs]")
    _require(d.sensitive_max is None, SENSITIVE_MAX_REFUSED)
    if d.class_names is not None:
        _require(len(d.class_names) > 0 and all(n.strip() for n in d.class_names)
                 and len(set(d.class_names)) == len(d.class_names),
                 "data.class_names must list distinct, non-empty class names, or be null")
    validate_training(cfg.pretrain, cfg.finetune)
    from privimage_core.methods import check_method
    check_method(cfg.method, cfg.generator.preset, cfg.pretrain.steps, cfg.pretrain.precision)
    _require(cfg.sampling.solver in ("euler", "heun"),
             f"sampling.solver must be 'euler' or 'heun', got '{cfg.sampling.solver}'")
    _require(0 <= cfg.generator.label_dropout < 1,
             f"generator.label_dropout must be in [0, 1), got {cfg.generator.label_dropout}")
    _require(cfg.sampling.guidance == 0 or cfg.generator.label_dropout > 0,
             "sampling.guidance > 0 needs a model trained with generator.label_dropout > 0 "
             "(e.g. 0.1); set one or sampling.guidance: 0")
    _require(cfg.sampling.guidance >= 0, "sampling.guidance must be >= 0")
    _require(cfg.sampling.num_images >= 1 and cfg.sampling.num_steps >= 1,
             "sampling.num_images and sampling.num_steps must be >= 1")
    _require(cfg.ray.num_workers >= 0, "ray.num_workers must be >= 0 (0 = in-process)")
    _require(cfg.ray.cpus_per_worker > 0, "ray.cpus_per_worker must be > 0 (Ray rejects 0 CPUs)")
    from privimage_core.config_infra import TRAIN_LOG_LEVELS
    _require(cfg.ray.train_log_level in TRAIN_LOG_LEVELS,
             f"ray.train_log_level must be one of {', '.join(TRAIN_LOG_LEVELS)}, "
             f"got '{cfg.ray.train_log_level}'")
    _require(cfg.ray.checkpoints_per_stage >= 1,
             f"ray.checkpoints_per_stage must be >= 1, got {cfg.ray.checkpoints_per_stage}; "
             "set e.g. 4")
    validate_evaluation(cfg.evaluation)
    validate_latent(cfg.latent)
    validate_tune(cfg.tune, set(cfg.flat()))


# Derived settings (resolved once the data is known), re-exported here.
from privimage_core.config_resolve import resolve_delta, resolve_k  # noqa: E402,F401
