"""Whole-model per-sample gradients with ``torch.func`` for Opacus's ``no_op`` mode.

``vmap(grad(functional_call(...)))`` differentiates the per-example loss of
each example of the physical batch in one vectorised pass and the result is
stored as ``p.grad_sample``, the field Opacus's hooks would have filled. The
DPOptimizer then does everything private as usual: per-sample clipping, the
Gaussian noise, the step hook (accounting), virtual steps
(BatchMemoryManager) and, under DPDDP, the all-reduce of the clipped sums.
Measured faster than the hooks on this project's UNet
(benchmarks/bench_dp_step.py), and noise multiplicity fits inside the
per-example function.

The per-example loss must be a pure function of (params, x_i, y_i, rnd_i):
vmap refuses random ops, so all randomness comes in ``rnd`` (drawn by the
objective outside).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

# Strips Opacus's GradSampleModule (``_module.``) and DPDDP / DDP (``module.``):
# the same Parameter objects the DPOptimizer holds, under unprefixed names.
from privimage_core.models.ema import unwrap


class _PerExample(nn.Module):
    """The objective's loss for ONE example (vmap strips the batch dim, the
    loss expects one): a module, so functional_call swaps the model's
    parameters for the traced ones while the loss still sees the real module
    (e.g. ``edm_loss`` looks up EDMPrecond's sigma_data on it)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x, y, rnd):
        one = {k: v.unsqueeze(0) for k, v in rnd.items()}
        return self.objective.loss(self.model, x.unsqueeze(0), y.unsqueeze(0), one)[0]


def compute_grad_samples(module: nn.Module, objective, x: torch.Tensor, y: torch.Tensor,
                         rnd: dict[str, torch.Tensor], chunk_size: int | None = None) -> None:
    """Set ``p.grad_sample`` [B, *p.shape] (the gradient of example i's loss,
    unscaled, as Opacus's hooks give for ``loss_reduction="mean"``) on every
    trainable parameter of ``module`` (possibly Opacus/DPDDP-wrapped).

    An empty batch (Poisson sampling can draw one) gets zero-row tensors: vmap
    cannot map over B = 0, and the optimizer must still step (noise added,
    step counted). ``chunk_size`` bounds the examples vmapped at once (memory).
    """
    model = unwrap(module)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for n, p in named:
        if getattr(p, "grad_sample", None) is not None:
            # Opacus would stack a second batch (accumulated_iterations 2), which
            # changes the sampling rate; overwriting would drop a batch. Refuse.
            raise RuntimeError(f"parameter '{n}' still holds per-sample gradients: call "
                               "optimizer.step() and optimizer.zero_grad() between batches")
    if x.shape[0] == 0:
        for _, p in named:
            p.grad_sample = p.new_zeros((0, *p.shape))
        return
    per_example = _PerExample(model, objective)
    params = {f"model.{n}": p.detach() for n, p in named}

    def loss_i(params, xi, yi, rnd_i):
        return functional_call(per_example, params, (xi, yi, rnd_i), strict=False)

    grads = vmap(grad(loss_i), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(params, x, y, rnd)
    for n, p in named:
        p.grad_sample = grads[f"model.{n}"]


def fold_multiplicity(params, batch: int, k: int) -> None:
    """Hooks mode with noise multiplicity: Opacus gave one gradient per ROW
    (B * k rows, example-major). Replace them by each example's mean over its
    k rows, BEFORE clipping: clipping each row would let one example move the
    sum by k * C, k times the sensitivity the accountant assumes."""
    for p in params:
        gs = p.grad_sample
        if gs is None:
            continue
        if not isinstance(gs, torch.Tensor) or gs.shape[0] != batch * k:
            got = type(gs).__name__ if not isinstance(gs, torch.Tensor) else gs.shape[0]
            raise RuntimeError(f"expected {batch} x {k} per-row gradients, got {got}: the "
                               "objective's forward must see the k draws of each example as "
                               "k consecutive rows")
        p.grad_sample = gs.reshape(batch, k, *gs.shape[1:]).mean(dim=1)
