"""Stopping a run cleanly: Ctrl-C (SIGINT) and ``ray job stop`` (SIGTERM).

Either signal raises ``RunInterrupted`` in the driver's main thread, wherever
it waits (a Ray call, an actor, a stage): the pipeline saves its state, marks
the run stopped in MLflow and its run directory, the command line stops the
Ray it started (workers, actors and placement groups end with it) and prints
the one command that resumes the run. What each finished stage computed and
spent is already on disk, so nothing is lost; a DP stage resumes from its
last checkpoint and its ledger.

Ray installs handlers of its own: ``ray.init`` one for SIGTERM (it exits),
Ray Train's ``fit`` one for SIGINT when called in the main thread (it aborts
the training run and stays installed after ``fit`` returns, ignoring later
Ctrl-C). ``install`` is therefore called after ``ray.init``, and training
runs ``fit`` through ``run_interruptible``, in a thread of its own, while
the main thread waits where a signal can reach it. A second signal while
stopping exits at once.
"""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict[str, str | None] = {"signal": None}


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _state["signal"] is not None:  # a second signal: stop now
        os._exit(128 + signum)
    _state["signal"] = name
    raise RunInterrupted(name)


def install() -> bool:
    """Handle SIGINT and SIGTERM here (main thread only: a Tune trial's
    driver runs in a thread, where Tune handles the signals). Returns
    whether the handlers were installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in SIGNALS:
        signal.signal(s, _handler)
    return True


def run_interruptible(fn, name: str):
    """``fn()`` in a daemon thread, the main thread waiting in short joins so
    that SIGINT and SIGTERM reach this module's handlers. On a signal the
    thread is left to the Ray shutdown that follows (its actors go with the
    driver's Ray session); ``fn``'s own exception is re-raised here."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def aborted_by_ray_train() -> RunInterrupted:
    """The interruption of a training run that Ray Train's own SIGINT
    handler aborted (its fit returns early instead of raising)."""
    _state["signal"] = _state["signal"] or "SIGINT"
    return RunInterrupted(_state["signal"])


def as_interrupted(e: KeyboardInterrupt) -> RunInterrupted:
    """``e`` as a RunInterrupted: Ray turns an exception raised by a signal
    handler while it waits in C++ into a plain KeyboardInterrupt."""
    if isinstance(e, RunInterrupted):
        return e
    _state["signal"] = _state["signal"] or "SIGINT"
    return RunInterrupted(_state["signal"])


def received() -> str | None:
    """The name of the signal that stopped the run, if one did."""
    return _state["signal"]


def reset() -> None:
    _state["signal"] = None
