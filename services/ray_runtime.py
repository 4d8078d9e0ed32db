"""Connect to Ray the same way on a laptop and on a cluster.

- Under ``ray job submit`` (RAY_ADDRESS / job env set): join that cluster with
  a plain ``ray.init()`` (passing num_cpus there raises ValueError).
- ``ray.address`` configured: join it.
- Otherwise: start a local Ray owned by this process, bound to 127.0.0.1.
  On Linux a local ``ray.init()`` binds every interface unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (FIELD_NOTES); we set it before init.
"""
from __future__ import annotations

import os

import ray

from privimage_core.config import RayConfig


def in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def ensure_ray(cfg: RayConfig, num_cpus: int | None = None) -> dict:
    """Initialise Ray once per process; returns how it was reached."""
    if ray.is_initialized():
        return {"mode": "existing"}
    # Workers and trials import the project from the working dir / installed package.
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
        return {"mode": "address", "address": cfg.address}
    if in_ray_job():
        ray.init()
        return {"mode": "job"}
    # Loopback only. The constant is read when ray is imported, so set it for
    # the processes Ray spawns (env) and for this already-imported module.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The dashboard (State API, Jobs) is on: Ray Train's placement-group cleaner
    # polls the State API. It binds to 127.0.0.1 like everything else here.
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [os.getcwd(), os.environ.get("PYTHONPATH", "")])}})
    return {"mode": "local", "address": "127.0.0.1"}
