"""GPU readiness that a CPU can check: the synthetic set is the same for one
sampling worker or several (Ray tasks, services/sampling.py), the one
resources setting reaches every GPU user, and the evaluation's device reaches
its Inception passes and CNN classifiers. The CUDA runs themselves are in
tests/test_gpu.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.data.imageset import ImageSet
from privimage_core.errors import ConfigError
from privimage_core.evaluation import downstream, fid, metric_groups
from privimage_core.evaluation.suite import run_evaluation
from privimage_core.models import build_model
from privimage_core.models.release import ReleaseManifest, read_manifest
from privimage_core.models.state import state_bytes
from services.actors import Evaluator
from services.sampling import sample_sharded
from services.stages.training import _worker_resources
from tests.helpers import fake_inception, shapes, tiny_config

CLASSES = [str(i) for i in range(10)]


def _release(tmp_path, workers: int = 1, **ray):
    """(config dict, state bytes, manifest) of a tiny seeded diffusion release."""
    d = {"run": {"output_dir": str(tmp_path), "seed": 3, "torch_threads": 1},
         "generator": {"preset": "tiny"},
         "sampling": {"num_images": 7, "num_steps": 2, "batch_size": 3},
         "ray": {"sampling_workers": workers, **ray}}
    cfg = from_dict(d)
    torch.manual_seed(0)
    model = build_model(cfg, "diffusion", len(CLASSES))
    for p in model.parameters():  # off the zero-initialised output layers
        p.data.add_(0.05 * torch.randn_like(p))
    man = ReleaseManifest.for_run(cfg, "diffusion", CLASSES, "dp_generator.pt").to_dict()
    return d, state_bytes(model.state_dict()), man


@pytest.mark.ray
def test_two_sampling_workers_give_the_images_of_one(tmp_path, ray_local):
    d, state, man = _release(tmp_path)
    one = Evaluator(d, str(tmp_path / "one"))
    one.synthesize(state, man, {})
    d2, _, _ = _release(tmp_path, workers=2)
    refs = sample_sharded(from_dict(d2), ray_local.put(state), man)  # all finished
    assert len(refs) == 2
    two = Evaluator(d2, str(tmp_path / "two"))
    two.synthesize(state, man, {}, shards=refs)
    assert np.array_equal(two.synthetic.images, one.synthetic.images)
    assert np.array_equal(two.synthetic.labels, one.synthetic.labels)
    # control: the comparison sees which shard drew which images
    swapped = Evaluator(d2, str(tmp_path / "swapped"))
    swapped.synthesize(state, man, {}, shards=refs[::-1])
    assert not np.array_equal(swapped.synthetic.images, one.synthetic.images)


@pytest.mark.ray
def test_a_failed_shard_raises_on_the_caller(tmp_path, ray_local):
    d, state, man = _release(tmp_path, workers=2)
    with pytest.raises(KeyError, match="unknown model family 'nope'"):
        sample_sharded(from_dict(d), ray_local.put(state), {**man, "family": "nope"})


def test_the_gpu_share_reaches_train_workers_and_every_gpu_actor():
    off = from_dict({"ray": {"gpus_per_worker": 0.5, "cpus_per_worker": 2}}).ray
    assert _worker_resources(off) == {"CPU": 2.0}
    assert off.gpu_options() == {"num_gpus": 0}
    on = from_dict({"ray": {"use_gpu": True, "gpus_per_worker": 0.5,
                            "cpus_per_worker": 2}}).ray
    assert _worker_resources(on) == {"CPU": 2.0, "GPU": 0.5}
    assert on.gpu_options() == {"num_gpus": 0.5}


def test_evaluator_without_a_visible_gpu_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d, state, man = _release(tmp_path, use_gpu=True)
    with pytest.raises(ConfigError, match="ray.use_gpu is true but this worker sees no CUDA"):
        Evaluator(d, str(tmp_path)).synthesize(state, man, {})
    assert Evaluator(_release(tmp_path)[0], str(tmp_path)).device == torch.device("cpu")


def test_the_evaluation_device_reaches_inception_and_the_cnn(monkeypatch):
    seen = []
    real_extract, real_train = fid.extract_features, downstream.train_classifier

    def extract(*a, device="cpu", **k):
        seen.append(("inception", str(device)))
        return real_extract(*a, device="cpu", **k)

    def train(kind, *a, device="cpu", **k):
        seen.append((kind, str(device)))
        return real_train(kind, *a, device="cpu", **k)

    monkeypatch.setattr(fid, "extract_features", extract)
    monkeypatch.setattr(fid, "load_fid_inception", lambda *a, **k: fake_inception())
    monkeypatch.setattr(metric_groups, "train_classifier", train)
    ds = shapes(60, size=16, channels=1)
    ecfg = from_dict({"evaluation": {"fid_images": 20, "pr_k": 3, "classifiers": ["cnn"],
                                     "classifier": "cnn", "classifier_epochs": 1,
                                     "real_ceiling": False, "utility_matrix": False,
                                     "detector": False, "mia": False, "canary_audit": False,
                                     "memorisation": False}}).evaluation
    syn = ImageSet(ds.images, ds.labels, ds.class_names, name="synthetic")
    run_evaluation(ecfg, syn, ds, device="meta-test")
    assert ("inception", "meta-test") in seen and ("cnn", "meta-test") in seen
    assert all(dev == "meta-test" for _, dev in seen), seen


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_with_two_sampling_workers_releases_the_images_of_one(tmp_path, ray_local):
    """The pipeline's synthesis stage with ray.sampling_workers: 2 writes the
    images one in-process sampler draws from the same release."""
    from services.pipeline import run_pipeline  # lazy: slow opt-in test only

    cfg = from_dict(tiny_config(tmp_path, **{"ray.sampling_workers": 2}))
    s = run_pipeline(cfg, log=lambda _: None)
    run_dir = Path(s["run_dir"])
    man = read_manifest(run_dir)
    state = state_bytes(torch.load(run_dir / man.weights, map_location="cpu"))
    one = Evaluator(from_dict(tiny_config(tmp_path)).to_dict(), str(tmp_path / "one"))
    one.synthesize(state, man.to_dict(), {})
    written = json.loads((Path(s["synthetic_path"]) / "manifest.json").read_text())
    assert written["num_images"] == len(one.synthetic) == cfg.sampling.num_images
    assert written["sha1_pixels"] == hashlib.sha1(one.synthetic.images.tobytes()).hexdigest()
