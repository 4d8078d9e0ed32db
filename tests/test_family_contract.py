"""The model-family contract (privimage_core/models/base.py), checked for
every registered family (``FAMILY_NAMES``): a new family is tested by
registering it. Tiny presets, tiny batches, at 28x28x1 and 32x32x3.

For each family and image shape:
- it builds from a run's config for each of its methods (``build_model``),
  and every DP part of its methods' stages has a plan and a trainable module;
- for every DP part, the per-example gradients of the family's DP loss from
  ``compute_grad_samples`` (vmap) equal a per-example loop of ordinary
  backprop, each example's row of one batched forward: the batch that
  Opacus's hooks and ghost clipping see (control: a loss that mixes the
  batch's examples is caught);
- ghost clipping's per-example norms and clipped sum equal vmap's where its
  layers are supported, and it refuses the module where not (control: a
  forward whose rows are not example-major is caught);
- a state-dict round trip gives identical outputs (control: a freshly built
  model's differ, so the outputs do see the weights);
- ``sample`` gives uint8 [N, H, W, C] images for the labels, the same for
  the same seed; ``audit_loss`` a finite [B], the same for the same seed;
- sampling split into contiguous shards (``start_index``; several sampling
  workers) gives the images of one call, with 1, 2 or 3 shards (control:
  shards that all start at image 0, reusing the seeds, differ);
- a release written with its manifest (``ReleaseManifest.for_run`` ->
  ``write_release`` -> ``load_release``) rebuilds the same network (control:
  a manifest describing another network is refused).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privimage_core.config import from_dict
from privimage_core.dp_sgd.ghost_clipping import BookKeepingClipper, unsupported_parameters
from privimage_core.dp_sgd.per_sample_grads import compute_grad_samples
from privimage_core.errors import DataError
from privimage_core.methods import METHODS
from privimage_core.models import FAMILY_NAMES, build_model, get_family
from privimage_core.models.base import DPStagePlan, ModelFamily
from privimage_core.models.release import (MANIFEST_FILE, ReleaseManifest, load_release,
                                           write_release)
from privimage_core.synthesize import generate, shard_ranges

torch.set_num_threads(1)

IMAGE_SHAPES = ((28, 1), (32, 3))  # (size, channels)
CLASS_NAMES = [str(i) for i in range(10)]
B, K = 3, 2  # examples per batch, noise multiplicity (draws per example)
LABELS = torch.tensor([0, 3, 9])
# Relative error allowed between two computations of one gradient (float32).
RTOL = 1e-4


def family_methods(family: str) -> list[str]:
    names = [n for n, m in METHODS.items() if m.family == family]
    assert names, f"no registered method uses the '{family}' family: add one to METHODS"
    return names


def dp_parts(family: str) -> list[str | None]:
    """The ``part`` option of every DP-SGD stage of the family's methods, in
    order, once each (None: a single-stage family)."""
    parts = [s.options.get("part") for n in family_methods(family)
             for s in METHODS[n].stages if s.kind == "dp_finetune"]
    return list(dict.fromkeys(parts))


def run_config(family: str, size: int, channels: int, method: str | None = None):
    """A run's config choosing ``method`` (default: the family's first), its
    family's tiny preset, and label dropout on (the objectives' extra draw)."""
    fam = get_family(family)
    preset = "tiny" if "tiny" in fam.presets else fam.presets[0]
    return from_dict({"method": method or family_methods(family)[0],
                      "data": {"image_size": size, "channels": channels},
                      "generator": {"preset": preset, "label_dropout": 0.25}})


def build(cfg, family: str, seed: int) -> torch.nn.Module:
    """The family's model for ``cfg``, every weight moved off its
    initialisation: zero-initialised layers (output convolutions, the GAN's
    projection) would otherwise hide weights from the outputs compared."""
    torch.manual_seed(seed)
    model = build_model(cfg, family, len(CLASS_NAMES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module", params=[(f, s, c) for f in FAMILY_NAMES for s, c in IMAGE_SHAPES],
                ids=lambda p: f"{p[0]}-{p[1]}x{p[1]}x{p[2]}")
def case(request):
    family, size, channels = request.param
    cfg = run_config(family, size, channels)
    torch.manual_seed(1)
    x = torch.rand(B, channels, size, size) * 2 - 1
    return SimpleNamespace(family=family, fam=get_family(family), cfg=cfg, size=size,
                           channels=channels, model=build(cfg, family, seed=0), x=x, y=LABELS)


def objective_and_draws(case, model, part):
    """(the family's DP objective for ``part`` of ``model``, its random
    inputs for the case's batch, drawn with a fixed seed)."""
    obj = case.fam.dp_objective(model, part, case.cfg)
    k = K if getattr(obj, "uses_multiplicity", True) else 1
    torch.manual_seed(2)
    return obj, obj.draw(case.x, k)


def trainable(module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def vmap_grads(module, obj, x, y, rnd) -> torch.Tensor:
    """[B, P]: ``compute_grad_samples``' per-example gradients, flattened."""
    params = [p for _, p in trainable(module)]
    try:
        compute_grad_samples(module, obj, x, y, rnd)
        return torch.cat([p.grad_sample.reshape(len(x), -1) for p in params], dim=1)
    finally:
        for p in params:
            p.grad_sample = None


def loop_grads(module, obj, x, y, rnd) -> torch.Tensor:
    """[B, P]: example i's gradient by ordinary backprop of row i of one
    batched forward of the per-example loss."""
    params = [p for _, p in trainable(module)]
    losses = obj.loss(module, x, y, rnd)
    assert losses.shape == (len(x),)
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                               for gi, p in zip(g, params)]))
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-example relative error of ``a`` against ``b`` ([B, P])."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max())


