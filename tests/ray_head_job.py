"""A real Ray head started by the tests, and one pipeline submitted to it.

Shared by tests/test_job_submit.py and tests/test_live_metrics.py (loaded
with ``pytest_plugins``, so the session-scoped fixture runs once): one
``ray start --head`` on 127.0.0.1 with free ports, its own temp dir and token
authentication; a tiny pipeline submitted with ``ray job submit --working-dir
.``; the head's metrics export port scraped every second while the job runs;
the job's logs fetched with ``ray job logs``; the head stopped by its own
process ids (never ``ray stop``, which would end every Ray on the host).

The token is a fresh one in the test's temp dir (``RAY_AUTH_TOKEN_PATH``)
so the user's ``~/.ray/auth_token`` is neither read nor written; otherwise it
is the mechanism the README describes (``RAY_AUTH_MODE=token``).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 480
REPORT_INTERVAL_MS = 1000   # Ray's metrics export cadence on the test head
SCRAPE_EVERY_S = 1.0
FINETUNE_STEPS = 24
FINETUNE_BATCH = 50
SENSITIVE_MAX = 1000


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _clean_env() -> dict[str, str]:
    """This process's env minus anything that would point Ray elsewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "MLFLOW_")) and k != "PRIVIMAGE_DATA_DIR"}


def parse_prometheus(text: str, prefix: str = "ray_privimage_") -> list[tuple[str, dict, float]]:
    out = []
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.append((m.group(1), labels, float(m.group(4))))
    return out


