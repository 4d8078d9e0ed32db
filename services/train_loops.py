"""Ray Train worker functions for pre-training (step 4) and DP fine-tuning (step 5).

Both run under ``TorchTrainer`` on ``ray.num_workers`` workers (CPU or GPU by
configuration). Checkpoints go through Ray Train (``ray.train.report``) and a
restarted worker group resumes from ``ray.train.get_checkpoint()``: the model,
EMA, optimizer and, for fine-tuning, the privacy ledger, so that a resumed run
continues its ledger instead of restarting it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch

from privimage_core.config import from_dict
from services.process_setup import configure_torch
from privimage_core.diffusion.ema import EMA
from privimage_core.generator import build_generator, state_from_bytes
from privimage_core.privacy_ledger import PrivacyLedger

CKPT_FILES = ("model.pt", "ema.pt", "optimizer.pt", "state.json")


def _ctx():
    c = ray.train.get_context()
    return c.get_world_rank(), c.get_world_size()


def _device(cfg) -> torch.device:
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")




def _save(d: Path, inner, ema: EMA, opt, state: dict, ledger: PrivacyLedger | None = None) -> None:
    torch.save(inner.state_dict(), d / "model.pt")
    torch.save(ema.state_dict(), d / "ema.pt")
    torch.save(opt.state_dict(), d / "optimizer.pt")
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


def _metrics(config):
    """Live metrics of this worker, through Ray's metrics API (services/metrics.py):
    they appear on this node's metrics export port, no port of its own."""
    try:
        from services.metrics import PipelineMetrics
    except Exception:  # metrics are optional; training must not depend on them
        return None
    m = config.get("metrics") or {}
    if not m.get("enabled", True):
        return None
    return PipelineMetrics(config["run_id"])


def _log_mlflow(config, metrics: dict, step: int) -> None:
    if config.get("mlflow_uri") and config.get("mlflow_run_id"):
        from services.tracking import log_remote_metrics
        try:
            log_remote_metrics(config["mlflow_uri"], config["mlflow_run_id"], metrics, step)
        except Exception as e:  # tracking hiccups must not kill training
            print(f"[privimage] mlflow logging failed: {e}")


