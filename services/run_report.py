"""What a run says about itself, whatever its outcome: ``summary.json`` in
its directory (``running`` while it goes, then ``finished``, ``failed`` or
``stopped``), the headline metrics and status on its parent MLflow run, and
the command that finishes a run that did not.

The summary holds DP outputs and public quantities only (the ledger, the
public size, stage times, the evaluation's non-private figures labelled as
such in the report), never sensitive records or counts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow import end_run, set_tag
from mlflow.entities import Metric

from privimage_core.data.specs import parse_spec
from privimage_core.privacy.ledger import PrivacyLedger
from services.interrupts import RunInterrupted
from services.run_store import spent_upper_bound

SUMMARY_FILE = "summary.json"
STATUSES = ("running", "finished", "failed", "stopped")


def resume_command(run_dir: Path) -> str:
    return f"privimage run --resume {run_dir}"


def run_name(cfg) -> str:
    """The MLflow run name: what tells runs apart in the runs table (method,
    dataset, epsilon), unless ``run.name`` was set to something of its own."""
    if cfg.run.name != "privimage":
        return cfg.run.name
    kind, arg = parse_spec(cfg.data.sensitive) or (cfg.data.sensitive, None)
    data = kind if arg is None else Path(arg.rstrip("/")).stem
    return f"{cfg.method}-{data}-eps{cfg.privacy.target_epsilon:g}"


def _spent(ctx) -> dict:
    upper = spent_upper_bound(ctx.run_dir)
    return {"confirmed": ctx.ledger.epsilon(),
            "at_most": PrivacyLedger.from_state_dict(upper).epsilon() if upper else 0.0}


def _base(ctx, status: str) -> dict:
    return {"status": status, "method": ctx.method.name, "run_dir": str(ctx.run_dir),
            "stages_done": [s.name for s in ctx.method.stages if s.name in ctx.state["stages"]],
            "stage_seconds": dict(ctx.stage_seconds), "mlflow_run_id": ctx.mlflow_run_id,
            "mlflow_uri": ctx.tracker.uri, "mlflow_experiment_id": ctx.tracker.experiment_id,
            "dataset_size": ctx.state.get("dataset_size")}


def _write(ctx, summary: dict) -> None:
    (ctx.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))


def write_running(ctx) -> None:
    """After every stage: what is done and spent so far, and how to finish
    the run if the process is killed (a kill leaves this as it was)."""
    _write(ctx, {**_base(ctx, "running"), "current_stage": ctx.current_stage,
                 "epsilon": _spent(ctx), "resume": resume_command(ctx.run_dir)})
    _parent_metrics(ctx, {"epsilon": ctx.ledger.epsilon()})


def _parent_metrics(ctx, metrics: dict) -> None:
    """Metrics on the parent MLflow run (the run table's row), from inside a
    stage's nested run or outside it."""
    try:
        ctx.tracker.client.log_batch(ctx.mlflow_run_id, metrics=[
            _metric(k, v) for k, v in metrics.items() if isinstance(v, (int, float))])
    except Exception:  # tracking hiccups must not stop or hide the run's outcome
        pass


def _metric(key: str, value: float) -> Metric:
    return Metric(key, float(value), int(time.time() * 1000), 0)


def final_summary(ctx, total_seconds: float) -> dict:
    ev = ctx.values.get("evaluation", {})
    led = ctx.ledger
    failure = ev.get("failure")
    return {**_base(ctx, "failed" if failure else "finished"),
            "failure": failure, "epsilon": led.epsilon(), "delta": led.target_delta,
            "fid": ev.get("fid"), "accuracy": ev.get(f"accuracy_{ctx.cfg.evaluation.classifier}"),
            "synthetic_path": ctx.values["synthetic"]["path"], "total_seconds": total_seconds,
            "ledger": led.summary(),
            "evaluation": {k: v for k, v in ev.items() if isinstance(v, (int, float))},
            "audit_ok": None if "audit_ok" not in ev else bool(ev["audit_ok"]),
            "audit_message": ev.get("audit_message"),
            "evaluation_report": ev.get("report_path"), "sds": ctx.values.get("sds"),
            "selection_warning": ctx.values.get("selection_note"),
            "pretrain_data_fallback": ctx.values.get("selection_fallback")}


def record_final(ctx, summary: dict) -> None:
    """The finished (or failed: at chance) run on its parent MLflow run, in
    its directory and, for a failure, loudly in the log."""
    ev = summary["evaluation"]
    _parent_metrics(ctx, {"epsilon": summary["epsilon"], "delta": summary["delta"],
                          "accuracy": summary["accuracy"], "fid": summary["fid"],
                          **{k: ev[k] for k in ("kid", "precision", "recall") if k in ev},
                          **{f"seconds_{k}": v for k, v in ctx.stage_seconds.items()}})
    set_tag("result", summary["status"])
    if summary["failure"]:
        ctx.log("[privimage] " + "!" * 72 + f"\n[privimage] RUN FAILED: {summary['failure']}\n"
                "[privimage] " + "!" * 72)
    _write(ctx, summary)


def record_stop(ctx, e: RunInterrupted) -> None:
    """A run stopped by a signal: its state, the budget it may have spent and
    the command that finishes it, in the run directory, MLflow and the log."""
    stage = ctx.current_stage or "between stages"
    spent = _spent(ctx)
    ctx.state["stopped"] = {"signal": e.signal_name, "stage": stage,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "epsilon": spent, "resume": resume_command(ctx.run_dir)}
    ctx.save()
    _write(ctx, {**_base(ctx, "stopped"), **ctx.state["stopped"]})
    _close_parent(ctx, "stopped", f"{e.signal_name} during {stage}", spent)
    ctx.log(f"[privimage] stopped by {e.signal_name} during stage '{stage}'; finished stages "
            f"are saved in {ctx.run_dir} (epsilon spent: {spent['confirmed']:.4g} confirmed, at "
            f"most {spent['at_most']:.4g}). Resume with:\n  {resume_command(ctx.run_dir)}")


def record_error(ctx, err: BaseException) -> None:
    """A run that raised: what was done and spent, the error in one line and
    the command that finishes the run once its cause is fixed."""
    stage = ctx.current_stage or "between stages"
    spent = _spent(ctx)
    line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    _write(ctx, {**_base(ctx, "failed"), "stage": stage, "error": line, "epsilon": spent,
                 "resume": resume_command(ctx.run_dir)})
    _close_parent(ctx, "failed", f"{line} (stage {stage})", spent)
    ctx.log(f"[privimage] failed during stage '{stage}': {line}; finished stages are saved in "
            f"{ctx.run_dir} (epsilon spent: {spent['confirmed']:.4g} confirmed, at most "
            f"{spent['at_most']:.4g}). After fixing the cause, resume with:\n  "
            f"{resume_command(ctx.run_dir)}")


def _close_parent(ctx, status: str, why: str, spent: dict) -> None:
    try:
        set_tag("result", status)
        set_tag("stopped" if status == "stopped" else "error", why)
    except Exception:  # tracking hiccups must not hide the outcome
        pass
    _parent_metrics(ctx, {"epsilon": spent["confirmed"], "epsilon_at_most": spent["at_most"]})
    if status == "stopped":  # MLflow's word for a run ended from outside; an error stays FAILED
        try:
            end_run("KILLED")
        except Exception:
            pass
