"""A run's privacy plan, computed once, before it touches the data.

From the config and public quantities only (the dataset's public size,
privacy/dataset_size.py, never the true N), the plan fixes every mechanism
the method will run: the size query's noise multiplier when the size is
estimated, the semantic query's, and, for each DP-SGD stage, its noise
multiplier sigma, Poisson rate q and number of steps. The lifetime ledger
charges the plan's final ledger before the first mechanism runs (so a run
that dies is still counted); the semantic query and every DP stage then run
exactly what the plan says, the Ray Train worker checks that its loader's
rate is the planned q, and the plan is saved in the run's state so a resumed
run continues under the same one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from privimage_core.errors import PrivacyBudgetError
from privimage_core.models import get_family
from privimage_core.privacy.dataset_size import SIZE_MECHANISM
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.privacy.query_budget import resolve_sigma_q
from privimage_core.selection.distribution import QUERY_MECHANISM


def dp_mechanism_name(stage_name: str) -> str:
    """Each DP-SGD stage is its own ledger mechanism, named after the stage."""
    return f"dp_sgd_{stage_name}"


# The mechanism of a method whose one DP-SGD stage is called "finetune".
DP_SGD_MECHANISM = dp_mechanism_name("finetune")


def sample_rate_for(n: int, batch_size: int) -> float:
    """Opacus's Poisson rate for N records and this expected batch:
    1 / len(DataLoader(range(N), batch_size)) = 1 / ceil(N / batch_size)."""
    return 1.0 / math.ceil(n / batch_size)


def plan_noise(ledger: PrivacyLedger, n: int, batch_size: int, steps: int,
               noise_multiplier: float | None = None,
               mechanism: str = DP_SGD_MECHANISM,
               epsilon_share: float | None = None) -> tuple[float, float, int]:
    """(sigma, q, total): the DP-SGD record may hold ``total`` steps when
    fine-tuning ends (``dp_sgd.finetune.dp_finetune`` runs until it does).
    sigma is calibrated after the costs already in the ledger (App. E,
    Theorem E.3) unless given; with ``epsilon_share`` (a stage of several,
    e.g. dp_ldm's autoencoder) it is calibrated so that this stage ALONE costs
    at most that share of the target, leaving the rest to later stages. total
    is capped so that the composition never exceeds the target. A ledger
    that already holds the mechanism keeps its recorded (sigma, q) and its
    steps count toward ``steps``."""
    q = sample_rate_for(n, batch_size)
    prior = next((r for r in ledger.records if r.name == mechanism), None)
    if prior is not None:
        sigma = prior.noise_multiplier
        remaining = max(0, steps - prior.steps)
        further = min(remaining, ledger.max_steps(sigma, prior.sample_rate))
        return sigma, prior.sample_rate, prior.steps + further
    if noise_multiplier is not None:
        sigma = noise_multiplier
    elif epsilon_share is not None:
        alone = PrivacyLedger(epsilon_share * ledger.target_epsilon, ledger.target_delta,
                              ledger.accountant_name)
        sigma = alone.calibrate_noise(q, steps)
    else:
        sigma = ledger.calibrate_noise(q, steps)
    allowed = ledger.max_steps(sigma, q)
    if allowed == 0:
        raise PrivacyBudgetError(
            f"not one DP-SGD step fits the remaining budget at sigma={sigma:.3g}; raise "
            "privacy.target_epsilon or finetune.noise_multiplier")
    return sigma, q, min(steps, allowed)


def query_sigma(cfg, delta: float) -> float:
    """The semantic query's noise multiplier for this run (config + delta)."""
    s, p = cfg.selection, cfg.privacy
    return resolve_sigma_q(s.sigma_q, s.query_epsilon_share, p.target_epsilon, delta, p.accountant)


def dp_record_count(cfg, n: int) -> int:
    """The public record count DP-SGD's sampling rate is computed from: N,
    plus the m canaries of an audit run (each of which may or may not be in
    the training set; q must not say which: evaluation/canary_audit.py)."""
    e = cfg.evaluation
    return n + (e.canaries if e.canary_audit else 0)


@dataclass(frozen=True)
class DPSGDPlan:
    """One DP-SGD stage as planned: what its worker runs and the ledger records."""
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    total_steps: int
    # The record count q is computed from (N, plus the canaries of an audit run).
    num_records: int
    batch_size: int
    lr: float
    # Set when the stage's noise was calibrated to cost that share of epsilon alone.
    epsilon_share: float | None = None


@dataclass
class PrivacyPlan:
    target_epsilon: float
    delta: float
    accountant: str
    # None: the dataset's size is public (no size query).
    size_sigma: float | None = None
    # None: the method runs no semantic query.
    query_sigma: float | None = None
    # DP stage name -> its plan, in the method's order; None: the config skips it.
    stages: dict[str, DPSGDPlan | None] = field(default_factory=dict)

    def ledger(self) -> PrivacyLedger:
        """The ledger the run holds when every planned mechanism has run."""
        led = PrivacyLedger(self.target_epsilon, self.delta, self.accountant)
        if self.size_sigma is not None:
            led.record_gaussian(SIZE_MECHANISM, self.size_sigma, note="plan")
        if self.query_sigma is not None:
            led.record_gaussian(QUERY_MECHANISM, self.query_sigma, note="plan")
        for p in self.stages.values():
            if p is not None:
                led.begin_dp_sgd(p.mechanism, p.noise_multiplier, p.sample_rate).steps = \
                    p.total_steps
        return led

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PrivacyPlan":
        stages = {k: None if v is None else DPSGDPlan(**v) for k, v in d["stages"].items()}
        return cls(**{**d, "stages": stages})


def plan_run(cfg, method, n: int, delta: float, size_sigma: float | None = None) -> PrivacyPlan:
    """The privacy plan of ``method`` on a sensitive dataset of public size
    ``n`` (canaries are added here), stage by stage against the composed
    ledger; ``size_sigma``: the size query's noise when the size was
    estimated (privacy/dataset_size.py)."""
    p = cfg.privacy
    plan = PrivacyPlan(p.target_epsilon, delta, p.accountant, size_sigma=size_sigma)
    led = PrivacyLedger(p.target_epsilon, delta, p.accountant)
    if size_sigma is not None:
        led.record_gaussian(SIZE_MECHANISM, size_sigma, note="plan")
    records = dp_record_count(cfg, n)
    f = cfg.finetune
    family = get_family(method.family)
    for st in method.stages:
        if st.kind == "semantic_query":
            plan.query_sigma = query_sigma(cfg, delta)
            led.record_gaussian(QUERY_MECHANISM, plan.query_sigma, note="plan")
        elif st.kind == "dp_finetune":
            sp = family.dp_stage_plan(cfg, st.options.get("part"))
            if sp is None:  # the config leaves this stage out
                plan.stages[st.name] = None
                continue
            mech = dp_mechanism_name(st.name)
            sigma, q, total = plan_noise(led, records, f.batch_size, sp.steps, f.noise_multiplier,
                                         mechanism=mech, epsilon_share=sp.epsilon_share)
            led.begin_dp_sgd(mech, sigma, q).steps = total
            plan.stages[st.name] = DPSGDPlan(mech, sigma, q, total, records, f.batch_size, sp.lr,
                                             sp.epsilon_share)
    return plan


def planned_ledger(cfg, method, n: int, delta: float,
                   size_sigma: float | None = None) -> PrivacyLedger:
    """The ledger ``method`` would hold at the end (``plan_run(...).ledger()``)."""
    return plan_run(cfg, method, n, delta, size_sigma).ledger()
