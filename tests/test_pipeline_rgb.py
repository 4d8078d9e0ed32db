"""Every registered method end to end at 32x32 and 64x64 RGB on the local
Ray: the sensitive data a user ImageFolder of coloured digits
(scripts/make_coloured_digits.py, 32 px, resized on load for 64: data.resize) with
its own test folder, the public pool (glyphs) and the canaries converted to
RGB at the run's size, the tiny settings of
tests/helpers.py otherwise. Opt-in (-m slow): a minute or more each on 2
cores, on the machinery the default suite runs end to end at 28x28x1
(tests/test_pipeline_e2e.py); the default suite holds the RGB contracts
themselves: every family at 32x32x3 (tests/test_family_contract.py), the
paper's RGB configs on stand-in data (tests/test_paper_configs.py) and the
colour-robust query function (tests/test_semantic_query_colour.py)."""
from __future__ import annotations

import pytest

from privimage_core.config import from_dict
from privimage_core.methods import METHODS, get_method
from tests.helpers import coloured_digits, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PER_CLASS = 100  # the public size is declared, so the plan is known beforehand
# A method's extra "section.key" values and sections (dp_ldm: a smaller
# autoencoder stage, and the audit and memorisation checks off, as in
# tests/test_pipeline_e2e.py).
EXTRA: dict[str, tuple[dict, dict]] = {
    "dp_ldm": ({"evaluation.canary_audit": False, "evaluation.memorisation": False},
               {"latent": {"autoencoder_dp_steps": 2, "width": 8}}),
}


def rgb_config(tmp, method: str, size: int = 32):
    root = coloured_digits(tmp / "digits", PER_CLASS, 10)
    keys, sections = EXTRA.get(method, ({}, {}))
    cfg = tiny_config(tmp, **{"data.sensitive": f"folder:{root / 'train'}",
                              "data.sensitive_test": f"folder:{root / 'test'}",
                              "data.channels": 3, "data.image_size": size,
                              "data.resize": size != 32,  # the folder holds 32 px images
                              "privacy.dataset_size": 10 * PER_CLASS, **keys})
    return from_dict({**cfg, **sections, "method": method})


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_end_to_end_on_rgb_folder(tmp_path, ray_local, method, size):
    """Exactly the method's stages ran, its ledger is the plan's under the
    target, the release is an RGB model of the method's family at the run's
    size that rebuilds from its manifest and the synthetic set is RGB at that
    size; with a semantic query, the query function read the images in the
    luminance view (the default) and its DP histogram is 10 classes by the
    pool's labels; pre-training recoloured the grayscale public images."""
    import json
    from pathlib import Path

    import numpy as np

    from privimage_core.models.release import load_release
    from privimage_core.privacy.plan import planned_ledger
    from privimage_core.synthesize import read_dataset
    from services.pipeline import run_pipeline

    cfg = rgb_config(tmp_path, method, size)
    lines: list[str] = []
    s = run_pipeline(cfg, log=lines.append)
    m = get_method(method)
    assert set(s["stage_seconds"]) == {st.name for st in m.stages}
    plan = planned_ledger(cfg, m, 10 * PER_CLASS, s["delta"])
    assert [(r["name"], r["noise_multiplier"], r["sample_rate"], r["steps"])
            for r in s["ledger"]["records"]] == \
        [(r.name, r.noise_multiplier, r.sample_rate, r.steps) for r in plan.records]
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    fam, release, man = load_release(s["run_dir"])
    assert fam.name == m.family and (man.image_size, man.channels) == (size, 3)
    syn = read_dataset(s["synthetic_path"])
    assert syn.images.shape == (cfg.sampling.num_images, size, size, 3)
    assert syn.images.dtype == np.uint8 and set(syn.labels.tolist()) <= set(range(10))
    assert 0.0 <= s["accuracy"] <= 1.0
    state = json.loads((Path(s["run_dir"]) / "pipeline_state.json").read_text())
    # grayscale public images, an RGB run: pretrain.recolour auto is on
    assert all(state["stages"][st.name]["recolour"] for st in m.stages if st.kind == "pretrain")
    if m.has("semantic_query"):
        # auto, on the grayscale glyph pool, reads every image by its luminance
        assert cfg.semantic_query.colour == "auto"
        assert any("images seen as: luminance" in ln for ln in lines), lines
        name = next(st.name for st in m.stages if st.kind == "semantic_query")
        saved = state["stages"][name]
        assert np.asarray(saved["noisy_histograms"]).shape == (10, 62)  # the glyph labels
        assert len(saved["significance"]["significant"]) == 10
