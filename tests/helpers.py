"""Plain helpers shared by the test modules (tests/conftest.py holds the
fixtures): the tiny pipeline config and its sensitive dataset, the synthetic
"shapes" image sets, a tiny EDM model and a stand-in Inception. Test modules
import these from here, never from one another; tests/ray_head_job.py (the
Ray head and job of tests/test_job_submit.py and tests/test_live_metrics.py)
too.

Kept light: numpy only at import time (torch and the project's modules are
imported by the helpers that need them), since tests/conftest.py imports this
module in every test run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


# ------------------------------------------------------------------ the tiny pipeline

def noise_folder(root: Path, n_per_class: int, classes=("a", "b"), seed: int = 0) -> Path:
    """An ImageFolder of random 28x28 grayscale PNGs: a user dataset whose
    content does not matter (identity, size, bookkeeping)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (Path(root) / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
                Path(root) / c / f"{i}.png")
    return Path(root)


def small_mnist(tmp_path: Path, n: int = 1000, seed: int = 0) -> Path:
    """A declared sensitive dataset of n MNIST train images, materialised
    outside the DP boundary as a user would (`privimage data subsample`)."""
    from privimage_core.data.subsample import materialise_subsample

    out = Path(tmp_path) / f"mnist-{n}-{seed}.parquet"
    if not out.is_file():
        materialise_subsample("mnist", n, out, seed=seed)
    return out


def repo_script(rel: str):
    """A script of the repository (scripts/ and benchmarks/ are not
    packages), imported as a module by its path relative to the root."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


def coloured_digits(root: Path, per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """``root``/train and ``root``/test: ImageFolders of coloured MNIST digits
    at 32x32 RGB, written by scripts/make_coloured_digits.py (once)."""
    root = Path(root)
    if not (root / "train").is_dir():
        gen = repo_script("scripts/make_coloured_digits.py")
        assert gen.main([str(root), "--per-class", str(per_class),
                         "--test-per-class", str(test_per_class), "--seed", str(seed)]) == 0
    return root


def tiny_config(tmp_path: Path, sensitive_n: int = 1000, **over) -> dict:
    """The tiny end-to-end pipeline's config (a dict for ``config.from_dict``);
    ``over`` sets ``"section.key"`` values."""
    cfg = {
        "run": {"name": "e2e", "output_dir": str(tmp_path / "runs"), "torch_threads": 1},
        "data": {"sensitive": f"parquet:{small_mnist(tmp_path, sensitive_n)}",
                 "sensitive_test": "mnist", "public": ["glyphs"],
                 "glyph_max_fonts": 6, "public_max_per_class": 20},
        "semantic_query": {"epochs": 1, "width": 8},
        "selection": {"k2": 1, "sigma_q": 20.0},
        "privacy": {"target_epsilon": 5.0, "target_delta": 1e-4},
        "pretrain": {"steps": 6, "batch_size": 16},
        "finetune": {"steps": 4, "batch_size": 50, "physical_batch_size": 25},
        "sampling": {"num_images": 40, "num_steps": 2, "batch_size": 40},
        # the headline classifier only: every other (non-private) metric has
        # its own tests, and each costs seconds per run on 2 cores
        "evaluation": {"fid": False, "classifier": "lr", "classifier_epochs": 1,
                       "classifiers": ["lr"], "precision_recall": False,
                       "utility_matrix": False, "detector": False,
                       "canaries": 32, "canary_repeats": 1, "memorisation_images": 100,
                       "memorisation_heldout": 200, "memorisation_reconstruction_images": 100,
                       "memorisation_feature_images": 0},
        # one checkpoint per stage (the last): ~1.7 s each on 2 cores, and a
        # 6-step stage at the default 4 per stage checkpointed every step
        "ray": {"num_workers": 1, "cpus_per_worker": 1, "checkpoints_per_stage": 1},
        "metrics": {"enabled": True},
    }
    for k, v in over.items():
        sec, _, key = k.partition(".")
        cfg[sec][key] = v
    return cfg


# ------------------------------------------------------------------ image sets

def shapes(n: int, size: int = 16, seed: int = 0, channels: int = 1, kinds=(0, 1)):
    """Easy labelled task: filled squares (label 0) vs. rings (label 1) at
    random positions and sizes, on a noisy background."""
    from privimage_core.data.imageset import ImageSet

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.empty((n, size, size, channels), np.uint8)
    labels = rng.choice(np.asarray(kinds), n)
    for i, lab in enumerate(labels):
        r = rng.uniform(size * 0.18, size * 0.3)
        cy, cx = rng.uniform(r + 1, size - r - 1, 2)
        if lab == 0:
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        else:
            d = np.hypot(yy - cy, xx - cx)
            mask = (d <= r) & (d >= r * 0.55)
        img = rng.normal(30, 10, (size, size)) + mask * rng.uniform(160, 220)
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)[..., None]
    return ImageSet(imgs, labels, ["square", "ring"], name=f"shapes{seed}")


def noised(ds, std: float, seed: int = 99):
    """``ds`` (an ImageSet) with Gaussian pixel noise (mean 40, ``std``)."""
    from privimage_core.data.imageset import ImageSet

    rng = np.random.default_rng(seed)
    x = np.clip(ds.images.astype(np.float64) + rng.normal(40, std, ds.images.shape), 0, 255)
    return ImageSet(x.astype(np.uint8), ds.labels, ds.class_names, name=ds.name + "+noise")


# ------------------------------------------------------------------ models

def tiny_edm(size: int = 16, classes: int = 2, seed: int = 0):
    """A 16-channel tiny EDM-preconditioned UNet, seeded."""
    import torch

    from privimage_core.models.diffusion.edm import EDMPrecond
    from privimage_core.models.diffusion.unet import build_unet

    torch.manual_seed(seed)
    return EDMPrecond(build_unet("tiny", image_size=size, channels=1, num_classes=classes,
                                 base_channels=16))


def fake_inception():
    """A cheap stand-in for the FID Inception with the same interface (a
    ``model_id`` and 2048 features per image), for cache and wiring checks:
    a fixed random projection of the 8x8-pooled image."""
    import torch

    class FakeInception(torch.nn.Module):
        model_id = "fake-v1"

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(3 * 8 * 8, 2048)

        def forward(self, x):
            return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))

    return FakeInception()


def use_fake_inception(monkeypatch) -> None:
    """Make ``fid.load_fid_inception`` return ``fake_inception()``."""
    from privimage_core.evaluation import fid

    monkeypatch.setattr(fid, "load_fid_inception", lambda *a, **k: fake_inception())
