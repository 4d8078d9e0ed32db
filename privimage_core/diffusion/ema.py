"""Exponential moving average of model weights.

Kept on the INNER (unwrapped) model: Opacus's GradSampleModule and DPDDP
prefix state-dict keys with ``_module.``/``module.``, so EMA copies and
checkpoints always use the plain model's keys. The EMA of DP iterates is
post-processing of DP outputs, hence as private as the iterates.
"""
from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "_module") or hasattr(model, "module"):
        model = getattr(model, "_module", None) or getattr(model, "module")
    return model


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in unwrap(model).state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                s.copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        unwrap(model).load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
