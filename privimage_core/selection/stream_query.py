"""The semantic query function (Sec. 3.2) trained from a stream of public
batches, for pools too large to hold in memory: the same network, optimiser,
schedule and augmentation as ``semantic_query.train_semantic_query``, fed by
whatever yields (images, labels) batches (services/public_data.py streams
them from the pool's shards with Ray Data). Public data only."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privimage_core.data.imageset import writable_tensor
from privimage_core.selection.semantic_query import SmallResNet, _augment, predict_topk


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,C] -> float [N,C,H,W] in [-1, 1], as ImageSet.to_tensor."""
    return writable_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_semantic_query_stream(
        epoch_batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
        steps_per_epoch: int, num_classes: int, channels: int,
        val: tuple[np.ndarray, np.ndarray] | None = None, width: int = 32, epochs: int = 2,
        lr: float = 2e-3, seed: int = 0, colour: str = "luminance", device: str = "cpu",
        log=None, wrap: Callable[[nn.Module], nn.Module] | None = None
        ) -> tuple[SmallResNet, dict]:
    """Train on ``epoch_batches(epoch)`` (uint8 NHWC images, int labels),
    at most ``steps_per_epoch`` batches an epoch; returns the model and
    public-only metrics (accuracy on the held-out public ``val`` rows, which
    the stream must not contain, and the training throughput). ``wrap``
    makes the network data-parallel (each worker then streams its own
    share); the model returned is the network itself."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallResNet(num_classes, channels, width, colour).to(device)
    model = wrap(net) if wrap else net
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    seen = steps = 0
    model.train()
    for ep in range(epochs):
        done = 0
        for images, labels in epoch_batches(ep):
            if done == steps_per_epoch:
                break
            xb = _augment(to_model_input(images), g, colour).to(device)
            yb = torch.from_numpy(np.array(labels, dtype=np.int64)).to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            seen += len(labels)
        steps += done
        if log and done:
            log(f"semantic query: epoch {ep + 1}/{epochs} loss {loss.item():.3f}")
    net.eval()
    seconds = time.time() - t0
    metrics = {"train_seconds": seconds, "train_images": seen, "train_steps": steps,
               "train_images_per_second": seen / seconds if seconds > 0 else 0.0}
    if val is not None and len(val[1]):
        metrics["public_val_accuracy"] = val_accuracy(net, val, device)
    return net, metrics


def val_accuracy(model: nn.Module, val: tuple[np.ndarray, np.ndarray],
                 device: str = "cpu") -> float:
    """Top-1 accuracy on held-out public (uint8 NHWC images, labels)."""
    # small batches: the held-out images' activations stay small at any pool size
    pred = predict_topk(model, to_model_input(val[0]), k=1, batch_size=128, device=device)[:, 0]
    return float((pred == np.asarray(val[1])).mean())
