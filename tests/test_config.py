"""Bad configuration gets a one-line error naming the problem and the fix."""
import pytest
import torch

from privimage_core.config import Config, from_dict, load_config, resolve_delta, resolve_k
from privimage_core.device import resolve_device
from privimage_core.errors import ConfigError


def test_defaults_validate_and_flatten():
    cfg = from_dict({})
    flat = cfg.flat()
    assert flat["privacy.target_epsilon"] == 10.0
    assert "selection.selection_ratio" in flat
    assert from_dict(cfg.to_dict()) == cfg  # the resolved config round-trips


@pytest.mark.parametrize("bad,match", [
    ({"privacy": {"target_epsilon": 0}}, "target_epsilon must be > 0"),
    ({"privacy": {"target_epsilon": -1}}, "target_epsilon must be > 0"),
    ({"selection": {"selection_ratio": 0}}, r"selection_ratio must be in \(0, 1\]"),
    ({"selection": {"selection_ratio": 1.5}}, r"selection_ratio must be in \(0, 1\]"),
    ({"privacy": {"target_delta": 1.0}}, "target_delta must be in"),
    ({"privacy": {"epsilon": 3}}, "unknown config key 'privacy.epsilon'"),
    ({"privcy": {}}, "unknown config section 'privcy'"),
    ({"finetune": {"steps": "many"}}, "must be an integer"),
    ({"generator": {"preset": "huge"}}, "not a preset of the diffusion family"),
        ({"method": "dpgann"}, "method .dpgann. is unknown; use one of privimage"),
        ({"method": "pdp_diffusion", "pretrain": {"steps": 0}}, "use method dpdm"),
    ({"ray": {"cpus_per_worker": 0}}, "Ray rejects 0 CPUs"),
    ({"ray": {"checkpoints_per_stage": 0}}, "ray.checkpoints_per_stage must be >= 1"),
    ({"ray": {"gpus_per_worker": 0}}, r"ray.gpus_per_worker must be a fraction in \(0, 1\]"),
    ({"ray": {"gpus_per_worker": 1.5}}, "ray.gpus_per_worker must be a fraction"),
    ({"ray": {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5}},
     "NCCL refuses two ranks on one GPU; set ray.gpus_per_worker: 1"),
    ({"ray": {"sampling_workers": 0}}, "ray.sampling_workers must be >= 1"),
    ({"ray": {"use_gpu": True}, "evaluation": {"inception_backend": "openvino"}},
     "evaluation.inception_backend is openvino .CPU only. but ray.use_gpu"),
    ({"ray": {"train_log_level": "LOUD"}}, "ray.train_log_level must be one of DEBUG, INFO"),
    ({"evaluation": {"inception_backend": "tensorrt"}},
     "evaluation.inception_backend must be one of auto, torch, openvino"),
    ({"pretrain": {"precision": "fp8"}}, "pretrain.precision must be one of auto, fp32, bf16"),
    ({"method": "dpgan", "pretrain": {"precision": "bf16"}},
     "pretrain.precision 'bf16' is not one the gan family pre-trains in"),
])
def test_bad_values_are_named(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(bad)
    assert "\n" not in str(e.value)


def test_delta_must_be_below_one_over_n():
    cfg = from_dict({"privacy": {"target_delta": 1e-3}})
    with pytest.raises(ConfigError, match=r"must be < 1/N"):
        resolve_delta(cfg, 5000)
    assert resolve_delta(cfg, 500) == 1e-3
    assert resolve_delta(from_dict({}), 60000) == 1e-5


def test_k_from_selection_ratio():
    cfg = from_dict({"selection": {"selection_ratio": 0.1}})
    assert resolve_k(cfg, 1000, 10) == (10, 10)  # paper Table 8: CIFAR-10 10% -> 10
    assert resolve_k(from_dict({"selection": {"selection_ratio": 0.01}}), 1000, 10) == (1, 1)
    with pytest.raises(ConfigError, match="lower selection.selection_ratio"):
        resolve_k(from_dict({"selection": {"selection_ratio": 1.0}}), 5, 10)


def test_overrides_and_files(tmp_path):
    cfg = Config().with_overrides({"generator.preset": "small"})
    assert cfg.generator.preset == "small"
    with pytest.raises(ConfigError, match="unknown config key 'generator.size'"):
        Config().with_overrides({"generator.size": 3})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("privacy:\n  target_epsilon: 5\n")
    assert load_config(p).privacy.target_epsilon == 5.0


def test_shipped_configs_parse_and_quickstart_is_the_default():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(root / "quickstart.yaml") == from_dict({})
    for p in root.glob("*.yaml"):
        load_config(p)  # every shipped config validates


def test_gpu_options_follow_the_one_switch():
    assert from_dict({"ray": {"gpus_per_worker": 0.5}}).ray.gpu_options() == {"num_gpus": 0}
    on = from_dict({"ray": {"use_gpu": True, "gpus_per_worker": 0.5}}).ray
    assert on.gpu_options() == {"num_gpus": 0.5}
    assert from_dict({"ray": {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 2}})


def test_use_gpu_without_a_visible_gpu_is_one_line(monkeypatch):
    assert resolve_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="ray.use_gpu is true but this worker sees no CUDA GPU"
                       ".*set ray.use_gpu: false") as e:
        resolve_device(True)
    assert "\n" not in str(e.value)


