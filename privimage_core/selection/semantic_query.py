"""Step 1 (paper Sec. 3.2, Eq. 4): the semantic query function.

A classifier trained with cross-entropy on the labelled PUBLIC pool only; it
maps an image to probabilities over the public semantics. The paper uses a
ResNet50 on ImageNet at 32x32; here a small ResNet sized for 28-32 px images.
It never sees sensitive data during training.

Colour (``semantic_query.colour``): the public pool is mostly grayscale
(glyphs, Fashion-MNIST: bright strokes on black), while sensitive images may
come in any stroke and background colour, which a function trained on the
pool as it is cannot read (coloured digits all look like a shirt or a bag to
it). ``luminance``, the default, feeds the network a fixed view of each
image, in training and in prediction alike: its luminance, negated when the
image's border (its background) is brighter than its mean, and stretched to
the full range; a coloured digit then looks like an MNIST digit. ``augment``
instead trains on public images recoloured at random (each image's black and
white mapped to two contrasting colours, so a channel's gain may be
negative: colour jitter and inversion in one; some then grayscaled) and
predicts on the images as they are: it keeps colour, but at the default
epochs it learns the public labels far worse. benchmarks/query_colour.py
measures the three modes. Either way the function is trained on public data
and the seed only, and the view is a function of each image alone, so the
DP query's sensitivity argument is unchanged.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privimage_core.config.sections import COLOUR_MODES
from privimage_core.data.colour import colour_gap, luma, recolour  # shared with pre-training
from privimage_core.data.imageset import ImageSet
from privimage_core.data.imageset import writable_tensor


def luminance_view(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> the same shape: each image's luminance
    (C = 3: Rec. 601 weights), negated when its one-pixel border is brighter
    than its mean (a bright background: make it dark, as in the public pool),
    min-max stretched to [-1, 1] and repeated over the C channels."""
    lum = luma(x)
    border = torch.cat([lum[:, :, 0], lum[:, :, -1], lum[:, :, :, 0], lum[:, :, :, -1]], dim=2)
    flip = border.mean(dim=(1, 2)) > lum.mean(dim=(1, 2, 3))
    lum = torch.where(flip[:, None, None, None], -lum, lum)
    lo = lum.amin(dim=(1, 2, 3), keepdim=True)
    span = (lum.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-3)
    return ((lum - lo) / span * 2 - 1).expand(-1, x.shape[1], -1, -1)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)))
        return F.relu(self.n2(self.c2(h)) + self.skip(x))


class SmallResNet(nn.Module):
    """ResNet with three stages (w, 2w, 4w); BatchNorm is fine here because the
    query function trains on public data only, never under DP-SGD. With
    ``colour="luminance"`` every input goes through :func:`luminance_view`."""

    def __init__(self, num_classes: int, channels: int = 1, width: int = 32,
                 colour: str = "none"):
        super().__init__()
        self.luminance = colour == "luminance"
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(_Block(width, width, 1), _Block(width, 2 * width, 2),
                                    _Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        h = self.layers(self.stem(luminance_view(x) if self.luminance else x))
        return self.head(h.mean(dim=(2, 3)))


def _augment(x: torch.Tensor, gen: torch.Generator, colour: str) -> torch.Tensor:
    # Small random translations make the query robust to framing differences
    # between public and sensitive images (e.g. glyphs vs handwriting). The
    # recolouring comes after, so the black padding takes the background colour.
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    x = xp[:, :, i:i + x.shape[2], j:j + x.shape[3]]
    return recolour(x, gen) if colour == "augment" else x


def resolve_colour(colour: str, public_images: np.ndarray) -> str:
    """``colour`` (one of COLOUR_MODES) with ``auto`` decided from public
    images (uint8 [N, H, W, C], at the run's channels): ``luminance`` when a
    run in RGB has a grayscale pool (three equal channels: the colour gap),
    else ``none``: a one-channel run has no colour to bridge, and a colour
    pool's colours are part of what its labels mean."""
    if colour not in COLOUR_MODES:
        raise ValueError(f"colour={colour!r}; use one of {', '.join(COLOUR_MODES)}")
    if colour != "auto":
        return colour
    return "luminance" if colour_gap(public_images) else "none"


def train_semantic_query(pool: ImageSet, width: int = 32, epochs: int = 2, batch_size: int = 128,
                         lr: float = 2e-3, val_fraction: float = 0.1, seed: int = 0,
                         colour: str = "auto", device: str = "cpu",
                         log=None) -> tuple[SmallResNet, dict]:
    """Train on the public pool; returns the model and public-only metrics
    (validation accuracy on a held-out public split, as the images are, and
    the colour mode used). ``colour`` is one of COLOUR_MODES."""
    colour = resolve_colour(colour, pool.images)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(pool)
    perm = torch.randperm(n, generator=g).numpy()
    n_val = max(1, int(n * val_fraction)) if val_fraction > 0 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    x_all = pool.to_tensor()
    y_all = writable_tensor(pool.labels)
    model = SmallResNet(pool.num_classes, pool.shape[2], width, colour).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr_idx) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    model.train()
    for ep in range(epochs):
        order = torch.from_numpy(tr_idx)[torch.randperm(len(tr_idx), generator=g)]
        for s in range(steps_per_epoch):
            b = order[s * batch_size:(s + 1) * batch_size]
            xb = _augment(x_all[b], g, colour).to(device)
            loss = F.cross_entropy(model(xb), y_all[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log:
            log(f"semantic query: epoch {ep + 1}/{epochs} loss {loss.item():.3f}")
    model.eval()
    metrics = {"train_seconds": time.time() - t0, "colour": colour}
    if n_val:
        pred = predict_topk(model, x_all[val_idx], k=1, device=device)[:, 0]
        metrics["public_val_accuracy"] = float((pred == pool.labels[val_idx]).mean())
    return model, metrics


@torch.no_grad()
def predict_topk(model: nn.Module, x: torch.Tensor, k: int, batch_size: int = 1000,
                 device: str = "cpu") -> np.ndarray:
    """Top-k public semantics per image (Sec. 3.2), as label indices [N, k]."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        out.append(logits.topk(k, dim=1).indices.cpu())
    if not out:
        return np.zeros((0, k), dtype=np.int64)
    return torch.cat(out).numpy().astype(np.int64)
