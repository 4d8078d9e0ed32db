"""Step 4 (paper Sec. 3.4, Algorithm 2 line 9): pre-train the generator on
PUBLIC images without DP (public data costs no budget). The loss and the
optimisers belong to the model family (``ModelFamily.public_trainer``)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from privimage_core.models.base import PublicTrainer


def pretrain(trainer: PublicTrainer, after_step: Callable[[], None], x: torch.Tensor,
             y: torch.Tensor, steps: int, batch_size: int, seed: int = 0, start_step: int = 0,
             on_step: Callable[[int, float, float], None] | None = None,
             checkpoint_every: int = 0, on_checkpoint: Callable[[int], None] | None = None) -> int:
    """Minibatch training on (x in [-1, 1], y class ids); ``after_step`` runs
    after every step (the EMA update).

    Resumable: ``start_step`` continues the step count and the minibatch stream
    (the generator is re-seeded per step, so a resumed run draws what the
    uninterrupted run would have drawn). Returns the last step done.
    """
    n = len(x)
    if n == 0:
        raise ValueError("the pre-training data is empty")
    step = start_step
    t_last = time.time()
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        xb, yb = x[idx], y[idx]
        # Light augmentation for the public images: +-1 px shifts.
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        loss = trainer.step(xb, yb, g)
        after_step()
        step += 1
        if on_step is not None:
            now = time.time()
            on_step(step, loss, len(idx) / max(now - t_last, 1e-9))
            t_last = now
        if checkpoint_every and on_checkpoint and step % checkpoint_every == 0:
            on_checkpoint(step)
    return step
