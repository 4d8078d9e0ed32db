"""The method registry and the model-family interface (privimage_core/methods.py,
privimage_core/models/): plain data, no Ray, and the driver's structure."""
from __future__ import annotations

import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.errors import ConfigError
from privimage_core.methods import DP_STAGE_KINDS, METHODS, Method, Stage, get_method
from privimage_core.models import get_family


def test_methods_are_stage_lists_with_the_paper_baselines():
    assert set(METHODS) == {"privimage", "pdp_diffusion", "dpdm", "privimage_g", "dpgan", "dp_ldm"}
    kinds = {n: [s.kind for s in m.stages] for n, m in METHODS.items()}
    # PDP-Diffusion: no semantic query (all of epsilon to DP-SGD), whole-pool pre-training
    assert "semantic_query" not in kinds["pdp_diffusion"]
    assert [s.options for s in METHODS["pdp_diffusion"].stages if s.kind == "pretrain"] == [
        {"data": "public_pool"}]
    # DPDM / DPGAN: no public data at all
    for m in ("dpdm", "dpgan"):
        assert kinds[m] == ["dp_finetune", "synthesize", "evaluate"]
    assert kinds["privimage"] == kinds["privimage_g"]
    for m in METHODS.values():
        names = [s.name for s in m.stages]
        assert len(names) == len(set(names)), f"{m.name}: stage names must be unique"
        assert any(s.kind in DP_STAGE_KINDS for s in m.stages)


def test_bad_methods_and_stages_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown; use one of privimage"):
        get_method("privimage_d")
    with pytest.raises(ValueError, match="unknown stage kind"):
        Stage("pretrainn", "x")
    with pytest.raises(ValueError, match="options data"):
        Stage("pretrain", "p", {"data": "everything"})
    with pytest.raises(ConfigError, match="pretrain.steps"):
        from_dict({"method": "privimage", "pretrain": {"steps": 0}})
    assert from_dict({"method": "dpdm", "pretrain": {"steps": 0}}).method == "dpdm"


def test_method_is_recorded_in_the_resolved_config():
    cfg = from_dict({"method": "dpdm"})
    assert cfg.to_dict()["method"] == "dpdm" and cfg.flat()["method"] == "dpdm"
    assert from_dict(cfg.to_dict()).method == "dpdm"
    assert cfg.with_overrides({"method": "pdp_diffusion"}).method == "pdp_diffusion"


def test_diffusion_family_objective_averages_k_draws_inside_the_example():
    fam = get_family("diffusion")
    model = fam.make("tiny", {}, 28, 1, 10)
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 4, 9])
    obj = fam.dp_objective(model)
    rnd = obj.draw(x, 4)
    assert rnd["sigma"].shape == (3, 4) and rnd["noise"].shape == (3, 4, 1, 28, 28)
    per = obj.loss(model, x, y, rnd)
    # the same as averaging 4 separate single-draw losses per example
    from privimage_core.models.diffusion.edm import edm_loss
    ref = torch.stack([edm_loss(model, x, y, rnd["sigma"][:, j], rnd["noise"][:, j])
                       for j in range(4)], 1).mean(1)
    torch.testing.assert_close(per, ref, rtol=1e-5, atol=1e-6)
    # a broken objective (only the first draw) does not match
    assert not torch.allclose(edm_loss(model, x, y, rnd["sigma"][:, 0], rnd["noise"][:, 0]), ref)


def test_a_new_method_is_data_only():
    m = Method("custom", "diffusion", (Stage("dp_finetune", "finetune", {"release": True}),
                                       Stage("synthesize", "synthesize")), "test")
    assert m.has("dp_finetune") and not m.has("pretrain") and m.release_stage.name == "finetune"
    # the release is marked by an option on the last DP-SGD stage, never by a name
    with pytest.raises(ValueError, match="release"):
        Method("bad", "diffusion", (Stage("dp_finetune", "finetune"),), "no release stage")
    with pytest.raises(ValueError, match="release"):
        Method("bad", "diffusion", (Stage("dp_finetune", "a", {"release": True}),
                                    Stage("dp_finetune", "b")), "release before the last")


def test_classifier_free_guidance_reserves_a_null_label_and_mixes_two_passes():
    from privimage_core.models.diffusion.family import GuidedDenoiser

    fam = get_family("diffusion")
    model = fam.make("tiny", {}, 28, 1, 10, label_dropout=0.5).eval()
    assert model.null_label == 10 and model.net.class_emb.num_embeddings == 11
    x, s, y = torch.randn(3, 1, 28, 28), torch.full((3,), 0.7), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond, uncond = model(x, s, y), model(x, s, torch.full_like(y, 10))
        torch.testing.assert_close(GuidedDenoiser(model, 0.0)(x, s, y), cond)
        torch.testing.assert_close(GuidedDenoiser(model, 2.0)(x, s, y), 3 * cond - 2 * uncond,
                                   rtol=1e-4, atol=1e-5)
    # label dropout: drawn outside the loss, applied inside it
    obj = fam.dp_objective(model)
    rnd = obj.draw(torch.randn(400, 1, 28, 28), 1)
    assert 0.4 < rnd["drop"].float().mean() < 0.6
    with pytest.raises(ConfigError, match="label_dropout"):
        from_dict({"sampling": {"guidance": 1.5}})


def test_diffusion_dp_objective_draws_the_configured_noise_levels():
    """finetune.noise_level_mean/std reach the DP loss of a run (the driver
    passes its config), and the draws follow them; without a config the
    family keeps EDM's -1.2."""
    fam = get_family("diffusion")
    model = fam.make("tiny", {}, 28, 1, 10)
    cfg = from_dict({"finetune": {"noise_level_mean": 0.5, "noise_level_std": 0.1}})
    obj = fam.dp_objective(model, cfg=cfg)
    x = torch.zeros(4000, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    ln = obj.draw(x, 1, generator=g)["sigma"].log()
    assert abs(ln.mean().item() - 0.5) < 0.01 and abs(ln.std().item() - 0.1) < 0.01
    assert fam.dp_objective(model).p_mean == -1.2
    assert from_dict({}).finetune.noise_level_mean == 0.0
    with pytest.raises(ConfigError, match="noise_level_std"):
        from_dict({"finetune": {"noise_level_std": 0}})
