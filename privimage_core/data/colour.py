"""Colour transforms of public images, shared by the semantic query
function's ``augment`` mode (selection/semantic_query.py) and public
pre-training's ``pretrain.recolour`` (pretrain.py). Both only ever see
public images and draw from public randomness (the run's seed), so neither
costs privacy budget."""
from __future__ import annotations

import numpy as np
import torch

# The query function's augment mode: the share of each batch recoloured, the
# least difference of the two colours in some channel (on [0, 1]), and the
# share then grayscaled.
RECOLOUR_P, RECOLOUR_MIN_CONTRAST, GRAYSCALE_P = 0.75, 0.35, 0.1
_LUMA = (0.299, 0.587, 0.114)


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 1, H, W]: Rec. 601 luminance of RGB, or the one channel."""
    return (x * x.new_tensor(_LUMA)[None, :, None, None]).sum(1, keepdim=True) \
        if x.shape[1] == 3 else x[:, :1]


def recolour(x: torch.Tensor, gen: torch.Generator, p: float = RECOLOUR_P,
             grayscale_p: float = GRAYSCALE_P) -> torch.Tensor:
    """Random colour augmentation of a batch in [-1, 1]: a ``p`` share of the
    images has each channel's black and white mapped to a random background
    and stroke colour (per-channel gains of either sign: colour jitter and
    inversion), contrasting by at least RECOLOUR_MIN_CONTRAST in some
    channel; for RGB a ``grayscale_p`` share is then reduced to its
    luminance. Public randomness only (``gen``); the draws do not depend on
    ``p`` or ``grayscale_p``."""
    n, c = x.shape[:2]
    bg, fg = torch.rand(n, c, generator=gen), torch.rand(n, c, generator=gen)
    for _ in range(100):  # redraw the pairs without contrast
        weak = (fg - bg).abs().amax(dim=1) < RECOLOUR_MIN_CONTRAST
        if not weak.any():
            break
        bg[weak] = torch.rand(int(weak.sum()), c, generator=gen)
        fg[weak] = torch.rand(int(weak.sum()), c, generator=gen)
    bg, fg = bg.to(x.device), fg.to(x.device)
    mapped = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * (x + 1) / 2
    pick = (torch.rand(n, generator=gen) < p).to(x.device)
    out = torch.where(pick[:, None, None, None], mapped * 2 - 1, x)
    if c == 3:
        gray = (torch.rand(n, generator=gen) < grayscale_p).to(x.device)
        out = torch.where(gray[:, None, None, None], luma(out).expand_as(out), out)
    return out


def is_grayscale(images: np.ndarray) -> bool:
    """Whether uint8 NHWC images carry no colour: one channel, or all
    channels equal in every pixel."""
    if images.ndim != 4 or images.shape[-1] == 1:
        return True
    first = images[..., :1]
    return bool(all(np.array_equal(images[..., c:c + 1], first)
                    for c in range(1, images.shape[-1])))


def colour_gap(public_images: np.ndarray) -> bool:
    """Whether public images at an RGB run's three channels carry no colour
    (a grayscale pool repeated over RGB): the gap between a grayscale public
    pool and coloured sensitive images that ``semantic_query.colour: auto``
    and ``pretrain.recolour: auto`` bridge. Public images only."""
    return np.asarray(public_images).shape[-1] == 3 and is_grayscale(public_images)