class MixedBatch:
    """Control: the family's loss plus the batch's mean loss, so that each
    example's 'per-example' loss depends on the other examples."""

    def __init__(self, base):
        self.base = base
        self.uses_multiplicity = getattr(base, "uses_multiplicity", True)

    def draw(self, x, k):
        return self.base.draw(x, k)

    def loss(self, model, x, y, rnd):
        per = self.base.loss(model, x, y, rnd)
        return per + per.mean()


class ReversedRows:
    """Control: the family's loss with the batch run in reverse order and the
    losses put back, the same per-example losses, but row i of every layer
    call belongs to example B-1-i (not example-major)."""

    def __init__(self, base):
        self.base = base

    def loss(self, model, x, y, rnd):
        flip = {k: v.flip(0) for k, v in rnd.items()}
        return self.base.loss(model, x.flip(0), y.flip(0), flip).flip(0)


def outputs(case, model) -> dict[str, torch.Tensor]:
    """What a model computes, every part of it: each DP part's per-example
    loss (fixed draws), the audit loss and a few samples of the release."""
    out = {}
    for part in dp_parts(case.family):
        obj, rnd = objective_and_draws(case, case.model, part)  # the same draws for any model
        obj = case.fam.dp_objective(model, part, case.cfg)
        with torch.no_grad():
            out[f"loss[{part}]"] = obj.loss(case.fam.dp_module(model, part), case.x, case.y, rnd)
    return {**out, **release_outputs(case, case.fam, case.fam.release_module(model))}


def release_outputs(case, fam, release) -> dict[str, torch.Tensor]:
    """The released module's audit loss and a few samples, seeded."""
    return {"audit": fam.audit_loss(release, case.x, case.y, seed=0),
            "sample": torch.from_numpy(fam.sample(release, LABELS.numpy(), num_steps=2,
                                                  solver="heun", seed=0, batch_size=B))}


def same_outputs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the checks

