"""The sensitive dataset's size as the run uses it: public, never the true N.

The guarantee is for add/remove-one neighbours, under which the number of
records N is itself private: releasing it exactly would tell two neighbours
apart. Yet DP-SGD's Poisson rate q = 1 / ceil(N / batch), its expected batch
size (the noise's scale) and the default delta are functions of a size. So
the run uses a size that is public by construction and releases only that:

  declared     ``privacy.dataset_size``: a size the operator states is public
  builtin      a built-in dataset's published size (MNIST, Fashion-MNIST)
  subsample    a subsample materialised by ``privimage data subsample``: its
               size was the operator's choice, made outside the DP boundary
  dp_estimate  otherwise, N plus Gaussian noise (sensitivity 1), a mechanism
               of its own in the ledger, costing ``privacy.size_epsilon_share``
               of epsilon (calibrated alone, like the semantic query's share)

With q fixed by a public size, adding or removing a record changes only the
set Poisson sampling draws from, which is the neighbouring relation Opacus's
accountants analyse. Nothing else released depends on N exactly; stage
wall-clock times do, weakly (docs/privacy.md).
"""
from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass

import numpy as np

from privimage_core.data.provenance import read_provenance
from privimage_core.data.specs import parse_spec
from privimage_core.privacy.ledger import PrivacyLedger

SIZE_MECHANISM = "dataset_size_query"
SIZE_SOURCES = ("declared", "builtin", "subsample", "dp_estimate")
# Published training-split sizes of the built-in sensitive datasets.
BUILTIN_SIZES = {("mnist", "train"): 60_000, ("fashion_mnist", "train"): 60_000}


@dataclass(frozen=True)
class PublicSize:
    value: int
    source: str                              # one of SIZE_SOURCES
    noise_multiplier: float | None = None    # dp_estimate only

    def to_dict(self) -> dict:
        return asdict(self)


def known_size(cfg, split: str = "train") -> PublicSize | None:
    """The public size of ``data.sensitive`` when one exists without reading
    the data: declared, built-in, or a materialised subsample's; else None."""
    p = cfg.privacy
    if p.dataset_size is not None:
        return PublicSize(int(p.dataset_size), "declared")
    spec = cfg.data.sensitive
    parsed = parse_spec(spec)
    if parsed is not None and parsed[1] is None and (parsed[0], split) in BUILTIN_SIZES:
        return PublicSize(BUILTIN_SIZES[(parsed[0], split)], "builtin")
    prov = read_provenance(spec)
    if prov is not None and prov.get("n"):
        return PublicSize(int(prov["n"]), "subsample")
    return None


def size_noise_multiplier(cfg, delta: float) -> float:
    """sigma of the size query: its Gaussian mechanism (sensitivity 1),
    released alone at ``delta``, costs at most the configured share of
    epsilon."""
    p = cfg.privacy
    return PrivacyLedger(p.size_epsilon_share * p.target_epsilon, delta,
                         p.accountant).calibrate_noise(sample_rate=1.0, steps=1)


def estimate_size(n: int, noise_multiplier: float, ledger: PrivacyLedger) -> PublicSize:
    """The DP size estimate: N + N(0, sigma^2), rounded and at least 1,
    charged to ``ledger`` before it is computed. Noise from OS entropy."""
    ledger.record_gaussian(SIZE_MECHANISM, noise_multiplier)
    rng = np.random.default_rng(secrets.randbits(128))
    value = max(1, int(round(n + rng.normal(0.0, noise_multiplier))))
    return PublicSize(value, "dp_estimate", noise_multiplier)
