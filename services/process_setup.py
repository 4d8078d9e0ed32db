"""Per-process torch settings, applied in every Ray worker and actor."""
from __future__ import annotations

import warnings

import torch

# Opacus's per-sample-gradient hooks fire on modules whose inputs need no
# gradient (the first layer's input is data): torch then warns on every
# backward. Expected and harmless under Opacus ("hooks" grad-sample mode).
FULL_BACKWARD_HOOK_WARNING = ("Full backward hook is firing when gradients are computed with "
                              "respect to module outputs since no inputs require gradients")
# Opacus warns that its secure_mode (a CSPRNG that also resists floating-point
# attacks on the Gaussian sampler) is off. The noise and sampling generators
# here hold OS entropy in their whole state (dp_sgd/entropy.py); what that does
# not cover is stated in docs/privacy.md, once, instead of per worker.
SECURE_RNG_WARNING = "Secure RNG turned off"


def configure_torch(cfg) -> None:
    warnings.filterwarnings("ignore", message=FULL_BACKWARD_HOOK_WARNING, category=UserWarning)
    warnings.filterwarnings("ignore", message=SECURE_RNG_WARNING, category=UserWarning)
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    # Adam's second moments of rarely-updated weights decay into subnormal
    # floats, which x86 CPUs process ~100x slower; flushing them to zero
    # changes nothing measurable in training and keeps step times flat.
    torch.set_flush_denormal(True)
