"""Ray Train worker functions for pre-training (step 4) and DP fine-tuning (step 5).

Both run under ``TorchTrainer`` on ``ray.num_workers`` workers (CPU or GPU by
configuration) for any model family (privimage_core.models). Checkpoints go
through Ray Train (``ray.train.report``) and a restarted worker group resumes
from ``ray.train.get_checkpoint()``: the model, EMA, optimizer state and, for
DP stages, the privacy ledger, so that a resumed run continues its ledger.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

from privimage_core.config import from_dict
from privimage_core.data.imageset import writable_tensor
from privimage_core.device import resolve_device
from privimage_core.dp_sgd.finetune import dp_finetune, make_private, restrict_trainable
from privimage_core.errors import PrivacyBudgetError
from privimage_core.models import build_model, get_family
from privimage_core.models.ema import EMA
from privimage_core.models.state import state_from_bytes
from privimage_core.pretrain import pretrain, resolve_precision
from privimage_core.privacy.ledger import PrivacyLedger
from services.metrics import PipelineMetrics
from services.process_setup import configure_torch
from services.progress import ProgressPoster
from services.run_store import open_checkpoint
from services.tracking import log_remote_metrics
from services.train_job import TrainJob


def _ctx():
    c = ray.train.get_context()
    return c.get_world_rank(), c.get_world_size()


def _device(cfg) -> torch.device:
    """CPU, or this worker's own GPU: with several workers on one node each
    sees the node's GPUs, and Ray Train's get_device picks the one Ray gave
    this rank (plain "cuda" would put every rank on GPU 0, which NCCL refuses)."""
    dev = resolve_device(cfg.ray.use_gpu)  # the one-line error when no GPU is visible
    if dev.type == "cuda":
        dev = ray.train.torch.get_device()
        torch.cuda.set_device(dev)
    return dev


def _save(d: Path, model, ema: EMA, opt_state: dict, state: dict,
          ledger: PrivacyLedger | None = None) -> None:
    torch.save(model.state_dict(), d / "model.pt")
    torch.save(ema.state_dict(), d / "ema.pt")
    torch.save(opt_state, d / "optimizer.pt")
    if ledger is not None:
        (d / "ledger.json").write_text(json.dumps(ledger.state_dict()))
    (d / "state.json").write_text(json.dumps(state))


def _report(metrics: dict, rank: int, save_fn=None) -> None:
    """All ranks call report (it is a barrier); only rank 0 ships a checkpoint."""
    if rank == 0 and save_fn is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save_fn(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics, checkpoint=None)


def _metrics(job: TrainJob):
    """Live metrics of this worker, through Ray's metrics API (services/metrics.py)."""
    return PipelineMetrics(job.run_id) if job.metrics_enabled else None


def _log_mlflow(job: TrainJob, metrics: dict, step: int) -> None:
    if job.mlflow_uri and job.mlflow_run_id:
        try:
            log_remote_metrics(job.mlflow_uri, job.mlflow_run_id, metrics, step)
        except Exception as e:  # tracking hiccups must not kill training
            print(f"[privimage] mlflow logging failed: {e}")


def _quiet_ray_train(level: str) -> None:
    """Apply ray.train_log_level to the line Ray 2.60 prints per report
    ("Reporting training result ..."): its module logs through
    ``logging.getLogger(__file__)``, a logger named by the file's path, which
    the level filter of Ray Train's LoggingConfig (loggers "ray.train.*")
    does not reach."""
    try:
        # lazy: a Ray-internal module, absent in other Ray layouts
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(level)