def test_builds_from_each_method_config_with_its_dp_parts(case):
    fam = case.fam
    assert isinstance(fam, ModelFamily) and fam.name == case.family
    shapes = {k: v.shape for k, v in case.model.state_dict().items()}
    for method in family_methods(case.family):  # one network whatever the family's method
        other = build_model(run_config(case.family, case.size, case.channels, method),
                            case.family, len(CLASS_NAMES))
        assert {k: v.shape for k, v in other.state_dict().items()} == shapes, method
    whole = {id(p) for p in case.model.parameters()}
    for part in dp_parts(case.family):
        plan = fam.dp_stage_plan(case.cfg, part)
        assert isinstance(plan, DPStagePlan) and plan.steps >= 1 and plan.lr > 0, part
        dp = fam.dp_module(case.model, part)
        assert trainable(dp) and {id(p) for p in dp.parameters()} <= whole, part
    released = fam.release_module(case.model)
    assert {id(p) for p in released.parameters()} <= whole
    with pytest.raises(ValueError):  # a part no stage names is refused
        fam.dp_module(case.model, "no_such_part")


def test_vmap_per_example_grads_equal_a_loop_of_backprop(case):
    for part in dp_parts(case.family):
        module = case.fam.dp_module(case.model, part)
        obj, rnd = objective_and_draws(case, case.model, part)
        got = vmap_grads(module, obj, case.x, case.y, rnd)
        ref = loop_grads(module, obj, case.x, case.y, rnd)
        assert got.shape == (B, sum(p.numel() for _, p in trainable(module)))
        assert ref.norm(dim=1).min() > 0, part  # every example has a gradient
        assert rel_err(got, ref) < RTOL, part


def test_control_a_loss_mixing_the_examples_is_caught(case):
    """The comparison above fails for a loss that is not per-example."""
    part = dp_parts(case.family)[-1]
    module = case.fam.dp_module(case.model, part)
    obj, rnd = objective_and_draws(case, case.model, part)
    bad = MixedBatch(obj)
    got = vmap_grads(module, bad, case.x, case.y, rnd)
    assert rel_err(got, loop_grads(module, bad, case.x, case.y, rnd)) > 100 * RTOL


def test_ghost_clipping_norms_and_clipped_sum_equal_vmaps(case):
    for part in dp_parts(case.family):
        model = copy.deepcopy(case.model)  # the clipper's hooks stay on its module
        module = case.fam.dp_module(model, part)
        obj, rnd = objective_and_draws(case, model, part)
        if unsupported_parameters(module):
            with pytest.raises(ValueError, match="ghost"):
                BookKeepingClipper(module)
            continue
        per = vmap_grads(module, obj, case.x, case.y, rnd)
        norms = per.norm(dim=1)
        clip = float(norms.median())  # some examples clipped, some not
        clipper = BookKeepingClipper(module)
        ghost = clipper.clipped_grad(lambda: obj.loss(module, case.x, case.y, rnd), B, clip)
        torch.testing.assert_close(ghost, norms, rtol=1e-3, atol=0)
        c = (clip / (norms + 1e-6)).clamp(max=1.0)
        summed = torch.cat([p.grad.reshape(-1) for p in clipper.params])
        assert rel_err(summed[None], (c @ per)[None]) < 1e-3, part


def test_control_rows_that_are_not_example_major_are_caught(case):
    """Ghost clipping's norms are per row: with the batch's rows reversed
    inside the forward they are the wrong examples' (the per-example losses,
    hence vmap's norms, are unchanged)."""
    part = dp_parts(case.family)[-1]
    model = copy.deepcopy(case.model)
    module = case.fam.dp_module(model, part)
    obj, rnd = objective_and_draws(case, model, part)
    if unsupported_parameters(module):
        pytest.skip("ghost clipping refuses this module (checked above)")
    bad = ReversedRows(obj)
    norms = vmap_grads(module, bad, case.x, case.y, rnd).norm(dim=1)
    assert torch.allclose(norms, vmap_grads(module, obj, case.x, case.y, rnd).norm(dim=1),
                          rtol=1e-4)
    ghost = BookKeepingClipper(module).clipped_grad(
        lambda: bad.loss(module, case.x, case.y, rnd), B, 1.0)
    assert not torch.allclose(ghost, norms, rtol=1e-2)


def test_state_dict_round_trip_gives_identical_outputs(case):
    ref = outputs(case, case.model)
    twin = build(case.cfg, case.family, seed=1)
    assert not same_outputs(outputs(case, twin), ref)  # control: other weights, other outputs
    twin.load_state_dict(case.model.state_dict())
    assert same_outputs(outputs(case, twin), ref)


