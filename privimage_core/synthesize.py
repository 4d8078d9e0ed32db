"""Step 6a (Algorithm 2, last line): generate the labelled synthetic dataset
from the DP generator and write it as Parquet with a manifest.

The synthetic images are a DP output (post-processing of the DP model), so
they may be released. Labels are balanced across classes.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from privimage_core.data.imageset import ImageSet
from privimage_core.diffusion.edm import sample


def balanced_labels(num_images: int, num_classes: int) -> np.ndarray:
    return np.arange(num_images, dtype=np.int64) % num_classes


def generate(precond: torch.nn.Module, num_images: int, class_names: list[str], num_steps: int,
             solver: str = "euler", seed: int = 0, batch_size: int = 500,
             device: str = "cpu") -> ImageSet:
    labels = balanced_labels(num_images, len(class_names))
    images = sample(precond, torch.from_numpy(labels), num_steps=num_steps, seed=seed,
                    batch_size=batch_size, solver=solver, device=device)
    return ImageSet(images, labels, list(class_names), name="synthetic")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(ds: ImageSet, directory: str | Path, provenance: dict) -> Path:
    """Write ``images.parquet`` (columns: image PNG bytes, label, label_name)
    and ``manifest.json`` (counts, shape, hashes, provenance incl. the final
    epsilon/delta). Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "image": pa.array([_png(im) for im in ds.images], type=pa.binary()),
        "label": pa.array(ds.labels, type=pa.int64()),
        "label_name": pa.array([ds.class_names[i] for i in ds.labels], type=pa.string()),
    })
    pq.write_table(table, d / "images.parquet")
    manifest = {
        "format": "parquet: image (PNG bytes), label (int64), label_name (string)",
        "num_images": len(ds), "image_shape": list(ds.shape), "class_names": ds.class_names,
        "per_class": np.bincount(ds.labels, minlength=ds.num_classes).tolist(),
        "sha1_pixels": hashlib.sha1(ds.images.tobytes()).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **provenance,
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return d


def read_dataset(directory: str | Path) -> ImageSet:
    d = Path(directory)
    manifest = json.loads((d / "manifest.json").read_text())
    t = pq.read_table(d / "images.parquet")
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in t.column("image").to_pylist()])
    return ImageSet(imgs.astype(np.uint8), np.asarray(t.column("label").to_pylist()),
                    manifest["class_names"], name=str(d))
