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
    # Noise multiplier of the histogram query; noise std is sigma_q * sqrt(k1).
    sigma_q: float = 100.0


@dataclass
class PrivacyConfig:
    target_epsilon: float = 10.0
    # None: 1e-5, or 0.1/N when N is so small that 1e-5 >= 1/N (resolve_delta).
    target_delta: float | None = None
    accountant: str = "rdp"


@dataclass
class GeneratorConfig:
    preset: str = "tiny"
    # Overrides of the preset's UNet arguments (e.g. base_channels).
    overrides: dict = field(default_factory=dict)


@dataclass
class PretrainConfig:
    steps: int = 900
    batch_size: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.995


@dataclass
class FinetuneConfig:
    """DP-SGD fine-tuning (Sec. 3.4, Algorithm 1)."""
    # Planned optimizer steps; training stops earlier if the budget would be exceeded.
    steps: int = 60
    # Expected logical batch size (Poisson sampling rate = batch_size / N).
    batch_size: int = 512
    # Physical batch for memory (BatchMemoryManager virtual steps).
    physical_batch_size: int = 128
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    # None: calibrated from the target epsilon after the query's cost.
    noise_multiplier: float | None = None
    # Few DP steps: a short EMA horizon, else the EMA stays at the pre-trained weights.
    ema_decay: float = 0.9


@dataclass
class SamplingConfig:
    num_images: int = 3000
    num_steps: int = 18
    solver: str = "euler"
    batch_size: int = 500


@dataclass
class EvaluationConfig:
    """What the evaluator measures (privimage_core/evaluation/suite.py). All of
    it is non-private evaluation (real test split; the ceiling and the
    membership audit also read the sensitive training set). Defaults keep the
    quickstart's evaluation under about 3 minutes on 2 CPU cores: FID-Inception
    (~3-5 images/s there) dominates; the real side's features are cached."""
    # Semantic distribution similarity (paper Eq. 5) of the sensitive classes
    # to the selected public data and to the whole public pool, computed by
    # the selector from the noisy histograms (a DP output) and public counts:
    # the one metric here that is private (evaluation/semantic_similarity.py).
    sds: bool = True
    fid: bool = True
    # Images per side for FID and precision/recall (one Inception pass serves
    # both). FID is biased upward at small N: compare runs only at equal N;
    # the paper uses 5,000 (configs/cluster.yaml).
    fid_images: int = 200
    fid_weights: str | None = None
    # Precision/recall in the FID features (computed only when fid is on).
    precision_recall: bool = True
    pr_k: int = 3
    # The headline classifier (summary "accuracy", utility matrix).
    classifier: str = "cnn"
    # Classifiers trained on synthetic data, tested on the real test split.
    classifiers: list[str] = field(default_factory=lambda: ["lr", "mlp", "cnn"])
    classifier_epochs: int = 8
    # LR / MLP train on at most this many images, with these iteration caps.
    sklearn_max_images: int = 2000
    lr_max_iter: int = 50
    mlp_max_iter: int = 15
    # "Train on real" ceiling on a subset of the SENSITIVE training set (non-private).
    real_ceiling: bool = True
    ceiling_images: int = 1000
    # Real/synthetic utility matrix; synthetic images held out as its synthetic test set.
    utility_matrix: bool = True
    utility_holdout: int = 500
    # Detector attack (real vs synthetic classifier) on this many images per side.
    detector: bool = True
    detector_images: int = 400
    detector_kind: str = "cnn"
    detector_min_steps: int = 100
    # Loss-threshold membership inference on the DP generator.
    mia: bool = True
    mia_members: int = 500
    mia_nonmembers: int = 500
    mia_noise_levels: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    mia_repeats: int = 1
    mia_confidence: float = 0.95


@dataclass
class RayConfig:
    # None: start a local Ray bound to 127.0.0.1 (or join the job's cluster
    # when running under `ray job submit`).
    address: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 2.0
    storage_path: str | None = None
    max_failures: int = 0


@dataclass
class TrackingConfig:
    # None: sqlite:///<abs output_dir>/mlflow.db
    mlflow_uri: str | None = None
    experiment: str = "privimage"


