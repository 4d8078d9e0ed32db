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
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from privimage_core.data.folders import IMAGE_EXTS
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import load_source
from privimage_core.data.specs import parse_spec
from privimage_core.errors import DataError


def balanced_labels(num_images: int, num_classes: int) -> np.ndarray:
    return np.arange(num_images, dtype=np.int64) % num_classes


def shard_ranges(num_images: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` image ranges covering ``num_images`` for
    ``shards`` sampling workers, their sizes differing by at most one (as
    NVlabs/edm's generate.py splits its seeds over ranks); empty ranges are
    left out."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    cuts = [num_images * k // shards for k in range(shards + 1)]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def generate(family, release: torch.nn.Module, num_images: int, class_names: list[str],
             num_steps: int, solver: str = "euler", seed: int = 0,
             batch_size: int = 500, guidance: float = 0.0,
             progress: Callable[[int, int], None] | None = None,
             start: int = 0, stop: int | None = None) -> ImageSet:
    """``num_images`` class-balanced samples of a model family's released
    module, on the device its weights are on; ``progress(done, total)`` hears
    each finished batch. ``start``/``stop``: only images ``[start, stop)`` of
    that set (one shard, ``shard_ranges``): the shards of any split,
    concatenated in order, are the images of one call over all of them."""
    stop = num_images if stop is None else stop
    if not 0 <= start <= stop <= num_images:
        raise ValueError(f"image range [{start}, {stop}) is outside [0, {num_images})")
    labels = balanced_labels(num_images, len(class_names))[start:stop]
    tick = None if progress is None else (lambda done: progress(done, len(labels)))
    images = family.sample(release, labels, num_steps=num_steps, solver=solver, seed=seed,
                           batch_size=batch_size, guidance=guidance, progress=tick,
                           start_index=start)
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


SYNTHETIC_HELP = ("pass a directory a run wrote (runs/<run>/synthetic: manifest.json + "
                  "images.parquet), folder:<ImageFolder>, parquet:<file or directory>, or an "
                  ".npz with arrays images (N,H,W[,C] uint8) and labels")
# PIL modes read as grayscale; every other mode is converted to RGB
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _line(e: BaseException) -> str:
    """An exception as one short line, for DataError messages."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def read_dataset(path: str | Path) -> ImageSet:
    """Read a synthetic dataset, ours or made elsewhere:

    * a directory this project wrote (``manifest.json`` + ``images.parquet``,
      see ``write_dataset``), or that ``images.parquet`` itself;
    * a ``load_source`` spec: ``folder:<ImageFolder>``, ``parquet:<path>``
      (or a bare ``*.parquet`` path), ``mnist`` ...; user images are loaded at
      the size and mode of the first image (non-square ones centre-cropped);
    * an ``.npz`` with ``images`` (N,H,W[,C] uint8), ``labels`` (N ints) and
      optionally ``class_names``.

    ``meta``: ``manifest`` (dict, None when the format has none), ``format``
    and ``named`` (False when the labels came without class names: .npz
    without class_names, Parquet with bare integer labels; the caller names
    them, e.g. after the real dataset). Every failure is a one-line DataError.
    """
    spec = str(path).strip()
    if parse_spec(spec) is not None:
        return _read_spec(spec)
    p = Path(spec)
    if p.suffix.lower() == ".npz":
        return _read_npz(p)
    if p.suffix.lower() == ".parquet" and p.is_file():
        if p.name == "images.parquet" and (p.parent / "manifest.json").is_file():
            return _read_project_dir(p.parent)
        return _read_spec(f"parquet:{p}")
    return _read_project_dir(p)


def _read_project_dir(d: Path) -> ImageSet:
    if not d.exists():
        raise DataError(f"synthetic dataset '{d}' does not exist; {SYNTHETIC_HELP}")
    if not d.is_dir():
        raise DataError(f"synthetic dataset '{d}' is not a directory, .npz or .parquet file; "
                        f"{SYNTHETIC_HELP}")
    man_path, pq_path = d / "manifest.json", d / "images.parquet"
    if not man_path.is_file():
        if pq_path.is_file():
            raise DataError(f"'{d}' has images.parquet but no manifest.json; pass "
                            f"parquet:{pq_path} (class names then come from the real dataset)")
        if (d / "synthetic" / "manifest.json").is_file():
            raise DataError(f"'{d}' is a run directory; pass its synthetic dataset, "
                            f"--synthetic {d / 'synthetic'} (or evaluate the whole run: "
                            f"privimage evaluate --run {d})")
        if any(c.is_dir() and not c.name.startswith(".") for c in d.iterdir()):
            raise DataError(f"'{d}' has no manifest.json; for an image folder with one subfolder "
                            f"per class pass folder:{d}")
        raise DataError(f"'{d}' has no manifest.json; {SYNTHETIC_HELP}")
    try:
        manifest = json.loads(man_path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{man_path} is not a readable JSON manifest ({_line(e)}); restore it "
                        "from the run or pass the images as parquet:/folder:/.npz instead") from e
    if not pq_path.is_file():
        raise DataError(f"'{d}' has manifest.json but no images.parquet (an unfinished or partly "
                        "copied synthetic set); re-run the synthesis (privimage run --resume "
                        "<run_dir>) or copy the whole directory")
    try:
        t = pq.read_table(pq_path, columns=["image", "label"])
    except Exception as e:  # pyarrow raises several types for bad input
        raise DataError(f"{pq_path} is not readable Parquet with columns image and label "
                        f"({_line(e)}); re-run the synthesis or copy the file again") from e
    names = manifest.get("class_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{man_path} has no class_names list; restore the manifest or pass "
                        f"parquet:{pq_path} (class names then come from the real dataset)")
    imgs = []
    for i, b in enumerate(t.column("image").to_pylist()):
        try:
            imgs.append(np.asarray(Image.open(io.BytesIO(b)), dtype=np.uint8))
        except Exception as e:
            raise DataError(f"{pq_path}: row {i} is not a readable PNG ({type(e).__name__}); "
                            "re-run the synthesis or copy the file again") from e
    labels = np.asarray(t.column("label").to_pylist(), dtype=np.int64)
    if not imgs:
        raise DataError(f"{pq_path} has no images; re-run the synthesis with sampling.num_images > 0")
    if len({im.shape for im in imgs}) > 1:
        raise DataError(f"{pq_path}: images have different shapes "
                        f"{sorted({im.shape for im in imgs})[:2]}; re-run the synthesis")
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"{pq_path}: labels span [{labels.min()}, {labels.max()}] but the manifest "
                        f"lists {len(names)} classes; restore the matching manifest.json")
    ds = ImageSet(np.stack(imgs), labels, [str(n) for n in names], name=str(d),
                  meta={"manifest": manifest, "format": "privimage", "named": True})
    want = manifest.get("sha1_pixels")
    if want and hashlib.sha1(ds.images.tobytes()).hexdigest() != want:
        raise DataError(f"{pq_path} does not match its manifest (pixel sha1 differs: changed or "
                        "truncated); restore both files from the same run")
    return ds


def _peek_image(kind: str, arg: str) -> tuple[int, int] | None:
    """(size, channels) of the first image a folder:/parquet: spec would load:
    its shorter side (non-square images get centre-cropped) and 1 for a
    grayscale mode, else 3. None when there is none to read."""
    root = Path(arg)
    try:
        src = None
        if kind == "folder":
            files = (f for cls in sorted(c for c in root.iterdir()
                                         if c.is_dir() and not c.name.startswith("."))
                     for f in sorted(cls.rglob("*")) if f.suffix.lower() in IMAGE_EXTS and f.is_file())
            src = next(files, None)
        else:
            col = pq.read_table(root, columns=["image"]).column("image")
            v = col[0].as_py() if len(col) else None
            v = v.get("bytes") if isinstance(v, dict) else v
            src = io.BytesIO(v) if isinstance(v, (bytes, bytearray)) else None
        if src is None:
            return None
        with Image.open(src) as img:
            return min(img.size), 1 if img.mode in _GRAY_MODES else 3
    except Exception:  # unreadable: load_source reports the problem properly
        return None


def _read_spec(spec: str) -> ImageSet:
    kind, arg = parse_spec(spec)
    if arg is None:  # built-in dataset: its own size (28x28 grayscale)
        ds = load_source(spec, split="train")
        return ImageSet(ds.images, ds.labels, ds.class_names, spec,
                        {"manifest": None, "format": spec, "named": True})
    size, channels = _peek_image(kind, arg) or (28, 1)
    ds = load_source(spec, split="train", image_size=size, channels=channels, resize=True)
    # Parquet with bare integer labels gets placeholder names "0".."max"
    named = not (kind == "parquet" and ds.class_names == [str(i) for i in range(ds.num_classes)])
    return ImageSet(ds.images, ds.labels, ds.class_names, ds.name,
                    {"manifest": None, "format": kind, "named": named})


def _read_npz(p: Path) -> ImageSet:
    if not p.is_file():
        raise DataError(f"synthetic dataset '{p}' does not exist; fix the path ({SYNTHETIC_HELP})")
    fix = "save it with np.savez(path, images=uint8 N,H,W[,C], labels=ints[, class_names=strs])"
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # .npz files are zip archives
            raise DataError(f"{p} is not a readable .npz (not a zip archive); {fix}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.files)
            missing = [k for k in ("images", "labels") if k not in keys]
            if missing:
                raise DataError(f"{p} has no {' or '.join(missing)} array (has {keys}); {fix}")
            images, labels = z["images"], z["labels"]
            names = z["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{p} holds Python objects (pickled arrays); save class_names as "
                            "np.array(names, dtype=str) and images/labels as numeric arrays") from e
        raise DataError(f"{p} is not a readable .npz ({_line(e)}); {fix}") from e
    except Exception as e:  # BadZipFile, OSError, EOFError, ...
        raise DataError(f"{p} is not a readable .npz ({_line(e)}); {fix}") from e
    if images.dtype != np.uint8:
        raise DataError(f"{p}: images are {images.dtype}, expected uint8 pixels 0..255; save "
                        "np.clip(x, 0, 255).astype(np.uint8) (or (x * 255) for images in [0, 1])")
    if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        raise DataError(f"{p}: images are {images.shape}, which looks like N,C,H,W; save "
                        "images.transpose(0, 2, 3, 1) (N,H,W,C)")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{p}: images are {images.shape}, expected N,H,W (grayscale) or N,H,W,C "
                        "with C = 1 or 3; reshape them")
    if len(images) == 0:
        raise DataError(f"{p} holds no images; save at least one image per class")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{p}: labels are {labels.shape} for {len(images)} images; save one "
                        "integer label per image (shape (N,))")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{p}: labels are {labels.dtype}; save integer class indices "
                        "(labels.astype(np.int64))")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{p}: labels include {labels.min()}; labels must be class indices >= 0")
    if names is None:
        class_names, named = [str(i) for i in range(int(labels.max()) + 1)], False
    else:
        if names.ndim != 1 or not (np.issubdtype(names.dtype, np.str_) or
                                   np.issubdtype(names.dtype, np.bytes_)):
            raise DataError(f"{p}: class_names is {names.dtype} {names.shape}; save a 1-D string "
                            "array, np.array(names, dtype=str)")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        if len(set(class_names)) != len(class_names):
            raise DataError(f"{p}: class_names has duplicates; give each class a distinct name")
        if labels.max() >= len(class_names):
            raise DataError(f"{p}: labels go up to {labels.max()} but there are "
                            f"{len(class_names)} class_names; give one name per class index")
        named = True
    return ImageSet(np.ascontiguousarray(images), labels, class_names, p.stem,
                    {"manifest": None, "format": "npz", "named": named})
