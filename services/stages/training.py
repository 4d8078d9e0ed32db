"""Training stages on Ray Train: pre-training on public data (Algorithm 2,
line 9) and DP-SGD fine-tuning on the sensitive data (line 10)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import ray
import torch
from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from privimage_core.data.provenance import declaration
from privimage_core.errors import PrivacyBudgetError
from privimage_core.evaluation.canary_audit import (CANARY_FILE, CanarySet, make_canaries,
                                                    resolve_canary_source)
from privimage_core.methods import Stage, check_trainable
from privimage_core.models import build_model, get_family
from privimage_core.models.release import ReleaseManifest, write_release
from privimage_core.models.state import state_bytes
from privimage_core.pretrain import resolve_recolour
from privimage_core.privacy.ledger import PrivacyLedger
from services import interrupts
from services.progress import progress_line
from services.run_store import trainer_name
from services.stage_engine import RunContext
from services.stages.public import pretrain_data, pretrain_images
from services.tracking import log_curve
from services.train_job import TrainJob
from services.train_loops import finetune_loop, pretrain_loop

PRETRAINED_FILE = "pretrained_generator.pt"   # public-only weights
RELEASE_FILE = "dp_generator.pt"              # the DP release (its manifest: release.json)


def _fit(ctx: RunContext, stage: Stage, loop, job: TrainJob, planned_steps: int):
    """Run the stage on Ray Train. ``fit`` runs in a thread of its own: Ray
    Train installs its SIGINT handler only in the main thread, which keeps
    the run's handlers (interrupts.py) in charge of Ctrl-C and SIGTERM while
    the main thread waits. A fit that returns before ``planned_steps``
    without an error was aborted: the run stops there instead of going on
    with a half-trained model."""
    r = ctx.cfg.ray
    label = "DP fine-tuning" if job.is_dp else "pre-training"
    with progress_line(ctx.mlflow_run_id or "run", stage.name, label, ctx.log) as board:
        trainer = _trainer(ctx, stage, loop, replace(job, progress_board=board), r)
        res = interrupts.run_interruptible(trainer.fit, name=f"ray-train-{stage.name}")
    if res.metrics is None or res.metrics.get("step", 0) < planned_steps:
        raise interrupts.aborted_by_ray_train()
    return res


def _trainer(ctx: RunContext, stage: Stage, loop, job: TrainJob, r):
    return TorchTrainer(
        loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=_worker_resources(r)),
        run_config=RunConfig(name=trainer_name(ctx.run_dir, stage.name), storage_path=ctx.storage,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             logging_config=LoggingConfig(log_level=r.train_log_level)))


def _worker_resources(r) -> dict:
    """Each Ray Train worker's resources: ray.cpus_per_worker CPUs and, with
    ray.use_gpu, ray.gpus_per_worker GPUs (the same GPU share as the sampling
    workers and the evaluator; RayConfig.gpu_options)."""
    gpus = r.gpu_options()["num_gpus"]
    return {"CPU": r.cpus_per_worker, **({"GPU": gpus} if gpus else {})}


def _job(ctx: RunContext, stage: Stage, data_ref, mlflow_run_id, **kw) -> TrainJob:
    return TrainJob(cfg=ctx.cfg.to_dict(), family=ctx.method.family, stage=stage.name,
                    num_classes=len(ctx.class_names), data_ref=data_ref,
                    run_id=ctx.mlflow_run_id, mlflow_uri=ctx.tracker.uri,
                    mlflow_run_id=mlflow_run_id, metrics_enabled=ctx.cfg.metrics.enabled, **kw)


def _model_state(result) -> tuple[dict, dict]:
    """(full model state, EMA state of the released part) of a Train result."""
    with result.checkpoint.as_directory() as d:
        model = torch.load(Path(d) / "model.pt", map_location="cpu")
        ema = torch.load(Path(d) / "ema.pt", map_location="cpu")
    return model, ema["shadow"] if "shadow" in ema else ema


def _with_ema(model_state: dict, ema_shadow: dict, release_prefix: str) -> dict:
    """The model state with the released part replaced by its EMA weights."""
    out = dict(model_state)
    for k, v in ema_shadow.items():
        out[release_prefix + k] = v
    return out


def _release_prefix(ctx: RunContext, part: str | None = None) -> str:
    """State-dict prefix of the submodule whose EMA the stage training
    ``part`` keeps (ModelFamily.ema_module)."""
    fam = get_family(ctx.method.family)
    m = build_model(ctx.cfg, ctx.method.family, len(ctx.class_names))
    rel = fam.ema_module(m, part)
    for name, mod in m.named_modules():
        if mod is rel:
            return f"{name}." if name else ""
    raise RuntimeError("ema_module must be a submodule of the family's model")


def release_file(stage: Stage) -> str:
    """The weights a DP stage ends with: the release for the method's release
    stage, an intermediate DP output for the others (dp_ldm's autoencoder),
    which the next stage starts from."""
    return RELEASE_FILE if stage.is_release else f"dp_{stage.name}.pt"


def _pretrain_key(ctx: RunContext, stage: Stage, labels, recolour: bool = False) -> str:
    """Digest of everything public pre-training depends on: the family and
    its settings, the public pool's settings, the seed and the data choice
    (for PrivImage the selection, a DP output). Ray/Tune settings aside.
    pretrain.recolour enters as its resolved value, and only when on: runs
    without recolouring keep the keys (and cache entries) they had before
    the option existed, whatever it says."""
    c = ctx.cfg.to_dict()
    data = pretrain_data(ctx, stage)
    settings = {k: v for k, v in c["pretrain"].items() if k != "recolour"}
    # the number of steps, not "null" (whose meaning depends on data.channels)
    settings["steps"] = ctx.cfg.pretrain.resolved_steps(ctx.cfg.data.channels)
    if recolour:
        settings["recolour"] = True
    key = {"family": ctx.method.family, "generator": c["generator"], "pretrain": settings,
           "data": {k: c["data"][k] for k in ("public", "image_size", "channels", "resize",
                                              "public_max_per_class", "glyph_max_fonts",
                                              "glyph_copies_per_font")},
           "seed": c["run"]["seed"], "stage": {**stage.options, "data": data},
           "classes": len(ctx.class_names),
           "selection": {str(k): v for k, v in sorted((ctx.values.get("selection") or {}).items())}
           if data == "selection" else None,
           "workers": c["ray"]["num_workers"], "n": int(len(labels))}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pretrain(ctx: RunContext, stage: Stage) -> dict:
    images, labels = pretrain_images(ctx, stage)
    data = pretrain_data(ctx, stage)
    # decided from the public images alone: no privacy cost
    recolour = resolve_recolour(ctx.cfg.pretrain.recolour, ctx.cfg.data.channels, images)
    mlflow.set_tag("pretrain_recolour", "on" if recolour else "off")
    colours = (f"recoloured at random, pretrain.recolour: {ctx.cfg.pretrain.recolour}"
               if recolour else f"as they are, pretrain.recolour: {ctx.cfg.pretrain.recolour}")
    steps = ctx.cfg.pretrain.resolved_steps(ctx.cfg.data.channels)
    cache = Path(ctx.cfg.run.output_dir).resolve() / "cache" / \
        f"pretrain-{_pretrain_key(ctx, stage, labels, recolour)}.pt"
    if ctx.cfg.run.cache_public and cache.is_file():
        init = torch.load(cache, map_location="cpu")
        torch.save(init, ctx.run_dir / PRETRAINED_FILE)
        ctx.values["init_state"] = ctx.values["pretrained_state"] = init
        ctx.finish(stage, {"steps": steps, "images": len(labels),
                           "data": data, "cached": str(cache), "recolour": recolour})
        ctx.log(f"[privimage] pre-training: reused {cache.name} (public, same settings; "
                f"images {colours})")
        return {"cached": 1, "num_pretrain_images": len(labels)}
    job = _job(ctx, stage, ray.put((images, labels)), mlflow.active_run().info.run_id,
               checkpoint_every=max(1, steps // ctx.cfg.ray.checkpoints_per_stage),
               recolour=recolour)
    res = _fit(ctx, stage, pretrain_loop, job, steps)
    model, ema = _model_state(res)
    init = _with_ema(model, ema, _release_prefix(ctx))
    torch.save(init, ctx.run_dir / PRETRAINED_FILE)
    if ctx.cfg.run.cache_public:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(init, tmp)
        tmp.replace(cache)  # atomic: concurrent trials never read a half-written file
    # public-only weights: the DP stages start here; the canary audit's reference
    ctx.values["init_state"] = ctx.values["pretrained_state"] = init
    steps = res.metrics.get("step", 0)
    precision = res.metrics.get("precision", "fp32")
    mlflow.set_tag("pretrain_precision", precision)  # resolved on the worker's hardware
    ctx.finish(stage, {"steps": steps, "images": len(labels), "data": data,
                       "precision": precision, "recolour": recolour})
    ctx.log(f"[privimage] pre-training done: {steps} steps on {len(labels)} public images "
            f"({data}; {precision} arithmetic, pretrain.precision: {ctx.cfg.pretrain.precision}; "
            f"images {colours})")
    return {"steps": steps, "num_pretrain_images": len(labels)}


def restore_pretrain(ctx: RunContext, stage: Stage, saved: dict) -> None:
    state = torch.load(ctx.run_dir / PRETRAINED_FILE, map_location="cpu")
    ctx.values["init_state"] = ctx.values["pretrained_state"] = state


def dp_finetune(ctx: RunContext, stage: Stage) -> dict:
    f = ctx.cfg.finetune
    part = stage.options.get("part")
    plan = ctx.plan.stages[stage.name]  # computed once when the run started
    if plan is None:  # the config leaves this stage out (e.g. a frozen autoencoder)
        ctx.finish(stage, {"skipped": True})
        ctx.log(f"[privimage] DP-SGD ({stage.name}): skipped by the config, no budget spent")
        return {"skipped": 1}
    canaries = audit_canaries(ctx)  # drawn (and saved) before any DP-SGD step
    mech, sigma, q, total = (plan.mechanism, plan.noise_multiplier, plan.sample_rate,
                             plan.total_steps)
    # Saved BEFORE any DP-SGD step: a run that dies from here on is charged
    # its whole plan by sweeps (spent_upper_bound), and a resume reads the
    # checkpoints' ledgers (resume_ledger).
    ctx.state.setdefault("dp_plans", {})[stage.name] = {
        "mechanism": mech, "noise_multiplier": sigma, "sample_rate": q, "total_steps": total}
    ctx.state["ledger"] = ctx.ledger.state_dict()  # also for methods with no query before
    ctx.save()
    ctx.tracker.params({"noise_multiplier": sigma, "sample_rate": q, "planned_steps": total,
                        **({"epsilon_share": plan.epsilon_share} if plan.epsilon_share else {})})
    share = (f", {plan.epsilon_share:g} of epsilon for this stage alone"
             if plan.epsilon_share else "")
    ctx.log(f"[privimage] DP-SGD ({stage.name}): sigma={sigma:.4f}, q={q:.5f}, {total} steps "
            f"(target eps={ctx.ledger.target_epsilon:g}, delta={ctx.ledger.target_delta:.2g}"
            f"{share})")
    init = ctx.values.get("init_state")
    trainable = f.trainable if stage.is_release else None
    if trainable is not None:
        trained, total_params = check_trainable(ctx.cfg, len(ctx.class_names))
        ctx.log(f"[privimage] DP-SGD ({stage.name}) trains {trained:,} of {total_params:,} "
                f"parameters (finetune.trainable '{trainable}'); the rest keep their "
                f"{'pre-trained' if init is not None else 'initial'} values")
    resume = ctx.resume_checkpoints.get(stage.name)
    data_ref = ctx.sens_ref
    if canaries is not None:  # the audit run's dataset: sensitive + the included canaries
        ci, cl = canaries.members()
        s = ctx.inputs.sensitive
        data_ref = ray.put((np.concatenate([s.images, ci]), np.concatenate([s.labels, cl])))
        ctx.log(f"[privimage] audit run: each of {len(canaries)} public canaries is in the "
                f"DP-SGD set with probability 1/2 (the bits stay in {CANARY_FILE}, operator "
                "only)")
    job = _job(ctx, stage, data_ref, mlflow.active_run().info.run_id,
               checkpoint_every=max(1, total // ctx.cfg.ray.checkpoints_per_stage),
               init_ref=ray.put(state_bytes(init)) if init is not None else None,
               ledger=ctx.ledger.state_dict(), plan=plan, part=part,
               trainable=trainable,
               resume_checkpoint=resume and {"storage": ctx.storage, "relpath": resume})
    steps_before = ctx.ledger.steps_of(mech)
    res = _fit(ctx, stage, finetune_loop, job, total)
    with res.checkpoint.as_directory() as d:
        ledger = PrivacyLedger.from_state_dict(json.loads((Path(d) / "ledger.json").read_text()))
    model, ema = _model_state(res)
    eps = ledger.epsilon()
    if eps > ledger.target_epsilon + 1e-9:  # the step hook refuses this; never release past it
        raise PrivacyBudgetError(f"the ledger reached epsilon {eps:.4g} > target "
                                 f"{ledger.target_epsilon:g}; nothing was released")
    ctx.ledger = ledger
    ctx.state["ledger"] = ledger.state_dict()
    # EMA of DP iterates: post-processing
    release = _with_ema(model, ema, _release_prefix(ctx, part))
    if stage.is_release:  # with the manifest that rebuilds it (models/release.py)
        write_release(ctx.run_dir, release, ReleaseManifest.for_run(
            ctx.cfg, ctx.method.family, ctx.class_names, RELEASE_FILE))
    else:
        torch.save(release, ctx.run_dir / release_file(stage))
    (ctx.run_dir / "ledger.json").write_text(json.dumps(
        {**ledger.summary(), "guarantee": guarantee_statement(ctx)}, indent=2))
    # the next DP stage (if any) starts from this one's DP output
    ctx.values["release_state"] = ctx.values["init_state"] = release
    steps = ledger.steps_of(mech)
    # resolved on the worker from the model's layers (finetune.grad_sample_mode auto)
    clipping = res.metrics.get("grad_sample_mode", f.grad_sample_mode)
    mlflow.set_tag(f"clipping_{stage.name}", clipping)
    ctx.finish(stage, {"steps": steps, "grad_sample_mode": clipping})
    _export_dp_progress(ctx, ledger, mech, steps, steps - steps_before)
    ctx.tracker.file_artifact(ctx.run_dir / "ledger.json")
    ctx.log(f"[privimage] DP fine-tuning done: epsilon={eps:.4f} at "
            f"delta={ledger.target_delta:.2g} ({steps} steps; per-example clipping: {clipping}, "
            f"finetune.grad_sample_mode: {f.grad_sample_mode})")
    return {"epsilon": eps, "delta": ledger.target_delta, "steps": steps}


def _export_dp_progress(ctx: RunContext, ledger: PrivacyLedger, mech: str, steps: int,
                        new_steps: int) -> None:
    """A DP stage's progress leaves only when it is over: the epsilon curve
    (every 1/20 of the stage, computed from the plan's public parameters, all
    points stamped with one time) to MLflow, and the steps and expected
    samples to the live metrics. Per-step times would follow the realised
    Poisson batch sizes."""
    every = max(1, steps // 20)
    points = sorted({*range(every, steps + 1, every), steps} - {0})
    log_curve(ctx.tracker.uri, mlflow.active_run().info.run_id, "epsilon_spent",
              [(s, ledger.epsilon_at(mech, s)) for s in points])
    if ctx.pm:
        ctx.pm.stage_steps("finetune", new_steps, new_steps * ctx.cfg.finetune.batch_size)
        ctx.pm.epsilon(ledger.epsilon(), ledger.target_epsilon)


def guarantee_statement(ctx: RunContext) -> dict:
    """What the (epsilon, delta) covers, stated where the release is."""
    d = ctx.cfg.data
    e = ctx.cfg.evaluation
    src = resolve_canary_source(e.canary_source, d.sensitive)
    audit = {"audit_run": True, "canaries": e.canaries, "canary_source": src,
             "note": f"AN AUDIT RUN: the DP-SGD dataset was the declared dataset plus each of "
                     f"{e.canaries} public canaries ({src} test images, labels "
                     "drawn uniformly) included independently with probability 1/2; the "
                     "guarantee covers that dataset. DP-SGD's sampling rate was computed from "
                     "the public size + canaries, so it does not reveal which were included."} \
        if e.canary_audit else {"audit_run": False}
    return {
        "audit": audit,
        "neighbouring_relation": "add or remove one record (image and label) of the sensitive "
                                 "dataset",
        "dataset": d.sensitive, "declared": declaration(d.sensitive),
        "public_parameters": {"dataset_size": ctx.state["dataset_size"],
                              "class_names": ctx.class_names},
        "note": "The true number of records is not released: the Poisson rate, the expected "
                "batch and delta use dataset_size, which is declared public, a built-in "
                "dataset's or a materialised subsample's size, or a DP estimate (then a "
                "mechanism of the ledger). The class list is declared public. The guarantee "
                "covers the declared dataset: a subsample materialised with `privimage data "
                "subsample` is the dataset, not its source. Wall-clock times of whole stages "
                "are released and depend weakly on the data (docs/privacy.md). Mechanisms: "
                + ", ".join(r.name for r in ctx.ledger.records),
    }


def audit_canaries(ctx: RunContext):
    """The run's canaries (a CanarySet) or None when the audit is off. Drawn
    once from OS entropy and kept in the run dir (operator only: the bits are
    the audit's secret); a resumed run trains on the same ones."""
    e = ctx.cfg.evaluation
    if not e.canary_audit:
        return None
    path = ctx.run_dir / CANARY_FILE
    if path.is_file():
        return CanarySet.load(path)
    d = ctx.cfg.data
    c = make_canaries(resolve_canary_source(e.canary_source, d.sensitive), e.canaries,
                      len(ctx.class_names), d.image_size, d.channels)
    c.save(path)
    return c


def restore_dp_finetune(ctx: RunContext, stage: Stage, saved: dict) -> None:
    if saved.get("skipped"):
        return
    state = torch.load(ctx.run_dir / release_file(stage), map_location="cpu")
    ctx.values["release_state"] = ctx.values["init_state"] = state
