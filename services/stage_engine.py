"""The stage engine: runs a method's stages in order and does, in one place,
what every stage needs around it: the nested MLflow run, timing, live
metrics, and saving the run state after the stage (so a resumed run skips
what is done and never re-spends budget).

A stage is a ``StageImpl``: ``run(ctx, stage)`` does the work and returns
numeric metrics for its MLflow run; it saves what a resume needs into
``ctx.state["stages"][stage.name]`` (present = done). ``restore(ctx, stage,
saved)``, when given, rebuilds the stage's in-memory outputs from that saved
entry instead of running again; stages without it (cheap public ones) re-run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from privimage_core.config import Config
from privimage_core.methods import Method, Stage
from privimage_core.privacy.ledger import PrivacyLedger
from privimage_core.privacy.plan import PrivacyPlan
from services.actors import outside_trial
from services.run_store import save_state


@dataclass
class RunContext:
    cfg: Config
    method: Method
    run_dir: Path
    state: dict
    ledger: PrivacyLedger
    plan: PrivacyPlan              # the run's privacy plan, computed once (privacy/plan.py)
    inputs: Any                    # services.pipeline.Inputs
    tracker: Any                   # services.tracking.Tracker
    log: Callable[[str], None]
    storage: str                   # Ray Train storage path
    resume_checkpoints: dict[str, str]
    pm: Any = None                 # services.metrics.PipelineMetrics or None
    mlflow_run_id: str | None = None
    sens_ref: Any = None           # ray.ObjectRef of the sensitive (images, labels)
    # In-memory outputs handed from stage to stage (public_names, selection,
    # pretrain_data, init_state (what the next training stage starts from),
    # pretrained_state (public-only weights), release_state, synthetic, ...).
    values: dict = field(default_factory=dict)
    actors: dict = field(default_factory=dict)
    stage_seconds: dict = field(default_factory=dict)
    current_stage: str | None = None   # the stage under way (for a stop's report)
    # Called after each finished stage (services/run_report.write_running).
    on_stage_done: Callable[["RunContext"], None] | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.inputs.sensitive.class_names)

    def save(self) -> None:
        self.state["stage_seconds"] = self.stage_seconds
        save_state(self.run_dir, self.state)

    def done(self, stage: Stage) -> dict | None:
        return self.state["stages"].get(stage.name)

    def finish(self, stage: Stage, saved: dict) -> None:
        """Mark ``stage`` done with what a resume needs, and save the state."""
        self.state["stages"][stage.name] = saved
        self.save()

    def actor(self, name: str, actor_cls, **options):
        """The run's actor ``name`` (created on first use, outside any Tune
        trial's placement group, with Ray ``options`` such as num_gpus),
        given the run's config and directory."""
        if name not in self.actors:
            self.actors[name] = outside_trial(actor_cls, **options).remote(
                self.cfg.to_dict(), str(self.run_dir),
                metrics_run_id=self.mlflow_run_id if self.pm else None)
        return self.actors[name]

    def kill_actors(self, *names: str) -> None:
        for n in names or list(self.actors):
            a = self.actors.pop(n, None)
            if a is not None:
                ray.kill(a)


@dataclass(frozen=True)
class StageImpl:
    run: Callable[[RunContext, Stage], dict | None]
    restore: Callable[[RunContext, Stage, dict], None] | None = None


def run_stages(ctx: RunContext, impls: dict[str, StageImpl]) -> None:
    total = len(ctx.method.stages)
    for i, stage in enumerate(ctx.method.stages, 1):
        impl = impls[stage.kind]
        saved = ctx.done(stage)
        if saved is not None and impl.restore is not None:
            impl.restore(ctx, stage, saved)
            ctx.log(f"[privimage] stage {stage.name}: done in an earlier attempt, restored")
            continue
        ctx.current_stage = stage.name
        ctx.log(f"[privimage] stage {i}/{total}: {stage.name}")
        with ctx.tracker.stage(stage.name):
            t0 = time.time()
            metrics = impl.run(ctx, stage) or {}
            seconds = time.time() - t0
            ctx.stage_seconds[stage.name] = seconds
            ctx.tracker.metrics({**{k: v for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)},
                                 "seconds": seconds})
            if ctx.pm:
                ctx.pm.stage_done(stage.name, seconds)
            ctx.save()
        if ctx.on_stage_done is not None:
            ctx.on_stage_done(ctx)
    ctx.current_stage = None
