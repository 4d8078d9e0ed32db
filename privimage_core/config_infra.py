"""The infrastructure sections of the config (``ray:``, ``tracking:``,
``metrics:``): where and how a run executes, not what it computes.
Re-exported by privimage_core.config."""
from __future__ import annotations

from dataclasses import dataclass

# Levels Ray Train's LoggingConfig accepts for its own console lines.
TRAIN_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class RayConfig:
    # None: start a local Ray bound to 127.0.0.1 (or join the job's cluster
    # when running under `ray job submit`).
    address: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 2.0
    storage_path: str | None = None
    max_failures: int = 0
    # Ray Train checkpoints per training stage (every steps // n steps, plus the
    # last): what a restarted worker group or a resumed driver can lose is at
    # most 1/n of a stage; each checkpoint costs a save and a Ray report.
    checkpoints_per_stage: int = 4
    # Ray Train's own console lines (worker group start, "Checkpoint
    # successfully created", "Reporting training result"): INFO prints one per
    # checkpoint; WARNING keeps warnings and errors. The stages' progress
    # lines come from this program, not from Ray Train, and stay.
    train_log_level: str = "WARNING"


@dataclass
class TrackingConfig:
    # None: sqlite:///<abs output_dir>/mlflow.db
    mlflow_uri: str | None = None
    experiment: str = "privimage"


@dataclass
class MetricsConfig:
    """Live metrics go through Ray's metrics API (services/metrics.py) and are
    served by each Ray node's metrics agent, which binds to the node's address
    (127.0.0.1 for the local Ray this program starts). ``port`` pins the local
    Ray's metrics export port (0: Ray picks a free one); on a cluster it is
    ``ray start --metrics-export-port``."""
    enabled: bool = True
    port: int = 0
