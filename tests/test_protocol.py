"""Every fidelity line says whether its FID compares with published ones:
only at the protocol's 5,000 images per side."""
from __future__ import annotations

from pathlib import Path

import yaml

from privimage_core.config import from_dict
from privimage_core.evaluation.protocol import PROTOCOL_IMAGES, comparability, fidelity_line


def test_a_small_fid_says_it_compares_with_nothing_published():
    m = {"fid": 120.5, "fid_images": 500, "kid": 0.11, "kid_std": 0.006}
    assert fidelity_line(m) == "KID 0.1100 ± 0.0060, FID 120.50 on 500 vs 500 images"
    assert comparability(m).startswith("below the protocol's 5,000 per side: the FID compares "
                                       "only with FIDs at 500")


def test_the_protocols_size_is_called_comparable():
    m = {"fid": 80.0, "fid_images": PROTOCOL_IMAGES, "kid": 0.09, "kid_std": 0.003,
         "precision": 0.1, "recall": 0.2}
    assert fidelity_line(m) == ("FID 80.00, KID 0.0900 ± 0.0030 on 5,000 vs 5,000 images, "
                                "precision 0.100, recall 0.200")
    assert comparability(m).endswith("comparable with published FIDs")


def test_no_fid_no_line():
    assert fidelity_line({"kid": 0.1}) is None and comparability({"fid": None}) is None


def test_the_benchmark_config_runs_the_protocol_and_the_default_does_not():
    root = Path(__file__).resolve().parents[1]
    bench = from_dict(yaml.safe_load((root / "configs" / "benchmark.yaml").read_text()))
    assert bench.evaluation.fid and bench.evaluation.fid_images >= PROTOCOL_IMAGES
    assert bench.sampling.num_images >= PROTOCOL_IMAGES  # the synthetic side has them
    assert from_dict({}).evaluation.fid_images < PROTOCOL_IMAGES
