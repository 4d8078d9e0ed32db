"""A run's privacy plan before it touches the data: the ledger its method
would hold at the end, from the config and public quantities only (N is
public in this project). The lifetime ledger charges this plan before the
first mechanism runs, so a run that dies is still counted; the stages then
calibrate exactly as planned (same accountant, same calibration)."""
from __future__ import annotations

from privimage_core.config import Config
from privimage_core.dp_finetune import DP_SGD_MECHANISM, plan_noise
from privimage_core.methods import Method
from privimage_core.privacy_ledger import PrivacyLedger
from privimage_core.query_budget import resolve_sigma_q
from privimage_core.semantic_distribution import QUERY_MECHANISM


def dp_mechanism_name(stage_name: str) -> str:
    """Each DP-SGD stage is its own ledger mechanism."""
    return DP_SGD_MECHANISM if stage_name == "finetune" else f"dp_sgd_{stage_name}"


def query_sigma(cfg: Config, delta: float) -> float:
    """The semantic query's noise multiplier for this run (config + delta)."""
    s, p = cfg.selection, cfg.privacy
    return resolve_sigma_q(s.sigma_q, s.query_epsilon_share, p.target_epsilon, delta, p.accountant)


def dp_record_count(cfg: Config, n: int) -> int:
    """The public record count DP-SGD's sampling rate is computed from: N,
    plus the m canaries of an audit run (each of which may or may not be in
    the training set; q must not say which: evaluation/canary_audit.py)."""
    e = cfg.evaluation
    return n + (e.canaries if e.canary_audit else 0)


def planned_ledger(cfg: Config, method: Method, n: int, delta: float) -> PrivacyLedger:
    """``n``: the sensitive dataset's size (canaries are added here)."""
    led = PrivacyLedger(cfg.privacy.target_epsilon, delta, cfg.privacy.accountant)
    n = dp_record_count(cfg, n)
    f = cfg.finetune
    for st in method.stages:
        if st.kind == "semantic_query":
            led.record_gaussian(QUERY_MECHANISM, query_sigma(cfg, delta), note="plan")
        elif st.kind == "dp_finetune":
            plan = dp_stage_plan(cfg, method, st)
            if plan is None:  # the config leaves this stage out
                continue
            mech = dp_mechanism_name(st.name)
            sigma, q, total = plan_noise(led, n, f.batch_size, plan.steps, f.noise_multiplier,
                                         mechanism=mech, epsilon_share=plan.epsilon_share)
            led.begin_dp_sgd(mech, sigma, q).steps = total
    return led


def dp_stage_plan(cfg: Config, method: Method, stage):
    """The family's DPStagePlan of a dp_finetune stage (None: skipped)."""
    from privimage_core.models import get_family
    return get_family(method.family).dp_stage_plan(cfg, stage.options.get("part"))
