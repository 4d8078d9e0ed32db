"""MNIST and Fashion-MNIST from local IDX files.

The files are installed offline (see scripts/setup.sh); nothing is downloaded
unless a caller opts in with ``allow_download=True``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from privimage_core.data.imageset import ImageSet
from privimage_core.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SETUP_FIX = "run `bash scripts/setup.sh`"

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_dir() -> Path:
    """Where offline data lives: $PRIVIMAGE_DATA_DIR, else <repo>/data_cache."""
    env = os.environ.get("PRIVIMAGE_DATA_DIR")
    return Path(env) if env else REPO_ROOT / "data_cache"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or .gz) into a numpy array of its declared shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist; {SETUP_FIX}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated or not-really-gzip files
        raise DataError(f"cannot read IDX file {path} ({e}); delete it and {SETUP_FIX}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()}); "
                        f"delete it and {SETUP_FIX}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header {dims} needs {expected}; "
                        f"the file is truncated, delete it and {SETUP_FIX}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, prefix: str, kind: str) -> Path | None:
    """Accept canonical names, the ``.idx3-ubyte`` variant, gzipped or not,
    and torchvision's ``<Name>/raw`` layout (for allow_download)."""
    ndim = 3 if kind == "images" else 1
    stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    dirs = [root, root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    for d in dirs:
        for stem in stems:
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    return d / name
    return None


def _load(name: str, split: str, root: Path, classes: list[str],
          allow_download: bool, tv_cls: str) -> ImageSet:
    if split not in ("train", "test"):
        raise DataError(f"{name}: unknown split {split!r}; use 'train' or 'test'")
    prefix = "train" if split == "train" else "t10k"
    paths = [_find(root, prefix, k) for k in ("images", "labels")]
    if None in paths and allow_download:
        import torchvision.datasets as tvd  # lazy: only on explicit opt-in (it reaches the network)

        getattr(tvd, tv_cls)(str(root), train=split == "train", download=True)
        paths = [_find(root, prefix, k) for k in ("images", "labels")]
    if None in paths:
        missing = root / f"{prefix}-{'images-idx3' if paths[0] is None else 'labels-idx1'}-ubyte"
        raise DataError(f"{name}: {missing} not found (nor .gz / .idx variants); {SETUP_FIX}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{name}: {paths[0]} has shape {images.shape} {images.dtype}, expected "
                        f"[N,28,28] uint8; replace it via {SETUP_FIX}")
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{name}: {paths[1]} has {labels.shape} labels in "
                        f"[{labels.min()}, {labels.max()}] for {len(images)} images; "
                        f"replace the file via {SETUP_FIX}")
    return ImageSet(images[..., None], labels.astype(np.int64), list(classes),
                    name=f"{name}-{split}", meta={"files": [str(p) for p in paths]})


def load_mnist(split: str = "train", root: str | os.PathLike | None = None,
               allow_download: bool = False) -> ImageSet:
    """MNIST as an ImageSet of 28x28x1 uint8 images, classes "0".."9"."""
    root = Path(root) if root is not None else data_dir() / "mnist"
    return _load("mnist", split, root, MNIST_CLASSES, allow_download, "MNIST")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       allow_download: bool = False) -> ImageSet:
    """Fashion-MNIST (Debian dataset-fashion-mnist) as 28x28x1 uint8 images."""
    root = Path(root) if root is not None else Path(FASHION_MNIST_DIR)
    return _load("fashion_mnist", split, root, FASHION_MNIST_CLASSES, allow_download,
                 "FashionMNIST")