def _setup(job: TrainJob):
    cfg = from_dict(job.cfg)
    configure_torch(cfg)
    _quiet_ray_train(cfg.ray.train_log_level)
    rank, world = _ctx()
    dev = _device(cfg)
    family = get_family(job.family)
    model = build_model(cfg, job.family, job.num_classes).to(dev)
    images, labels = ray.get(job.data_ref)
    x = (writable_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    y = writable_tensor(labels).long()
    return cfg, rank, world, dev, family, model, x, y


def pretrain_loop(config: dict) -> None:
    """Non-private pre-training on PUBLIC images (the selection or the pool)."""
    job: TrainJob = config["job"]
    cfg, rank, world, dev, family, model, x, y = _setup(job)
    if world > 1:  # each rank trains on its own slice of the (public) data
        x, y = x[rank::world], y[rank::world]
    release = family.ema_module(model)
    ema = EMA(release, decay=cfg.pretrain.ema_decay)
    wrapped = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs=family.public_ddp_kwargs or None) if world > 1 else model

    # resolved here, on the worker's hardware; reported to the driver's log
    precision = resolve_precision(cfg.pretrain.precision, dev, family.public_precisions)
    trainer = family.public_trainer(wrapped, lr=cfg.pretrain.lr, precision=precision)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            d = Path(d)
            model.load_state_dict(torch.load(d / "model.pt", map_location=dev))
            ema.load_state_dict(torch.load(d / "ema.pt", map_location=dev))
            trainer.load_state_dict(torch.load(d / "optimizer.pt", map_location=dev))
            start = json.loads((d / "state.json").read_text())["step"]
    pm = _metrics(job)
    steps = cfg.pretrain.resolved_steps(cfg.data.channels)
    every = max(1, steps // 20)
    progress = ProgressPoster(job.progress_board if rank == 0 else None)

    def on_step(step, loss, sps):
        progress(step, steps)
        if pm:
            pm.train_step("pretrain", cfg.pretrain.batch_size // world, loss, sps,
                          worker=str(rank))
        if rank == 0 and (step % every == 0 or step == steps):
            _log_mlflow(job, {"loss": loss, "samples_per_second": sps * world}, step)

    def save(d, step):
        _save(d, model, ema, trainer.state_dict(), {"step": step})

    t0 = time.time()
    step = pretrain(trainer, lambda: ema.update(release), x.to(dev), y.to(dev), steps,
                    max(1, cfg.pretrain.batch_size // world), seed=cfg.run.seed + 7919 * rank,
                    start_step=start, on_step=on_step, checkpoint_every=job.checkpoint_every,
                    recolour=job.recolour,
                    on_checkpoint=lambda s: _report({"step": s, "precision": precision}, rank,
                                                    lambda d: save(d, s)))
    ck = job.checkpoint_every
    if not ck or step % ck != 0 or step == start:
        _report({"step": step, "seconds": time.time() - t0, "precision": precision}, rank,
                lambda d: save(d, step))


def _restore_dp(job: TrainJob, model, ledger: PrivacyLedger, dev):
    """(checkpoint state or None). Ray Train's own restore (a failed worker
    group) first; else the checkpoint the driver found when resuming."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and job.resume_checkpoint:
        ckpt = open_checkpoint(**job.resume_checkpoint)
    prior = ledger.steps_of(job.plan.mechanism)
    if ckpt is None:
        if prior:
            # DP steps were taken but their weights are not here: starting again
            # would release a model the ledger does not describe.
            raise PrivacyBudgetError(f"the ledger holds {prior} steps of '{job.plan.mechanism}' but no "
                                     "checkpoint of that stage was found to continue from")
        return None
    with ckpt.as_directory() as d:
        d = Path(d)
        model.load_state_dict(torch.load(d / "model.pt", map_location=dev))
        out = {"ema": torch.load(d / "ema.pt", map_location=dev),
               "opt": torch.load(d / "optimizer.pt", map_location=dev)}
        saved = PrivacyLedger.from_state_dict(json.loads((d / "ledger.json").read_text()))
    if saved.steps_of(job.plan.mechanism) < prior:
        raise PrivacyBudgetError("the checkpoint holds fewer DP-SGD steps than the ledger the "
                                 "driver passed; refusing to undercount")
    ledger.load_state_dict(saved.state_dict())
    return out


def finetune_loop(config: dict) -> None:
    """DP-SGD on the SENSITIVE data (Opacus, Poisson sampling)."""
    job: TrainJob = config["job"]
    cfg, rank, world, dev, family, model, x, y = _setup(job)
    x, y = x.to(dev), y.to(dev)  # sensitive: stays in the workers' memory
    ledger = PrivacyLedger.from_state_dict(job.ledger)
    restored = _restore_dp(job, model, ledger, dev)
    if restored is None and job.init_ref is not None:  # Algorithm 2, line 10
        model.load_state_dict(state_from_bytes(ray.get(job.init_ref)))
    part = job.part  # which part of the family this DP stage trains (None: the only one)
    plan = job.plan
    release = family.ema_module(model, part)
    ema = EMA(release, decay=cfg.finetune.ema_decay)
    if restored:
        ema.load_state_dict(restored["ema"])
    dp_module = family.dp_module(model, part)
    restrict_trainable(dp_module, job.trainable)  # before DDP and Opacus see it
    if world > 1:
        dp_module = DPDDP(ray.train.torch.prepare_model(dp_module, parallel_strategy=None))
    opt = torch.optim.Adam([p for p in dp_module.parameters() if p.requires_grad], lr=plan.lr)
    f = cfg.finetune
    objective = family.dp_objective(model, part, cfg=cfg)
    dp = make_private(dp_module, opt, x, y, batch_size=plan.batch_size,
                      noise_multiplier=plan.noise_multiplier, max_grad_norm=f.max_grad_norm,
                      ledger=ledger, distributed=world > 1, mechanism=plan.mechanism,
                      grad_sample_mode=f.grad_sample_mode, num_records=plan.num_records,
                      sample_rate=plan.sample_rate)
    # A two-player family's post-processing step (a GAN's generator update),
    # checkpointed with the DP optimizer so a resumed stage continues it.
    after = family.after_dp_step(model, plan.lr)
    if restored:
        dp.optimizer.original_optimizer.load_state_dict(restored["opt"]["dp"])
        if after is not None and restored["opt"].get("after") is not None:
            after.load_state_dict(restored["opt"]["after"])
    total = plan.total_steps
    progress = ProgressPoster(job.progress_board if rank == 0 else None)

    def on_step(step, sps):
        # Console only, averaged on the driver (services/progress.py). Nothing
        # else leaves a DP stage per step: a step's duration follows its
        # realised Poisson batch size, a count of sensitive records. The driver
        # exports the stage's steps and its epsilon curve when it ends.
        progress(step, total)

    def save(d):
        opt_state = {"dp": dp.optimizer.original_optimizer.state_dict(),
                     "after": after.state_dict() if hasattr(after, "state_dict") else None}
        _save(d, model, ema, opt_state, {"step": dp.record.steps}, ledger)

    t0 = time.time()
    start = dp.record.steps
    steps = dp_finetune(dp, ema, release, total, f.physical_batch_size, on_step=on_step,
                        checkpoint_every=job.checkpoint_every,
                        on_checkpoint=lambda s: _report({"step": s, "epsilon": ledger.epsilon(),
                                                         "grad_sample_mode": dp.grad_sample_mode},
                                                        rank, save),
                        objective=objective, noise_multiplicity=f.noise_multiplicity,
                        after_step=after)
    # the last state is always a reported checkpoint (also when a resumed run
    # had no step left to take)
    ck = job.checkpoint_every
    if not ck or steps % ck != 0 or steps == start:
        _report({"step": steps, "epsilon": ledger.epsilon(), "seconds": time.time() - t0,
                 "grad_sample_mode": dp.grad_sample_mode}, rank, save)

