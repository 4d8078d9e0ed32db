"""The ``privimage`` command line: its subcommands, options, help texts and
examples (services/cli.py runs them)."""
from __future__ import annotations

import argparse
from importlib import metadata

DESCRIPTION = """\
privimage: differentially private synthetic images (PrivImage) on Ray.

A run selects public images by a DP query of the sensitive data's semantics,
pre-trains a generator on them, fine-tunes it with DP-SGD and releases a
synthetic dataset with its (epsilon, delta). Errors you can fix print one
line naming the problem and the fix and exit with status 2.
Every config key: docs/configuration.md."""

EPILOG = """\
examples:
  privimage run                                   # the quickstart, embedded defaults
  privimage run --set method=dpdm --set privacy.target_epsilon=1
  privimage run --config my.yaml --dry-run        # check and plan, run nothing
  privimage run --resume runs/<run-dir>           # finish a stopped run
  privimage evaluate --run runs/<run-dir>         # evaluate a run's release again
  privimage tune --config configs/tune.yaml"""

SET_HELP = ("set a config key (dotted, e.g. generator.preset=small; the value is read as "
            "YAML; repeatable). Every key: docs/configuration.md")

COMMANDS = {
    "run": ("run the pipeline (a local Ray, or the job's cluster under ray job submit)",
            """\
examples:
  privimage run                                  # embedded quickstart defaults
  privimage run --config configs/quality-cpu.yaml
  privimage run --set data.sensitive=folder:/data/train --set data.sensitive_test=folder:/data/test \\
                --set data.channels=3 --set data.image_size=32
  privimage run --print-config --set method=dp_ldm   # the resolved config, as YAML
  privimage run --dry-run                        # every check and the privacy plan, nothing run
  privimage run --resume runs/privimage-mnist-eps10-20261207-101500
Ctrl-C (or ray job stop) stops a run cleanly and prints the --resume command."""),
    "validate": ("check the config, the data, the generator and the privacy plan; run nothing",
                 """\
example:
  privimage validate --config my.yaml   # prints the planned epsilon, noise and steps as JSON"""),
    "tune": ("a Ray Tune sweep over tune.search_space (trials compose in one budget)",
             """\
example:
  privimage tune --config configs/tune.yaml --set tune.sweep_epsilon=10"""),
    "compare": ("methods x budgets x seeds at equal compute: a comparison table",
                """\
example:
  privimage compare --config configs/compare.yaml"""),
}


def version() -> str:
    try:
        return metadata.version("privimage")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _config_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", default=None, metavar="FILE",
                   help="YAML/JSON config (default: the embedded quickstart defaults)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    s.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")


def build_parser(handlers: dict) -> argparse.ArgumentParser:
    """The parser; ``handlers`` maps each (sub)command name to its function."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="privimage", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"privimage {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (hlp, example) in COMMANDS.items():
        s = sub.add_parser(name, help=hlp, description=hlp, epilog=example, formatter_class=fmt)
        _config_options(s)
        if name == "run":
            s.add_argument("--resume", default=None, metavar="RUN_DIR",
                           help="finish a stopped run with its saved config (no --set/--config)")
            s.add_argument("--dry-run", action="store_true",
                           help="make every check run makes and print the privacy plan; run nothing")
        s.set_defaults(fn=handlers[name])
    _data_parser(sub, handlers, fmt)
    _evaluate_parser(sub, handlers, fmt)
    return p


def _data_parser(sub, handlers: dict, fmt) -> None:
    d = sub.add_parser("data", help="dataset preparation outside the DP boundary",
                       description="dataset preparation outside the DP boundary",
                       formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="COMMAND")
    hlp = ("materialise a subsample as the declared sensitive dataset (the guarantee then "
           "covers it, not its source)")
    ds = dsub.add_parser("subsample", help=hlp, description=hlp, formatter_class=fmt,
                         epilog="""\
example:
  privimage data subsample --source mnist --n 5000 --out sens.parquet
  privimage run --set data.sensitive=parquet:sens.parquet --set data.sensitive_test=mnist""")
    ds.add_argument("--source", required=True, help="dataset spec, e.g. mnist or folder:/path")
    ds.add_argument("--n", type=int, required=True, help="number of records to keep")
    ds.add_argument("--out", required=True, metavar="PATH.parquet")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--split", default="train")
    ds.add_argument("--class-names", default=None, metavar="A,B,...",
                    help="the declared class list, for sources that do not carry one")
    ds.set_defaults(fn=handlers["data subsample"])


def _evaluate_parser(sub, handlers: dict, fmt) -> None:
    hlp = "evaluate a synthetic dataset against real data (non-private)"
    e = sub.add_parser("evaluate", help=hlp, description=hlp, formatter_class=fmt, epilog="""\
examples:
  privimage evaluate --run runs/<run-dir>        # a run's release: its data, generator, canaries
  privimage evaluate --synthetic runs/<run-dir>/synthetic --real mnist --set evaluation.fid=false
  privimage evaluate --synthetic folder:/other/samples --real folder:/data/train \\
                     --real-test folder:/data/test""")
    e.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a run directory: its synthetic set, real data, generator and canaries "
                        "(the canary audit), and its config unless --config is given")
    e.add_argument("--synthetic", default=None,
                   help="a run's synthetic directory (manifest.json + images.parquet), "
                        "folder:<ImageFolder>, parquet:<path>, or an .npz (images, labels"
                        "[, class_names])")
    e.add_argument("--real", default=None,
                   help="real dataset spec, e.g. mnist or folder:/path (default with --run: "
                        "the run's data.sensitive)")
    e.add_argument("--real-test", default=None, metavar="SPEC",
                   help="held-out real data for the test split (required when --real is "
                        "folder:/parquet:, which have no train/test split of their own)")
    e.add_argument("--config", default=None, metavar="FILE",
                   help="evaluation settings (default: the run's with --run, else the "
                        "embedded defaults)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    e.add_argument("--generator", default=None, metavar="DP_GENERATOR_PT",
                   help="the DP generator's weights (release.json beside them): adds the "
                        "membership diagnostic")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="where to write the report (default: <synthetic>/../evaluation)")
    e.add_argument("--json", action="store_true", help="print every metric as JSON")
    e.set_defaults(fn=handlers["evaluate"])
