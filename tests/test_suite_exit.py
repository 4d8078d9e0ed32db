"""The suite leaves through ``os._exit`` (tests/conftest.py); the exit status
must still be pytest's: 0 when every test passes, 1 when one fails (the
control: an exit that always said 0 would turn a red CI green)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("body, status", [("assert True", 0), ("assert False", 1)])
def test_the_exit_status_is_the_sessions(tmp_path, body, status):
    # an atexit handler runs only in the interpreter's teardown: its line
    # missing shows the exit went through the hook
    (tmp_path / "test_one.py").write_text(
        "import atexit\natexit.register(print, 'TEARDOWN RAN')\n"
        f"def test_one():\n    {body}\n")
    env = {k: v for k, v in os.environ.items() if k != "PRIVIMAGE_TEST_FINALIZE"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "tests.conftest", "--rootdir", str(tmp_path),
                        str(tmp_path / "test_one.py")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == status, r.stdout + r.stderr
    assert ("1 passed" if status == 0 else "1 failed") in r.stdout
    assert "TEARDOWN RAN" not in r.stdout
