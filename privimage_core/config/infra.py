"""The infrastructure sections of the config (``ray:``, ``tracking:``,
``metrics:``): where and how a run executes, not what it computes."""
from __future__ import annotations

from dataclasses import dataclass

from privimage_core.config.types import require as _require

# Levels Ray Train's LoggingConfig accepts for its own console lines.
TRAIN_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class RayConfig:
    # None: start a local Ray bound to 127.0.0.1 (or join the job's cluster
    # when running under `ray job submit`).
    address: str | None = None
    num_workers: int = 1
    # The one GPU switch: Ray Train workers, the sampling workers and the
    # evaluator (its Inception pass and classifiers) each take
    # gpus_per_worker GPUs and run on CUDA; a worker that sees no GPU stops
    # with an error instead of falling back to the CPU. The public selector
    # stays on the CPU.
    use_gpu: bool = False
    cpus_per_worker: float = 2.0
    # GPUs per worker when use_gpu is on, the same for every worker above: a
    # fraction (e.g. 0.5) packs several sampling workers onto one GPU; above
    # 1 it must be a whole number. DDP over NCCL needs one whole GPU per rank.
    gpus_per_worker: float = 1.0
    # Ray tasks that sample the synthetic set in parallel, each a contiguous
    # range of images; any number gives the same images. 1: the evaluator
    # samples them itself.
    sampling_workers: int = 1
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

    def validate(self) -> None:
        _require(self.num_workers >= 0, "ray.num_workers must be >= 0 (0 = in-process)")
        _require(self.cpus_per_worker > 0,
                 "ray.cpus_per_worker must be > 0 (Ray rejects 0 CPUs)")
        g = self.gpus_per_worker
        _require(g > 0 and (g <= 1 or float(g).is_integer()),
                 f"ray.gpus_per_worker must be a fraction in (0, 1] or a whole number, got {g}; "
                 "set e.g. 1 (Ray rejects other fractions above 1)")
        _require(not (self.use_gpu and self.num_workers > 1 and g < 1),
                 f"ray.gpus_per_worker is {g} with ray.num_workers {self.num_workers}: DDP over "
                 "NCCL refuses two ranks on one GPU; set ray.gpus_per_worker: 1")
        _require(self.sampling_workers >= 1,
                 f"ray.sampling_workers must be >= 1, got {self.sampling_workers}; set e.g. 1")
        _require(self.train_log_level in TRAIN_LOG_LEVELS,
                 f"ray.train_log_level must be one of {', '.join(TRAIN_LOG_LEVELS)}, "
                 f"got '{self.train_log_level}'")
        _require(self.checkpoints_per_stage >= 1,
                 f"ray.checkpoints_per_stage must be >= 1, got {self.checkpoints_per_stage}; "
                 "set e.g. 4")

    def gpu_options(self) -> dict:
        """Ray resource options of a GPU-using actor or task (``.options(**...)``):
        ``num_gpus`` from use_gpu and gpus_per_worker, 0 on the CPU."""
        return {"num_gpus": self.gpus_per_worker if self.use_gpu else 0}


@dataclass
class TrackingConfig:
    # None: sqlite:///<abs output_dir>/mlflow.db
    mlflow_uri: str | None = None
    experiment: str = "privimage"

    def validate(self) -> None:
        _require(bool(self.experiment.strip()),
                 "tracking.experiment must be a non-empty name, e.g. privimage")


@dataclass
class MetricsConfig:
    """Live metrics go through Ray's metrics API (services/metrics.py) and are
    served by each Ray node's metrics agent, which binds to the node's address
    (127.0.0.1 for the local Ray this program starts). ``port`` pins the local
    Ray's metrics export port (0: Ray picks a free one); on a cluster it is
    ``ray start --metrics-export-port``."""
    enabled: bool = True
    port: int = 0

    def validate(self) -> None:
        _require(0 <= self.port <= 65535, f"metrics.port must be in [0, 65535], got {self.port}")
