"""The pipeline driver: PrivImage's Algorithm 2 on Ray.

Used identically by the local CLI (``privimage run``) and by
``ray job submit ... -- python -m services.entrypoint``.

  Input: sensitive D_s, public D_p, target (epsilon, delta)
  1  train the semantic query function on D_p            (SelectorActor)
  2  DP query of D_s's semantic distribution             (SelectorActor, ledger)
  3  select + relabel public images, top-k2 semantics    (SelectorActor)
  4  pre-train the generator on the selection, no DP     (Ray Train)
  5  fine-tune it with DP-SGD on D_s                      (Ray Train + Opacus, ledger)
  6  sample the synthetic dataset and evaluate it        (EvaluatorActor)

Stage outputs are saved in the run directory as they finish, so a failed or
interrupted run resumes (``--resume <run_dir>``) without recomputing them and
without re-spending privacy budget: the ledger is part of the saved state.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from privimage_core.config import Config, from_dict, resolve_delta, resolve_k
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import (check_public_specs, is_user_source, load_source,
                                         same_user_dataset, subsample_sensitive,
                                         validate_sensitive)
from privimage_core.errors import ConfigError, DataError
from privimage_core.privacy_ledger import PrivacyLedger

STATE_FILE = "pipeline_state.json"


@dataclass
class Inputs:
    """Loaded and validated before any expensive work starts."""
    sensitive: ImageSet
    test: ImageSet
    delta: float


def load_inputs(cfg: Config) -> Inputs:
    if cfg.evaluation.sds:  # fail before any work, not after the DP query
        from privimage_core.evaluation.semantic_similarity import require_model
        require_model()
    if cfg.run.data_dir:
        os.environ["PRIVIMAGE_DATA_DIR"] = str(Path(cfg.run.data_dir).resolve())
    d = cfg.data
    check_public_specs(d.public, d.sensitive)
    # folder:/parquet: data has no split: evaluation and the membership audit
    # need held-out data, never the training images again.
    if is_user_source(d.sensitive) and not d.sensitive_test:
        raise ConfigError(f"data.sensitive {d.sensitive!r} has no test split; set "
                          "data.sensitive_test to held-out data of the same classes")
    if d.sensitive_test and same_user_dataset(d.sensitive_test, d.sensitive):
        raise ConfigError("data.sensitive_test names the same files as data.sensitive; point it "
                          "at held-out data of the same classes")
    sens = load_source(d.sensitive, split="train", image_size=d.image_size, channels=d.channels,
                       resize=d.resize)
    sens = subsample_sensitive(sens, d.sensitive_max, cfg.run.seed)
    validate_sensitive(sens)
    test = load_source(d.sensitive_test or d.sensitive, split="test", image_size=d.image_size,
                       channels=d.channels, resize=d.resize)
    if list(test.class_names) != list(sens.class_names):
        raise DataError(f"the test split's classes {test.class_names[:5]}... differ from the "
                        f"sensitive classes {sens.class_names[:5]}...; point data.sensitive_test "
                        "at the matching test split")
    delta = resolve_delta(cfg, len(sens))
    from privimage_core.dp_finetune import check_worker_batches
    check_worker_batches(len(sens), cfg.finetune.batch_size, cfg.ray.num_workers)
    return Inputs(sens, test, delta)


def _new_run_dir(output_dir: Path, name: str) -> Path:
    """A fresh run directory, created atomically: concurrent runs (Tune
    trials with the same overrides) started in the same second get distinct
    directories, and so distinct Ray Train names, ledgers and states."""
    base = output_dir.resolve() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        d = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory next to {base}")


def _save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=lambda o: o.tolist()
                              if isinstance(o, np.ndarray) else str(o)))
    tmp.replace(run_dir / STATE_FILE)


def _storage_fs(storage: str):
    """(pyarrow filesystem, root path) of a Ray Train storage path or URI; the
    URI's options (endpoint, region, host) stay in the filesystem object."""
    from pyarrow import fs as pafs

    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), str(Path(storage).resolve())


