"""The ``privimage`` command: run, validate, tune, compare, evaluate, data.

The options and help texts are in services/cli_args.py. Errors a user can
fix (bad config, missing data, budget) print one line that names the problem
and the fix, and exit with status 2; a run stopped by Ctrl-C or SIGTERM exits
with 130 or 143 after printing how to resume it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from privimage_core.config import Config, from_dict, load_config, resolve_defaults
from privimage_core.errors import PrivImageError
from privimage_core.evaluation.protocol import comparability, fidelity_line
from services.cli_args import build_parser


def _overrides(pairs: list[str] | None) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise PrivImageError(f"--set expects key=value, got '{p}'; e.g. --set generator.preset=small")
        k, v = p.split("=", 1)
        try:
            out[k] = yaml.safe_load(v)
        except Exception:
            out[k] = v
    return out


def _config(a) -> Config:
    return load_config(a.config, _overrides(a.set))


def _print_config(cfg: Config) -> int:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="")
    return 0


def plan_comment(found: dict) -> list[str]:
    """What ``run --dry-run`` checked and planned, as YAML comments after the
    resolved config (the output still loads as a config file)."""
    out = ["# privimage run --dry-run: config, data, generator and privacy plan checked; "
           "nothing was run or spent",
           f"# method {found['method']}, {found['classes']} classes"]
    if found.get("dataset_size") is None:
        return out + [f"# dataset size: {found['dataset_size_source']}; the DP-SGD plan "
                      "follows from it at run time"]
    out.append(f"# dataset size {found['dataset_size']:,} ({found['dataset_size_source']}), "
               f"delta {found['delta']:.3g}, planned epsilon {found['planned_epsilon']:.4g}")
    for stage, dp in found["dp_stages"].items():
        if dp:
            out.append(f"# {stage}: DP-SGD, noise multiplier {dp['noise_multiplier']:.4g}, "
                       f"sample rate {dp['sample_rate']:.4g}, {dp['steps']:,} steps")
    return out


def mlflow_ui_command(uri: str) -> str:
    """The command that browses a run's MLflow store; one worker, since the
    UI's default four loop on 'Child process died' on a 2-core machine."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")  # the venv's, even if not on PATH
    return (f"{mlflow_bin if mlflow_bin.exists() else 'mlflow'} ui --backend-store-uri {uri} "
            "--host 127.0.0.1 --port 5000 --workers 1")


def _print_summary(s: dict) -> None:
    print("\n=== PrivImage run " + ("FAILED" if s.get("status") == "failed" else "finished")
          + " ===")
    print(f"privacy    : epsilon = {s['epsilon']:.4f}, delta = {s['delta']:.3g} "
          f"(target epsilon {s['ledger']['target_epsilon']:g})")
    ev = {**s.get("evaluation", {}), "fid": s.get("fid")}
    fidelity = fidelity_line(ev)
    print(f"fidelity   : {fidelity} (vs the real test split, non-private evaluation)\n"
          f"             {comparability(ev)}" if fidelity else "fidelity   : FID not computed")
    acc = s.get("accuracy")
    print(f"utility    : downstream accuracy = {100 * acc:.2f}% (trained on synthetic, tested on "
          "real test split)" if acc is not None else "utility    : not computed")
    if s.get("status") == "failed":
        print(f"RESULT     : FAILED: {s['failure']}")
    if s.get("audit_message"):
        print(f"audit      : {s['audit_message']}")
    if s.get("evaluation_report"):
        print(f"report     : {s['evaluation_report']} (non-private evaluation)")
    print(f"synthetic  : {s['synthetic_path']}")
    print(f"run dir    : {s['run_dir']}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
          + f"; total {s['total_seconds']:.0f}s")
    print("MLflow     : " + mlflow_browse_lines(s["mlflow_uri"], s.get("mlflow_experiment_id"),
                                                 s["mlflow_run_id"]))


def mlflow_browse_lines(uri: str, experiment_id: str | None, run_id: str) -> str:
    """How to see a run beside the others: the UI command for a local store,
    and the address of the runs table in the view that compares them."""
    # lazy: --help starts without MLflow
    from services.tracking import runs_view_url
    served = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if served else "http://127.0.0.1:5000"
    where = runs_view_url(base, experiment_id) if experiment_id else base
    head = "" if served else f"{mlflow_ui_command(uri)}\n             then "
    return f"{head}open {where}\n             (this run: {run_id})"


