"""Step 4 (paper Sec. 3.4, Algorithm 2 line 9): pre-train the generator on the
selected, relabelled PUBLIC images, without DP (public data costs no budget)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from privimage_core.diffusion.edm import edm_loss, sample_training_noise
from privimage_core.diffusion.ema import EMA


def pretrain(precond: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
             x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, seed: int = 0,
             start_step: int = 0, on_step: Callable[[int, float, float], None] | None = None,
             checkpoint_every: int = 0, on_checkpoint: Callable[[int], None] | None = None) -> int:
    """Minibatch training of the EDM loss on (x in [-1, 1], y class ids).

    Resumable: ``start_step`` continues the step count and the minibatch stream
    (the generator is re-seeded per step, so a resumed run draws what the
    uninterrupted run would have drawn). Returns the last step done.
    """
    n = len(x)
    if n == 0:
        raise ValueError("the pre-training selection is empty")
    precond.train()
    step = start_step
    t_last = time.time()
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        xb, yb = x[idx], y[idx]
        # Light augmentation for the public images: +-1 px shifts.
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        sigma, noise = sample_training_noise(xb, generator=g)
        loss = edm_loss(precond, xb, yb, sigma, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(precond)
        step += 1
        if on_step is not None:
            now = time.time()
            on_step(step, float(loss.item()), len(idx) / max(now - t_last, 1e-9))
            t_last = now
        if checkpoint_every and on_checkpoint and step % checkpoint_every == 0:
            on_checkpoint(step)
    return step
