"""The method registry: each method is plain data, a model family and a list
of stages (in the spirit of jax_privacy's method configs). The driver runs
the stages in order; adding a method is one entry here, no driver change.

Stage kinds (what each does lives in ``services/stages/``):
  public_index     build the Parquet index of the public pool        (public)
  query_function   train the semantic query function on it           (public, Sec. 3.2)
  semantic_query   DP histogram of the sensitive data's semantics,
                   then the top-k2 selection                          (DP, Sec. 3.3)
  pretrain         train the generator on public data without DP      (public, Sec. 3.4)
                   option data: "selection" (PrivImage) or "public_pool"
                   (PDP-Diffusion: the whole pool, no query)
  dp_finetune      DP-SGD on the sensitive data                       (DP, Algorithm 1)
                   option part: which part of a multi-part family this
                   stage trains (the family's dp_stage_plan says its steps,
                   learning rate and budget share, or that it is skipped);
                   option release: this stage's model is the release (the
                   method's last DP-SGD stage; earlier ones hand their DP
                   output on to the next)
  synthesize       sample the synthetic dataset from the DP model     (post-processing)
  evaluate         fidelity, utility, privacy audit                   (non-private)

Every DP stage is its own ledger mechanism (named after the stage); the
ledger composes them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from privimage_core.errors import ConfigError
from privimage_core.models import FAMILY_NAMES, build_model, get_family

STAGE_KINDS = ("public_index", "query_function", "semantic_query", "pretrain", "dp_finetune",
               "synthesize", "evaluate")
# Stages that read the sensitive data through a DP mechanism.
DP_STAGE_KINDS = ("semantic_query", "dp_finetune")
PRETRAIN_DATA = ("selection", "public_pool")


@dataclass(frozen=True)
class Stage:
    kind: str
    # Unique within a method: names the MLflow stage run, the state entry,
    # the Ray Train run and (for DP stages) the ledger mechanism.
    name: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind '{self.kind}'")
        data = self.options.get("data")
        if self.kind == "pretrain" and data not in PRETRAIN_DATA:
            raise ValueError(f"pretrain stage needs options data in {PRETRAIN_DATA}")
        if self.options.get("release") and self.kind != "dp_finetune":
            raise ValueError(f"stage '{self.name}': only a dp_finetune stage can be the release")

    @property
    def is_release(self) -> bool:
        return bool(self.options.get("release"))


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    stages: tuple[Stage, ...]
    summary: str

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(names) != len(set(names)):
            raise ValueError(f"method '{self.name}': stage names must be unique, got {names}")
        dp = [s for s in self.stages if s.kind == "dp_finetune"]
        if dp and [s.name for s in dp if s.is_release] != [dp[-1].name]:
            raise ValueError(f"method '{self.name}': its last dp_finetune stage, and only that "
                             "one, must have options release: True")

    def has(self, kind: str) -> bool:
        return any(s.kind == kind for s in self.stages)

    @property
    def release_stage(self) -> Stage:
        return next(s for s in self.stages if s.is_release)


# Sampling from the release and its evaluation end every method.
_RELEASE = (Stage("synthesize", "synthesize"), Stage("evaluate", "evaluate"))


def _privimage(family: str) -> tuple[Stage, ...]:
    return (Stage("public_index", "index"), Stage("query_function", "semantic_query"),
            Stage("semantic_query", "selection"),
            Stage("pretrain", "pretrain", {"data": "selection"}),
            Stage("dp_finetune", "finetune", {"release": True})) + _RELEASE


def _pdp() -> tuple[Stage, ...]:
    return (Stage("public_index", "index"),
            Stage("pretrain", "pretrain", {"data": "public_pool"}),
            Stage("dp_finetune", "finetune", {"release": True})) + _RELEASE


def _latent() -> tuple[Stage, ...]:
    # Seed 003: the autoencoder's DP stage first (its share of epsilon, or
    # skipped when frozen), then the latent model's on the remainder.
    return (Stage("public_index", "index"), Stage("query_function", "semantic_query"),
            Stage("semantic_query", "selection"),
            Stage("pretrain", "pretrain", {"data": "selection"}),
            Stage("dp_finetune", "finetune_autoencoder", {"part": "autoencoder"}),
            Stage("dp_finetune", "finetune", {"part": "latent", "release": True})) + _RELEASE


def _from_scratch() -> tuple[Stage, ...]:
    return (Stage("dp_finetune", "finetune", {"release": True}),) + _RELEASE


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("privimage", "diffusion", _privimage("diffusion"),
           "Privimage+D: DP semantic query, pre-train on the selected public semantics, "
           "DP-SGD fine-tuning (Li et al. 2024)"),
    Method("pdp_diffusion", "diffusion", _pdp(),
           "PDP-Diffusion: pre-train on the whole public pool, all of epsilon to DP-SGD "
           "(Sehwag et al. / Ghalebikesabi et al. 2023)"),
    Method("dpdm", "diffusion", _from_scratch(),
           "DPDM: DP-SGD from random initialisation, no public data (Dockhorn et al. 2022)"),
    Method("privimage_g", "gan", _privimage("gan"),
           "Privimage+G: the PrivImage selection with a GAN (paper App. C)"),
    Method("dpgan", "gan", _from_scratch(),
           "DPGAN: a GAN whose discriminator is trained with DP-SGD from scratch"),
    Method("dp_ldm", "latent_diffusion", _latent(),
           "DP-LDM: an autoencoder and a latent diffusion model pre-trained on the "
           "PrivImage selection, each fine-tuned with DP-SGD (Ge, Zhang & Sun 2024)"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method '{name}' is unknown; use one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def check_method(name: str, preset: str, pretrain_steps: int,
                 pretrain_precision: str = "auto") -> Method:
    """The method, or one clear error for combinations it cannot run."""
    m = get_method(name)
    if m.family not in FAMILY_NAMES:
        raise ConfigError(f"method '{name}' needs the '{m.family}' model family, which this "
                          f"installation does not have (known: {', '.join(FAMILY_NAMES)}); "
                          "choose another method")
    fam = get_family(m.family)
    if preset not in fam.presets:
        raise ConfigError(f"generator.preset '{preset}' is not a preset of the {m.family} family "
                          f"(method '{name}'); use one of {', '.join(fam.presets)}")
    if m.has("pretrain") and pretrain_steps < 1:
        raise ConfigError(f"method '{name}' pre-trains but pretrain.steps is {pretrain_steps}; "
                          "set pretrain.steps >= 1, or use method dpdm / dpgan for no pre-training")
    if pretrain_precision not in ("auto", *fam.public_precisions):
        raise ConfigError(f"pretrain.precision '{pretrain_precision}' is not one the {m.family} "
                          f"family pre-trains in (method '{name}'); use auto or one of "
                          f"{', '.join(fam.public_precisions)}")
    return m


def guided(name: str) -> bool:
    """Whether the method's model family samples with classifier-free
    guidance (and trains the null label it needs)."""
    m = get_method(name)
    return m.family in FAMILY_NAMES and get_family(m.family).guidance


def check_guidance(cfg) -> None:
    """One clear error for guidance the method's family cannot use, or a
    guidance scale without the null label trained (label dropout 0)."""
    if cfg.sampling.guidance == 0:
        return
    if not guided(cfg.method):
        raise ConfigError(f"sampling.guidance {cfg.sampling.guidance:g}: method '{cfg.method}' "
                          f"samples from the {get_method(cfg.method).family} family, which has "
                          "no classifier-free guidance; set sampling.guidance: 0")
    if cfg.generator.label_dropout == 0:
        raise ConfigError("sampling.guidance > 0 needs a model trained with "
                          "generator.label_dropout > 0 (e.g. 0.1); set one or sampling.guidance: 0")


def check_trainable(cfg, num_classes: int = 2) -> tuple[int, int] | None:
    """One clear error unless ``finetune.trainable`` (when set) matches a
    parameter of the module the method's release stage trains with DP-SGD,
    and that module is (part of) the released one; else (trained, total)
    trainable scalars of that module, None when no pattern is set. Builds the
    model once (parameter names do not depend on ``num_classes``; the counts do)."""
    if cfg.finetune.trainable is None:
        return None
    # lazy: Opacus loads only when a pattern is set (the config imports this module)
    from privimage_core.dp_sgd.finetune import restrict_trainable
    m = get_method(cfg.method)
    fam = get_family(m.family)
    part = next(s for s in m.stages if s.is_release).options.get("part")
    try:
        model = build_model(cfg, m.family, num_classes)
    except Exception:  # noqa: BLE001 (bad generator settings: the generator check names them)
        return None
    module, released = fam.dp_module(model, part), fam.release_module(model)
    if not any(sub is module for sub in released.modules()):
        raise ConfigError(f"finetune.trainable: method '{cfg.method}' trains its "
                          f"{type(module).__name__} with DP-SGD and releases another network "
                          "trained from it, which the pattern would not restrict; set "
                          "finetune.trainable: null")
    total = sum(p.numel() for p in module.parameters() if p.requires_grad)
    try:
        return restrict_trainable(module, cfg.finetune.trainable), total
    except ValueError as e:
        raise ConfigError(f"finetune.trainable {e} of the module method '{cfg.method}' "
                          "fine-tunes; change the pattern or set null to train every "
                          "parameter") from None
