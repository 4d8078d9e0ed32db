"""The typed contract between the driver and the Ray Train loops.

One ``TrainJob`` per training stage, passed as ``train_loop_config={"job": job}``
(Ray pickles it to every worker). DP fields are set only for DP stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    # DP stages only:
    part: str | None = None        # Stage.options["part"]: the family part trained
    ledger: dict | None = None
    mechanism: str | None = None
    noise_multiplier: float | None = None
    total_steps: int | None = None
    # The public record count q is computed from (N + m canaries in an audit
    # run, so that q does not reveal which canaries were included); None: len(data).
    num_records: int | None = None
    # {"storage": ..., "relpath": ...}: the checkpoint a resumed run continues from.
    resume_checkpoint: dict | None = None

    @property
    def is_dp(self) -> bool:
        return self.mechanism is not None
