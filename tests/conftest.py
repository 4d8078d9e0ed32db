"""Fixtures shared by the test modules; the plain helpers they use (tiny
pipeline config, image sets, tiny models) are in tests/helpers.py; the
two session hooks at the end make the suite's exit status its tests' alone."""
from __future__ import annotations

import os
import sys

import pytest

from tests import helpers


@pytest.fixture(scope="module")
def ray_local(request):
    """The local Ray of every test module that needs one: started the way
    the program starts it (``services.ray_runtime.ensure_ray``: loopback
    only, here with 2 CPUs) on the module's first request, and stopped with
    ``ray_runtime.shutdown()`` after its last test, so no module sees another's Ray
    (never ``ray stop``, which would end every Ray on the host).

    A module whose code under test starts Ray itself sets
    ``RAY_STARTED_BY_TEST = True`` (``services.tune.run_sweep`` sizes its own
    CPUs, which is part of what its test checks): the fixture then only
    stops it."""
    import ray

    from privimage_core.config import RayConfig
    from services.ray_runtime import ensure_ray, shutdown

    if not getattr(request.module, "RAY_STARTED_BY_TEST", False):
        ensure_ray(RayConfig(), num_cpus=2)
    yield ray
    shutdown()


@pytest.fixture
def fake_fid_inception(monkeypatch):
    """``fid.load_fid_inception`` returns the cheap stand-in
    (``helpers.fake_inception``) for this test."""
    helpers.use_fake_inception(monkeypatch)


# ------------------------------------------------------------ session exit

def pytest_sessionfinish(session):
    """Stop a Ray this process still holds (a module fixture stops its own;
    this catches one a failed test left), and keep the session for the exit
    below."""
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    session.config.stash[_SESSION] = session


_SESSION = pytest.StashKey()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's exit status, skipping the interpreter's teardown.
    The suite loads native runtimes that keep threads of their own (Ray's core
    worker and gRPC, Ray Data's executor, torch's and OpenVINO's thread
    pools); tearing them down at interpreter exit crashed CI once with
    SIGSEGV after every test had passed and pytest had printed its summary,
    turning a green run red. Every report is written by now (this hook runs
    last). PRIVIMAGE_TEST_FINALIZE=1 keeps the normal teardown (with
    ``-X faulthandler`` to see where such a crash happens)."""
    session = config.stash.get(_SESSION, None)
    if session is None or os.environ.get("PRIVIMAGE_TEST_FINALIZE") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
