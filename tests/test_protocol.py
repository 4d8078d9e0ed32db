"""Every fidelity line says whether its FID compares with published ones:
only at the protocol's 5,000 images per side."""
from __future__ import annotations

from pathlib import Path

import yaml

from privimage_core.config import from_dict
from privimage_core.evaluation.protocol import PROTOCOL_IMAGES, fidelity_line


def test_a_small_fid_says_it_compares_with_nothing_published():
    m = {"fid": 120.5, "fid_images": 500, "kid": 0.11, "kid_std": 0.006}
    line = fidelity_line(m)
    assert line.startswith("KID 0.1100 ± 0.0060, FID 120.50 on 500 vs 500 images")
    assert "below the protocol's 5,000 per side" in line and "comparable" in line


def test_the_protocols_size_is_called_comparable():
    line = fidelity_line({"fid": 80.0, "fid_images": PROTOCOL_IMAGES, "kid": 0.09,
                          "kid_std": 0.003, "precision": 0.1, "recall": 0.2})
    assert line.startswith("FID 80.00, KID 0.0900 ± 0.0030 (5,000 vs 5,000 images: the "
                           "protocol's size, comparable)")
    assert "below" not in line and line.endswith("precision 0.100, recall 0.200")


def test_no_fid_no_line():
    assert fidelity_line({"kid": 0.1}) is None and fidelity_line({"fid": None}) is None


def test_the_benchmark_config_runs_the_protocol_and_the_default_does_not():
    root = Path(__file__).resolve().parents[1]
    bench = from_dict(yaml.safe_load((root / "configs" / "benchmark.yaml").read_text()))
    assert bench.evaluation.fid and bench.evaluation.fid_images >= PROTOCOL_IMAGES
    assert bench.sampling.num_images >= PROTOCOL_IMAGES  # the synthetic side has them
    assert from_dict({}).evaluation.fid_images < PROTOCOL_IMAGES
