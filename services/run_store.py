"""The run store: a run directory's state file, checkpoint discovery, resume
and the spent-budget bound of a (possibly failed) run.

State file layout (``pipeline_state.json``, written atomically after every
stage and before every DP stage starts):
  config            the resolved config of the run
  method            the method's name (privimage_core.methods)
  stages            stage name -> its saved outputs (present = done)
  ledger            the privacy ledger after the last finished mechanism
  dp_plans          DP stage name -> {mechanism, noise_multiplier, sample_rate,
                    total_steps}, saved BEFORE its first DP step
  stage_seconds, parent_run_id, mlflow_run_id

Everything here reads files only (no Ray), so the train loops, the driver
and the sweep share it without an import cycle.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray.train
import yaml
from pyarrow import fs as pafs

from privimage_core.errors import ConfigError, PrivacyBudgetError
from privimage_core.privacy.ledger import PrivacyLedger

STATE_FILE = "pipeline_state.json"


def new_run_dir(output_dir: Path, name: str) -> Path:
    """A fresh run directory, created atomically: concurrent runs (Tune
    trials with the same overrides) started in the same second get distinct
    directories, and so distinct Ray Train names, ledgers and states."""
    base = Path(output_dir).resolve() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        d = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory next to {base}")


def save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=lambda o: o.tolist()
                              if isinstance(o, np.ndarray) else str(o)))
    tmp.replace(run_dir / STATE_FILE)


CONFIG_FILE = "config.yaml"


def write_config(run_dir: Path, cfg) -> None:
    """The run's resolved config, readable, in its directory from the start
    (``privimage run --config <run_dir>/config.yaml`` repeats the run)."""
    (Path(run_dir) / CONFIG_FILE).write_text(
        "# The resolved config of this run (every key; docs/configuration.md).\n"
        + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))


def load_state(run_dir: Path) -> dict:
    """The saved state of ``run_dir``; one clear error when there is none."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {STATE_FILE} there; pass the directory of a "
                          "run started by `privimage run` (see `ls <run.output_dir>`)")
    return json.loads(path.read_text())


def trainer_name(run_dir: Path, stage: str) -> str:
    """The Ray Train run name of a stage: stable, so a re-run resumes it."""
    return f"{Path(run_dir).name}-{stage}"


def storage_fs(storage: str):
    """(pyarrow filesystem, root path) of a Ray Train storage path or URI; the
    URI's options (endpoint, region, host) stay in the filesystem object."""
    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), str(Path(storage).resolve())


def checkpoint_ledgers(storage: str, trainer: str) -> list[tuple[str, dict]]:
    """(checkpoint path relative to ``storage``, ledger) of every checkpoint
    of a Ray Train run that holds a readable ledger. Recursive: Train V2 puts
    checkpoints in <name>/checkpoint_*, Train V1 in <name>/<trial>/checkpoint_*."""
    filesystem, root = storage_fs(storage)
    infos = filesystem.get_file_info(pafs.FileSelector(f"{root}/{trainer}",
                                                       allow_not_found=True, recursive=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                with filesystem.open_input_stream(f"{info.path}/ledger.json") as f:
                    ledger = json.loads(f.read().decode())
            except (FileNotFoundError, OSError, ValueError):
                continue  # a checkpoint being written when the run died
            out.append((info.path[len(root):].lstrip("/"), ledger))
    return out


def open_checkpoint(storage: str, relpath: str):
    """The ray.train.Checkpoint at ``relpath`` under ``storage`` (local or remote)."""
    filesystem, root = storage_fs(storage)
    return ray.train.Checkpoint(f"{root}/{relpath}", filesystem=filesystem)


def _steps(ledger_state: dict, mechanism: str) -> int:
    return PrivacyLedger.from_state_dict(ledger_state).steps_of(mechanism)


def resume_ledger(state: dict, storage: str, run_dir: Path
                  ) -> tuple[PrivacyLedger, dict[str, str]]:
    """The ledger a resumed run continues from, and for the DP stage that was
    under way (if any) the checkpoint (path relative to ``storage``) holding
    it: {stage name: relpath}.

    Once a DP stage has started, its checkpoints hold DP-SGD steps that the
    saved state does not. We read them here instead of relying on Ray Train
    restoring the trainer by name (a storage change or a lost snapshot would
    silently break that): the checkpoint with the most steps wins, and the
    stage restarts from it. A stage stopped before its first checkpoint
    restarts from its beginning when its checkpoints live in the run's own
    directory (the default storage): none was written, so nothing the lost
    steps computed survives to be released. Refused: the stage started, its
    checkpoints live in other storage and none is visible (a checkpoint this
    run cannot see could later seed a second, uncounted branch), or the
    surviving checkpoints hold fewer steps than the saved ledger (the weights
    of the later steps are gone); going on would release a model the ledger
    does not describe or spend steps twice.
    """
    ledger = PrivacyLedger.from_state_dict(state["ledger"])
    resume: dict[str, str] = {}
    for stage, plan in state.get("dp_plans", {}).items():
        if stage in state["stages"]:
            continue  # finished: its final ledger is in state["ledger"]
        mech, trainer = plan["mechanism"], trainer_name(run_dir, stage)
        found = checkpoint_ledgers(storage, trainer)
        if not found and _own_storage(storage, run_dir):
            continue  # restarts from the stage's beginning
        if not found:
            raise PrivacyBudgetError(
                f"this run's DP stage '{stage}' started but no checkpoint of '{trainer}' is "
                f"left under {storage}; its DP-SGD steps cannot be accounted or its weights "
                "restored, so it cannot resume; start a new run (and count this one's planned "
                "budget as spent)")
        path, best = max(found, key=lambda pl: _steps(pl[1], mech))
        if _steps(best, mech) < _steps(state["ledger"], mech):
            raise PrivacyBudgetError(
                f"the saved ledger holds {_steps(state['ledger'], mech)} steps of '{mech}' but "
                f"the newest surviving checkpoint of '{trainer}' only {_steps(best, mech)}; the "
                "later weights are gone, so the run cannot resume; start a new run")
        ledger.load_state_dict(best)
        resume[stage] = path
    return ledger, resume


def _own_storage(storage: str, run_dir: Path) -> bool:
    """Whether ``storage`` is the run's own default checkpoint directory."""
    return "://" not in storage and Path(storage).resolve() == (Path(run_dir) / "ray_train").resolve()


def spent_upper_bound(run_dir: Path) -> dict | None:
    """An upper bound on the budget a (possibly failed) run spent, as a ledger
    state: the final ledger of a finished run; for a run that failed during a
    DP stage, its ledger plus every step that stage planned; None when the
    run never touched the sensitive data. Used by sweeps to compose trials."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if "ledger" not in state:
        return None
    records = list(state["ledger"]["records"])
    for stage, plan in state.get("dp_plans", {}).items():
        if stage in state["stages"]:
            continue
        records = [r for r in records if r["name"] != plan["mechanism"]]
        records.append({"name": plan["mechanism"], "noise_multiplier": plan["noise_multiplier"],
                        "sample_rate": plan["sample_rate"], "steps": plan["total_steps"],
                        "note": f"upper bound: the run failed during DP stage '{stage}'"})
    return {**state["ledger"], "records": records}