class RayHead:
    """``ray start --head --block`` in its own session; every process it
    spawns inherits a marker (this head's temp dir) in its environment."""

    PORT_FLAGS = ("port", "node-manager-port", "object-manager-port", "runtime-env-agent-port",
                  "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                  "metrics-export-port", "dashboard-port", "ray-client-server-port")

    def __init__(self, num_cpus: int = 2):
        # Short path: Ray's Unix sockets live under it (108-byte limit).
        self.tmp = Path(tempfile.mkdtemp(prefix="privimage-rh-", dir="/tmp"))
        self.token_path = self.tmp / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.ports = dict(zip(self.PORT_FLAGS, _free_ports(len(self.PORT_FLAGS))))
        self.num_cpus = num_cpus
        self.proc: subprocess.Popen | None = None
        self.marker = str(self.tmp)
        self.log = self.tmp / "head.log"
        self.killed: list[str] = []   # processes that needed SIGKILL

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics-export-port']}/metrics"

    def env(self) -> dict[str, str]:
        """For the head and the CLI: venv first on PATH (a submitted job's
        ``python`` is resolved through the PATH of ``ray start``), token auth."""
        return {**_clean_env(),
                "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",   # bind loopback (FIELD_NOTES)
                "RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_MS),
                "RAY_USAGE_STATS_ENABLED": "0",
                "PRIVIMAGE_TEST_RAY_HEAD": self.marker}

    def start(self, timeout: float = 240) -> None:
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               f"--num-cpus={self.num_cpus}", f"--temp-dir={self.tmp / 'ray'}",
               "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0"]
        cmd += [f"--{k}={v}" for k, v in self.ports.items()]
        # The head's processes learn their own cluster's address: Ray Train's
        # placement-group cleaner otherwise auto-detects it and fails with
        # "Found multiple active Ray instances" when another Ray runs on the
        # host (a second test session, a benchmark). Only for `ray start`:
        # for the job CLI, RAY_ADDRESS would name the job server instead.
        env = {**self.env(), "RAY_ADDRESS": f"127.0.0.1:{self.ports['port']}"}
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.api("/api/version")
                urllib.request.urlopen(self.metrics_url, timeout=5).read()
                return
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        raise RuntimeError(f"Ray head not up after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def api(self, path: str, token: bool = True) -> dict:
        req = urllib.request.Request(self.dashboard + path)
        if token:
            req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def processes(self):
        """Every live process of this head: descendants of ``ray start`` plus
        any process carrying the marker (job drivers, orphans)."""
        import psutil
        found = {}
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                for p in [root] + root.children(recursive=True):
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        me = os.getuid()
        for p in psutil.process_iter(["uids"]):
            try:
                if p.info["uids"] and p.info["uids"].real != me:
                    continue
                if p.environ().get("PRIVIMAGE_TEST_RAY_HEAD") == self.marker:
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def listening(self) -> list[tuple[str, str, int]]:
        import psutil
        out = []
        for p in self.processes():
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append((p.name(), c.laddr.ip, c.laddr.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def driver_python(self, module: str) -> str:
        """Which ``python`` the job driver running ``-m module`` is: its argv[0]
        resolved through its own PATH (what the job's shell did)."""
        for p in self.processes():
            try:
                cmd = p.cmdline()
                if len(cmd) >= 3 and cmd[1:3] == ["-m", module]:
                    return shutil.which(cmd[0], path=p.environ().get("PATH", "")) or cmd[0]
            except Exception:  # noqa: BLE001 (the process may just have ended)
                continue
        return ""

    def stop(self, timeout: float = 60) -> list[str]:
        """SIGTERM ``ray start --block`` (it stops what it started), SIGKILL
        stragglers of this head only; returns what still lives (should be [])."""
        import psutil
        procs = self.processes()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        alive += [p for p in self.processes() if p not in alive]
        for p in alive:
            try:
                self.killed.append(f"{p.pid} {p.name()}")
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return [f"{p.pid} {p.name()}" for p in self.processes()]

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Scrape:
    t: float
    job_status: str
    samples: list[tuple[str, dict, float]]


@dataclass
class JobOutcome:
    head: RayHead
    tmp: Path
    cfg: dict
    submission_id: str
    driver_python: str = ""   # the job driver's `python`, resolved through its PATH
    submit: subprocess.CompletedProcess | None = None
    status: str = ""
    message: str = ""         # the Jobs API's message on the job (its exit code, when it failed)
    logs: str = ""
    status_cli: subprocess.CompletedProcess | None = None
    scrapes: list[Scrape] = field(default_factory=list)
    listening: list[tuple[str, str, int]] = field(default_factory=list)
    unauthenticated_status: int | None = None
    survivors: list[str] | None = None
    job_seconds: float = 0.0
    total_seconds: float = 0.0
    error: str = ""


def job_config(tmp: Path) -> dict:
    """The tiny pipeline (tests/helpers.py), with enough DP steps to
    watch it move, an absolute MLflow store and run directory."""
    import dataclasses

    from privimage_core.config import EvaluationConfig
    from tests.helpers import tiny_config
    cfg = tiny_config(tmp, **{"run.name": "jobsubmit",
                              "finetune.steps": FINETUNE_STEPS,
                              "finetune.batch_size": FINETUNE_BATCH},
                      sensitive_n=SENSITIVE_MAX)
    cfg["tracking"] = {"mlflow_uri": f"sqlite:///{(tmp / 'mlflow.db').resolve()}"}
    # Only the headline classifier: the extra (non-private) evaluations and
    # the audits cost time on 2 cores and run in the in-process end-to-end
    # test (tests/test_pipeline_e2e.py).
    names = {f.name for f in dataclasses.fields(EvaluationConfig)}
    for opt in ("precision_recall", "real_ceiling", "utility_matrix", "detector", "mia",
                "canary_audit", "memorisation"):
        if opt in names:
            cfg["evaluation"][opt] = False
    if "classifiers" in names:
        cfg["evaluation"]["classifiers"] = [cfg["evaluation"]["classifier"]]
    return cfg


def _scraper(head: RayHead, out: JobOutcome, state: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        t = time.time()
        try:
            with urllib.request.urlopen(head.metrics_url, timeout=5) as r:
                text = r.read().decode()
            out.scrapes.append(Scrape(t, state.get("status", ""), parse_prometheus(text)))
        except Exception:  # noqa: BLE001 (a missed scrape is not a failure)
            pass
        stop.wait(max(0.0, SCRAPE_EVERY_S - (time.time() - t)))


@pytest.fixture(scope="session")
def submitted_job(tmp_path_factory) -> JobOutcome:
    from privimage_core.data.idx import data_dir

    t_start = time.time()
    tmp = tmp_path_factory.mktemp("jobsubmit")
    cfg = job_config(tmp)
    cfg_path = tmp / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    head = RayHead(num_cpus=2)
    out = JobOutcome(head=head, tmp=tmp, cfg=cfg,
                     submission_id=f"privimage-test-{secrets.token_hex(4)}")
    stop = threading.Event()
    state: dict = {}
    scraper = threading.Thread(target=_scraper, args=(head, out, state, stop), daemon=True)
    try:
        head.start()
        try:
            head.api("/api/jobs/", token=False)
            out.unauthenticated_status = 200
        except urllib.error.HTTPError as e:
            out.unauthenticated_status = e.code
        # The working dir upload honours .gitignore (.venv, data_cache, runs stay
        # home); the job finds the offline data through PRIVIMAGE_DATA_DIR.
        runtime_env = {"env_vars": {"PRIVIMAGE_DATA_DIR": str(data_dir().resolve())}}
        scraper.start()
        t_job = last_listen = time.time()
        out.submit = head.ray("job", "submit", "--address", head.dashboard,
                              "--submission-id", out.submission_id, "--no-wait",
                              "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
                              "--", "python", "-m", "services.entrypoint",
                              "--config", str(cfg_path))
        if out.submit.returncode != 0:
            raise RuntimeError(f"submit failed: {out.submit.stdout}\n{out.submit.stderr}")
        while time.time() - t_job < JOB_TIMEOUT_S:
            info = head.api(f"/api/jobs/{out.submission_id}")
            state["status"] = info.get("status", "")
            if state["status"] == "RUNNING" and time.time() - last_listen > 10:
                last_listen = time.time()  # the driver, actors and Train workers come and go
                out.listening = sorted(set(out.listening) | set(head.listening()))
                if not out.driver_python:
                    out.driver_python = head.driver_python("services.entrypoint")
            if state["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        out.status = state.get("status", "")
        out.message = info.get("message") or ""
        out.job_seconds = time.time() - t_job
        time.sleep(2 * SCRAPE_EVERY_S)  # one more scrape after the driver's last export
        stop.set()
        scraper.join(timeout=10)
        out.status_cli = head.ray("job", "status", "--address", head.dashboard, out.submission_id)
        logs = head.ray("job", "logs", "--address", head.dashboard, out.submission_id)
        out.logs = logs.stdout + logs.stderr
        (tmp / "job.log").write_text(out.logs)
        if out.status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            head.ray("job", "stop", "--address", head.dashboard, "--no-wait", out.submission_id)
    except Exception as e:  # noqa: BLE001 (reported by the tests)
        out.error = f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        out.survivors = head.stop()
        out.total_seconds = time.time() - t_start
        if not out.error and not out.survivors:
            head.cleanup()
    return out
