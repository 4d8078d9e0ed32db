"""One progress line per training stage on the driver's console.

Ray Train workers run in other processes; their prints reach the driver as
prefixed log lines that cannot update in place. Rank 0 instead posts
(step, total) to a tiny per-run actor at most every ``POST_SECONDS``; a thread
on the driver reads it and draws one line: steps, steps/s, ETA. On a terminal
the line updates in place (``\\r``); in a Ray job's log (not a terminal) it is
a plain line at each quarter of the stage (or every ``LOG_SECONDS``).

Console only: nothing here goes to MLflow or Prometheus. For a DP stage the
rate shown is the average over the stage so far, observed on the driver at a
few seconds' granularity, never a per-step timing (a step's duration
follows its realised Poisson batch size).
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

POST_SECONDS = 2.0
POLL_SECONDS = 1.0
LOG_SECONDS = 300.0


def board_name(run_id: str, stage: str) -> str:
    return f"privimage-progress-{run_id}-{stage}"


def _board_cls():
    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.value, self.lines = None, []

        def post(self, step: int, total: int) -> None:
            self.value = (int(step), int(total))

        def say(self, line: str) -> None:
            self.lines.append(str(line))

        def read(self, since: int = 0):
            """The latest (step, total) and the lines said after the first ``since``."""
            return self.value, self.lines[since:]

    return ProgressBoard


class ProgressPoster:
    """Worker side (rank 0): throttled, fire-and-forget; silent when no board."""

    def __init__(self, name: str | None):
        self.name, self.board, self.last = name, None, 0.0

    def __call__(self, step: int, total: int) -> None:
        now = time.time()
        if not self.name or (now - self.last < POST_SECONDS and step < total):
            return
        self.last = now
        self._send("post", step, total)

    def say(self, line: str) -> None:
        """A log line for the driver's console, as it happens (an actor's own
        prints would reach it prefixed, or only when its task returns)."""
        if self.name:
            self._send("say", line)

    def _send(self, method: str, *args) -> None:
        try:
            if self.board is None:
                self.board = ray.get_actor(self.name)
            getattr(self.board, method).remote(*args)
        except Exception:
            self.name = None  # progress is optional; training never depends on it


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_text(label: str, step: int, total: int, elapsed: float, start_step: int = 0,
                  unit: str = "steps") -> str:
    done = step - start_step
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = _fmt_seconds((total - step) / rate) if rate > 0 else "?"
    pct = 100.0 * step / total if total else 0.0
    return (f"[privimage] {label}: {step}/{total} {unit} ({pct:.0f}%), "
            f"{rate:.2f} {unit}/s, ETA {eta}")


class LineDrawer:
    """Draws one progress line: in place on a terminal; in a log (not a
    terminal) a plain line when the count passes a quarter of the total or
    ``LOG_SECONDS`` after the last one, never before a rate is known."""

    def __init__(self, label: str, log: Callable[[str], None], stream=None,
                 tty: bool | None = None, unit: str = "steps"):
        self.label, self.log, self.unit = label, log, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.first: tuple[float, int] | None = None
        self.last_log, self.last_quarter, self.drawn = 0.0, 0, False

    def __call__(self, step: int, total: int) -> None:
        now = time.time()
        if self.first is None:
            self.first = (now, step)
            return
        t0, s0 = self.first
        if step <= s0:
            return  # no rate yet
        text = progress_text(self.label, step, total, now - t0, s0, self.unit)
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:120])
            self.stream.flush()
            self.drawn = True
            return
        quarter = 4 * step // total if total else 0
        if quarter > self.last_quarter or now - self.last_log >= LOG_SECONDS:
            self.last_quarter, self.last_log = quarter, now
            self.log(text)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


@contextmanager
def progress_line(run_id: str, stage: str, label: str, log: Callable[[str], None],
                  stream=None, tty: bool | None = None, unit: str = "steps",
                  said: list[str] | None = None):
    """Yield the board's name (for the TrainJob) and draw its line until the
    block ends; lines said to the board are logged as they come, and added
    to ``said`` (so the caller logs only the ones that did not arrive)."""
    name = board_name(run_id, stage)
    # outside any Tune trial's placement group (as services/actors.outside_trial)
    board = _board_cls().options(name=name, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=None)).remote()
    drawer = LineDrawer(label, log, stream, tty, unit)
    stop = threading.Event()
    said = [] if said is None else said
    lock = threading.Lock()  # the final poll may overlap the thread's last one

    def poll() -> None:
        with lock:
            _poll()

    def _poll() -> None:
        try:
            v, lines = ray.get(board.read.remote(len(said)), timeout=5)
        except Exception:
            return
        for line in lines:
            drawer.close()  # end a line drawn in place before a line of text
            log(line)
            said.append(line)
        if v is not None:
            drawer(*v)

    def draw():
        while not stop.wait(POLL_SECONDS):
            poll()

    thread = threading.Thread(target=draw, daemon=True, name=f"progress-{stage}")
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join(timeout=5)
        poll()  # what was said since the last poll
        drawer.close()
        try:
            ray.kill(board)
        except Exception:
            pass
