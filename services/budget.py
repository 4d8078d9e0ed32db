"""A run's budget before its first stage: the public dataset size, delta, the
privacy plan, and the lifetime ledger's reservation, in the order that
charges every mechanism before it reads the sensitive data.

Fresh run, size public (declared, built-in, a subsample's): plan, reserve
the plan, start. Fresh run, size unknown: reserve the size query alone, run
it (privacy/dataset_size.py), then plan with the estimate and grow the
reservation to the whole plan. A resumed run reads the size, the plan and
the ledger from its state and keeps its reservation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privimage_core.config import Config, resolve_delta
from privimage_core.data.provenance import dataset_identity
from privimage_core.data.subsample import source_digest
from privimage_core.methods import Method
from privimage_core.privacy import lifetime as lifetime_ledger
from privimage_core.privacy.dataset_size import (SIZE_MECHANISM, PublicSize, estimate_size,
                                                 known_size, size_noise_multiplier)
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.privacy.plan import PrivacyPlan, plan_run
from services.run_store import save_state


@dataclass
class Budget:
    size: PublicSize
    delta: float
    plan: PrivacyPlan
    lifetime: lifetime_ledger.LifetimeLedger
    # The run's ledger before its first stage (the size query, when estimated).
    ledger: PrivacyLedger


def open_lifetime(cfg: Config, delta: float) -> lifetime_ledger.LifetimeLedger:
    """The lifetime ledger of the run's sensitive dataset (keyed by its
    identity, stored locally, never released); a ledger kept under the data's
    content digest (the earlier key) is folded in first."""
    d = cfg.data
    store = Path(cfg.run.ledger_store or Path(cfg.run.output_dir) / "lifetime_ledgers").resolve()
    identity = dataset_identity(d.sensitive, "train", cfg.privacy.dataset_id)
    led = lifetime_ledger.open(store, lifetime_ledger.dataset_key(identity),
                               cfg.privacy.lifetime_epsilon, delta, cfg.privacy.accountant)
    if any(p.stem != led.digest for p in store.glob("*.json")):
        led.absorb(source_digest(d.sensitive, "train", d.class_names))
    return led


def prepare_budget(cfg: Config, method: Method, n_records: int, state: dict, run_dir: Path,
                   log=print) -> Budget:
    """Size, delta, plan and the lifetime reservation of the run in
    ``run_dir`` (``state`` is its saved state, updated and saved here before
    any mechanism runs). ``n_records``: the sensitive dataset's true size,
    read only by the size query."""
    p = cfg.privacy
    size = PublicSize(**state["dataset_size"]) if "dataset_size" in state else known_size(cfg)
    if size is None:  # the DP size query: reserved, then run, then saved
        delta0 = p.target_delta if p.target_delta is not None else 1e-5
        sigma = size_noise_multiplier(cfg, delta0)
        first = PrivacyLedger(p.target_epsilon, delta0, p.accountant)
        first.record_gaussian(SIZE_MECHANISM, sigma, note="plan")
        open_lifetime(cfg, delta0).reserve(str(run_dir), first.state_dict())
        size = estimate_size(n_records, sigma, PrivacyLedger(p.target_epsilon, delta0,
                                                             p.accountant))
        state["dataset_size"] = size.to_dict()
        save_state(run_dir, state)
        log(f"[privimage] dataset size: {size.value} (DP estimate, noise std {sigma:.3g}; "
            f"{p.size_epsilon_share:g} of epsilon; declare privacy.dataset_size to skip it)")
    state["dataset_size"] = size.to_dict()
    if "privacy_plan" in state:
        plan = PrivacyPlan.from_dict(state["privacy_plan"])
    else:
        plan = plan_run(cfg, method, size.value, resolve_delta(cfg, size.value),
                        size_sigma=size.noise_multiplier)
        state["privacy_plan"] = plan.to_dict()
    lifetime = open_lifetime(cfg, plan.delta)
    lifetime.reserve(str(run_dir), plan.ledger().state_dict())  # grows a size-only reservation
    ledger = PrivacyLedger(p.target_epsilon, plan.delta, p.accountant)
    if size.noise_multiplier is not None:
        ledger.record_gaussian(SIZE_MECHANISM, size.noise_multiplier)
    return Budget(size, plan.delta, plan, lifetime, ledger)