@dataclass
class MetricsConfig:
    """Live metrics go through Ray's metrics API (services/metrics.py) and are
    served by each Ray node's metrics agent, which binds to the node's address
    (127.0.0.1 for the local Ray this program starts). ``port`` pins the local
    Ray's metrics export port (0: Ray picks a free one); on a cluster it is
    ``ray start --metrics-export-port``."""
    enabled: bool = True
    port: int = 0


@dataclass
class TuneConfig:
    presets: list[str] = field(default_factory=lambda: ["tiny", "small"])
    selection_ratios: list[float] = field(default_factory=lambda: [0.05, 0.1])
    num_samples: int = 1
    metric: str = "accuracy"
    mode: str = "max"
    max_concurrent_trials: int = 1
    # The trial function only drives; its actors and Ray Train workers ask for
    # their own CPUs, so the trial itself holds a small fraction (0 is rejected).
    cpus_per_trial: float = 0.1


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    semantic_query: SemanticQueryConfig = field(default_factory=SemanticQueryConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
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
        out: dict[str, Any] = {}
        for sec, vals in self.to_dict().items():
            for k, v in vals.items():
                out[f"{sec}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
        return out

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        """A copy with dotted-key overrides applied (e.g. {'generator.preset': 'small'})."""
        d = self.to_dict()
        for key, value in overrides.items():
            sec, _, name = key.partition(".")
            if sec not in d or name not in d[sec]:
                raise ConfigError(f"unknown config key '{key}'; use a dotted key such as "
                                  "'generator.preset' (see configs/quickstart.yaml)")
            d[sec][name] = value
        return from_dict(d)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int)
                                           or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(key, v, args[0]) for v in value]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(d: dict | None) -> Config:
    """Build and validate a Config; unknown keys are errors, never ignored."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError("the config must be a mapping of sections (run:, data:, ...)")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for sec, vals in d.items():
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


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Range checks that need no data. Data-dependent checks (delta < 1/N) run
    in :func:`validate_against_data` once the sensitive size is known."""
    p = cfg.privacy
    _require(p.target_epsilon > 0 and math.isfinite(p.target_epsilon),
             f"privacy.target_epsilon must be > 0, got {p.target_epsilon}; set e.g. 10")
    if p.target_delta is not None:
        _require(0 < p.target_delta < 1,
                 f"privacy.target_delta must be in (0, 1), got {p.target_delta}; set e.g. 1e-5")
    _require(p.accountant in ("rdp", "prv"),
             f"privacy.accountant must be 'rdp' or 'prv', got '{p.accountant}'")
    s = cfg.selection
    _require(0 < s.selection_ratio <= 1,
             f"selection.selection_ratio must be in (0, 1], got {s.selection_ratio}; set e.g. 0.1")
    _require(s.sigma_q > 0, f"selection.sigma_q must be > 0, got {s.sigma_q}")
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
    f = cfg.finetune
    _require(f.steps >= 1 and f.batch_size >= 1 and f.physical_batch_size >= 1,
             "finetune.steps, batch_size and physical_batch_size must be >= 1")
    _require(f.max_grad_norm > 0, f"finetune.max_grad_norm must be > 0, got {f.max_grad_norm}")
    _require(f.noise_multiplier is None or f.noise_multiplier > 0,
             "finetune.noise_multiplier must be > 0 or null (calibrated)")
    _require(cfg.pretrain.steps >= 0, "pretrain.steps must be >= 0")
    for sec in ("pretrain", "finetune"):
        dec = getattr(cfg, sec).ema_decay
        _require(0 <= dec < 1, f"{sec}.ema_decay must be in [0, 1), got {dec}")
    _require(cfg.generator.preset in ("tiny", "small", "base"),
             f"generator.preset must be tiny, small or base, got '{cfg.generator.preset}'")
    _require(cfg.sampling.solver in ("euler", "heun"),
             f"sampling.solver must be 'euler' or 'heun', got '{cfg.sampling.solver}'")
    _require(cfg.sampling.num_images >= 1 and cfg.sampling.num_steps >= 1,
             "sampling.num_images and sampling.num_steps must be >= 1")
    _require(cfg.ray.num_workers >= 0, "ray.num_workers must be >= 0 (0 = in-process)")
    _require(cfg.ray.cpus_per_worker > 0, "ray.cpus_per_worker must be > 0 (Ray rejects 0 CPUs)")
    _validate_evaluation(cfg.evaluation)
    t = cfg.tune
    _require(all(0 < r <= 1 for r in t.selection_ratios),
             "tune.selection_ratios must all be in (0, 1]")
    _require(all(pr in ("tiny", "small", "base") for pr in t.presets),
             "tune.presets must be among tiny, small, base")
    _require(t.mode in ("max", "min"), "tune.mode must be 'max' or 'min'")
    _require(t.metric in ("accuracy", "fid"),
             f"tune.metric must be 'accuracy' (mode max) or 'fid' (mode min), got '{t.metric}'")


