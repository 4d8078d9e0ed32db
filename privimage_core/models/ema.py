"""Exponential moving average of model weights (EDM and DPDM sample from the
EMA weights, which average out optimiser noise; under DP-SGD they also
average out part of the injected Gaussian noise).

The shadow copy is of the INNER (unwrapped) model: Opacus's GradSampleModule
registers the model as ``_module`` (state-dict keys ``_module.*``) and
(DP)DDP as ``module``; ``unwrap`` strips those wrappers, so EMA copies and
checkpoints always carry the plain model's keys and load into an unwrapped
model. The EMA of DP iterates is post-processing of DP outputs, hence as
private as the iterates.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

_GSM_BASE = "AbstractGradSampleModule"  # opacus.grad_sample.gsm_base (all grad_sample_modes)
_DDP_NAMES = {"DistributedDataParallel", "DataParallel",
              "DifferentiallyPrivateDistributedDataParallel"}


def _class_names(model: nn.Module) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside Opacus GradSampleModule / DPDDP / DDP wrappers.

    Matches wrapper classes by name (no opacus import needed here) and looks
    at registered submodules (``_modules``), not attributes: Opacus's
    GradSampleModule forwards unknown attribute look-ups to the inner model."""
    while True:
        subs, names = model._modules, _class_names(model)
        if "_module" in subs and _GSM_BASE in names:
            model = subs["_module"]
        elif "module" in subs and names & _DDP_NAMES:
            model = subs["module"]
        else:
            return model


class EMA:
    """Shadow weights s <- d s + (1 - d) w after each optimiser step.

    Parameters are averaged; buffers are copied (they are not trained).
    With ``warmup`` the decay used at update n is min(decay, (1 + n) / (10 + n)):
    a short run (a few hundred steps, as in the CPU quickstart or a DP
    fine-tune of few steps) is not dominated by the initial weights, while
    long runs reach ``decay``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        inner = unwrap(model)
        self.param_names = {n for n, _ in inner.named_parameters()}
        self.shadow = {k: v.detach().clone() for k, v in inner.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, v in unwrap(model).state_dict().items():
            s = self.shadow[k]
            if k in self.param_names and v.dtype.is_floating_point:
                s.lerp_(v.detach().to(s.device), 1.0 - d)  # s + (1-d)(v - s) = d s + (1-d) v
            else:
                s.copy_(v)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the shadow weights into ``model`` (wrapped or not)."""
        unwrap(model).load_state_dict(self.shadow)

    def model_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of the unwrapped ``model`` holding the EMA weights."""
        m = copy.deepcopy(unwrap(model))
        m.load_state_dict(self.shadow)
        return m

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", self.warmup))
        self.num_updates = int(state.get("num_updates", 0))
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