def cmd_run(a) -> int:
    if a.resume:
        # lazy: the run store imports the ledger and so Opacus and torch
        from services.run_store import load_state
        if a.set or a.config:
            raise PrivImageError("--resume finishes a run with the config its budget was planned "
                                 "with; drop --set/--config, or start a new run to change settings")
        if a.print_config or a.dry_run:  # what the resumed run goes on with
            return _print_config(from_dict(load_state(Path(a.resume))["config"]))
        cfg = None
    else:
        cfg = _config(a)  # a config error is one line, before the pipeline is imported
        if a.print_config:
            return _print_config(cfg)
    # lazy: the pipeline imports Ray, Opacus and MLflow (seconds); only a valid config gets here
    from services import ray_runtime
    # lazy: as above
    from services.interrupts import as_interrupted
    # lazy: as above
    from services.pipeline import preflight, run_pipeline

    if cfg is not None and a.dry_run:
        found = preflight(cfg)
        _print_config(resolve_defaults(cfg))  # the numbers the run would record
        print("\n".join(plan_comment(found)))
        return 0
    try:
        s = run_pipeline(cfg, resume_dir=a.resume)
    except KeyboardInterrupt as e:
        # the pipeline saved its state and printed the resume command; the Ray
        # this process started goes with its workers, actors and placement groups
        stop = as_interrupted(e)
        ray_runtime.shutdown()
        print(f"privimage: stopped by {stop.signal_name}", file=sys.stderr)
        return stop.exit_code
    _print_summary(s)
    return 4 if s.get("status") == "failed" else 0


def cmd_validate(a) -> int:
    cfg = _config(a)  # a config error is one line, before the pipeline is imported
    if a.print_config:
        return _print_config(cfg)
    # lazy: the pipeline imports Ray, Opacus and MLflow (seconds)
    from services.pipeline import preflight
    print(json.dumps({"ok": True, **preflight(cfg)}, indent=2))
    return 0


def cmd_tune(a) -> int:
    cfg = _config(a)  # a config error is one line, before the pipeline is imported
    if a.print_config:
        return _print_config(cfg)
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.tune import run_sweep
    res = run_sweep(cfg)
    print(json.dumps(res, indent=2, default=str))
    return _sweep_stopped(res) or 0


def cmd_compare(a) -> int:
    cfg = _config(a)  # a config error is one line, before the pipeline is imported
    if a.print_config:
        return _print_config(cfg)
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.compare import run_compare
    res = run_compare(cfg)
    stopped = _sweep_stopped(res)
    if stopped:
        return stopped
    print(res["table"])
    print(f"table written to {res['table_path']} and {res['html_path']}")
    return 0


def _sweep_stopped(res: dict) -> int | None:
    """130 and one line saying how to go on when the sweep was stopped."""
    if not res.get("unfinished_trials"):
        return None
    print(f"privimage: sweep stopped with {res['unfinished_trials']} of {res['trial_runs']} "
          "trials unfinished; run the same command again to restore it (finished trials are "
          "kept, a stopped trial resumes its own run and ledger)", file=sys.stderr)
    return 130


def cmd_data_subsample(a) -> int:
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from privimage_core.data.subsample import materialise_subsample
    names = a.class_names.split(",") if a.class_names else None
    out = materialise_subsample(a.source, a.n, a.out, seed=a.seed, split=a.split,
                                class_names=names)
    print(f"wrote {out} (and its provenance file); use it as data.sensitive: parquet:{out}")
    return 0


def cmd_evaluate(a) -> int:
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.evaluate_cli import evaluate_command
    return evaluate_command(a, _overrides(a.set))


HANDLERS = {"run": cmd_run, "validate": cmd_validate, "tune": cmd_tune, "compare": cmd_compare,
            "data subsample": cmd_data_subsample, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    a = build_parser(HANDLERS).parse_args(argv)
    try:
        return a.fn(a)
    except PrivImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