def _validate_evaluation(e: EvaluationConfig) -> None:
    kinds = ("cnn", "mlp", "lr")
    _require(e.classifier in kinds, "evaluation.classifier must be cnn, mlp or lr")
    _require(all(k in kinds for k in e.classifiers),
             f"evaluation.classifiers must be among cnn, mlp, lr, got {e.classifiers}")
    _require(e.detector_kind in kinds, "evaluation.detector_kind must be cnn, mlp or lr")
    _require(e.pr_k >= 1, f"evaluation.pr_k must be >= 1, got {e.pr_k}")
    _require(e.fid_images > e.pr_k and e.fid_images >= 2,
             f"evaluation.fid_images must be >= 2 and > evaluation.pr_k, got {e.fid_images}; set e.g. 200")
    for k in ("classifier_epochs", "sklearn_max_images", "lr_max_iter", "mlp_max_iter",
              "ceiling_images", "utility_holdout", "detector_min_steps", "mia_repeats"):
        _require(getattr(e, k) >= 1, f"evaluation.{k} must be >= 1, got {getattr(e, k)}")
    _require(e.detector_images >= 4,
             f"evaluation.detector_images must be >= 4, got {e.detector_images}; set e.g. 400")
    for k in ("mia_members", "mia_nonmembers"):
        _require(getattr(e, k) >= 2, f"evaluation.{k} must be >= 2, got {getattr(e, k)}; set e.g. 500")
    _require(len(e.mia_noise_levels) >= 1 and all(
        0 < s < 1000 and math.isfinite(s) for s in e.mia_noise_levels),
        f"evaluation.mia_noise_levels must be a non-empty list of sigmas in (0, 1000), "
        f"got {e.mia_noise_levels}; set e.g. [0.1, 0.3, 1.0]")
    _require(0 < e.mia_confidence < 1,
             f"evaluation.mia_confidence must be in (0, 1), got {e.mia_confidence}; set e.g. 0.95")


def resolve_delta(cfg: Config, n_sensitive: int) -> float:
    """The delta used for the run: the configured one, checked against 1/N.

    delta >= 1/N would allow releasing a whole record; we refuse it (Sec. 2.1).
    """
    delta = cfg.privacy.target_delta
    if delta is None:
        # 1e-5 as DPDM and PrivImage use for MNIST/CIFAR-10, unless N is so
        # small that 1e-5 >= 1/N; then 0.1/N.
        delta = 1e-5 if 1e-5 < 1.0 / n_sensitive else 0.1 / n_sensitive
    if delta >= 1.0 / n_sensitive:
        raise ConfigError(f"privacy.target_delta={delta:g} must be < 1/N = {1.0 / n_sensitive:.3g} "
                          f"for N={n_sensitive} sensitive images; set e.g. {0.1 / n_sensitive:.1g}")
    return delta


def resolve_k(cfg: Config, num_public_labels: int, num_sensitive_classes: int) -> tuple[int, int]:
    """(k1, k2): k2 from the selection ratio (Table 8), k1 = k2 unless set (App. A)."""
    s = cfg.selection
    # floor (+ a tolerance for float error): a ratio never selects more than it says
    k2 = s.k2 if s.k2 is not None else max(
        1, math.floor(s.selection_ratio * num_public_labels / num_sensitive_classes + 1e-9))
    k1 = s.k1 if s.k1 is not None else k2
    if k1 > num_public_labels:
        raise ConfigError(f"selection.k1={k1} exceeds the {num_public_labels} public labels; lower it")
    if k2 * num_sensitive_classes > num_public_labels:
        raise ConfigError(f"selection asks for {k2} public labels per class x {num_sensitive_classes} "
                          f"classes but the public pool has {num_public_labels}; lower "
                          "selection.selection_ratio or add public sources")
    return k1, k2
