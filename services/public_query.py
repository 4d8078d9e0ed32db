"""The semantic query function of a pool read from its shards: trained on
Ray Train from the Ray Data stream of services/public_data.py, or a
pre-trained classifier plugged in from a local weights file
(privimage_core/selection/pretrained.py)."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from privimage_core.config.sections import SemanticQueryConfig
from privimage_core.selection.pretrained import (
    PretrainedQuery, classifier_class_names, load_classifier, match_classes)
from privimage_core.selection.public_index import PublicIndex
from privimage_core.selection.semantic_query import SmallResNet, predict_topk, resolve_colour
from privimage_core.selection.stream_query import (
    to_model_input, train_semantic_query_stream, val_accuracy)
from services.public_data import (
    iter_images, ray_data_workers, read_images, shuffle_options, stream_dataset)

# Held-out public images for the query function's validation accuracy (a
# public-only sanity figure): val_fraction of the pool, at most this many.
VAL_MAX = 10_000


def train_query_stream(index: PublicIndex, q: SemanticQueryConfig, seed: int, workers: int,
                       storage: str | os.PathLike, log=None, log_level: str = "WARNING"):
    """The query function trained on the pool streamed from its shards: Ray
    Data's stream into Ray Train (``q.train_workers`` workers, or its local
    mode), each epoch a fresh seeded draw of at most
    ``q.max_images_per_epoch`` images; a held-out public part
    (val_fraction, at most VAL_MAX) scores it. Without Ray Data
    (``workers`` 0, or no CPU free) the selector's process trains alone.
    ``storage``: where Ray Train keeps the run (removed afterwards)."""
    n = index.num_rows
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = min(max(1, int(n * q.val_fraction)), VAL_MAX) if q.val_fraction > 0 else 0
    val_pos, train_pos = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    val = None
    if n_val:
        vt = index.table.take(val_pos)
        val = read_images(index, vt, workers), vt.column("label").to_numpy()
    per_epoch = min(len(train_pos), q.max_images_per_epoch or len(train_pos))
    # auto: judged on public rows (the held-out ones, or the first few)
    colour = q.colour if q.colour != "auto" else resolve_colour(
        q.colour, val[0] if val is not None else read_images(index, index.table.slice(0, 256),
                                                              workers))

    def epoch_table(ep: int) -> pa.Table:
        pos = train_pos if per_epoch == len(train_pos) else np.sort(
            np.random.default_rng([seed, 8, ep]).choice(train_pos, per_epoch, replace=False))
        return index.table.take(pos)

    shape = (len(index.label_names), index.manifest["image_shape"][2])
    if ray_data_workers(workers) == 0:
        def epoch_batches(ep: int):
            for x, y, _ in iter_images(index, epoch_table(ep), 0, q.batch_size,
                                       shuffle_seed=seed * 1000 + ep, drop_last=True):
                yield x, y

        model, metrics = train_semantic_query_stream(
            epoch_batches, per_epoch // q.batch_size, *shape, val, q.width, q.epochs, q.lr, seed,
            colour, log=log)
        return model, {**metrics, "colour": colour}
    n_workers = q.train_workers
    if n_workers and not _cpus_free(n_workers * q.cpus_per_train_worker + 1):
        if log:
            log(f"semantic query: no room for {n_workers} Ray Train worker(s) and a read task; "
                "training in Ray Train's local mode")
        n_workers = 0
    world = max(1, n_workers)
    batch = max(1, q.batch_size // world)  # per worker: the same global batch
    storage, name = Path(storage).resolve(), f"query-function-{uuid.uuid4().hex[:8]}"
    config = {"seed": seed, "batch": batch, "steps": per_epoch // (batch * world),
              "shape": shape, "width": q.width, "epochs": q.epochs, "lr": q.lr,
              "colour": colour,
              "threads": max(1, round(q.cpus_per_train_worker)) if n_workers else None,
              "upload": str(storage / name / "model")}
    datasets = {f"epoch{ep}": stream_dataset(index, epoch_table(ep), workers,
                                             shuffle_seed=seed * 1000 + ep)
                for ep in range(q.epochs)}
    trainer = TorchTrainer(
        _query_loop, train_loop_config=config, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=n_workers,
                                     resources_per_worker={"CPU": q.cpus_per_train_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             logging_config=LoggingConfig(log_level=log_level)))
    result = trainer.fit()
    try:
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", map_location="cpu")
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)
    model = SmallResNet(shape[0], shape[1], q.width, colour)
    model.load_state_dict(state)
    metrics = dict(result.metrics, train_workers=n_workers, colour=colour)
    if val is not None and len(val[1]):
        metrics["public_val_accuracy"] = val_accuracy(model.eval(), val)
    return model.eval(), metrics


def _cpus_free(need: float, wait_s: float = 5.0) -> bool:
    """Whether ``need`` CPUs are free, waiting a little for the read tasks
    that just ended (the validation images) to give theirs back."""
    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0) < need:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _query_loop(config: dict) -> None:
    """One Ray Train worker: its share of each epoch's stream into the
    training loop; rank 0 reports the network."""
    ctx = ray.train.get_context()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    world = ctx.get_world_size()

    def epoch_batches(ep: int):
        shard = ray.train.get_dataset_shard(f"epoch{ep}")
        for b in shard.iter_batches(batch_size=config["batch"], batch_format="numpy",
                                    drop_last=True,
                                    **shuffle_options(config["seed"] * 1000 + ep)):
            yield b["image"], b["label"]

    model, metrics = train_semantic_query_stream(
        epoch_batches, config["steps"], *config["shape"], None, config["width"],
        config["epochs"], config["lr"], config["seed"], config["colour"],
        wrap=ray.train.torch.prepare_model if world > 1 else None)
    # every worker saw as many images (equal shares): the whole group's throughput
    metrics = {**metrics, "train_images": metrics["train_images"] * world,
               "train_images_per_second": metrics["train_images_per_second"] * world}
    checkpoint = None
    if ctx.get_world_rank() == 0:
        # inside the run's directory, not a temporary one: local mode hands
        # this directory itself back, and it goes when the run's does
        d = Path(config["upload"])
        d.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), d / "model.pt")
        checkpoint = ray.train.Checkpoint.from_directory(str(d))
    ray.train.report(metrics, checkpoint=checkpoint)


def pretrained_query(index: PublicIndex, q: SemanticQueryConfig, seed: int, workers: int,
                     sample: int = 1000):
    """A pre-trained classifier as the query function, scored on a public
    sample of the labels it knows (its top-1 in the pool's label space)."""
    names = classifier_class_names(q.pretrained_classes)
    net = load_classifier(q.pretrained, q.architecture, len(names))
    clf_ids, pool_ids = match_classes(names, index.label_names)
    model = PretrainedQuery(net, q.architecture, q.pretrained_input_size, clf_ids, pool_ids,
                            len(index.label_names)).eval()
    known = index.select(sorted(set(pool_ids)))
    take = np.sort(np.random.default_rng([seed, 9]).choice(
        known.num_rows, min(sample, known.num_rows), replace=False))
    t = known.take(take)
    pred = predict_topk(model, to_model_input(read_images(index, t, workers)), k=1,
                        batch_size=model.predict_batch_size)[:, 0]
    acc = float((pred == t.column("label").to_numpy()).mean()) if len(pred) else float("nan")
    return model, {"public_val_accuracy": acc, "matched_public_labels": len(set(pool_ids)),
                   "classifier_classes": len(names)}
