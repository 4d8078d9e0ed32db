"""Sampling the synthetic set on several Ray workers (``ray.sampling_workers``).

Each worker is a Ray task that rebuilds the release from its weights (one
object in the object store, read once per node) and samples a contiguous
range of image indices (privimage_core.synthesize.shard_ranges): each
image's randomness depends on the seed and its index only, so the shards,
concatenated in order, are the images one worker would sample (NVlabs/edm's
generate.py splits its seeds over ranks the same way). Tasks rather than
actors: a task gives its GPU back when it returns, so more shards than GPUs
queue instead of waiting forever for a GPU that a finished shard still holds.
With ``ray.use_gpu`` each task takes ``ray.gpus_per_worker`` GPUs.
"""
from __future__ import annotations

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from privimage_core.config import Config, from_dict
from privimage_core.device import resolve_device
from privimage_core.models import get_family
from privimage_core.models.release import ReleaseManifest
from privimage_core.models.state import state_from_bytes
from privimage_core.synthesize import generate, shard_ranges
from services.process_setup import configure_torch
from services.progress import ProgressPoster


def load_release_module(state: bytes, manifest: dict, device: torch.device):
    """(family, manifest, released module in eval mode on ``device``) from a
    release's weights (``state_bytes``) and its manifest (models/release.py)."""
    man = ReleaseManifest.from_dict(manifest)
    fam = get_family(man.family)
    model = man.build()
    model.load_state_dict(state_from_bytes(state))
    return fam, man, fam.release_module(model).eval().to(device)


def sample_range(cfg: Config, state: bytes, manifest: dict, start: int, stop: int,
                 progress=None) -> np.ndarray:
    """uint8 images ``[start, stop)`` of the run's synthetic set, on this
    process's device (``ray.use_gpu``); ``progress(done, total)`` as
    ``generate``'s."""
    fam, man, release = load_release_module(state, manifest, resolve_device(cfg.ray.use_gpu))
    c = cfg.sampling
    return generate(fam, release, c.num_images, man.class_names, c.num_steps, c.solver,
                    seed=cfg.run.seed, batch_size=c.batch_size, guidance=c.guidance,
                    progress=progress, start=start, stop=stop).images


@ray.remote(num_cpus=1, num_returns=2)
def _sample_task(cfg_dict: dict, state: bytes, manifest: dict, start: int, stop: int,
                 progress_board: str | None) -> tuple[int, np.ndarray]:
    cfg = from_dict(cfg_dict)
    configure_torch(cfg)
    post = ProgressPoster(progress_board)
    n = cfg.sampling.num_images
    # Only the first shard reports: its fraction stands for all of them (the
    # shards differ by at most one image), drawn on the driver's one line.
    tick = None if progress_board is None else (
        lambda done, total: post(done * n // max(1, total), n))
    images = sample_range(cfg, state, manifest, start, stop, tick)
    return len(images), images


def sample_sharded(cfg: Config, state_ref, manifest: dict,
                   progress_board: str | None = None) -> list:
    """Run the ``ray.sampling_workers`` tasks to the end and return one
    ObjectRef per shard (uint8 images, in image order), left in the object
    store for the evaluator; ``state_ref``: ray.put(state_bytes(...)). A
    failed shard raises its error here, on the caller, like any other
    stage's. Scheduled outside any Tune trial's placement group
    (actors.outside_trial)."""
    r = cfg.ray
    task = _sample_task.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        **r.gpu_options())
    d = cfg.to_dict()
    ranges = shard_ranges(cfg.sampling.num_images, r.sampling_workers)
    counts, shards = zip(*(task.remote(d, state_ref, manifest, a, b,
                                       progress_board if k == 0 else None)
                           for k, (a, b) in enumerate(ranges))) if ranges else ((), ())
    got = ray.get(list(counts))  # the image counts only: the images stay in the store
    if got != [b - a for a, b in ranges]:
        raise RuntimeError(f"sampling shards returned {got} images for the ranges {ranges}")
    return list(shards)