def pretrain_loop(config: dict) -> None:
    """Non-private pre-training on the selected PUBLIC images."""
    from privimage_core.pretrain import pretrain

    cfg = from_dict(config["cfg"])
    configure_torch(cfg)
    rank, world = _ctx()
    dev = _device(cfg)
    images, labels = ray.get(config["data_ref"])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    y = torch.from_numpy(labels).long()
    if world > 1:  # each rank trains on its own slice of the (public) selection
        x, y = x[rank::world], y[rank::world]
    precond = build_generator(cfg.generator, cfg.data.image_size, cfg.data.channels,
                              config["num_classes"]).to(dev)
    ema = EMA(precond, decay=cfg.pretrain.ema_decay)
    model = ray.train.torch.prepare_model(precond) if world > 1 else precond
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            d = Path(d)
            precond.load_state_dict(torch.load(d / "model.pt", map_location=dev))
            ema.load_state_dict(torch.load(d / "ema.pt", map_location=dev))
            opt.load_state_dict(torch.load(d / "optimizer.pt", map_location=dev))
            start = json.loads((d / "state.json").read_text())["step"]
    pm = _metrics(config)
    every = max(1, cfg.pretrain.steps // 20)

    def on_step(step, loss, sps):
        if pm:
            pm.train_step("pretrain", cfg.pretrain.batch_size // world, loss, sps, worker=str(rank))
        if rank == 0 and (step % every == 0 or step == cfg.pretrain.steps):
            _log_mlflow(config, {"loss": loss, "samples_per_second": sps * world}, step)

    def on_ckpt(step):
        _report({"step": step}, rank, lambda d: _save(d, precond, ema, opt, {"step": step}))

    ck_every = config.get("checkpoint_every", 0)
    t0 = time.time()
    seed = cfg.run.seed + 7919 * rank
    step = pretrain(model, ema, opt, x.to(dev), y.to(dev), cfg.pretrain.steps,
                    max(1, cfg.pretrain.batch_size // world), seed=seed, start_step=start,
                    on_step=on_step, checkpoint_every=ck_every, on_checkpoint=on_ckpt)
    if not ck_every or step % ck_every != 0 or step == start:
        _report({"step": step, "seconds": time.time() - t0}, rank,
                lambda d: _save(d, precond, ema, opt, {"step": step}))


def finetune_loop(config: dict) -> None:
    """DP-SGD fine-tuning on the SENSITIVE data (Opacus, Poisson sampling)."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    from privimage_core.dp_finetune import DP_SGD_MECHANISM, dp_finetune, make_private
    from privimage_core.errors import PrivacyBudgetError

    cfg = from_dict(config["cfg"])
    configure_torch(cfg)
    rank, world = _ctx()
    dev = _device(cfg)
    images, labels = ray.get(config["data_ref"])  # sensitive: stays in workers' memory
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(dev)
    y = torch.from_numpy(labels).long().to(dev)
    precond = build_generator(cfg.generator, cfg.data.image_size, cfg.data.channels,
                              config["num_classes"]).to(dev)
    ledger = PrivacyLedger.from_state_dict(config["ledger"])
    # Ray Train's own restore (a failed worker group) first; else the
    # checkpoint the driver found when the pipeline was resumed.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_checkpoint"):
        from services.pipeline import open_checkpoint
        ckpt = open_checkpoint(**config["resume_checkpoint"])
    prior_steps = ledger.steps_of(DP_SGD_MECHANISM)
    if ckpt is None and prior_steps:
        # DP steps were taken but their weights are not here: starting again
        # from the pre-trained weights would release a model the ledger does
        # not describe.
        raise PrivacyBudgetError(f"the ledger holds {prior_steps} DP-SGD steps but no "
                                 "fine-tuning checkpoint was found to continue from")
    opt_state = None
    if ckpt:  # resume: weights AND ledger come from the checkpoint
        with ckpt.as_directory() as d:
            d = Path(d)
            precond.load_state_dict(torch.load(d / "model.pt", map_location=dev))
            ema_state = torch.load(d / "ema.pt", map_location=dev)
            opt_state = torch.load(d / "optimizer.pt", map_location=dev)
            saved = PrivacyLedger.from_state_dict(json.loads((d / "ledger.json").read_text()))
            if saved.steps_of(DP_SGD_MECHANISM) < prior_steps:
                raise PrivacyBudgetError("the fine-tuning checkpoint holds fewer DP-SGD steps "
                                         "than the ledger the driver passed; refusing to undercount")
            ledger.load_state_dict(saved.state_dict())
    else:  # start from the pre-trained (EMA) weights: Algorithm 2, line 10
        precond.load_state_dict(state_from_bytes(ray.get(config["init_ref"])))
    ema = EMA(precond, decay=cfg.finetune.ema_decay)
    if ckpt:
        ema.load_state_dict(ema_state)
    model = precond
    if world > 1:
        model = ray.train.torch.prepare_model(precond, parallel_strategy=None)
        model = DPDDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.finetune.lr)
    dp = make_private(model, opt, x, y, batch_size=cfg.finetune.batch_size,
                      noise_multiplier=config["noise_multiplier"],
                      max_grad_norm=cfg.finetune.max_grad_norm, ledger=ledger,
                      distributed=world > 1)
    if opt_state is not None:
        dp.optimizer.original_optimizer.load_state_dict(opt_state)
    pm = _metrics(config)
    total = config["total_steps"]
    every = max(1, total // 20)

    def on_step(step, sps):
        if pm:
            pm.train_step("finetune", cfg.finetune.batch_size // world, None, sps, worker=str(rank))
        if rank == 0 and (step % every == 0 or step == total):
            eps = ledger.epsilon()
            if pm:
                pm.epsilon(eps, ledger.target_epsilon)
            _log_mlflow(config, {"epsilon_spent": eps, "samples_per_second": sps}, step)

    def save(d):
        _save(d, precond, ema, dp.optimizer.original_optimizer, {"step": dp.record.steps}, ledger)

    ck_every = config.get("checkpoint_every", 0)
    t0 = time.time()
    start = dp.record.steps
    steps = dp_finetune(dp, ema, precond, total, cfg.finetune.physical_batch_size, on_step=on_step,
                        checkpoint_every=ck_every,
                        on_checkpoint=lambda s: _report({"step": s, "epsilon": ledger.epsilon()},
                                                        rank, save))
    # the last state is always a reported checkpoint (also when a resumed run
    # had no step left to take)
    if not ck_every or steps % ck_every != 0 or steps == start:
        _report({"step": steps, "epsilon": ledger.epsilon(), "seconds": time.time() - t0}, rank, save)
