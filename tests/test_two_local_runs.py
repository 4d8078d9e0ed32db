"""Two local runs on one host each use their own Ray: the Ray a run starts is
named in its RAY_ADDRESS, so Ray Train's State-API lookups (its
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


@pytest.mark.ray
def test_a_second_local_ray_is_found_by_the_state_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    other = subprocess.Popen([sys.executable, "-c", OTHER], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        probe = """
import os, sys
from ray.util.state import list_actors
from privimage_core.config import RayConfig
from services.ray_runtime import ensure_ray, shutdown
info = ensure_ray(RayConfig(), num_cpus=1)
assert os.environ["RAY_ADDRESS"] == info["address"]
if sys.argv[1] == "control":
    os.environ.pop("RAY_ADDRESS")
try:
    list_actors()
    print("found")
except ConnectionError as e:
    print("refused:", str(e).splitlines()[0])
shutdown()
assert "RAY_ADDRESS" not in os.environ
"""
        out = {}
        for mode in ("ours", "control"):
            r = subprocess.run([sys.executable, "-c", probe, mode], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
            out[mode] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
        assert out["ours"] == "found", out
        # control: without the address, Ray cannot choose between the two
        assert out["control"].startswith("refused:") and "multiple" in out["control"], out
    finally:
        other.terminate()  # ray.init's SIGTERM handler exits, and its Ray goes with it
        other.wait(timeout=60)
