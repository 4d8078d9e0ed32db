"""The torch device a worker computes on, chosen once from ``ray.use_gpu``.

CPU unless the config asks for a GPU; then CUDA, or a one-line ConfigError
when this process sees none, rather than a silent fall-back that would run a
GPU-sized job for hours on a CPU. Ray hands each GPU-holding process its GPUs
through ``CUDA_VISIBLE_DEVICES``, so the current CUDA device is its own.
"""
from __future__ import annotations

import os

import torch

from privimage_core.errors import ConfigError


def resolve_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            "ray.use_gpu is true but this worker sees no CUDA GPU (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={seen!r}); set ray.use_gpu: false, or run on nodes with GPUs "
            "that Ray counts (ray start --num-gpus) and a CUDA build of torch")
    return torch.device("cuda", torch.cuda.current_device())
