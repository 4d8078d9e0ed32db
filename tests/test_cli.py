"""The command line's conventions: --version, --print-config, run --dry-run,
did-you-mean for a mistyped key, --resume refusing new settings, help with
examples. None of these starts Ray or reads more than the config and data."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from privimage_core.config import from_dict, load_config, resolve_defaults
from services.cli import main
from services.cli_args import COMMANDS
from tests.helpers import tiny_config


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's --help and --version
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version(capsys):
    rc, out, _ = _run(capsys, ["--version"])
    assert rc == 0 and re.fullmatch(r"privimage \d+\.\d+\.\d+\S*\n", out)


def test_print_config_is_the_resolved_config_and_loads_again(capsys, tmp_path):
    rc, out, _ = _run(capsys, ["run", "--print-config", "--set", "method=dpdm",
                               "--set", "privacy.target_epsilon=3"])
    assert rc == 0
    printed = yaml.safe_load(out)
    assert printed["method"] == "dpdm" and printed["privacy"]["target_epsilon"] == 3
    # every key, defaults included, and it round-trips as a config file
    assert from_dict(printed) == load_config(None, {"method": "dpdm",
                                                    "privacy.target_epsilon": 3})
    (tmp_path / "c.yaml").write_text(out)
    assert load_config(str(tmp_path / "c.yaml")) == from_dict(printed)


def test_dry_run_checks_and_plans_but_spends_nothing(capsys, tmp_path):
    cfg = tiny_config(tmp_path, **{"privacy.dataset_size": 1000})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rc, out, err = _run(capsys, ["run", "--config", str(tmp_path / "cfg.json"), "--dry-run"])
    assert rc == 0, err
    # the plan is YAML comments; the config is the one the run would record,
    # its null defaults resolved (finetune.lr: 0.004 for these grayscale images)
    assert from_dict(yaml.safe_load(out)) == resolve_defaults(from_dict(cfg))
    assert yaml.safe_load(out)["finetune"]["lr"] == 0.004
    comments = [ln for ln in out.splitlines() if ln.startswith("#")]
    assert "nothing was run or spent" in comments[0]
    assert any("finetune: DP-SGD, noise multiplier" in ln and "4 steps" in ln for ln in comments)
    # no run directory, ledger or MLflow store (the lifetime ledger's lock file only)
    left = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert [p.suffix for p in left] in ([], [".lock"]), left


def test_a_mistyped_key_gets_one_line_with_the_nearest_key(capsys):
    rc, out, err = _run(capsys, ["run", "--set", "privacy.target_epsilno=1"])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "did you mean 'privacy.target_epsilon'" in err


def test_resume_refuses_new_settings(capsys, tmp_path):
    rc, _, err = _run(capsys, ["run", "--resume", str(tmp_path), "--set", "finetune.steps=9"])
    assert rc == 2 and "--resume" in err and "--set" in err


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["evaluate"])
def test_every_command_has_a_description_and_examples(capsys, command):
    rc, out, _ = _run(capsys, [command, "--help"])
    assert rc == 0 and re.search(rf"examples?:\n +privimage {command}\b", out), out