def test_sample_gives_uint8_images_for_the_labels(case):
    rel = case.fam.release_module(case.model)
    labels = np.array([0, 3, 9, 3, 1])
    img = case.fam.sample(rel, labels, num_steps=2, solver="heun", seed=5, batch_size=2)
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8
    assert img.shape == (len(labels), case.size, case.size, case.channels)
    again = case.fam.sample(rel, labels, num_steps=2, solver="heun", seed=5, batch_size=2)
    assert np.array_equal(img, again)
    other = case.fam.sample(rel, labels, num_steps=2, solver="heun", seed=6, batch_size=2)
    assert not np.array_equal(img, other)


def test_guidance_flag_matches_what_sample_does(case):
    """A family that declares ``guidance`` samples differently at w > 0 (its
    null label is used); one that does not refuses a scale, so the config's
    check (methods.check_guidance) and the sampler agree."""
    rel = case.fam.release_module(case.model)
    labels = np.array([0, 3, 9])
    kw = dict(num_steps=2, solver="euler", seed=5, batch_size=3)
    if case.fam.guidance:
        plain = case.fam.sample(rel, labels, **kw)
        assert not np.array_equal(plain, case.fam.sample(rel, labels, guidance=1.0, **kw))
    else:
        with pytest.raises(ValueError, match="guidance"):
            case.fam.sample(rel, labels, guidance=1.0, **kw)


def test_sharded_sampling_gives_the_images_of_one_call(case):
    rel = case.fam.release_module(case.model)
    n = 7
    whole = generate(case.fam, rel, n, CLASS_NAMES, num_steps=2, solver="euler", seed=5,
                     batch_size=3)

    def sharded(shards: int, reuse_seeds: bool = False) -> np.ndarray:
        parts = []
        for a, b in shard_ranges(n, shards):
            part = generate(case.fam, rel, n, CLASS_NAMES, num_steps=2, solver="euler", seed=5,
                            batch_size=3, start=a, stop=b)
            if reuse_seeds:  # control: every shard draws images 0.. of the seed again
                part = case.fam.sample(rel, part.labels, num_steps=2, solver="euler", seed=5,
                                       batch_size=3)
                part = SimpleNamespace(images=part)
            parts.append(part.images)
        return np.concatenate(parts)

    for shards in (1, 2, 3):
        assert np.array_equal(sharded(shards), whole.images), shards
    assert not np.array_equal(sharded(2, reuse_seeds=True), whole.images)


def test_audit_loss_is_a_finite_score_per_example(case):
    rel = case.fam.release_module(case.model)
    loss = case.fam.audit_loss(rel, case.x, case.y, seed=0)
    assert isinstance(loss, torch.Tensor) and loss.shape == (B,) and loss.is_floating_point()
    assert torch.isfinite(loss).all()
    assert torch.equal(loss, case.fam.audit_loss(rel, case.x, case.y, seed=0))


def test_release_manifest_round_trip_rebuilds_the_same_network(case, tmp_path):
    man = ReleaseManifest.for_run(case.cfg, case.family, CLASS_NAMES, "dp_generator.pt")
    assert (man.family, man.method) == (case.family, case.cfg.method)
    weights = write_release(tmp_path, case.model.state_dict(), man)
    ref = release_outputs(case, case.fam, case.fam.release_module(case.model))
    for where in (tmp_path, tmp_path / MANIFEST_FILE, weights):
        fam, release, got = load_release(where)
        assert type(fam) is type(case.fam) and got == man
        assert not release.training
        assert same_outputs(release_outputs(case, fam, release), ref), where
    # control: a manifest of another network (the other channel count) is refused
    other = ReleaseManifest.from_dict({**man.to_dict(), "channels": 4 - case.channels})
    write_release(tmp_path, case.model.state_dict(), other)
    with pytest.raises(DataError, match="does not fit its manifest"):
        load_release(tmp_path)