def test_pretrain_steps_default_by_channels_and_recorded():
    """Left null, pretrain.steps is 900 for grayscale and 7200 for RGB, and
    resolve_defaults writes the number into the config a run records; an
    explicit number wins. Control: without the resolution the config keeps
    null, which the run's recorded config must not."""
    from privimage_core.config import resolve_defaults
    from privimage_core.config.training import PRETRAIN_STEPS_BY_CHANNELS
    gray, rgb = from_dict({}), from_dict({"data": {"channels": 3}})
    assert gray.pretrain.steps is None  # the control: unresolved
    assert resolve_defaults(gray).pretrain.steps == PRETRAIN_STEPS_BY_CHANNELS[1] == 900
    assert resolve_defaults(rgb).pretrain.steps == PRETRAIN_STEPS_BY_CHANNELS[3] == 7200
    assert resolve_defaults(rgb.with_overrides({"pretrain.steps": 5})).pretrain.steps == 5
    assert resolve_defaults(rgb).to_dict()["pretrain"]["steps"] == 7200


def test_finetune_lr_default_by_channels_and_recorded():
    """Left null, finetune.lr is 0.004 for grayscale and 0.001 for RGB, the
    DP stage plan uses that number before and after resolve_defaults writes it
    into the recorded config, and an explicit value wins. Control: the
    unresolved config keeps null."""
    from privimage_core.config import resolve_defaults
    from privimage_core.config.training import FINETUNE_LR_BY_CHANNELS
    from privimage_core.models import get_family
    gray, rgb = from_dict({}), from_dict({"data": {"channels": 3}})
    assert gray.finetune.lr is None and rgb.finetune.lr is None  # the control: unresolved
    assert resolve_defaults(gray).finetune.lr == FINETUNE_LR_BY_CHANNELS[1] == 4e-3
    assert resolve_defaults(rgb).finetune.lr == FINETUNE_LR_BY_CHANNELS[3] == 1e-3
    assert resolve_defaults(rgb).to_dict()["finetune"]["lr"] == 1e-3
    assert resolve_defaults(rgb.with_overrides({"finetune.lr": 0.01})).finetune.lr == 0.01
    for cfg, want in ((gray, 4e-3), (rgb, 1e-3), (resolve_defaults(rgb), 1e-3)):
        assert get_family("diffusion").dp_stage_plan(cfg, None).lr == want
    with pytest.raises(ConfigError, match="finetune.lr must be > 0 or null"):
        from_dict({"finetune": {"lr": 0}})


def test_guidance_is_checked_against_the_method_family_at_config_time():
    """sampling.guidance > 0 is refused before any work for a method whose
    family has no classifier-free guidance (a GAN) and without the null label
    trained; the diffusion and latent methods take it with label dropout."""
    base = {"generator": {"label_dropout": 0.1}, "sampling": {"guidance": 1.0}}
    for method in ("privimage", "pdp_diffusion", "dpdm", "dp_ldm"):
        assert from_dict({**base, "method": method}).sampling.guidance == 1.0
    for method in ("dpgan", "privimage_g"):
        with pytest.raises(ConfigError, match="no classifier-free guidance"):
            from_dict({**base, "method": method})
        assert from_dict({"method": method}).sampling.guidance == 0  # the default passes
    with pytest.raises(ConfigError, match="needs a model trained with generator.label_dropout"):
        from_dict({"sampling": {"guidance": 0.5}})
