"""Step 5 (paper Sec. 3.4, Algorithm 1): fine-tune on the SENSITIVE data with
DP-SGD through stock Opacus.

- Poisson sampling at rate q = logical batch / N (Opacus DPDataLoader).
- Per-sample gradients, clipped to ``max_grad_norm``: ``torch.func`` vmap
  over the whole model with Opacus's ``no_op`` mode
  (privimage_core/dp_sgd/per_sample_grads.py), Opacus's hooks, or book-keeping
  ghost clipping (privimage_core/dp_sgd/ghost_clipping.py: the clipped sum without
  per-sample gradients, into Opacus's fast-gradient-clipping optimizer). The loss is a
  ``DPObjective``, so model families other than diffusion plug in; DPDM's
  noise multiplicity (k draws per example averaged inside its loss) keeps one
  clipped gradient per example, so it costs no privacy.
- Gaussian noise N(0, sigma^2 C^2) added once per logical step by the
  DPOptimizer; virtual steps (BatchMemoryManager) let the logical batch exceed
  memory without adding noise per physical batch.
- Distributed: the caller wraps the model in Opacus's
  DifferentiallyPrivateDistributedDataParallel; Opacus then uses the
  DistributedDPOptimizer, where every rank clips its own per-sample gradients
  and only rank 0 adds the noise before the all-reduce, so the noise of a
  logical step is added once, at the scale the accountant assumes.
- Every real optimizer step is recorded in the privacy ledger through the
  optimizer's step hook; training stops before the ledger's target would be
  exceeded.
- Privacy randomness (Poisson sampling, gradient noise) comes from
  generators whose whole state is OS entropy (dp_sgd/entropy.py), never
  from the logged run seed.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
from opacus import PrivacyEngine
from opacus.optimizers import (DistributedDPOptimizerFastGradientClipping,
                               DPOptimizerFastGradientClipping)
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from privimage_core.config.training import GRAD_SAMPLE_MODES
from privimage_core.dp_sgd.entropy import entropy_generator
from privimage_core.dp_sgd.ghost_clipping import BookKeepingClipper, unsupported_parameters
from privimage_core.dp_sgd.per_sample_grads import compute_grad_samples, fold_multiplicity
from privimage_core.dp_sgd.poisson_sampler import keep_empty_draws
from privimage_core.models.base import DPObjective
from privimage_core.models.ema import unwrap
from privimage_core.privacy.ledger import MechanismRecord, PrivacyLedger
from privimage_core.privacy.plan import DP_SGD_MECHANISM


@dataclass
class DPTraining:
    model: torch.nn.Module  # Opacus GradSampleModule
    optimizer: torch.optim.Optimizer  # Opacus DPOptimizer (or DistributedDPOptimizer)
    loader: DataLoader  # Poisson-sampling DPDataLoader
    record: MechanismRecord
    sample_rate: float
    engine: PrivacyEngine
    grad_sample_mode: str = "hooks"  # "vmap": Opacus no_op + torch.func per-sample grads
    clipper: BookKeepingClipper | None = None  # "ghost": the clipped sum, no per-sample grads


def restrict_trainable(module: torch.nn.Module, pattern: str | None) -> int:
    """Freeze every parameter of ``module`` whose name ``pattern`` (a regular
    expression, ``re.search``) does not match; None changes nothing. Never
    unfreezes what the family froze. Returns how many scalars stay trainable,
    raising ValueError when none do.

    Frozen parameters keep their pre-trained (public) values and never see the
    sensitive data. The Gaussian noise of a DP-SGD step has the same scale on
    every trainable coordinate, so its norm grows with their number while the
    clipped signal does not: training fewer of them can keep more of the signal
    at the same budget (as in DP fine-tuning of biases or adapters only)."""
    if pattern is None:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    rx = re.compile(pattern)
    named = list(module.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    keep = {n for n, _ in trainable if rx.search(n)}
    if not keep:
        names = ", ".join(n for n, _ in trainable[:6])
        raise ValueError(f"'{pattern}' matches none of the {len(trainable)} trainable "
                         f"parameter names (e.g. {names})")
    for n, p in trainable:
        p.requires_grad_(n in keep)
    return sum(p.numel() for n, p in trainable if n in keep)


def resolve_grad_sample_mode(mode: str, module: torch.nn.Module) -> str:
    """"auto" -> "ghost" when book-keeping clipping supports every trainable
    layer of ``module``, else "vmap"; other modes unchanged."""
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got '{mode}'")
    if mode == "auto":
        return "vmap" if unsupported_parameters(module) else "ghost"
    return mode


def make_private(module: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, batch_size: int, noise_multiplier: float, max_grad_norm: float,
                 ledger: PrivacyLedger, distributed: bool = False,
                 grad_sample_mode: str = "hooks",
                 mechanism: str = DP_SGD_MECHANISM,
                 num_records: int | None = None,
                 sample_rate: float | None = None) -> DPTraining:
    """Wrap model, optimizer and the sensitive data with Opacus and attach the
    ledger to the optimizer. ``module`` is DPDDP-wrapped by the caller when
    distributed (Opacus then shards the Poisson sampling across ranks).

    ``grad_sample_mode``: "hooks" (Opacus computes ``grad_sample`` in
    backward; the default, for callers that run their own backward),
    "vmap" (Opacus ``no_op``: ``dp_finetune`` fills ``grad_sample`` with
    ``compute_grad_samples``) or "ghost" (Opacus ``no_op`` for the model and
    its fast-gradient-clipping optimizer, which only adds the noise:
    ``accumulate_grad_samples`` leaves the clipped sum in ``p.grad``).

    ``num_records``: the public record count the sampling rate and Opacus's
    expected batch size are computed from, instead of ``len(x)``. An audit
    run (evaluation/canary_audit.py) trains on the sensitive set plus a
    secret random subset of m canaries and passes N + m here: q must not
    depend on which canaries were included, or it would leak them and the
    per-record guarantee the audit tests (fixed q, add/remove one) would not
    hold.

    ``sample_rate``: the run's planned q (privacy/plan.py); the loader's own
    rate must equal it, or nothing is trained (the ledger would describe
    another mechanism than the one that ran)."""
    grad_sample_mode = resolve_grad_sample_mode(grad_sample_mode, module)
    data = TensorDataset(x, y)
    if num_records is None:
        loader = DataLoader(data, batch_size=batch_size)
    else:  # Opacus reads q = 1 / len(loader): make that length the planned one
        # (the public size may be below the rows trained on: a DP estimate,
        # or a declared size; Poisson sampling still covers every row)
        loader = DataLoader(data, batch_sampler=BatchSampler(
            SequentialSampler(range(num_records)), batch_size, drop_last=False))
    q = 1.0 / len(loader)
    if sample_rate is not None and not math.isclose(q, sample_rate, rel_tol=1e-12):
        raise RuntimeError(f"the loader's Poisson rate {q!r} is not the planned {sample_rate!r} "
                           "(the data reaching the worker differs from the plan's record count)")
    record = ledger.begin_dp_sgd(mechanism, noise_multiplier, q)
    # The engine's own accountant is not used: the ledger's hook replaces it below.
    engine = PrivacyEngine(accountant=ledger.accountant_name)
    # The generator must live where the gradients are: Opacus draws the noise
    # with torch.normal(device=grad.device, generator=...), which refuses a CPU
    # generator for CUDA tensors.
    device = next(module.parameters()).device
    noise_gen = entropy_generator(device)
    model, dp_opt, dp_loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True,
        grad_sample_mode="hooks" if grad_sample_mode == "hooks" else "no_op",
        noise_generator=noise_gen)
    clipper = None
    if grad_sample_mode == "ghost":
        # The clipped sum arrives in p.grad: Opacus's optimizer for its own
        # ghost mode accumulates it over virtual steps, adds the noise once,
        # divides by the expected batch size (rank 0 noises under DDP).
        clipper = BookKeepingClipper(model)
        # The fast-clipping optimizer noises p.grad without clipping it, so it
        # must update the clipper's parameters only: Opacus's make_private
        # above already refuses an optimizer whose parameters are not the
        # module's (test_ghost_clipping).
        cls = (DistributedDPOptimizerFastGradientClipping if distributed
               else DPOptimizerFastGradientClipping)
        dp_opt = cls(dp_opt.original_optimizer, noise_multiplier=dp_opt.noise_multiplier,
                     max_grad_norm=dp_opt.max_grad_norm,
                     expected_batch_size=dp_opt.expected_batch_size,
                     loss_reduction=dp_opt.loss_reduction, generator=dp_opt.generator,
                     secure_mode=dp_opt.secure_mode)
    if num_records is not None:  # Opacus set it from len(x): the noise scale would leak it
        world = torch.distributed.get_world_size() if distributed else 1
        dp_opt.expected_batch_size = int(num_records * q) / world
    dp_opt.attach_step_hook(ledger.step_hook(record, q))
    # Poisson sampling draws on the CPU from its own entropy-filled generator
    # (Opacus's default is torch's global one, 32 bits of seed on the CPU).
    dp_loader.batch_sampler.generator = entropy_generator("cpu")
    if distributed:  # every rank yields every Poisson draw, empty ones too
        dp_loader = keep_empty_draws(dp_loader)
    return DPTraining(model, dp_opt, dp_loader, record, q, engine, grad_sample_mode, clipper)


def accumulate_grad_samples(dp: DPTraining, objective: DPObjective, x: torch.Tensor,
                            y: torch.Tensor, noise_multiplicity: int = 1,
                            chunk_size: int | None = None) -> None:
    """Leave one per-example gradient (of the loss averaged over the k draws)
    in ``p.grad_sample`` for the physical batch (x, y), in either mode; the
    caller then calls ``dp.optimizer.step()``. An objective with
    ``uses_multiplicity = False`` (a deterministic loss, e.g. an
    autoencoder's) has nothing to average over: it runs at k = 1."""
    if not getattr(objective, "uses_multiplicity", True):
        noise_multiplicity = 1
    rnd = objective.draw(x, noise_multiplicity)
    if dp.grad_sample_mode == "ghost":
        dp.clipper.clipped_grad(lambda: objective.loss(dp.model, x, y, rnd), len(x),
                                dp.optimizer.max_grad_norm)
        return
    if dp.grad_sample_mode == "vmap":
        compute_grad_samples(dp.model, objective, x, y, rnd, chunk_size)
        return
    per_example = objective.loss(dp.model, x, y, rnd)
    # mean over the physical batch (Opacus rescales the hooks' per-row grads
    # for loss_reduction='mean'); an empty Poisson batch gives 0.
    (per_example.sum() / max(len(x), 1)).backward()
    if noise_multiplicity > 1:
        fold_multiplicity(dp.optimizer.params, len(x), noise_multiplicity)


def check_clipper(dp: DPTraining, objective: DPObjective, noise_multiplicity: int = 1,
                  n: int = 4, rtol: float = 1e-3) -> None:
    """Before the ghost mode trains, compare its per-example norms with
    vmap's on RANDOM inputs of the data's shape (nothing sensitive is read):
    an objective whose layer calls are not example-major would have its
    examples' gradients mixed, and clipping would not bound each one."""
    if dp.grad_sample_mode != "ghost":
        return
    if not getattr(objective, "uses_multiplicity", True):
        noise_multiplicity = 1
    xs, ys = dp.loader.dataset.tensors[:2]
    x = torch.rand(n, *xs.shape[1:], device=xs.device) * 2 - 1
    y = torch.zeros(n, dtype=ys.dtype, device=ys.device)
    params = list(dp.clipper.params)
    rnd = objective.draw(x, noise_multiplicity)
    ghost = dp.clipper.clipped_grad(lambda: objective.loss(dp.model, x, y, rnd), n, 1.0)
    compute_grad_samples(unwrap(dp.model), objective, x, y, rnd)
    ref = torch.stack([p.grad_sample.reshape(n, -1).norm(dim=1) for p in params]).norm(dim=0)
    for p in params:
        p.grad_sample, p.grad = None, None
    if not torch.allclose(ghost, ref, rtol=rtol, atol=1e-8):
        raise RuntimeError(f"ghost clipping's per-example norms {ghost.tolist()} differ from "
                           f"vmap's {ref.tolist()} on random inputs: the objective's layer calls "
                           "are not example-major; set finetune.grad_sample_mode vmap")


def dp_finetune(dp: DPTraining, ema, inner: torch.nn.Module, total_steps: int,
                physical_batch_size: int, *, objective: DPObjective,
                on_step: Callable[[int, float], None] | None = None,
                checkpoint_every: int = 0, on_checkpoint: Callable[[int], None] | None = None,
                noise_multiplicity: int = 1,
                after_step: Callable[[], None] | None = None,
                chunk_size: int | None = None) -> int:
    """Run DP-SGD until the DP-SGD record holds ``total_steps`` steps.

    ``inner`` is the unwrapped model (for EMA and checkpoints). ``objective``
    is the family's per-example loss (``ModelFamily.dp_objective``). ``after_step`` runs after every logical (noised,
    ledger-recorded) step, after the EMA update and before ``on_step`` and
    checkpoints: e.g. a GAN generator update, which is post-processing of the
    private discriminator. ``chunk_size`` bounds the examples vmapped at once.
    Returns the number of DP-SGD steps recorded in the ledger.
    """
    if noise_multiplicity < 1:
        raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
    check_clipper(dp, objective, noise_multiplicity)
    # The loss's own draws (diffusion noise levels) are not the privacy noise;
    # they come from the global generator, re-seeded so that runs differ.
    torch.seed()
    dp.model.train()
    record = dp.record
    # Throughput is reported from the EXPECTED logical batch (q * N), a public
    # quantity: realised Poisson batch sizes and losses on sensitive batches are
    # not DP outputs, so neither is reported.
    expected_batch = dp.sample_rate * len(dp.loader.dataset)
    while record.steps < total_steps:
        with BatchMemoryManager(data_loader=dp.loader, max_physical_batch_size=physical_batch_size,
                                optimizer=dp.optimizer) as loader:
            t0 = time.time()
            for xb, yb in loader:
                accumulate_grad_samples(dp, objective, xb, yb, noise_multiplicity, chunk_size)
                before = record.steps
                dp.optimizer.step()
                dp.optimizer.zero_grad(set_to_none=True)
                if record.steps > before:  # a logical step ended: noise added once
                    ema.update(inner)
                    if after_step is not None:
                        after_step()
                    if on_step is not None:
                        now = time.time()
                        on_step(record.steps, expected_batch / max(now - t0, 1e-9))
                        t0 = now
                    if checkpoint_every and on_checkpoint and record.steps % checkpoint_every == 0:
                        on_checkpoint(record.steps)
                    if record.steps >= total_steps:
                        break
    return record.steps
