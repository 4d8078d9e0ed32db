"""The FID-InceptionV3 on CPU through OpenVINO: the same TorchScript network
(``fid.load_fid_inception``), converted in memory by ``openvino.convert_model``
and run in float32 (``INFERENCE_PRECISION_HINT`` f32, so no bf16 or int8
shortcut changes the features).

Why: a comparable FID needs 5,000 images per side (FID is biased at small
sample sizes), and the Inception pass is what a CPU pays for it. On the
project's 2-core machines OpenVINO runs the network faster than torch's
oneDNN path (``benchmarks/bench_inception.py``) with features equal to
torch's within 1e-5 (tests/test_evaluation.py checks it
against the TorchScript module on every CI run). The conversion and
compilation take about 3 s, once per process.

Nothing here downloads anything; OpenVINO's telemetry only sends after an
explicit opt-in, which this program never gives.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

# The fastest batch size measured on 2 cores (benchmarks/bench_inception.py).
BATCH = 16

# id(TorchScript module), threads -> compiled model; one conversion per process.
_COMPILED: dict[tuple[int, int], object] = {}


def available() -> bool:
    """Whether the openvino package is installed (found, not imported)."""
    return importlib.util.find_spec("openvino") is not None


def compiled(model: torch.nn.Module, example: torch.Tensor, threads: int | None = None):
    """The OpenVINO CPU model of ``model`` (float32, ``threads`` inference
    threads, default torch's), converted from an example input batch."""
    threads = int(threads or torch.get_num_threads())
    key = (id(model), threads)
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    # lazy: OpenVINO is an optional backend and takes seconds to import
    import openvino as ov

    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=example)
    cm = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                   "INFERENCE_NUM_THREADS": threads})
    _COMPILED[key] = (model, cm)  # keeps model alive, so its id cannot be reused
    return cm


def run(cm, batch: torch.Tensor) -> np.ndarray:
    """Pool3 features [B, 2048] (float32) of one preprocessed batch."""
    out = cm(np.ascontiguousarray(batch.numpy(), dtype=np.float32))[0]
    return np.array(out, copy=True).reshape(len(batch), -1)
