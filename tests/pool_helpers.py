"""Small sharded public pools for the tests of the sharded public source
(tests/test_shards.py, tests/test_public_stream.py), rendered by
scripts/make_public_pool.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pool_script():
    """scripts/make_public_pool.py as a module (scripts/ is not a package)."""
    if "make_public_pool" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "make_public_pool", ROOT / "scripts" / "make_public_pool.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["make_public_pool"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["make_public_pool"]


def make_pool(root: Path, images: int = 600, classes: int = 12, shards: int = 3,
              seed: int = 0) -> Path:
    """A pool of ``images`` 32x32 RGB PNGs in ``classes`` classes over
    ``shards`` Parquet shards (row groups of 1024), once per directory."""
    root = Path(root)
    if not root.is_dir():
        pool_script().make_pool(root, images, classes, shards, seed=seed, workers=1)
    return root
