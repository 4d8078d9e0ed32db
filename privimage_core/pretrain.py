"""Step 4 (paper Sec. 3.4, Algorithm 2 line 9): pre-train the generator on
PUBLIC images without DP (public data costs no budget). The loss and the
optimisers belong to the model family (``ModelFamily.public_trainer``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from privimage_core.config.training import PRETRAIN_RECOLOUR
from privimage_core.data.colour import colour_gap, recolour as recolour_batch
from privimage_core.models.base import PublicTrainer


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN runs bf16 convolutions natively
    there); torch's private probe, else the Linux CPU flags."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except Exception:
            pass
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device | str,
                      supported: tuple[str, ...] = ("fp32",)) -> str:
    """'fp32' or 'bf16' for ``pretrain.precision`` on ``device``, for a family
    whose public trainer supports ``supported``. 'auto' picks bf16 only where
    it is native and faster (AMX CPUs: 1.6x on the tiny preset; CUDA GPUs
    with bf16); elsewhere emulated bf16 would be slower than fp32."""
    dev = torch.device(device)
    if precision == "bf16" and "bf16" not in supported:
        raise ValueError("this model family pre-trains in fp32 only; set pretrain.precision: "
                         "fp32 or auto")
    if precision != "auto":
        return precision
    if "bf16" not in supported:
        return "fp32"
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_amx() else "fp32"


def resolve_recolour(mode: str, channels: int, public_images: np.ndarray) -> bool:
    """Whether pre-training recolours its images (``pretrain.recolour``):
    'auto' is on for an RGB run (``channels`` 3) whose public images are
    grayscale, decided from those public images alone."""
    if mode not in PRETRAIN_RECOLOUR:
        raise ValueError(f"pretrain.recolour={mode!r}; use one of {', '.join(PRETRAIN_RECOLOUR)}")
    if mode != "auto":
        return mode == "on"
    return channels == 3 and colour_gap(public_images)


def pretrain(trainer: PublicTrainer, after_step: Callable[[], None], x: torch.Tensor,
             y: torch.Tensor, steps: int, batch_size: int, seed: int = 0, start_step: int = 0,
             on_step: Callable[[int, float, float], None] | None = None,
             checkpoint_every: int = 0, on_checkpoint: Callable[[int], None] | None = None,
             recolour: bool = False) -> int:
    """Minibatch training on (x in [-1, 1], y class ids); ``after_step`` runs
    after every step (the EMA update). ``recolour``: map every image's black
    and white to two random contrasting colours (resolve_recolour).

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
        if recolour:
            # Every image, none grayscaled: the sensitive images of an RGB run
            # are all in colour. Public images and the seed's stream only, so
            # no privacy cost; off, the stream is drawn exactly as before.
            xb = recolour_batch(xb, g, p=1.0, grayscale_p=0.0)
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
