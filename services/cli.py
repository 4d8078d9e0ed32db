"""The ``privimage`` command: run, tune, compare, evaluate, validate.

Errors a user can fix (bad config, missing data, budget) print one line that
names the problem and the fix, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from privimage_core.config import load_config
from privimage_core.errors import PrivImageError


def _overrides(pairs: list[str]) -> dict:
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


def _print_summary(s: dict) -> None:
    print("\n=== PrivImage run finished ===")
    print(f"privacy    : epsilon = {s['epsilon']:.4f}, delta = {s['delta']:.3g} "
          f"(target epsilon {s['ledger']['target_epsilon']:g})")
    fid = s.get("fid")
    print(f"fidelity   : FID = {fid:.2f} (vs real test split, non-private evaluation)"
          if fid is not None else "fidelity   : FID not computed")
    acc = s.get("accuracy")
    print(f"utility    : downstream accuracy = {acc:.4f} (trained on synthetic, tested on real test split)"
          if acc is not None else "utility    : not computed")
    if s.get("audit_message"):
        print(f"audit      : {s['audit_message']}")
    if s.get("evaluation_report"):
        print(f"report     : {s['evaluation_report']} (non-private evaluation)")
    print(f"synthetic  : {s['synthetic_path']}")
    print(f"run dir    : {s['run_dir']}")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["stage_seconds"].items())
          + f"; total {s['total_seconds']:.0f}s")
    uri = s["mlflow_uri"]
    mlflow_bin = Path(sys.executable).with_name("mlflow")  # the venv's, even if not on PATH
    print(f"MLflow UI  : {mlflow_bin if mlflow_bin.exists() else 'mlflow'} ui "
          f"--backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    print(f"             then open http://127.0.0.1:5000 (run {s['mlflow_run_id']})")


def cmd_run(a) -> int:
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services import ray_runtime
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.interrupts import as_interrupted
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.pipeline import run_pipeline
    cfg = load_config(a.config, _overrides(a.set)) if not a.resume else None
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
    return 0


def cmd_validate(a) -> int:
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.pipeline import preflight
    cfg = load_config(a.config, _overrides(a.set))
    print(json.dumps({"ok": True, **preflight(cfg)}))
    return 0


def cmd_tune(a) -> int:
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.tune import run_sweep
    cfg = load_config(a.config, _overrides(a.set))
    res = run_sweep(cfg)
    print(json.dumps(res, indent=2, default=str))
    return 0


def cmd_compare(a) -> int:
    # lazy: each subcommand imports what it runs: --help starts without Ray or torch
    from services.compare import run_compare
    cfg = load_config(a.config, _overrides(a.set))
    res = run_compare(cfg)
    print(res["table"])
    print(f"table written to {res['table_path']} and {res['html_path']}")
    return 0


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
    from services.evaluate_cli import evaluate_dataset
    res = evaluate_dataset(a.synthetic, a.real, config=a.config, generator=a.generator,
                           real_test=a.real_test,
                           out_dir=a.out, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(res, indent=2, default=str))
    print(f"report written to {res['report']}")
    return 0 if res.get("audit_ok", 1) else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="privimage", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, hlp in (("run", cmd_run, "run the pipeline (local Ray or the job's cluster)"),
                          ("validate", cmd_validate, "check config and data, run nothing"),
                          ("tune", cmd_tune, "Ray Tune sweep over tune.search_space"),
                          ("compare", cmd_compare, "methods x budgets x seeds: a comparison table")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--config", default=None, help="YAML/JSON config (default: embedded quickstart)")
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
        if name == "run":
            s.add_argument("--resume", default=None, metavar="RUN_DIR", help="resume a run directory")
        s.set_defaults(fn=fn)
    d = sub.add_parser("data", help="dataset preparation outside the DP boundary")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    ds = dsub.add_parser("subsample", help="materialise a subsample as the declared sensitive "
                         "dataset (the guarantee then covers it, not its source)")
    ds.add_argument("--source", required=True, help="dataset spec, e.g. mnist or folder:/path")
    ds.add_argument("--n", type=int, required=True, help="number of records to keep")
    ds.add_argument("--out", required=True, metavar="PATH.parquet")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--split", default="train")
    ds.add_argument("--class-names", default=None, metavar="A,B,...",
                    help="the declared class list, for sources that do not carry one")
    ds.set_defaults(fn=cmd_data_subsample)
    e = sub.add_parser("evaluate", help="evaluate a synthetic dataset against real data")
    e.add_argument("--synthetic", required=True,
                   help="a run's synthetic directory (manifest.json + images.parquet), "
                        "folder:<ImageFolder>, parquet:<path>, or an .npz (images, labels"
                        "[, class_names])")
    e.add_argument("--real", required=True, help="real dataset spec, e.g. mnist or folder:/path")
    e.add_argument("--real-test", default=None, metavar="SPEC",
                   help="held-out real data for the test split (required when --real is "
                        "folder:/parquet:, which have no train/test split of their own)")
    e.add_argument("--config", default=None, help="the run's config (evaluation settings, "
                   "generator preset)")
    e.add_argument("--generator", default=None, metavar="DP_GENERATOR_PT",
                   help="the DP generator's weights: adds the membership-inference audit")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="where to write the report (default: <synthetic>/../evaluation)")
    e.set_defaults(fn=cmd_evaluate)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except PrivImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
