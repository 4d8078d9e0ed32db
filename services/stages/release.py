"""Synthesis from the DP model (post-processing, Algorithm 2 line 11) and
the evaluation (non-private: it reads the real test split, and the ceiling
and the membership audit read the sensitive training set), by the
evaluator actor."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
from mlflow import set_tag
from PIL import Image

from privimage_core.evaluation.canary_audit import CANARY_FILE, CanarySet
from privimage_core.methods import Stage
from privimage_core.models.release import ReleaseManifest
from privimage_core.models.state import state_bytes
from privimage_core.synthesize import read_dataset
from services.actors import Evaluator, EvaluatorActor
from services.progress import progress_line
from services.sampling import sample_sharded
from services.stage_engine import RunContext
from services.stages.training import RELEASE_FILE


def _evaluator(ctx: RunContext):
    return ctx.actor("evaluator", EvaluatorActor, **ctx.cfg.ray.gpu_options())


def _sample_shards(ctx: RunContext, state: bytes, manifest: dict, board: str) -> list | None:
    """The sampling workers' shards (ObjectRefs), all finished, or None when
    the evaluator samples alone (ray.sampling_workers: 1). They run before the
    evaluator exists: an evaluator holding a GPU would leave queued shards
    waiting for it forever on a node with fewer GPUs than workers + 1."""
    if ctx.cfg.ray.sampling_workers < 2:
        return None
    ctx.kill_actors("evaluator")  # holds no state before synthesis
    return sample_sharded(ctx.cfg, ray.put(state), manifest, board)


def synthesize(ctx: RunContext, stage: Stage) -> dict:
    led = ctx.ledger
    provenance = {"epsilon": led.epsilon(), "delta": led.target_delta,
                  "accountant": led.accountant_name, "mlflow_run_id": ctx.mlflow_run_id,
                  "method": ctx.method.name, "generator_preset": ctx.cfg.generator.preset,
                  **{k: round(v, 4) for k, v in (ctx.values.get("sds") or {}).items()
                     if k != "sds_seconds"}}
    if ctx.values.get("selection_note"):  # DP outputs only (query_budget.py)
        provenance.update(selection_warning=ctx.values["selection_note"],
                          pretrain_data_fallback=ctx.values.get("selection_fallback"))
    with progress_line(ctx.mlflow_run_id or "run", stage.name, "sampling", ctx.log,
                       unit="images") as board:
        state, manifest = state_bytes(ctx.values["release_state"]), _manifest(ctx)
        shards = _sample_shards(ctx, state, manifest, board)
        syn = ray.get(_evaluator(ctx).synthesize.remote(state, manifest, provenance, board,
                                                        shards))
    ctx.values["synthetic"] = syn
    sample_grid_png(read_dataset(syn["path"]), ctx.run_dir / "samples.png")
    ctx.tracker.file_artifact(ctx.run_dir / "samples.png")
    ctx.tracker.file_artifact(Path(syn["path"]) / "manifest.json", "synthetic")
    return {"num_images": syn["num_images"]}


def _manifest(ctx: RunContext) -> dict:
    """The release's manifest (written beside it by its DP stage)."""
    return ReleaseManifest.for_run(ctx.cfg, ctx.method.family, ctx.class_names,
                                   RELEASE_FILE).to_dict()


def evaluate(ctx: RunContext, stage: Stage) -> dict:
    set_tag("evaluation", "non-private: uses the real test split; the ceiling and the "
            "membership diagnostic also read the sensitive training set; the canary audit "
            "reads the canaries' inclusion bits (operator only)")
    test = ctx.inputs.test
    canaries, reference = _canary_args(ctx)
    # sens_ref: the diagnostic's members and the ceiling's training data (never written)
    said: list[str] = []  # the evaluator's lines already shown as they came
    with progress_line(ctx.mlflow_run_id or "run", stage.name, "evaluation: FID Inception",
                       ctx.log, unit="images", said=said) as board:
        ev = ray.get(_evaluator(ctx).evaluate.remote((test.images, test.labels),
                                                     ctx.class_names, ctx.sens_ref,
                                                     ctx.ledger.epsilon(), canaries, reference,
                                                     board, ctx.ledger.epsilon_of("dp_sgd_")))
    ctx.kill_actors("evaluator")
    _record_canary_audit(ctx, ev.pop("canary_detail", None), ev.pop("audit_verdict", None))
    report = ctx.run_dir / "evaluation_report.html"
    report.write_text(ev.pop("report_html"))
    ctx.tracker.file_artifact(report)
    for line in ev.pop("log", [])[len(said):]:
        ctx.log(line)
    if ev.get("audit_ok") == 0:
        ctx.log("[privimage] " + "!" * 72 + f"\n[privimage] {ev['audit_message']}\n"
                "[privimage] " + "!" * 72)
    if ctx.pm:
        for k in Evaluator.LIVE_METRICS:
            if isinstance(ev.get(k), (int, float)):
                ctx.pm.eval_metric(k, ev[k])
    ev["report_path"] = str(report)
    ctx.values["evaluation"] = ev
    return {mlflow_key(k): v for k, v in ev.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------ canary audit
CANARY_RESULT_FILE = "canary_audit.json"  # counts + verdict, run dir only (operator)


def _canary_args(ctx: RunContext):
    """(CanarySet fields, public pre-trained weights) for the evaluator, or
    (None, None) when this run has no canaries."""
    path = ctx.run_dir / CANARY_FILE
    if not ctx.cfg.evaluation.canary_audit or not path.is_file():
        return None, None
    # The reference must never have seen a canary: the PUBLIC pre-trained
    # weights, not init_state (a multi-stage method hands its DP stages'
    # outputs on through it; after the last stage it is the release itself,
    # and release - release scores every canary 0).
    ref = ctx.values.get("pretrained_state")
    return asdict(CanarySet.load(path)), state_bytes(ref) if ref is not None else None


def _record_canary_audit(ctx: RunContext, detail: dict | None, verdict: str | None) -> None:
    """The full result stays in the run dir; MLflow gets the verdict (a tag)
    and, through the metrics, the bound and what it could show."""
    if detail is None:
        return
    (ctx.run_dir / CANARY_RESULT_FILE).write_text(json.dumps(detail, indent=2, default=str))
    set_tag("canary_audit_verdict", verdict)


# Metrics computed from the SENSITIVE training set (the membership audit, the
# train-on-real ceiling, the real rows of the utility matrix, the memorisation
# checks): logged under a prefix that says so, and never exported live.
TRAIN_READING_PREFIXES = ("mia_", "ceiling_", "utility_real", "memorisation_")


def mlflow_key(k: str) -> str:
    if k.startswith("canary_"):  # the audit reads the secret inclusion bits: operator only
        return f"nonprivate_audit.{k}"
    return f"nonprivate_train.{k}" if k.startswith(TRAIN_READING_PREFIXES) else k


def sample_grid_png(ds, path: Path, per_class: int = 10) -> None:
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
