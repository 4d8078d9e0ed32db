"""Fixtures shared by the test modules; the plain helpers they use (tiny
pipeline config, image sets, tiny models) are in tests/helpers.py."""
from __future__ import annotations

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
