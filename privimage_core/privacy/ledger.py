"""The privacy ledger: every mechanism that reads sensitive data, composed.

PrivImage spends budget in two places (paper App. E, Theorem E.2):
  1. the semantic distribution query, one Gaussian mechanism at sampling rate 1
     whose noise multiplier is sigma_q (noise std sigma_q * sqrt(k1) over an L2
     sensitivity of sqrt(k1), Theorem 3.1);
  2. each DP-SGD step, a Poisson-subsampled Gaussian mechanism (q, sigma).

The ledger keeps named records of these mechanisms and composes them with an
Opacus accountant (RDP by default, PRV selectable). It never does privacy
arithmetic itself: epsilon always comes from ``accountant.get_epsilon``. The
records are the single source of truth; they are saved in every checkpoint
(``state_dict``) so that a resumed run continues its ledger.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from opacus.accountants import create_accountant
from opacus.accountants.rdp import RDPAccountant

from privimage_core.errors import PrivacyBudgetError

# Opacus's default orders stop at 63; at epsilon ~10 the optimum can sit at the
# largest order (Opacus warns). More orders only tighten the RDP conversion.
RDP_ALPHAS = RDPAccountant.DEFAULT_ALPHAS + [64, 80, 96, 128, 160, 192, 256, 384, 512]


@dataclass
class MechanismRecord:
    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    note: str = ""


class PrivacyLedger:
    def __init__(self, target_epsilon: float, target_delta: float, accountant: str = "rdp"):
        if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise PrivacyBudgetError(f"target epsilon must be > 0, got {target_epsilon}; set e.g. 10")
        if not (0 < target_delta < 1):
            raise PrivacyBudgetError(f"target delta must be in (0, 1), got {target_delta}")
        if accountant not in ("rdp", "prv"):
            raise PrivacyBudgetError(f"accountant must be 'rdp' or 'prv', got '{accountant}'")
        self.target_epsilon = float(target_epsilon)
        self.target_delta = float(target_delta)
        self.accountant_name = accountant
        self.records: list[MechanismRecord] = []

    # ------------------------------------------------------------ accounting
    def _accountant(self, records: list[MechanismRecord]):
        acc = create_accountant(mechanism=self.accountant_name)
        acc.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in records if r.steps > 0]
        return acc

    def _epsilon_of(self, records: list[MechanismRecord]) -> float:
        if not any(r.steps > 0 for r in records):
            return 0.0
        acc = self._accountant(records)
        if self.accountant_name == "rdp":
            return float(acc.get_epsilon(delta=self.target_delta, alphas=RDP_ALPHAS))
        return float(acc.get_epsilon(delta=self.target_delta))

    def epsilon(self) -> float:
        """Epsilon spent so far at the target delta (composition of all records)."""
        return self._epsilon_of(self.records)

    def epsilon_of(self, prefix: str) -> float:
        """Epsilon of the mechanisms whose names start with ``prefix`` alone:
        what a record that enters only those mechanisms is protected by (the
        canary audit's canaries enter DP-SGD, never the queries)."""
        return self._epsilon_of([r for r in self.records if r.name.startswith(prefix)])

    def steps_of(self, name: str) -> int:
        """Steps recorded so far for the mechanism ``name`` (0 if none)."""
        return sum(r.steps for r in self.records if r.name == name)

    def epsilon_at(self, name: str, steps: int) -> float:
        """Epsilon had the mechanism ``name`` taken ``steps`` steps (the
        others as recorded): the curve of a DP-SGD stage, computed from public
        parameters after the fact instead of being timed while it ran."""
        recs = [replace(r, steps=steps) if r.name == name else r for r in self.records]
        return self._epsilon_of(recs)

    def epsilon_if(self, extra: list[MechanismRecord]) -> float:
        return self._epsilon_of(self.records + extra)

    def _charge(self, record: MechanismRecord) -> MechanismRecord:
        eps = self.epsilon_if([record])
        if eps > self.target_epsilon:
            raise PrivacyBudgetError(
                f"mechanism '{record.name}' would raise epsilon to {eps:.4g} > target "
                f"{self.target_epsilon:g}; raise its noise or the target epsilon")
        self.records.append(record)
        return record

    # ------------------------------------------------------------ mechanisms
    def record_gaussian(self, name: str, noise_multiplier: float, note: str = "") -> MechanismRecord:
        """One full-batch Gaussian mechanism (sampling rate 1), e.g. the histogram query."""
        return self._charge(MechanismRecord(name, float(noise_multiplier), 1.0, 1, note))

    def begin_dp_sgd(self, name: str, noise_multiplier: float, sample_rate: float) -> MechanismRecord:
        """Open (or, on resume, continue) a DP-SGD record with zero steps."""
        for r in self.records:
            if r.name == name:
                if (r.noise_multiplier, r.sample_rate) != (float(noise_multiplier), float(sample_rate)):
                    raise PrivacyBudgetError(
                        f"resumed DP-SGD '{name}' has sigma={noise_multiplier}, q={sample_rate} but "
                        f"the ledger recorded sigma={r.noise_multiplier}, q={r.sample_rate}; "
                        "resume with the same fine-tuning settings")
                return r
        r = MechanismRecord(name, float(noise_multiplier), float(sample_rate), 0)
        self.records.append(r)
        return r

    def step_hook(self, record: MechanismRecord, sample_rate: float) -> Callable:
        """A DPOptimizer step hook: Opacus calls it once per real (not skipped,
        i.e. end of logical batch) optimizer step, after clipping and noise and
        BEFORE the parameters are updated (``DPOptimizer.pre_step``).

        The hook is the last line of the budget: it refuses (raises) a step
        that would take the composition past the target, so the noisy gradient
        of that step is never applied, whatever the caller's loop planned. The
        limit is computed once, by the accountant, when the hook is attached:
        the record's steps so far plus ``max_steps`` further steps."""
        limit = record.steps + self.max_steps(record.noise_multiplier, record.sample_rate)

        def hook(optim) -> None:
            q = sample_rate * getattr(optim, "accumulated_iterations", 1)
            if optim.noise_multiplier != record.noise_multiplier or abs(q - record.sample_rate) > 1e-12:
                raise PrivacyBudgetError(
                    f"optimizer step with sigma={optim.noise_multiplier}, q={q} does not match "
                    f"the ledger record ({record.noise_multiplier}, {record.sample_rate})")
            if record.steps + 1 > limit:
                raise PrivacyBudgetError(
                    f"DP-SGD step {record.steps + 1} of '{record.name}' would take epsilon past "
                    f"the target {self.target_epsilon:g} (at most {limit} steps fit); the step "
                    "was refused before the update; lower finetune.steps or raise the target")
            record.steps += 1

        return hook

    # ------------------------------------------------------------ planning
    def max_steps(self, noise_multiplier: float, sample_rate: float, name: str | None = None,
                  upper: int = 10_000_000) -> int:
        """Largest number of further DP-SGD steps keeping epsilon <= target."""
        def ok(t: int) -> bool:
            extra = [MechanismRecord("_plan", noise_multiplier, sample_rate, t)]
            return self.epsilon_if(extra) <= self.target_epsilon

        if not ok(1):
            return 0
        lo, hi = 1, 2
        while hi < upper and ok(hi):
            lo, hi = hi, hi * 2
        hi = min(hi, upper)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo if not ok(hi) else hi

    def calibrate_noise(self, sample_rate: float, steps: int, tolerance: float = 0.01) -> float:
        """Smallest DP-SGD noise multiplier so that the records so far plus
        ``steps`` steps at ``sample_rate`` fit the target (App. E, Theorem E.3).
        A bisection on sigma; each candidate is scored by the Opacus accountant."""
        remaining = self.target_epsilon - self.epsilon()
        if remaining <= 0:
            raise PrivacyBudgetError(
                f"no budget left for fine-tuning: epsilon spent {self.epsilon():.4g} of "
                f"{self.target_epsilon:g}; raise the target or selection.sigma_q")

        def eps(sigma: float) -> float:
            return self.epsilon_if([MechanismRecord("_plan", sigma, sample_rate, steps)])

        lo, hi = 0.0, 1.0
        while eps(hi) > self.target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise PrivacyBudgetError("the privacy budget is too small for any DP-SGD step; "
                                         "raise privacy.target_epsilon or lower finetune.steps")
        while hi - lo > tolerance * hi / 10:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= self.target_epsilon else (mid, hi)
        return hi

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {"target_epsilon": self.target_epsilon, "target_delta": self.target_delta,
                "accountant": self.accountant_name,
                "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyLedger":
        led = cls(state["target_epsilon"], state["target_delta"], state["accountant"])
        led.records = [MechanismRecord(**r) for r in state["records"]]
        return led

    def load_state_dict(self, state: dict) -> None:
        other = self.from_state_dict(state)
        if (other.target_epsilon, other.target_delta, other.accountant_name) != (
                self.target_epsilon, self.target_delta, self.accountant_name):
            raise PrivacyBudgetError("the checkpoint's ledger has another target or accountant; "
                                     "resume with the same privacy settings")
        self.records = other.records

    def summary(self) -> dict:
        """DP outputs only: mechanism parameters and epsilons (no data-derived values)."""
        return {**self.state_dict(), "epsilon": self.epsilon()}

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)


def compose_ledgers(states: list[dict], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of running all these ledgers' mechanisms on the same sensitive
    data (e.g. every trial of a hyper-parameter sweep), by the Opacus accountant."""
    records = [MechanismRecord(**r) for s in states for r in s["records"]]
    led = PrivacyLedger(float("1e12"), delta, accountant)
    return led.epsilon_if(records)
