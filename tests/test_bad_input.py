"""Bad input is refused with one line naming the problem and the fix, before
any expensive work (no Ray, no training) starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from privimage_core.config import from_dict
from privimage_core.errors import ConfigError, DataError
from services.pipeline import load_inputs

REPO = Path(__file__).resolve().parents[1]


def _folder(root: Path, classes: dict[str, int], size=(28, 28), mode="L") -> Path:
    for name, n in classes.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            Image.new(mode, size, 0).save(d / f"{i}.png")
    return root


def _cfg(tmp_path, sensitive, test=None, **extra):
    """A config whose test split is a separate, valid folder unless given."""
    if test is None:
        test = f"folder:{_folder(tmp_path / 'held_out', {'a': 2, 'b': 2})}"
    return from_dict({"run": {"output_dir": str(tmp_path / "runs")},
                      "data": {"sensitive": sensitive, "sensitive_test": test, **extra}})


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError) as e:
        load_inputs(_cfg(tmp_path, f"folder:{tmp_path / 'nope'}"))
    assert "nope" in _one_line(e)


def test_empty_declared_class_flows_through_and_undeclared_labels_are_refused(tmp_path):
    """A declared class with no images is no error (its histogram row is pure
    noise); a record outside the declared list is refused with a
    message that neither names nor counts it."""
    root = _folder(tmp_path / "d", {"a": 3, "b": 0})
    inp = load_inputs(_cfg(tmp_path, f"folder:{root}"))
    assert list(inp.sensitive.class_names) == ["a", "b"] and len(inp.sensitive) == 3
    extra = _folder(tmp_path / "e", {"a": 3, "b": 2, "secret_label": 1})
    with pytest.raises(DataError) as e:
        load_inputs(_cfg(tmp_path, f"folder:{extra}", class_names=["a", "b"],
                         test=f"folder:{_folder(tmp_path / 'held2', {'a': 2, 'b': 2})}"))
    msg = _one_line(e)
    assert "declare every class" in msg and "secret_label" not in msg and "1" not in msg


def test_wrong_shape_and_mode(tmp_path):
    root = _folder(tmp_path / "s", {"a": 2, "b": 2}, size=(40, 40))
    with pytest.raises(DataError) as e:
        load_inputs(_cfg(tmp_path, f"folder:{root}"))
    assert "40" in _one_line(e) and "resize" in str(e.value)  # problem and fix
    root = _folder(tmp_path / "m", {"a": 2, "b": 2}, mode="RGB")
    test = _folder(tmp_path / "m_test", {"a": 1, "b": 1}, mode="RGB")
    with pytest.raises(DataError) as e:
        load_inputs(_cfg(tmp_path, f"folder:{root}", test=f"folder:{test}"))
    assert "channels" in _one_line(e)


def test_delta_too_large_for_n(tmp_path):
    root = _folder(tmp_path / "d", {"a": 30, "b": 30})
    cfg = from_dict({"data": {"sensitive": f"folder:{root}",
                              "sensitive_test": f"folder:{_folder(tmp_path / 't', {'a': 2, 'b': 2})}"},
                     "privacy": {"target_delta": 0.05, "dataset_size": 60}})
    with pytest.raises(ConfigError) as e:
        load_inputs(cfg)
    msg = _one_line(e)
    assert "must be < 1/N" in msg and "set e.g." in msg


def test_user_data_needs_a_separate_test_split(tmp_path):
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    cfg = from_dict({"data": {"sensitive": f"folder:{root}"}})
    with pytest.raises(ConfigError) as e:
        load_inputs(cfg)
    assert "no test split" in _one_line(e) and "data.sensitive_test" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_inputs(_cfg(tmp_path, f"folder:{root}", test=f"folder:{root}/"))
    assert "same files" in _one_line(e) and "held-out" in str(e.value)


@pytest.mark.parametrize("public, problem", [
    (["bogus"], "unknown data source 'bogus'"),
    (["glyphs", "folder:/nope/public"], "does not exist"),
    (["glyphs", "mnist"], "the sensitive dataset itself"),
])
def test_bad_public_sources(tmp_path, public, problem):
    cfg = from_dict({"data": {"sensitive": "mnist", "public": public}})
    with pytest.raises(DataError) as e:
        load_inputs(cfg)
    assert problem in _one_line(e)


def test_public_pool_may_not_contain_the_sensitive_files(tmp_path):
    """A public folder that holds the sensitive folder (it would become a public
    class, pre-trained on without DP) is refused, whichever contains which;
    specs are compared after stripping whitespace."""
    root = tmp_path / "data"
    sens = _folder(root / "private", {"a": 3, "b": 3})
    (sens / "x.parquet").write_bytes(b"")  # only its path matters here
    held_out = _folder(tmp_path / "t", {"a": 1, "b": 1})
    for public in ([f" folder:{root} "], [f"parquet:{sens}/x.parquet"], [f"folder:{sens}/a"]):
        cfg = from_dict({"data": {"sensitive": f"folder:{sens}", "public": public,
                                  "sensitive_test": f"folder:{held_out}"}})
        with pytest.raises(DataError) as e:
            load_inputs(cfg)
        assert "the sensitive dataset itself" in _one_line(e), public


def test_glyphs_have_no_test_split_either():
    with pytest.raises(ConfigError, match="no test split"):
        load_inputs(from_dict({"data": {"sensitive": "glyphs", "public": ["fashion_mnist"]}}))


def test_bad_input_fails_before_ray_starts(tmp_path):
    """Through the pipeline entry point: the error comes before any Ray or
    training work (no local Ray is started, no run directory is written)."""
    import ray

    from services.pipeline import run_pipeline

    if ray.is_initialized():
        pytest.skip("an earlier test in this process left Ray running")
    root = _folder(tmp_path / "d", {"a": 3, "b": 2, "c": 1})
    with pytest.raises(DataError, match="declare every class"):
        run_pipeline(_cfg(tmp_path, f"folder:{root}", class_names=["a", "b"]),
                     log=lambda s: None)
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("privacy:\n  target_epsilon: 0\n")
    p = subprocess.run([sys.executable, "-m", "services.cli", "run", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0
    assert "target_epsilon must be > 0" in p.stderr
    p = subprocess.run([sys.executable, "-m", "services.cli", "validate", "--set",
                        "selection.selection_ratio=1.5"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 2 and "selection_ratio" in p.stderr
    p = subprocess.run([sys.executable, "-m", "services.cli", "validate", "--set",
                        "privacy.bogus=1"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "unknown config key 'privacy.bogus'" in p.stderr


def test_generator_typo_and_missing_resume_fail_before_any_budget(tmp_path):
    """A typo in generator.overrides is caught by building the generator
    before the data is read (not in a worker after the DP query), and
    --resume of a directory without run state is one line, not a traceback."""
    import ray

    from services.pipeline import run_pipeline

    if ray.is_initialized():
        pytest.skip("an earlier test in this process left Ray running")
    cfg = from_dict({"run": {"output_dir": str(tmp_path / "runs")},
                     "generator": {"overrides": {"base_chanels": 16}}})
    with pytest.raises(ConfigError, match="generator.overrides") as e:
        run_pipeline(cfg, log=lambda s: None)
    _one_line(e)
    with pytest.raises(ConfigError, match="--resume") as e:
        run_pipeline(from_dict({"run": {"output_dir": str(tmp_path / "runs")}}),
                     resume_dir=str(tmp_path / "nowhere"), log=lambda s: None)
    _one_line(e)
    assert not ray.is_initialized()
    assert not list((tmp_path / "runs").glob("*/pipeline_state.json"))


def test_a_mistyped_folder_is_named_before_the_missing_test_split(tmp_path):
    """The first error of a mistyped path is that it does not exist, with its
    dotted key, not that the dataset has no test split."""
    cfg = from_dict({"data": {"sensitive": f"folder:{tmp_path / 'no-such-folder'}"}})
    with pytest.raises(DataError) as e:
        load_inputs(cfg)
    msg = _one_line(e)
    assert msg.startswith("data.sensitive:") and "does not exist" in msg
    # control: an existing folder without a test split gets the test-split line
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="data.sensitive_test"):
        load_inputs(from_dict({"data": {"sensitive": f"folder:{root}"}}))


@pytest.mark.parametrize("argv", [["run", "--set", "privacy.target_epsilon=0"],
                                  ["validate", "--set", "privacy.bogus=1"],
                                  ["tune", "--set", "selection.selection_ratio=1.5"]])
def test_a_config_error_is_said_before_the_pipeline_is_imported(argv):
    """The one line comes in a second or two: the CLI reads and checks the
    config (the model family's checks load torch) before it imports the
    pipeline, Ray, Opacus and MLflow (seconds more)."""
    code = ("import sys\nfrom services.cli import main\n"
            f"rc = main({argv!r})\n"
            "heavy = ('ray', 'mlflow', 'opacus', 'services.pipeline')\n"
            "print([m for m in heavy if m in sys.modules], rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.stdout.split() == ["[]", "2"], p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0, p.stderr
