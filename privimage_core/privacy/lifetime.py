"""The lifetime ledger: every run ever made on one sensitive dataset, composed.

Each run's PrivacyLedger bounds that run. Running again on the same data
composes, so a per-dataset ledger persists across runs in the output store:
``<store_dir>/<key>.json``, keyed by a SHA-256 of the dataset's identity
(``data.provenance.dataset_identity``: a declared ``privacy.dataset_id``, or
the origin of the data: a folder's path, a subsample's source), so that a
dataset that changes by a few records, or a subsample of it, is composed
with its earlier runs. An exact content digest would start a fresh ledger
for the same data plus one image. A run reserves its planned
ledger before it touches the data and settles its final ledger at the end, so
a run that crashes in between stays charged its whole plan. Composition is
the Opacus accountant's (privacy_ledger.compose_ledgers), never our own math.

Ledgers keyed by a content digest (this project's earlier key) are folded
into the identity's ledger the first time a run on the same data opens it
(``absorb``), so no spent budget is forgotten. Such a digest is an exact
test between two candidate neighbouring datasets, so it is never released
(MLflow, manifests, logs); the store belongs to the data holder.

Writes are atomic (temporary file + os.replace) and serialised across
processes by an fcntl lock, so two concurrent runs cannot both reserve the
last of the budget.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from privimage_core.errors import PrivacyBudgetError
from privimage_core.privacy.ledger import MechanismRecord, compose_ledgers

VERSION = 1
# A run's entry: "reserved" holds its plan, "settled" what it actually spent.
STATUSES = ("reserved", "settled")
_DIGEST = re.compile(r"[0-9a-f]{64}")
FIX = "raise the lifetime budget knowingly or use new data"


class LifetimeLedger:
    """One dataset's lifetime ledger; every call re-reads the file, so it
    sees the runs other processes reserved meanwhile."""

    def __init__(self, store_dir: str | os.PathLike, digest: str, lifetime_epsilon: float | None,
                 delta: float, accountant: str = "rdp"):
        if not _DIGEST.fullmatch(str(digest)):
            raise PrivacyBudgetError(f"lifetime ledger key {digest!r} is not a SHA-256 hex digest; "
                                     "pass dataset_key(dataset_identity(...))")
        if lifetime_epsilon is not None and not (lifetime_epsilon > 0
                                                 and math.isfinite(lifetime_epsilon)):
            raise PrivacyBudgetError(f"lifetime epsilon must be > 0, got {lifetime_epsilon}; "
                                     "set e.g. 10")
        compose_ledgers([], delta, accountant)  # PrivacyLedger checks delta and accountant
        self.dir = Path(store_dir)
        self.digest = digest
        # None: no lifetime budget; every run is composed and reported, none refused
        self.lifetime_epsilon = None if lifetime_epsilon is None else float(lifetime_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.path = self.dir / f"{digest}.json"
        self._lock_path = self.dir / f"{digest}.lock"

    # ------------------------------------------------------------ file
    @contextmanager
    def _locked(self, exclusive: bool):
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict:
        if not self.path.exists():
            return {"version": VERSION, "digest": self.digest, "runs": {}}
        try:
            state = json.loads(self.path.read_text())
            for entry in state["runs"].values():
                if entry["status"] not in STATUSES:
                    raise ValueError(entry["status"])
                _check(entry["ledger"])
            return state
        except (ValueError, KeyError, TypeError, AttributeError, PrivacyBudgetError) as e:
            raise PrivacyBudgetError(
                f"lifetime ledger {self.path} is unreadable ({type(e).__name__}); restore it from "
                "a backup: deleting it would forget the budget already spent") from None

    def _write(self, state: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{self.digest}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _epsilon(self, state: dict, extra: list[dict] = ()) -> float:
        states = [e["ledger"] for e in state["runs"].values()] + list(extra)
        return compose_ledgers(states, self.delta, self.accountant)

    # ------------------------------------------------------------ API
    def composed_epsilon(self) -> float:
        """Epsilon of every run on this dataset so far (plans of unsettled runs included)."""
        with self._locked(exclusive=False):
            return self._epsilon(self._read())

    def would_exceed(self, ledger_state: dict) -> bool:
        """Whether adding a run with this (planned) ledger would exceed the lifetime budget."""
        _check(ledger_state)
        with self._locked(exclusive=False):
            return (self.lifetime_epsilon is not None and
                    self._epsilon(self._read(), [ledger_state]) > self.lifetime_epsilon)

    def reserve(self, run_id: str, planned_ledger_state: dict) -> None:
        """Charge a run its plan before it touches the data; refused when the
        composition would exceed the lifetime budget. Reserving the same run
        again with the same plan (a resume) changes nothing; a reserved plan
        may grow (its records a prefix of the new plan's: the size query,
        reserved and run alone before the rest could be planned), never
        shrink; a settled run is not reserved again."""
        _check(planned_ledger_state)
        with self._locked(exclusive=True):
            state = self._read()
            old = state["runs"].get(run_id)
            new_records = planned_ledger_state["records"]
            if old is not None:
                have = old["ledger"]["records"]
                if have == new_records or old["status"] == "settled":
                    return
                if new_records[:len(have)] != have:
                    raise PrivacyBudgetError(f"run {run_id!r} already holds a lifetime-ledger "
                                             "entry with another plan; resume it unchanged or "
                                             "use a new run id")
                state["runs"].pop(run_id)  # grown: checked below as a whole
            eps = (self._epsilon(state, [planned_ledger_state])
                   if self.lifetime_epsilon is not None else 0.0)
            if self.lifetime_epsilon is not None and eps > self.lifetime_epsilon:
                spent = self._epsilon(state)
                raise PrivacyBudgetError(
                    f"this run would take the dataset's lifetime epsilon to {eps:.4g} > "
                    f"{self.lifetime_epsilon:g} ({spent:.4g} already spent by "
                    f"{len(state['runs'])} runs); {FIX}")
            state["runs"][run_id] = {"status": "reserved", "ledger": planned_ledger_state,
                                     "lifetime_epsilon": self.lifetime_epsilon,
                                     "reserved": _now()}
            self._write(state)

    def settle(self, run_id: str, final_ledger_state: dict) -> None:
        """Replace a run's reservation by what it actually spent (its final
        PrivacyLedger, whose step hook counted every applied step). Charged
        even beyond the plan or the budget: those steps happened. A run
        settled before (then resumed) may only grow."""
        _check(final_ledger_state)
        with self._locked(exclusive=True):
            state = self._read()
            old = state["runs"].get(run_id)
            if old is None:
                raise PrivacyBudgetError(f"run {run_id!r} has no lifetime-ledger reservation; "
                                         "reserve its plan before it touches the data")
            if old["status"] == "settled" and _fewer_steps(final_ledger_state, old["ledger"]):
                raise PrivacyBudgetError(f"run {run_id!r} was settled with more steps than now; "
                                         "settle with the run's final ledger")
            state["runs"][run_id] = {**old, "status": "settled", "ledger": final_ledger_state,
                                     "settled": _now()}
            self._write(state)

    def absorb(self, other_key: str) -> int:
        """Fold the runs of the ledger stored under ``other_key`` (a ledger of
        the same data under an earlier key) into this one, once; the other
        file is kept. Returns the number of runs added."""
        other = LifetimeLedger(self.dir, other_key, self.lifetime_epsilon, self.delta,
                               self.accountant)
        if other_key == self.digest or not other.path.exists():
            return 0
        with self._locked(exclusive=True):
            state = self._read()
            if other_key in state.get("absorbed", []):
                return 0
            new = {k: v for k, v in other._read()["runs"].items() if k not in state["runs"]}
            state["runs"].update(new)
            state.setdefault("absorbed", []).append(other_key)
            self._write(state)
            return len(new)

    def runs(self) -> dict[str, dict]:
        """run id -> entry (status, ledger, times), for reports."""
        with self._locked(exclusive=False):
            return self._read()["runs"]


def dataset_key(identity: str) -> str:
    """The ledger key of a dataset identity (data.provenance.dataset_identity)."""
    return hashlib.sha256(identity.encode()).hexdigest()


def open(store_dir: str | os.PathLike, digest: str, lifetime_epsilon: float | None, delta: float,
         accountant: str = "rdp") -> LifetimeLedger:
    """The lifetime ledger stored under this key in ``store_dir`` (created on
    the first reservation)."""
    return LifetimeLedger(store_dir, digest, lifetime_epsilon, delta, accountant)


def _check(ledger_state: dict) -> None:
    try:
        for r in ledger_state["records"]:
            MechanismRecord(**r)
    except (KeyError, TypeError) as e:
        raise PrivacyBudgetError(f"not a PrivacyLedger state ({type(e).__name__}: {e}); pass "
                                 "PrivacyLedger.state_dict()") from None


def _fewer_steps(new: dict, old: dict) -> bool:
    def steps(s: dict) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in s["records"]:
            out[r["name"]] = out.get(r["name"], 0) + r["steps"]
        return out

    have = steps(new)
    return any(have.get(name, 0) < n for name, n in steps(old).items())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
