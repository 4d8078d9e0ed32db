"""Connect to Ray the same way on a laptop and on a cluster.

- Under ``ray job submit`` (RAY_ADDRESS / job env set): join that cluster with
  a plain ``ray.init()`` (passing num_cpus there raises ValueError).
- ``ray.address`` configured: join it.
- Otherwise: start a local Ray owned by this process, bound to 127.0.0.1.
  On Linux a local ``ray.init()`` binds every interface unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (measured with Ray 2.60); we set it
  before init.
  Its metrics export port (where services/metrics.py's metrics and Ray's own
  appear) is ``metrics.port`` if set, else a free port Ray picks;
  ``metrics_endpoint()`` says which. While it lives, RAY_ADDRESS names it in
  this process's environment and in its workers' (``name_cluster``): Ray
  Train's placement-group cleaner looks a cluster up through the State API,
  which finds every Ray on the host and refuses to choose when a second run
  has started its own; ``shutdown()`` stops it and takes the variable back.
"""
from __future__ import annotations

import logging
import os

import ray
from ray._private import ray_constants

from privimage_core.config import RayConfig


# The RAY_ADDRESS this process set for the local Ray it started (None: not ours).
_OWNED: dict[str, str | None] = {"address": None}


def in_ray_job() -> bool:
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"))


def owns_ray() -> bool:
    """Whether this process started the Ray it is connected to."""
    return _OWNED["address"] is not None and ray.is_initialized()


def shutdown() -> None:
    """Stop Ray if this process started it (its workers, actors and placement
    groups end with it) and take back the RAY_ADDRESS it exported; only
    disconnect from a cluster it joined."""
    if ray.is_initialized():
        ray.shutdown()
    if _OWNED["address"] is not None and os.environ.get("RAY_ADDRESS") == _OWNED["address"]:
        os.environ.pop("RAY_ADDRESS")
    _OWNED["address"] = None


def name_cluster() -> None:
    """Run in every worker and actor process of a local Ray this program
    started (its job's worker_process_setup_hook): RAY_ADDRESS names the
    process's own cluster, which the driver's environment cannot pass on
    (its address is only known once the cluster runs)."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


# Ray Train's preemption watcher follows the draining of cloud nodes (spot
# instances); the one node of a local Ray is never drained, and creating the
# watcher makes Ray's core worker log an error-level line about its restart.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _local_env() -> dict[str, str]:
    """Environment of the worker processes of a local Ray this program starts."""
    return {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
            PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0")}


def ensure_ray(cfg: RayConfig, num_cpus: int | None = None,
               metrics_port: int | None = None) -> dict:
    """Initialise Ray once per process; returns how it was reached.

    ``metrics_port`` pins the metrics export port of a local Ray (0/None: Ray
    picks a free one). A cluster's port is set by ``ray start``.
    """
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
    # Token authentication stays on (Ray's default for a local cluster); its
    # warning that it is the default would open every run's log. (Setting
    # RAY_AUTH_MODE here is no way out: Ray reads it when it is imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The dashboard (State API, Jobs) is on: Ray Train's placement-group cleaner
    # polls the State API. It binds to 127.0.0.1 like everything else here.
    # The metrics agent binds the node address (127.0.0.1) for a loopback node.
    info = ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                    dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=True,
                    _metrics_export_port=metrics_port or None,
                    runtime_env={"env_vars": _local_env(),
                                 "worker_process_setup_hook": f"{__name__}.name_cluster"})
    address = info.address_info["gcs_address"]
    os.environ["RAY_ADDRESS"] = _OWNED["address"] = address
    return {"mode": "local", "address": address}


def metrics_endpoint() -> str | None:
    """``http://<node ip>:<port>/metrics`` of the node this process runs on:
    Ray's metrics export port, where one scrape shows this node's Ray metrics
    and the pipeline's (``ray_privimage_*``). None if unknown or disabled."""
    try:
        node_id = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node_id and n.get("Alive"):
                port = int(n.get("MetricsExportPort") or 0)
                if port > 0:
                    return f"http://{n['NodeManagerAddress']}:{port}/metrics"
    except Exception:
        return None
    return None