def _checkpoint_ledgers(storage: str, trainer_name: str) -> list[tuple[str, dict]]:
    """(checkpoint path relative to ``storage``, ledger) of every checkpoint
    of a Ray Train run that holds a readable ledger. Recursive: Train V2 puts
    checkpoints in <name>/checkpoint_*, Train V1 in <name>/<trial>/checkpoint_*."""
    from pyarrow import fs as pafs

    filesystem, root = _storage_fs(storage)
    infos = filesystem.get_file_info(pafs.FileSelector(f"{root}/{trainer_name}",
                                                       allow_not_found=True, recursive=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                with filesystem.open_input_stream(f"{info.path}/ledger.json") as f:
                    ledger = json.loads(f.read().decode())
            except (FileNotFoundError, OSError, ValueError):
                continue  # a checkpoint being written when the run died
            out.append((info.path[len(root):].lstrip("/"), ledger))
    return out


def open_checkpoint(storage: str, relpath: str):
    """The ray.train.Checkpoint at ``relpath`` under ``storage`` (local or remote)."""
    import ray.train

    filesystem, root = _storage_fs(storage)
    return ray.train.Checkpoint(f"{root}/{relpath}", filesystem=filesystem)


def _dp_steps(ledger_state: dict) -> int:
    from privimage_core.dp_finetune import DP_SGD_MECHANISM
    return PrivacyLedger.from_state_dict(ledger_state).steps_of(DP_SGD_MECHANISM)


def resume_ledger(state: dict, storage: str, trainer_name: str
                  ) -> tuple[PrivacyLedger, str | None]:
    """The ledger a resumed run continues from, and the fine-tuning
    checkpoint (path relative to ``storage``) that holds it, if any.

    Once fine-tuning has started, its checkpoints hold DP-SGD steps that the
    saved state does not. We read them here instead of relying on Ray Train
    restoring the trainer by name (a Ray Train default that a storage change
    or a lost snapshot would silently break): the checkpoint with the most
    DP-SGD steps wins, and the fine-tuning loop restarts from it. Refused:
    fine-tuning started and no checkpoint survived (the steps it took cannot
    be known), or the surviving checkpoints hold fewer steps than the saved
    ledger (the weights of the later steps are gone); either way going on
    would release a model the ledger does not describe or spend steps twice.
    """
    from privimage_core.errors import PrivacyBudgetError

    ledger = PrivacyLedger.from_state_dict(state["ledger"])
    if "finetune_plan" not in state:
        return ledger, None
    found = _checkpoint_ledgers(storage, trainer_name)
    if not found:
        raise PrivacyBudgetError(
            f"this run's DP fine-tuning started but no checkpoint of '{trainer_name}' is left "
            f"under {storage}; its DP-SGD steps cannot be accounted or its weights restored, "
            "so it cannot resume; start a new run (and count this one's planned budget as spent)")
    path, best = max(found, key=lambda pl: _dp_steps(pl[1]))
    if _dp_steps(best) < _dp_steps(state["ledger"]):
        raise PrivacyBudgetError(
            f"the saved ledger holds {_dp_steps(state['ledger'])} DP-SGD steps but the newest "
            f"surviving checkpoint of '{trainer_name}' only {_dp_steps(best)}; the later weights "
            "are gone, so the run cannot resume; start a new run")
    ledger.load_state_dict(best)
    return ledger, path


def spent_upper_bound(run_dir: Path) -> dict | None:
    """An upper bound on the budget a (possibly failed) run spent, as a ledger
    state: the final ledger of a finished run; for a run that failed during
    fine-tuning, its ledger plus every DP-SGD step it planned; None when the
    run never touched the sensitive data. Used by sweeps to compose trials."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if "ledger" not in state:
        return None
    if "finetune_plan" not in state or "finetune" in state["stages"]:
        return state["ledger"]
    from privimage_core.dp_finetune import DP_SGD_MECHANISM
    plan = state["finetune_plan"]
    records = [r for r in state["ledger"]["records"] if r["name"] != DP_SGD_MECHANISM]
    records.append({"name": DP_SGD_MECHANISM, "noise_multiplier": plan["noise_multiplier"],
                    "sample_rate": plan["sample_rate"], "steps": plan["total_steps"],
                    "note": "upper bound: the run failed during fine-tuning"})
    return {**state["ledger"], "records": records}


def _histogram_png(noisy: np.ndarray, class_names: list[str], public_names: list[str],
                   path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(8, len(public_names) * 0.18), 0.45 * len(class_names) + 1.5))
    im = ax.imshow(noisy, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xticks(range(len(public_names)), public_names, rotation=90, fontsize=6)
    ax.set_title("Noisy semantic distribution per sensitive class (DP output)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid_png(ds: ImageSet, path: Path, per_class: int = 10) -> None:
    from PIL import Image
    h, w, c = ds.shape
    rows = []
    for k in range(ds.num_classes):
        idx = np.nonzero(ds.labels == k)[0][:per_class]
        row = np.zeros((h, w * per_class, c), np.uint8)
        for j, i in enumerate(idx):
            row[:, j * w:(j + 1) * w] = ds.images[i]
        rows.append(row)
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid[..., 0] if c == 1 else grid).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def run_pipeline(cfg: Config, resume_dir: str | None = None, parent_run_id: str | None = None,
                 log: Callable[[str], None] = print, report_fn: Callable[[dict], None] | None = None
                 ) -> dict:
    """Run (or resume) one PrivImage pipeline; returns the final summary."""
    import ray
    from ray.train import RunConfig, ScalingConfig, FailureConfig
    from ray.train.torch import TorchTrainer

    from privimage_core.dp_finetune import plan_noise
    from privimage_core.generator import state_bytes
    from services import ray_runtime
    from services.actors import Evaluator, EvaluatorActor, SelectorActor
    from services.tracking import Tracker
    from services.train_loops import finetune_loop, pretrain_loop

    t_start = time.time()
    # ---- validate everything cheap first: config, data, delta
    if resume_dir:
        run_dir = Path(resume_dir).resolve()
        state = json.loads((run_dir / STATE_FILE).read_text())
        cfg = from_dict(state["config"])
        log(f"[privimage] resuming {run_dir} (stages done: {', '.join(state['stages']) or 'none'})")
    else:
        run_dir = None
        state = {"config": cfg.to_dict(), "stages": {}, "parent_run_id": parent_run_id}
    inputs = load_inputs(cfg)
    sens, test = inputs.sensitive, inputs.test
    if run_dir is None:  # only now: bad input leaves no directory behind
        run_dir = _new_run_dir(Path(cfg.run.output_dir), cfg.run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    class_names = list(sens.class_names)
    storage = cfg.ray.storage_path or str(run_dir / "ray_train")
    resume_ckpt = None
    if "ledger" in state:
        ledger, resume_ckpt = resume_ledger(state, storage, f"{run_dir.name}-finetune")
    else:
        ledger = PrivacyLedger(cfg.privacy.target_epsilon, inputs.delta, cfg.privacy.accountant)
    _save_state(run_dir, state)

    ray_info = ray_runtime.ensure_ray(cfg.ray, metrics_port=cfg.metrics.port)
    tracker = Tracker(cfg, parent_run_id=parent_run_id)
    stage_seconds: dict[str, float] = dict(state.get("stage_seconds", {}))

    pm = None
    if cfg.metrics.enabled:
        # Every process of the run records through Ray's metrics API; one scrape
        # of the node's metrics export port shows them all (services/metrics.py).
        from services.metrics import PipelineMetrics
        log(f"[privimage] live metrics (Prometheus): {ray_runtime.metrics_endpoint() or 'unknown'}")

    def timed(name, fn):
        t0 = time.time()
        out = fn()
        stage_seconds[name] = time.time() - t0
        state["stage_seconds"] = stage_seconds
        if pm:
            pm.stage_done(name, stage_seconds[name])
        return out

    sens_ref = ray.put((sens.images, sens.labels))
    with tracker.pipeline_run(cfg.run.name, tags={"run_dir": str(run_dir)}) as run:
        state["mlflow_run_id"] = run.info.run_id
        if cfg.metrics.enabled:
            pm = PipelineMetrics(run.info.run_id)
            pm.epsilon(ledger.epsilon(), ledger.target_epsilon)
        # every MLflow run records the full resolved config (a resumed run is a new MLflow run)
        tracker.params(cfg.flat())
        tracker.params({"resolved.delta": inputs.delta, "resolved.n_sensitive": len(sens)})
        tracker.json_artifact(cfg.to_dict(), "resolved_config.json")
        from mlflow import set_tag
        if resume_dir:
            set_tag("resumed_from", str(run_dir))
        set_tag("ray_mode", ray_info["mode"])
        log(f"[privimage] run dir {run_dir}; MLflow run {run.info.run_id}")

        selector = _outside_trial(SelectorActor).remote(cfg.to_dict(), str(run_dir),
                                        metrics_run_id=run.info.run_id if pm else None)
        idx_info = timed("index", lambda: ray.get(selector.build_index.remote()))
        public_names = idx_info["label_names"]
        k1, k2 = resolve_k(cfg, len(public_names), len(class_names))

        # ---- Algorithm 2, lines 1-2: semantic query function on public data
        with tracker.stage("semantic_query"):
            qm = timed("semantic_query", lambda: ray.get(selector.train_query_function.remote()))
            tracker.metrics({"public_val_accuracy": qm.get("public_val_accuracy", float("nan")),
                             "num_public_images": idx_info["num_public_images"],
                             "num_public_labels": idx_info["num_public_labels"]})
            log(f"[privimage] semantic query function: public val accuracy "
                f"{qm.get('public_val_accuracy', float('nan')):.3f}")

        # ---- lines 3-8: DP semantic distribution query and selection
        with tracker.stage("selection"):
            if "selection" in state["stages"]:
                sel = state["stages"]["selection"]
                selection = {int(k): v for k, v in sel["selection"].items()}
                noisy = np.asarray(sel["noisy_histograms"])
            else:
                q = timed("query", lambda: ray.get(selector.query.remote(
                    ledger.state_dict(), sens_ref, len(class_names))))
                ledger = PrivacyLedger.from_state_dict(q["ledger"])
                selection, noisy = q["selection"], q["noisy_histograms"]
                state["ledger"] = ledger.state_dict()
                state["stages"]["selection"] = {"selection": selection, "noisy_histograms": noisy,
                                                "k1": q["k1"], "k2": q["k2"]}
                _save_state(run_dir, state)
            sel_images, sel_labels = ray.get(selector.selected_images.remote(selection))
            named = {class_names[c]: [public_names[p] for p in ps] for c, ps in selection.items()}
            tracker.params({"selection.k1_resolved": k1, "selection.k2_resolved": k2})
            if pm:
                pm.selected(len(sel_labels))
                pm.epsilon(ledger.epsilon(), ledger.target_epsilon)
            tracker.metrics({"epsilon_after_query": ledger.epsilon(),
                             "num_selected_public_images": len(sel_labels)})
            tracker.json_artifact(named, "selected_public_labels.json")
            tracker.json_artifact({"noisy_histograms": noisy, "class_names": class_names,
                                   "public_labels": public_names, "k1": k1,
                                   "sigma_q": cfg.selection.sigma_q}, "noisy_histogram.json")
            _histogram_png(np.asarray(noisy), class_names, public_names, run_dir / "noisy_histogram.png")
            tracker.file_artifact(run_dir / "noisy_histogram.png")
            log(f"[privimage] selected {len(sel_labels)} public images: "
                + "; ".join(f"{k} <- {', '.join(v)}" for k, v in named.items()))
            sds = state["stages"]["selection"].get("sds")
            if cfg.evaluation.sds and sds is None:  # post-processing of DP outputs: private
                sds = ray.get(selector.semantic_similarity.remote(class_names, noisy, selection))
                state["stages"]["selection"]["sds"] = sds
                _save_state(run_dir, state)
            if sds:
                tracker.metrics(sds)
                log(f"[privimage] semantic distribution similarity (Eq. 5): selection "
                    f"{sds['sds_selected']:.3f}, whole public pool {sds['sds_public_pool']:.3f}")
        ray.kill(selector)  # frees its CPU for the trainers

        scaling = ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                resources_per_worker={"CPU": cfg.ray.cpus_per_worker})
        common = {"cfg": cfg.to_dict(), "num_classes": len(class_names), "run_id": run.info.run_id,
                  "mlflow_uri": tracker.uri,
                  "metrics": {"enabled": cfg.metrics.enabled, "port": cfg.metrics.port}}

        # ---- line 9: pre-training on the selection (public, no DP)
        with tracker.stage("pretrain") as srun:
            pre_ref = ray.put((sel_images, sel_labels))
            trainer = TorchTrainer(
                pretrain_loop, scaling_config=scaling,
                train_loop_config={**common, "data_ref": pre_ref, "mlflow_run_id": srun.info.run_id,
                                   "checkpoint_every": max(1, cfg.pretrain.steps // 4)},
                run_config=RunConfig(name=f"{run_dir.name}-pretrain", storage_path=storage,
                                     failure_config=FailureConfig(max_failures=cfg.ray.max_failures)))
            res = timed("pretrain", trainer.fit)
            with res.checkpoint.as_directory() as d:
                import torch
                ema_state = torch.load(Path(d) / "ema.pt", map_location="cpu")
            init_state = _ema_weights(ema_state)
            tracker.metrics({"steps": res.metrics.get("step", 0),
                             "seconds": stage_seconds["pretrain"]})
            log(f"[privimage] pre-training done: {res.metrics.get('step')} steps in "
                f"{stage_seconds['pretrain']:.0f}s")

        # ---- line 10: DP-SGD fine-tuning on the sensitive data
        with tracker.stage("finetune") as srun:
            # `total`: the steps the DP-SGD record holds at the end (a resumed
            # run's record already holds some)
            sigma, q, total = plan_noise(ledger, len(sens), cfg.finetune.batch_size,
                                         cfg.finetune.steps, cfg.finetune.noise_multiplier)
            # Saved BEFORE any DP-SGD step: a run that dies from here on is
            # charged for its whole plan by sweeps (spent_upper_bound), and a
            # resume reads the checkpoints' ledgers (resume_ledger).
            state["finetune_plan"] = {"noise_multiplier": sigma, "sample_rate": q,
                                      "total_steps": total}
            _save_state(run_dir, state)
            tracker.params({"noise_multiplier": sigma, "sample_rate": q, "planned_steps": total})
            log(f"[privimage] DP-SGD: sigma={sigma:.4f}, q={q:.5f}, {total} steps "
                f"(target eps={ledger.target_epsilon:g}, delta={ledger.target_delta:.2g})")
            trainer = TorchTrainer(
                finetune_loop, scaling_config=scaling,
                train_loop_config={**common, "data_ref": sens_ref, "ledger": ledger.state_dict(),
                                   "init_ref": ray.put(state_bytes(init_state)),
                                   "noise_multiplier": sigma, "total_steps": total,
                                   "resume_checkpoint": resume_ckpt and {
                                       "storage": storage, "relpath": resume_ckpt},
                                   "mlflow_run_id": srun.info.run_id,
                                   "checkpoint_every": max(1, total // 4)},
                run_config=RunConfig(name=f"{run_dir.name}-finetune", storage_path=storage,
                                     failure_config=FailureConfig(max_failures=cfg.ray.max_failures)))
            res = timed("finetune", trainer.fit)
            with res.checkpoint.as_directory() as d:
                import torch
                ledger = PrivacyLedger.from_state_dict(json.loads((Path(d) / "ledger.json").read_text()))
                dp_state = _ema_weights(torch.load(Path(d) / "ema.pt", map_location="cpu"))
            eps = ledger.epsilon()
            assert eps <= ledger.target_epsilon + 1e-9, "ledger exceeded its target"
            if pm:
                pm.epsilon(eps, ledger.target_epsilon)
            state["ledger"] = ledger.state_dict()
            state["stages"]["finetune"] = {"steps": res.metrics.get("step")}
            _save_state(run_dir, state)
            # Release: the DP generator's weights (EMA of DP iterates: post-processing).
            import torch
            torch.save(dp_state, run_dir / "dp_generator.pt")
            (run_dir / "ledger.json").write_text(ledger.to_json())
            tracker.metrics({"epsilon": eps, "delta": ledger.target_delta,
                             "steps": res.metrics.get("step", 0),
                             "seconds": stage_seconds["finetune"]})
            tracker.file_artifact(run_dir / "ledger.json")
            log(f"[privimage] DP fine-tuning done: epsilon={eps:.4f} at delta={ledger.target_delta:.2g}")

        # ---- line 11: synthesize, then evaluate (non-private: real test split)
        evaluator = _outside_trial(EvaluatorActor).remote(
            cfg.to_dict(), str(run_dir), metrics_run_id=run.info.run_id if pm else None)
        provenance = {"epsilon": eps, "delta": ledger.target_delta,
                      "accountant": ledger.accountant_name, "mlflow_run_id": run.info.run_id,
                      "generator_preset": cfg.generator.preset,
                      **{k: round(v, 4) for k, v in (sds or {}).items() if k != "sds_seconds"}}
        with tracker.stage("synthesize"):
            syn = timed("synthesize", lambda: ray.get(evaluator.synthesize.remote(
                state_bytes(dp_state), class_names, provenance)))
            from privimage_core.synthesize import read_dataset
            sample_grid_png(read_dataset(syn["path"]), run_dir / "samples.png")
            tracker.file_artifact(run_dir / "samples.png")
            tracker.file_artifact(Path(syn["path"]) / "manifest.json", "synthetic")
            tracker.metrics({"num_images": syn["num_images"], "seconds": syn["seconds"]})
        with tracker.stage("evaluate"):
            from mlflow import set_tag as _tag
            _tag("evaluation", "non-private: uses the real test split; the ceiling and the "
                 "membership audit also read the sensitive training set")
            # sens_ref: the audit's members and the ceiling's training data (never written)
            ev = timed("evaluate", lambda: ray.get(evaluator.evaluate.remote(
                (test.images, test.labels), class_names, sens_ref, eps)))
            report_path = run_dir / "evaluation_report.html"
            report_path.write_text(ev.pop("report_html"))
            tracker.file_artifact(report_path)
            for line in ev.pop("log", []):
                log(line)
            tracker.metrics({k: v for k, v in ev.items() if isinstance(v, (int, float))})
            if ev.get("audit_ok") == 0:
                log("[privimage] " + "!" * 72 + f"\n[privimage] {ev['audit_message']}\n"
                    "[privimage] " + "!" * 72)
            if pm:
                for k in Evaluator.LIVE_METRICS:
                    if isinstance(ev.get(k), (int, float)):
                        pm.eval_metric(k, ev[k])
        ray.kill(evaluator)

        acc_key = f"accuracy_{cfg.evaluation.classifier}"
        summary = {"epsilon": eps, "delta": ledger.target_delta, "fid": ev.get("fid"),
                   "accuracy": ev.get(acc_key), "synthetic_path": syn["path"],
                   "run_dir": str(run_dir), "mlflow_run_id": run.info.run_id,
                   "mlflow_uri": tracker.uri, "stage_seconds": stage_seconds,
                   "total_seconds": time.time() - t_start, "ledger": ledger.summary(),
                   "evaluation": {k: v for k, v in ev.items() if isinstance(v, (int, float))},
                   "audit_ok": None if "audit_ok" not in ev else bool(ev["audit_ok"]),
                   "audit_message": ev.get("audit_message"),
                   "evaluation_report": str(report_path), "sds": sds}
        tracker.metrics({"epsilon": eps, "delta": ledger.target_delta,
                         "accuracy": ev.get(acc_key), "fid": ev.get("fid"),
                         **{f"seconds_{k}": v for k, v in stage_seconds.items()}})
        # The parent run carries the release's headline artifacts too.
        tracker.file_artifact(run_dir / "ledger.json")
        tracker.file_artifact(run_dir / "samples.png")
        state["stages"]["done"] = True
        _save_state(run_dir, state)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if report_fn:
            report_fn(summary)
        if pm:  # a job driver exits next: let Ray export the final values first
            pm.close(linger=ray_info["mode"] in ("job", "address"))
        return summary


def _outside_trial(actor_cls):
    """Schedule an actor on the cluster's free resources, not in the caller's
    placement group: a Tune trial's group holds only the trial function's
    own (fractional) CPU, and Ray would otherwise capture child actors into it
    and refuse them. Outside Tune this changes nothing."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return actor_cls.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))


def _ema_weights(ema_state: dict) -> dict:
    """The EMA module stores the shadow model's state dict under 'shadow'."""
    return ema_state["shadow"] if "shadow" in ema_state else ema_state
