"""The lifetime ledger follows a dataset across versions: keyed by its
identity (a declared privacy.dataset_id, or its origin), not by an exact
content digest that one added image changes."""
from __future__ import annotations


import numpy as np
from PIL import Image

from privimage_core.config import from_dict
from privimage_core.data.provenance import dataset_identity
from privimage_core.data.subsample import materialise_subsample, source_digest
from privimage_core.privacy import lifetime
from privimage_core.privacy.ledger import PrivacyLedger
from services.budget import open_lifetime
from tests.helpers import noise_folder


def _ledger(steps: int) -> dict:
    led = PrivacyLedger(10.0, 1e-5)
    led.begin_dp_sgd("dp_sgd_finetune", 1.0, 0.01).steps = steps
    return led.state_dict()


def test_a_folder_that_gains_an_image_keeps_its_identity(tmp_path):
    d = noise_folder(tmp_path / "data", 5)
    spec = f"folder:{d}"
    before_id, before_digest = dataset_identity(spec), source_digest(spec)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(d / "a" / "new.png")
    assert dataset_identity(spec) == before_id
    # control: the content digest, the earlier key, does not survive the change
    assert source_digest(spec) != before_digest


def test_a_subsample_is_charged_to_its_source_and_a_declared_id_wins(tmp_path):
    d = noise_folder(tmp_path / "data", 10)
    sub = materialise_subsample(f"folder:{d}", 8, tmp_path / "sub.parquet", seed=0)
    assert dataset_identity(f"parquet:{sub}") == dataset_identity(f"folder:{d}")
    assert dataset_identity("mnist") == "builtin:mnist:train"
    copy = noise_folder(tmp_path / "copy", 10)
    assert dataset_identity(f"folder:{copy}") != dataset_identity(f"folder:{d}")
    assert (dataset_identity(f"folder:{copy}", declared="clinic") ==
            dataset_identity(f"folder:{d}", declared="clinic"))


def test_runs_compose_across_versions_and_an_old_digest_ledger_is_folded_in(tmp_path):
    d = noise_folder(tmp_path / "data", 5)
    spec = f"folder:{d}"
    store = tmp_path / "store"
    # a ledger under the earlier key: the content digest of this very data
    old = lifetime.open(store, source_digest(spec), 1e12, 1e-5)
    old.reserve("old-run", _ledger(100))
    cfg = from_dict({"data": {"sensitive": spec, "sensitive_test": spec},
                     "run": {"ledger_store": str(store)}})
    led = open_lifetime(cfg, 1e-5)
    led.reserve(str(tmp_path / "run1"), _ledger(50))
    assert set(led.runs()) == {"old-run", str(tmp_path / "run1")}
    eps_two = led.composed_epsilon()
    # the folder gains an image: the next run lands on the same ledger
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(d / "b" / "new.png")
    led2 = open_lifetime(cfg, 1e-5)
    led2.reserve(str(tmp_path / "run2"), _ledger(50))
    assert led2.path == led.path and len(led2.runs()) == 3
    assert led2.composed_epsilon() > eps_two
    assert led2.absorb(source_digest(spec)) == 0  # nothing under the new digest
