"""The GPU paths on CUDA (marker ``gpu``; skipped where CUDA is absent, so
the default suite on a CPU machine only collects them): ghost clipping's
per-example norms and clipped sum on CUDA equal the CPU's; a DP-SGD step
through Opacus's distributed optimizer over an NCCL process group; the
tests' tiny end-to-end run with ray.use_gpu, its synthetic set drawn by two
sampling workers sharing one GPU (close to the same release sampled on the
CPU: float rounding only); and, where two GPUs are visible, a run whose two
Ray Train workers train with DDP over NCCL.

    python -m pytest -q -p no:cacheprovider tests/test_gpu.py   # or benchmarks/gpu_check.sh
"""
from __future__ import annotations

import copy
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

from privimage_core.config import from_dict
from privimage_core.dp_sgd.finetune import accumulate_grad_samples, make_private
from privimage_core.dp_sgd.ghost_clipping import BookKeepingClipper
from privimage_core.models.diffusion.edm import EDMObjective, EDMPrecond
from privimage_core.models.diffusion.unet import build_unet
from privimage_core.models.release import read_manifest
from privimage_core.models.state import state_bytes
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.synthesize import read_dataset
from services.actors import Evaluator
from tests.helpers import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def exact_cuda_float32():
    """TF32 off (Hopper runs float32 matmuls and convolutions in TF32 by
    default, about 1e-3 relative): the CPU comparison is of float32 kernels."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _unet(seed: int = 0) -> EDMPrecond:
    # "small" at 16x16: attention at 8x8, ghost and instantiated convolutions,
    # the class Embedding and the noise MLP
    torch.manual_seed(seed)
    m = EDMPrecond(build_unet("small", 16, 1, 3))
    with torch.no_grad():  # off EDM's zero-initialised layers
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _ghost(model, obj, x, y, rnd, clip):
    norms = BookKeepingClipper(model).clipped_grad(lambda: obj.loss(model, x, y, rnd),
                                                   len(x), clip)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return norms.double().cpu(), grads.double().cpu()


def test_ghost_clipping_on_cuda_equals_the_cpu(exact_cuda_float32):
    obj = EDMObjective()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 3, (6,), generator=g)
    rnd = obj.draw(x, 2)  # noise multiplicity 2, drawn on the CPU for both
    cpu = _unet()
    gpu = copy.deepcopy(cpu).cuda()
    n_cpu, _ = _ghost(cpu, obj, x, y, rnd, 1e9)
    clip = float(n_cpu.median())  # some examples clipped, some not
    n_cpu, s_cpu = _ghost(cpu, obj, x, y, rnd, clip)
    to = {k: v.cuda() for k, v in rnd.items()}
    n_gpu, s_gpu = _ghost(gpu, obj, x.cuda(), y.cuda(), to, clip)
    torch.testing.assert_close(n_gpu, n_cpu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s_gpu, s_cpu, rtol=1e-3, atol=1e-5)
    assert (n_cpu > clip).any() and (n_cpu < clip).any()
    # control: other inputs give other norms at this tolerance
    n_other, _ = _ghost(gpu, obj, x.flip(0).cuda(), y.cuda(), to, clip)
    assert not torch.allclose(n_other, n_cpu, rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ghost", "vmap"])
def test_dp_step_through_the_distributed_optimizer_over_nccl(mode):
    """One rank, NCCL: DPDDP and Opacus's distributed optimizer all-reduce the
    clipped sum and take a noised, ledger-recorded step on the GPU."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DPDDP(EDMPrecond(build_unet("tiny", 16, 1, 3)).cuda())
        before = [p.detach().clone() for p in model.parameters()]
        x = (torch.rand(8, 1, 16, 16) * 2 - 1).cuda()
        y = torch.randint(0, 3, (8,)).cuda()
        ledger = PrivacyLedger(1e9, 1e-5)
        dp = make_private(model, torch.optim.Adam(model.parameters(), 1e-3), x, y,
                          batch_size=8, noise_multiplier=1.0, max_grad_norm=1.0,
                          ledger=ledger, distributed=True, grad_sample_mode=mode)
        accumulate_grad_samples(dp, EDMObjective(), x, y)
        dp.optimizer.step()
        torch.cuda.synchronize()
        after = list(model.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(after, before))
        assert dp.record.steps == 1
    finally:
        dist.destroy_process_group()


def _run(tmp_path, **over):
    from services.pipeline import run_pipeline  # lazy: starts Ray, only the run tests need it

    cfg = from_dict(tiny_config(tmp_path, **{"ray.use_gpu": True, **over}))
    return cfg, run_pipeline(cfg, log=lambda _: None)


def test_tiny_end_to_end_run_on_one_gpu(tmp_path, ray_local):
    cfg, s = _run(tmp_path, **{"ray.gpus_per_worker": 0.5, "ray.sampling_workers": 2})
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
    run_dir = Path(s["run_dir"])
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    if torch.cuda.is_bf16_supported():  # pretrain.precision auto: bf16 only on a GPU here
        assert state["stages"]["pretrain"]["precision"] == "bf16"
    assert 0.0 <= s["accuracy"] <= 1.0
    # the two GPU shards against the same release sampled on this process's CPU
    man = read_manifest(run_dir)
    weights = state_bytes(torch.load(run_dir / man.weights, map_location="cpu"))
    cpu = Evaluator(from_dict(tiny_config(tmp_path)).to_dict(), str(tmp_path / "cpu"))
    cpu.synthesize(weights, man.to_dict(), {})
    gpu = read_dataset(s["synthetic_path"])
    assert np.array_equal(gpu.labels, cpu.synthetic.labels)
    # float rounding (TF32 convolutions in the workers) moves pixels by a level
    # or so; other latents (control: another seed) move them by many
    diff = np.abs(gpu.images.astype(int) - cpu.synthetic.images.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8, (diff.mean(), diff.max())
    other = Evaluator(from_dict(tiny_config(tmp_path, **{"run.seed": 99})).to_dict(),
                      str(tmp_path / "other"))
    other.synthesize(weights, man.to_dict(), {})
    assert np.abs(gpu.images.astype(int) - other.synthetic.images.astype(int)).mean() > 2.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_two_train_workers_run_ddp_over_nccl(tmp_path, ray_local):
    cfg, s = _run(tmp_path, **{"ray.num_workers": 2})
    assert s["ledger"]["records"][-1]["steps"] == cfg.finetune.steps
    assert 0 < s["epsilon"] <= cfg.privacy.target_epsilon
