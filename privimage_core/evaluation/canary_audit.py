"""The one-run privacy audit of Steinke, Nasr & Jagielski (NeurIPS 2023,
"Privacy auditing with one (1) training run", arXiv:2305.08846).

m canaries are drawn; each is put into the DP fine-tuning set independently
with probability 1/2 (bits from OS entropy, never the logged seed). After
training, each canary gets a score (the model family's per-example audit
loss; lower = guess "in"); the auditor guesses "in" for the k+ lowest, "out"
for the k- highest and abstains on the rest, and counts correct guesses. If
the training is (eps, delta)-DP in each canary, the number of correct guesses
out of r is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up
to a delta term (their Theorem 5.2), which turns the count into an eps lower
bound at confidence 1 - beta. A bound above the ledger's claim means the
implementation or its accounting is broken.

Unlike the train-vs-test attack (diffusion_mia.py), this can fail: members and
non-members are randomised by the auditor, so nothing but the training can
make them differ; and the guessing thresholds are chosen on one half of the
canaries and applied to the other, which gives the bound, so no threshold is
maximised on the scores it is judged by. It also states what it cannot show:
with r guesses all correct the bound is at most ``max_provable_epsilon(m,
r)``; a claim above that is "inconclusive", never "passed".

Canaries are PUBLIC images (Fashion-MNIST's test split, MNIST's test split or
rendered glyphs) with labels drawn uniformly from the sensitive classes:
they are not sensitive records, so including them costs no privacy, and a
mislabelled out-of-domain image is what a non-private model memorises
fastest (their Sec. 6, input-space canaries). The inclusion bits are the
audit's secret: they stay in the run directory, for the operator only.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import binom

from privimage_core.config.evaluation import CANARY_SOURCES
from privimage_core.data.imageset import writable_tensor
from privimage_core.data.provenance import lineage
from privimage_core.data.sources import load_source
from privimage_core.data.specs import same_dataset
from privimage_core.errors import DataError

CANARY_FILE = "audit_canaries.npz"   # in the run dir: operator only (holds the bits)
VERDICTS = ("violation", "consistent", "inconclusive")
# Fractions of the half tried as (k+, k-) when choosing the guesses.
GUESS_FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)


def os_rng() -> np.random.Generator:
    """A generator seeded from OS entropy: the audit's secret randomness must
    not be reproducible from anything logged (the run seed is logged)."""
    return np.random.default_rng(secrets.randbits(128))


def draw_inclusion(m: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """m independent Bernoulli(1/2) inclusion bits (Steinke et al. Sec. 3:
    S uniform on {-1, +1}^m)."""
    return (rng or os_rng()).integers(0, 2, size=int(m)).astype(bool)


@dataclass
class CanarySet:
    images: np.ndarray        # uint8 [m, H, W, C]
    labels: np.ndarray        # int64 [m], uniform over the sensitive classes
    included: np.ndarray      # bool [m]: the audit's secret
    source: str
    source_index: np.ndarray  # which images of the public source

    def __len__(self) -> int:
        return len(self.labels)

    def members(self) -> tuple[np.ndarray, np.ndarray]:
        """The canaries that go into the DP fine-tuning set."""
        return self.images[self.included], self.labels[self.included]

    def save(self, path: str | Path) -> None:
        tmp = Path(path).with_suffix(".tmp.npz")
        np.savez(tmp, images=self.images, labels=self.labels, included=self.included,
                 source=np.array(self.source), source_index=self.source_index)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "CanarySet":
        z = np.load(path, allow_pickle=False)
        return cls(z["images"], z["labels"].astype(np.int64), z["included"].astype(bool),
                   str(z["source"]), z["source_index"].astype(np.int64))


def resolve_canary_source(source: str, sensitive: str) -> str:
    """'auto': Fashion-MNIST's test split, or MNIST's when the sensitive data
    is (drawn from) Fashion-MNIST; any other value as given."""
    if source != "auto":
        return source
    origins = lineage(sensitive)
    return next(s for s in ("fashion_mnist", "mnist")
                if not any(same_dataset(s, o) for o in origins))


def check_canary_source(source: str, sensitive: str) -> str:
    """Refuse canaries from the sensitive dataset or from a source it was
    materialised from: canaries must be public, never sensitive records.
    Returns the resolved source."""
    source = resolve_canary_source(source, sensitive)
    if source not in CANARY_SOURCES:
        raise DataError(f"canary source {source!r} is unknown; use one of {', '.join(CANARY_SOURCES)}")
    if any(same_dataset(source, o) for o in lineage(sensitive)):
        other = next(s for s in CANARY_SOURCES if s != source and
                     not any(same_dataset(s, o) for o in lineage(sensitive)))
        raise DataError(f"evaluation.canary_source {source!r} is (the origin of) the sensitive "
                        f"dataset; canaries must be public data: set evaluation.canary_source: "
                        f"{other}")
    return source


def make_canaries(source: str, m: int, num_classes: int, image_size: int, channels: int,
                  rng: np.random.Generator | None = None) -> CanarySet:
    """m distinct public images (the TEST split of a built-in source, which no
    public pool pre-trains on) with labels uniform over the sensitive classes
    and Bernoulli(1/2) inclusion bits, all from OS entropy."""
    if source not in CANARY_SOURCES:
        raise DataError(f"canary source {source!r} is unknown; use one of {', '.join(CANARY_SOURCES)}")
    rng = rng or os_rng()
    ds = load_source(source, split="test", image_size=image_size, channels=channels)
    if len(ds) < m:
        raise DataError(f"canary source {source} has {len(ds)} images, fewer than the {m} "
                        "canaries asked for; lower evaluation.canaries")
    idx = np.sort(rng.choice(len(ds), size=m, replace=False))
    return CanarySet(ds.images[idx], rng.integers(0, num_classes, size=m).astype(np.int64),
                     draw_inclusion(m, rng), source, idx.astype(np.int64))


def _to_model(images: np.ndarray) -> torch.Tensor:
    # torch.tensor copies: ImageSets hold read-only arrays, which from_numpy warns about
    x = torch.tensor(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0  # the models' [-1, 1] scale


@torch.no_grad()
def score_canaries(family, release: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                   repeats: int = 4, batch_size: int = 256,
                   reference: torch.nn.Module | None = None) -> np.ndarray:
    """Audit loss per canary (lower = guess "in"): the family's ``audit_loss``
    averaged over ``repeats`` fixed seeds; minus the same loss under
    ``reference`` (a model that never saw the canaries, e.g. the public
    pre-trained one) when given, which calibrates each canary's difficulty
    (Carlini et al. 2022's per-example calibration). The seeds depend on the
    repeat and batch only, never on the inclusion bits."""
    was = release.training
    release.eval()
    out = np.zeros(len(labels), dtype=np.float64)
    try:
        for i in range(0, len(labels), batch_size):
            x, y = _to_model(images[i:i + batch_size]), writable_tensor(labels[i:i + batch_size])
            dev = next(release.parameters()).device
            x, y = x.to(dev), y.to(dev)
            for r in range(repeats):
                seed = 1_000_003 * r + i
                loss = family.audit_loss(release, x, y, seed=seed).double()
                if reference is not None:
                    loss = loss - family.audit_loss(reference, x, y, seed=seed).double()
                out[i:i + len(y)] += loss.cpu().numpy() / repeats
    finally:
        release.train(was)
    if not np.all(np.isfinite(out)):
        raise DataError("the audit loss of a canary is NaN or infinite; the model diverged")
    return out


# ------------------------------------------------------------ the bound
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. Theorem 5.2: with m randomised canaries and r guesses,
    an (eps, delta)-DP training gives P[>= v correct] <= f(v) + 2 m delta
    max_{1<=i<=v} (f(v - i) - f(v)) / i, f(u) = P[Binomial(r, e^eps/(1+e^eps)) >= u]."""
    if v <= 0:
        return 1.0
    q = float(expit(eps))
    f_v = float(binom.sf(v - 1, r, q))
    if delta == 0:
        return f_v
    i = np.arange(1, v + 1)
    alpha = np.max((binom.sf(v - i - 1, r, q) - f_v) / i, initial=0.0)
    return float(min(1.0, f_v + 2 * m * delta * alpha))


def epsilon_lower_bound(m: int, r: int, v: int, beta: float, delta: float,
                        tol: float = 1e-6) -> float:
    """The largest eps whose (eps, delta) claim the count v of r rejects at
    level beta: sup {eps : p_value(eps) <= beta}, by bisection (the p-value
    grows with eps). 0 when even eps = 0 is not rejected."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    if r == 0 or p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return float("inf")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= beta else (lo, mid)
    return lo


def max_provable_epsilon(m: int, r: int, beta: float, delta: float) -> float:
    """The bound when all r guesses are correct: the most this audit can show."""
    return epsilon_lower_bound(m, r, r, beta, delta)


def guesses(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("in") for the k_pos lowest losses, -1 ("out") for the k_neg
    highest, 0 (abstain) elsewhere. Ties are broken by position."""
    n = len(scores)
    if k_pos + k_neg > n:
        raise ValueError(f"k+ + k- = {k_pos + k_neg} exceeds the {n} canaries")
    order = np.argsort(scores, kind="stable")
    g = np.zeros(n, dtype=np.int8)
    g[order[:k_pos]] = 1
    if k_neg:
        g[order[n - k_neg:]] = -1
    return g


def _count(guess: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses)."""
    truth = np.where(included, 1, -1)
    return int((guess != 0).sum()), int((guess == truth).sum())


def _ks(n: int, fp: float, fn: float) -> tuple[int, int]:
    return int(round(fp * n)), min(int(round(fn * n)), n - int(round(fp * n)))


def thresholds(scores: np.ndarray, k_pos: int, k_neg: int) -> tuple[float, float]:
    """(t_pos, t_neg): midway between the k_pos-th and the next lowest score,
    and between the k_neg-th and the next highest (-inf / +inf for none), so
    that a threshold sits in a gap between scores rather than on one.
    ``guess_by_threshold`` with them reproduces ``guesses(scores, k_pos,
    k_neg)`` on these scores (ties aside)."""
    order = np.sort(scores)
    n = len(order)
    t_pos = -np.inf if not k_pos else float(
        order[k_pos - 1] if k_pos == n else (order[k_pos - 1] + order[k_pos]) / 2)
    t_neg = np.inf if not k_neg else float(
        order[n - k_neg] if k_neg == n else (order[n - k_neg] + order[n - k_neg - 1]) / 2)
    return t_pos, t_neg


def guess_by_threshold(scores: np.ndarray, t_pos: float, t_neg: float) -> np.ndarray:
    """+1 ("in") where the loss is at most t_pos, -1 ("out") where it is at
    least t_neg (and not already "in"), 0 elsewhere."""
    g = np.zeros(len(scores), dtype=np.int8)
    g[scores >= t_neg] = -1
    g[scores <= t_pos] = 1
    return g


def choose_thresholds(scores, included, beta: float, delta: float
                      ) -> tuple[float, float, int, int]:
    """(t_pos, t_neg, k_pos, k_neg): the score thresholds whose guesses give
    the largest bound on THIS half (the selection half). They are applied as
    thresholds to the other half, whose bits played no part in the choice:
    counts would not transfer, since the number of members in the other half
    varies (a leaking model would get some of its "in" guesses wrong)."""
    n = len(scores)
    # ties (e.g. every choice gives 0) go to more guesses: a larger provable maximum
    best, best_key = None, (-1.0, 0)
    for fp in GUESS_FRACTIONS:
        for fn in GUESS_FRACTIONS:
            if fp + fn > 1 or fp + fn == 0:
                continue
            kp, kn = _ks(n, fp, fn)
            t = thresholds(scores, kp, kn)
            r, v = _count(guess_by_threshold(scores, *t), included)
            if r == 0:
                continue
            key = (epsilon_lower_bound(n, r, v, beta, delta, tol=1e-3), r)
            if key > best_key:
                best, best_key = (*t, kp, kn), key
    if best is None:  # no guesses possible (e.g. all scores equal): guess half each way
        kp, kn = _ks(n, 0.5, 0.5)
        best = (*thresholds(scores, kp, kn), kp, kn)
    return best


def verdict(eps_lb: float, eps_max: float, claimed: float | None, m: int) -> tuple[str, str]:
    """(verdict, message). 'violation': the bound exceeds the claim;
    'consistent': it does not, and a training leaking at the claim could have
    shown it (eps_max >= claim); 'inconclusive' otherwise: never 'passed'."""
    if claimed is None or not np.isfinite(claimed):
        return "inconclusive", (f"inconclusive: no claimed epsilon to test; canary lower bound "
                                f"{eps_lb:.3f} (at most {eps_max:.3f} can be shown with {m} "
                                "canaries)")
    if eps_lb > claimed:
        return "violation", (f"PRIVACY AUDIT FAILED: the canary lower bound {eps_lb:.3f} EXCEEDS "
                             f"the claimed epsilon {claimed:.3f}; the DP implementation or its "
                             "accounting is broken: do not release this model or its samples")
    if eps_max < claimed:
        return "inconclusive", (f"inconclusive: at most {eps_max:.3f} can be shown with {m} "
                                f"canaries, below the claimed epsilon {claimed:.3f} (lower bound "
                                f"{eps_lb:.3f}); this audit cannot refute the claim")
    return "consistent", (f"consistent: canary lower bound {eps_lb:.3f} <= claimed epsilon "
                          f"{claimed:.3f}; up to {eps_max:.3f} could have been shown with {m} "
                          "canaries")


def audit(scores: np.ndarray, included: np.ndarray, claimed_epsilon: float | None,
          delta: float, beta: float = 0.05) -> dict:
    """The audit on canary scores (lower = "in") and their inclusion bits.

    Even positions choose the score thresholds (``choose_thresholds``); odd
    positions (the evaluation half, m_eval canaries) are guessed with those
    thresholds and give the bound. Canaries are in random order, so the split
    is independent of the bits. The bound is valid for the evaluation half:
    conditioned on the selection half's bits (independent of the others), the
    training is still DP in each evaluation canary, and the guesses (and their
    number r) are a function of the scores alone: post-processing, given
    which each guessed bit is right with probability at most e^eps/(1+e^eps)
    up to the delta term (Steinke et al. Sec. 5; jax_privacy's auditing
    counts guesses at a fixed threshold the same way).
    Returns eps_lb, eps_max (all of these guesses correct), eps_max_all (all
    m_eval canaries guessed and correct: the ceiling of m), the counts, the
    verdict and its message."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    b = np.asarray(included, dtype=bool).ravel()
    if len(s) != len(b) or len(s) < 4:
        raise DataError(f"the canary audit needs >= 4 canaries with one score each, got "
                        f"{len(s)} scores and {len(b)} bits")
    if not np.all(np.isfinite(s)):
        raise DataError("canary scores have NaN or infinite values")
    if not (0 < beta < 1 and 0 <= delta < 1):
        raise ValueError(f"need beta in (0, 1) and delta in [0, 1), got {beta}, {delta}")
    sel, ev = np.arange(0, len(s), 2), np.arange(1, len(s), 2)
    t_pos, t_neg, kp, kn = choose_thresholds(s[sel], b[sel], beta, delta)
    n = len(ev)
    r, v = _count(guess_by_threshold(s[ev], t_pos, t_neg), b[ev])
    eps_lb = epsilon_lower_bound(n, r, v, beta, delta) if r else 0.0
    eps_max = max_provable_epsilon(n, r, beta, delta) if r else 0.0
    out = {"eps_lb": eps_lb, "eps_max": eps_max,
           "eps_max_all": max_provable_epsilon(n, n, beta, delta),
           "canaries": len(s), "canaries_eval": n, "k_pos": kp, "k_neg": kn,
           "t_pos": t_pos, "t_neg": t_neg,
           "guesses": r, "correct": v, "beta": beta, "delta": delta,
           "claimed_epsilon": claimed_epsilon}
    out["verdict"], out["message"] = verdict(eps_lb, eps_max, claimed_epsilon, len(s))
    return out


@dataclass
class CanaryAuditInput:
    """What the evaluation needs for the canary audit of one run."""
    canaries: CanarySet
    family: object                        # the run's ModelFamily (its audit_loss)
    release: torch.nn.Module              # the released (DP) module
    reference: torch.nn.Module | None = None  # never saw a canary (public pre-training)


def run_canary_audit(inp: CanaryAuditInput, claimed_epsilon: float | None, delta: float,
                     beta: float = 0.05, repeats: int = 4) -> dict:
    """Score the run's canaries and audit them (``audit``); adds the source
    and whether the scores were calibrated by a reference model."""
    c = inp.canaries
    scores = score_canaries(inp.family, inp.release, c.images, c.labels, repeats=repeats,
                            reference=inp.reference)
    out = audit(scores, c.included, claimed_epsilon, delta, beta)
    out.update(canary_source=c.source, calibrated=inp.reference is not None, repeats=repeats)
    return out
