"""The typed contract between the driver and the Ray Train loops.

One ``TrainJob`` per training stage, passed as ``train_loop_config={"job": job}``
(Ray pickles it to every worker). ``plan`` is set only for DP stages: the
stage's part of the run's privacy plan (privimage_core/privacy/plan.py),
computed once on the driver; the worker runs it and checks its loader's
Poisson rate against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from privimage_core.privacy.plan import DPSGDPlan


@dataclass
class TrainJob:
    cfg: dict                      # the run's resolved config (Config.to_dict())
    family: str                    # privimage_core.models family name
    stage: str                     # the method's stage name (checkpoint / ledger key)
    num_classes: int
    data_ref: Any                  # ray.ObjectRef of (images uint8 NHWC, labels)
    checkpoint_every: int
    run_id: str                    # the MLflow parent run (live metrics label)
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None   # the stage's nested MLflow run
    metrics_enabled: bool = True
    # Name of the driver's progress board actor (services/progress.py), or None.
    progress_board: str | None = None
    # Weights to start from (ray.ObjectRef of state_bytes), None = random init.
    init_ref: Any = None
    # Pre-training only: recolour the public images (pretrain.resolve_recolour,
    # resolved on the driver from the public images).
    recolour: bool = False
    # DP stages only:
    part: str | None = None        # Stage.options["part"]: the family part trained
    ledger: dict | None = None     # the run's ledger when the stage starts
    plan: DPSGDPlan | None = None
    trainable: str | None = None   # finetune.trainable for the release stage, else None
    # {"storage": ..., "relpath": ...}: the checkpoint a resumed run continues from.
    resume_checkpoint: dict | None = None

    @property
    def is_dp(self) -> bool:
        return self.plan is not None
