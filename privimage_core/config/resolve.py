"""Settings derived from other settings or once the data is known: null
defaults that depend on other keys, delta from N, (k1, k2) from the number of
public labels and sensitive classes."""
from __future__ import annotations

import math

from privimage_core.config.schema import Config
from privimage_core.errors import ConfigError


def resolve_defaults(cfg: Config) -> Config:
    """``cfg`` with the null defaults that depend on other keys filled in
    (pretrain.steps and finetune.lr by data.channels), so that a run
    records and resumes with the numbers it used."""
    c = cfg.data.channels
    fill = {}
    if cfg.pretrain.steps is None:
        fill["pretrain.steps"] = cfg.pretrain.resolved_steps(c)
    if cfg.finetune.lr is None:
        fill["finetune.lr"] = cfg.finetune.resolved_lr(c)
    # one copy, validated once (validation may build the model)
    return cfg.with_overrides(fill) if fill else cfg


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
                          f"for the dataset's public size N={n_sensitive}; set e.g. "
                          f"{0.1 / n_sensitive:.1g}")
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
