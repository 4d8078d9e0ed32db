"""The pipeline driver: runs one method (privimage_core/methods.py) on Ray.

Used identically by the local CLI (``privimage run``) and by
``ray job submit ... -- python -m services.entrypoint``. For PrivImage
(Algorithm 2) the stages are:

  1  train the semantic query function on D_p            (SelectorActor)
  2  DP query of D_s's semantic distribution             (SelectorActor, ledger)
  3  select + relabel public images, top-k2 semantics    (SelectorActor)
  4  pre-train the generator on the selection, no DP     (Ray Train)
  5  fine-tune it with DP-SGD on D_s                      (Ray Train + Opacus, ledger)
  6  sample the synthetic dataset and evaluate it        (EvaluatorActor)

The baselines are other stage lists. The driver validates everything cheap,
then hands the stages to the stage engine (services/stage_engine.py); stage
outputs are saved in the run directory as they finish (services/run_store.py),
so an interrupted run resumes (``--resume <run_dir>``) without recomputing them
and without re-spending privacy budget: the ledger is part of the saved state.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from mlflow import set_tag

from privimage_core.config import Config, from_dict, resolve_defaults, resolve_delta
from privimage_core.data.imageset import ImageSet
from privimage_core.data.sources import check_public_specs, load_source, validate_sensitive
from privimage_core.data.specs import SPEC_HELP, is_user_source, parse_spec, same_user_dataset
from privimage_core.errors import ConfigError, DataError, PrivacyBudgetError
from privimage_core.evaluation.canary_audit import check_canary_source
from privimage_core.evaluation.semantic_similarity import require_model
from privimage_core.methods import Method, get_method
from privimage_core.models import build_model
from privimage_core.privacy.dataset_size import known_size
from privimage_core.privacy.plan import plan_run
from services import interrupts, ray_runtime
from services.budget import open_lifetime, prepare_budget
from services.metrics import PipelineMetrics
from services.run_report import (final_summary, record_error, record_final, record_stop, run_name,
                                 write_running)
from services.run_store import (STATE_FILE, load_state, new_run_dir, resume_ledger, save_state,
                                write_config)
from services.stage_engine import RunContext, run_stages
from services.stages import STAGES
from services.tracking import Tracker

__all__ = ["STATE_FILE", "Inputs", "load_inputs", "run_pipeline"]


@dataclass
class Inputs:
    """Loaded and validated before any expensive work starts."""
    sensitive: ImageSet
    test: ImageSet


def load_inputs(cfg: Config) -> Inputs:
    if cfg.evaluation.sds:  # fail before any work, not after the DP query
        require_model()
    if cfg.run.data_dir:
        os.environ["PRIVIMAGE_DATA_DIR"] = str(Path(cfg.run.data_dir).resolve())
    d = cfg.data
    for key in ("sensitive", "sensitive_test"):  # a mistyped path is named first
        spec = getattr(d, key)
        parsed = parse_spec(spec) if spec else None
        if spec and parsed is None:
            raise ConfigError(f"data.{key}: unknown data source {spec!r}; {SPEC_HELP}")
        if parsed and parsed[1] is not None and not Path(parsed[1]).exists():
            raise DataError(f"data.{key}: {parsed[1]} does not exist; fix the path "
                            f"(data.{key}: {parsed[0]}:<path>)")
    check_public_specs(d.public, d.sensitive)
    # folder:/parquet: data has no split: evaluation and the membership audit
    # need held-out data, never the training images again.
    if is_user_source(d.sensitive) and not d.sensitive_test:
        raise ConfigError(f"data.sensitive {d.sensitive!r} has no test split; set "
                          "data.sensitive_test to held-out data of the same classes")
    if d.sensitive_test and same_user_dataset(d.sensitive_test, d.sensitive):
        raise ConfigError("data.sensitive_test names the same files as data.sensitive; point it "
                          "at held-out data of the same classes")
    if cfg.evaluation.canary_audit:  # canaries must be public, never sensitive records
        check_canary_source(cfg.evaluation.canary_source, d.sensitive)
    size = known_size(cfg)
    if size is not None:  # delta against the public size, before any work
        resolve_delta(cfg, size.value)
    sens = load_source(d.sensitive, split="train", image_size=d.image_size, channels=d.channels,
                       resize=d.resize, class_names=d.class_names)
    validate_sensitive(sens)
    test = load_source(d.sensitive_test or d.sensitive, split="test", image_size=d.image_size,
                       channels=d.channels, resize=d.resize, class_names=d.class_names)
    if list(test.class_names) != list(sens.class_names):
        raise DataError(f"the test split's classes {test.class_names[:5]}... differ from the "
                        f"sensitive classes {sens.class_names[:5]}...; point data.sensitive_test "
                        "at the matching test split")
    return Inputs(sens, test)


def check_generator(cfg: Config, method: Method, num_classes: int) -> None:
    """Build the generator once before anything reads sensitive data: a typo
    in generator.overrides fails here, not in a worker after the DP query."""
    g = cfg.generator
    try:
        build_model(cfg, method.family, num_classes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"generator.overrides {g.overrides} do not build a {method.family} "
                          f"'{g.preset}' generator ({e}); fix or remove them") from e


def run_pipeline(cfg: Config, resume_dir: str | None = None, parent_run_id: str | None = None,
                 log: Callable[[str], None] = print, report_fn: Callable[[dict], None] | None = None,
                 run_dir: str | None = None) -> dict:
    """Run (or resume) one pipeline of ``cfg.method``; returns the final
    summary. ``run_dir``: where a new run writes (default: a fresh directory
    under ``run.output_dir``); a sweep names one per trial so that a retried
    trial resumes instead of spending its budget again."""
    fixed_dir = Path(run_dir).resolve() if run_dir else None
    t_start = time.time()
    # ---- validate everything cheap first: config, generator, data, delta
    run_dir = None
    if resume_dir:
        run_dir = Path(resume_dir).resolve()
        state = load_state(run_dir)
        cfg = resolve_defaults(from_dict(state["config"]))
        log(f"[privimage] resuming {run_dir} (stages done: {', '.join(state['stages']) or 'none'})")
    else:
        cfg = resolve_defaults(cfg)  # the run records the numbers it uses
        state = {"config": cfg.to_dict(), "method": cfg.method, "stages": {},
                 "parent_run_id": parent_run_id}
    method = get_method(cfg.method)
    inputs = load_inputs(cfg)
    check_generator(cfg, method, len(inputs.sensitive.class_names))
    fresh = run_dir is None
    if fresh and fixed_dir is not None:
        fixed_dir.mkdir(parents=True, exist_ok=True)
        run_dir = fixed_dir
    elif fresh:  # only now: bad input leaves no directory behind
        run_dir = new_run_dir(Path(cfg.run.output_dir), run_name(cfg))
    # The public size, delta and privacy plan, once, charged to the lifetime
    # ledger before any mechanism reads the data (a resumed run keeps its own).
    try:
        budget = prepare_budget(cfg, method, len(inputs.sensitive), state, run_dir, log)
    except Exception:
        if fresh and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before anything was written or spent
        raise
    plan, lifetime = budget.plan, budget.lifetime
    storage = cfg.ray.storage_path or str(run_dir / "ray_train")
    if "ledger" in state:
        ledger, resume = resume_ledger(state, storage, run_dir)
    else:
        ledger, resume = budget.ledger, {}
        state["ledger"] = ledger.state_dict()
    save_state(run_dir, state)

    ray_info = ray_runtime.ensure_ray(cfg.ray, metrics_port=cfg.metrics.port)
    interrupts.install()  # after ray.init, which installs a SIGTERM handler of its own
    state.pop("stopped", None)
    tracker = Tracker(cfg, parent_run_id=parent_run_id)
    if cfg.metrics.enabled:
        # Every process of the run records through Ray's metrics API; one scrape
        # of the node's metrics export port shows them all (services/metrics.py).
        log(f"[privimage] live metrics (Prometheus): {ray_runtime.metrics_endpoint() or 'unknown'}")
    write_config(run_dir, cfg)
    with tracker.pipeline_run(run_name(cfg), tags={"run_dir": str(run_dir),
                                                   "method": method.name}) as run:
        state["mlflow_run_id"] = run.info.run_id
        ctx = RunContext(cfg=cfg, method=method, run_dir=run_dir, state=state, ledger=ledger,
                         plan=plan, inputs=inputs, tracker=tracker, log=log, storage=storage,
                         resume_checkpoints=resume, mlflow_run_id=run.info.run_id,
                         stage_seconds=dict(state.get("stage_seconds", {})),
                         on_stage_done=write_running)
        if cfg.metrics.enabled:
            ctx.pm = PipelineMetrics(run.info.run_id)
            ctx.pm.epsilon(ledger.epsilon(), ledger.target_epsilon)
        # every MLflow run records the full resolved config (a resumed run is a new MLflow run)
        tracker.params(cfg.flat())
        # the public size the run uses (never the true N: docs/privacy.md)
        tracker.params({"resolved.delta": plan.delta,
                        "resolved.dataset_size": budget.size.value,
                        "resolved.dataset_size_source": budget.size.source})
        tracker.json_artifact(cfg.to_dict(), "resolved_config.json")
        if resume_dir:
            set_tag("resumed_from", str(run_dir))
        set_tag("ray_mode", ray_info["mode"])
        log(f"[privimage] {method.name}: {method.summary}")
        log(f"[privimage] run dir {run_dir}; MLflow run {run.info.run_id}")
        ctx.sens_ref = ray.put((inputs.sensitive.images, inputs.sensitive.labels))
        write_running(ctx)
        try:
            run_stages(ctx, STAGES)
        except KeyboardInterrupt as e:
            stop = interrupts.as_interrupted(e)
            record_stop(ctx, stop)
            raise stop from None
        except Exception as e:
            record_error(ctx, e)
            raise
        finally:
            ctx.kill_actors()
        lifetime.settle(str(run_dir), ctx.ledger.state_dict())
        summary = final_summary(ctx, time.time() - t_start)
        summary["lifetime_epsilon_composed"] = lifetime.composed_epsilon()
        tracker.metrics({"lifetime_epsilon_composed": summary["lifetime_epsilon_composed"]})
        log(f"[privimage] lifetime ledger of this dataset: epsilon "
            f"{summary['lifetime_epsilon_composed']:.4g} over all its runs"
            + (f" (budget {cfg.privacy.lifetime_epsilon:g})" if cfg.privacy.lifetime_epsilon
               else " (no lifetime budget set: privacy.lifetime_epsilon)"))
        # The parent run carries the release's headline artifacts too.
        tracker.file_artifact(run_dir / "ledger.json")
        tracker.file_artifact(run_dir / "samples.png")
        state["stages"]["done"] = True
        ctx.save()
        record_final(ctx, summary)
        if report_fn:
            report_fn(summary)
        if ctx.pm:  # a job driver exits next: let Ray export the final values first
            ctx.pm.close(linger=ray_info["mode"] in ("job", "address"))
        return summary


def preflight(cfg: Config) -> dict:
    """Every check ``run`` makes before a mechanism reads the sensitive data,
    spending nothing (``privimage validate``): the config, the data and its
    classes, the generator built from the config, and, when the dataset's
    size is public, the privacy plan and the lifetime budget. What it found."""
    cfg = resolve_defaults(cfg)
    method = get_method(cfg.method)
    inputs = load_inputs(cfg)
    check_generator(cfg, method, len(inputs.sensitive.class_names))
    out = {"method": method.name, "classes": inputs.sensitive.num_classes}
    size = known_size(cfg)
    if size is None:  # the DP size query would run first; nothing can be planned before it
        return {**out, "dataset_size": None, "dataset_size_source":
                "dp_estimate (at run time, privacy.size_epsilon_share of epsilon)"}
    plan = plan_run(cfg, method, size.value, resolve_delta(cfg, size.value))
    planned = plan.ledger()
    lifetime = open_lifetime(cfg, plan.delta)
    if lifetime.would_exceed(planned.state_dict()):
        raise PrivacyBudgetError(
            f"this run's plan would take the dataset's lifetime epsilon past "
            f"privacy.lifetime_epsilon={cfg.privacy.lifetime_epsilon:g} "
            f"({lifetime.composed_epsilon():.4g} already spent); raise it knowingly or use new "
            "data")
    return {**out, "dataset_size": size.value, "dataset_size_source": size.source,
            "delta": plan.delta, "planned_epsilon": planned.epsilon(),
            "dp_stages": {k: None if v is None else {"noise_multiplier": v.noise_multiplier,
                                                     "sample_rate": v.sample_rate,
                                                     "steps": v.total_steps}
                          for k, v in plan.stages.items()}}
