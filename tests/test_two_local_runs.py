"""Two local runs on one host each use their own Ray: the Ray a run starts is
named in RAY_ADDRESS in the driver and in every worker and actor
(services/ray_runtime.py), so Ray Train's State-API lookups (its detached
placement-group cleaner) find it instead of refusing to choose between two."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER = """
import time
from privimage_core.config import RayConfig
from services.ray_runtime import ensure_ray
ensure_ray(RayConfig(), num_cpus=1)
print("up", flush=True)
time.sleep(120)
"""
# Looks its cluster up the way Ray Train's cleaner does: the State API, from
# a detached actor created by another actor. "ours": started by ensure_ray;
# "control": a plain local ray.init.
PROBE = """
import os, sys
import ray
from ray.util.state import list_actors
from privimage_core.config import RayConfig
from services.ray_runtime import ensure_ray, shutdown

def lookup():
    try:
        list_actors()
        return "found"
    except ConnectionError as e:
        return "refused: " + str(e).splitlines()[0]

@ray.remote(num_cpus=0)
class Cleaner:
    def lookup(self):
        return lookup()

@ray.remote(num_cpus=0)
class Controller:
    def probe(self):
        c = Cleaner.options(lifetime="detached", namespace="probe").remote()
        return ray.get(c.lookup.remote())

if sys.argv[1] == "ours":
    info = ensure_ray(RayConfig(), num_cpus=1)
    assert os.environ["RAY_ADDRESS"] == info["address"]
else:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
print("driver", lookup())
print("actor", ray.get(Controller.remote().probe.remote()))
shutdown()
assert "RAY_ADDRESS" not in os.environ
"""


@pytest.mark.ray
def test_a_second_local_ray_is_found_by_the_state_api_in_its_actors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", OTHER], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        out = {}
        for mode in ("ours", "control"):
            r = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=180)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("driver", "actor"))]
            out[mode] = dict(ln.split(" ", 1) for ln in lines) or {"error": r.stderr[-800:]}
        assert out["ours"] == {"driver": "found", "actor": "found"}, out
        # control: without the address, Ray cannot choose between the two
        assert out["control"].get("actor", "").startswith("refused") and \
            "multiple" in out["control"]["actor"], out
    finally:
        other.terminate()  # ray.init's SIGTERM handler exits, and its Ray goes with it
        other.wait(timeout=60)
