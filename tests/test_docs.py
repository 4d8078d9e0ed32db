"""The documentation stays true to the code: the generated pages are current
(docs/configuration.md from the config classes, the headline table from
benchmarks/results/summary.json), the measured tables quote their result
files, and every path, config key and command the README and docs/ name
exists. Each generator has a control showing that its check can fail."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from privimage_core.config import SECTIONS, all_keys, from_dict
from privimage_core.config.sections import DataConfig
from privimage_core.methods import METHODS
from privimage_core.models.base import ModelFamily
from services.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["privacy.md", "cluster.md", "configuration.md", "extending.md", "results.md", "data.md",
         "log.md"]


def _load(rel: str):
    """A script of the repository as a module (scripts/ and benchmarks/ are
    not packages)."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod


config_reference = _load("scripts/config_reference.py")
results_page = _load("benchmarks/results_page.py")


def _all_docs() -> dict[str, str]:
    out = {"README.md": (ROOT / "README.md").read_text()}
    out.update({f"docs/{p}": (DOCS / p).read_text() for p in PAGES})
    return out


# ------------------------------------------------------------ configuration.md
def test_every_page_exists():
    for p in PAGES:
        assert (DOCS / p).is_file(), f"docs/{p} is missing"


def test_configuration_reference_is_current():
    committed = (DOCS / "configuration.md").read_text()
    assert committed == config_reference.render(), (
        "docs/configuration.md is stale; run: python scripts/config_reference.py")


def test_configuration_reference_lists_every_key_and_section():
    text = (DOCS / "configuration.md").read_text()
    for key in all_keys():
        assert f"| `{key}` |" in text, f"{key} is not in docs/configuration.md"
    for name, cls in SECTIONS.items():
        assert f"## `{name}`" in text
        doc = config_reference._section_doc(cls, SECTIONS)
        if doc:
            assert doc in text


def test_reference_carries_the_comment_above_a_field_and_allowed_values():
    text = config_reference.render()
    # the comment block above DataConfig.public_max_per_class, joined
    assert ("| `data.public_max_per_class` | `int \\| None` | `300` | Cap on images per public "
            "class (deterministic subsample); None = all. |") in text
    # allowed values read from validate(), with the comment above the constant
    assert "Allowed: `\"rdp\"`, `\"prv\"`. Opacus accountants" in text
    # the family's section, with its module docstring (the class has none)
    assert "## `latent`" in text and "added by the `latent_diffusion` model family" in text


def test_control_a_changed_default_changes_the_reference():
    @dataclass
    class ChangedData(DataConfig):
        image_size: int = 32

    changed = config_reference.render({**SECTIONS, "data": ChangedData})
    assert changed != (DOCS / "configuration.md").read_text()
    line = next(ln for ln in changed.splitlines() if ln.startswith("| `data.image_size` |"))
    # the new default, and the comment still found through the base class
    assert "| `32` |" in line and "Every image is read at image_size" in line


@dataclass
class ExtraFamilyConfig:
    """A section a new model family would add."""
    # How many widgets the family builds.
    widgets: int = 3

    def validate(self) -> None:
        pass


def test_control_a_new_family_section_appears_automatically():
    text = config_reference.render({**SECTIONS, "extra": ExtraFamilyConfig})
    assert "## `extra`" in text and "A section a new model family would add." in text
    assert "| `extra.widgets` | `int` | `3` | How many widgets the family builds. |" in text


def test_config_reference_check_mode(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    with contextlib.redirect_stderr(io.StringIO()):
        assert config_reference.main(["--check", "--out", str(stale)]) == 1
        assert config_reference.main(["--check"]) == 0


# ------------------------------------------------------------ results
def test_headline_tables_are_current():
    for path, text in results_page.expected().items():
        assert path.read_text() == text, (
            f"{path.name}'s headline table is stale; run: python benchmarks/results_page.py")


def test_control_other_figures_give_another_table():
    summary = json.loads(results_page.SUMMARY.read_text())
    now = results_page.headline_table(summary, "x")
    changed = results_page.headline_table({**summary, "fmnist_cnn_accuracy": 0.5}, "x")
    assert changed != now and "| 50.00% |" in changed
    missing = results_page.headline_table({**summary, "quickstart_fid_5k": None}, "x")
    assert "not measured" in missing


def test_headline_figures_are_summary_json_values():
    summary = json.loads(results_page.SUMMARY.read_text())
    table = results_page.headline_table(summary, "x")
    assert f"{summary['fmnist_cnn_accuracy'] * 100:.2f}%" in table
    assert f"{summary['dp_step_ratio_tiny']:g}x" in table


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w])")
_CITED = re.compile(r"benchmarks/results/([\w.-]+)")


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))


def _quoted(number: str, source: str) -> bool:
    """``number`` appears in ``source`` as written, or as a rounding of a
    longer figure there (e.g. 76.39 for 76.38757...)."""
    found = _numbers(source)
    if number in found:
        return True
    if "." not in number or "e" in number:
        return False
    places = len(number.split(".")[1])
    return any("." in f and "e" not in f and len(f.split(".")[1]) > places
               and round(float(f), places) == float(number) for f in found)


def _table_problems(page: str) -> list[str]:
    """Numbers in the tables of each section of ``page`` that none of the
    result files the section cites contains."""
    page = re.sub(re.escape(results_page.HEADLINE_BEGIN) + ".*?" +
                  re.escape(results_page.HEADLINE_END), "", page, flags=re.S)
    problems = []
    for section in re.split(r"\n(?=## )", page):
        lines = section.splitlines()
        sep = [bool(re.fullmatch(r"\|[|\-\s]+", ln)) for ln in lines] + [False]
        # table rows, without separators and headers (the line before a separator)
        rows = [ln for i, ln in enumerate(lines)
                if ln.startswith("|") and not sep[i] and not sep[i + 1]]
        files = set(_CITED.findall(section))
        if not rows or not files:
            continue
        title = section.splitlines()[0]
        missing = [f for f in files if not (ROOT / "benchmarks" / "results" / f).is_file()]
        if missing:
            problems.append(f"{title}: cites missing {missing}")
            continue
        source = "\n".join((ROOT / "benchmarks" / "results" / f).read_text() for f in files)
        source = re.sub(r"(?<=\d),(?=\d{3})", "", source)
        problems += [f"{title}: {n} in '{row[:60]}'" for row in rows
                     for n in _numbers(row) if not _quoted(n, source)]
    return problems


def test_results_tables_quote_their_result_files():
    assert _table_problems((DOCS / "results.md").read_text()) == []


def test_control_an_invented_figure_is_caught():
    page = (DOCS / "results.md").read_text()
    forged = page.replace("| 149.7 |", "| 149.9 |", 1)
    assert forged != page
    assert any("149.9" in p for p in _table_problems(forged))


# ------------------------------------------------------------ README
def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)[1].splitlines()
    assert [ln.split("#")[0].strip() for ln in first_block] == [
        "bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert text.index("```bash") < text.index("\n## ")


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p}" for p in PAGES])
def test_no_internal_references(name):
    text = _all_docs()[name]
    assert not re.search(r"\bissue\s*#?\d", text, re.I), "cites an internal issue number"
    assert not re.search(r"\]\((\.\./|/|https?://)", text), "links outside the repository"
    if name == "README.md":
        assert not re.search(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", text), (
            "README names a commit hash")


# ------------------------------------------------------------ paths, keys, commands
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_PATH = re.compile(r"`((?:privimage_core|services|tests|benchmarks|scripts|configs|deploy|docs)"
                   r"/[\w./<>*-]*|ray_cluster\.yaml|requirements\.txt|pyproject\.toml)`")
# Named on purpose although not (yet) in this tree.
NOT_YET = {"tests/test_family_contract.py"}


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p}" for p in PAGES])
def test_links_and_paths_exist(name):
    text = _all_docs()[name]
    base = ROOT if name == "README.md" else DOCS
    for link in _LINK.findall(text):
        assert (base / link).exists(), f"{name}: link {link} does not exist"
    for path in _PATH.findall(text):
        if path in NOT_YET or any(c in path for c in "<>*"):
            continue
        if path.endswith("/"):
            path = path[:-1]
        assert (ROOT / path).exists(), f"{name}: {path} does not exist"


# Dotted names that are not config keys: an MLflow parameter, Ray's API.
NOT_KEYS = {"selection.fallback", "ray.init"}


def _unknown_keys(text: str) -> list[str]:
    """Dotted config keys named in ``text`` (inline code, `--set key=` in code
    blocks) that the config does not have."""
    keys = set(all_keys())
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([a-z_0-9]+)\b")
    fenced = re.findall(r"```\w*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))
    code = " ".join(inline + [k for block in fenced
                              for k in re.findall(r"--set '?([\w.]+)=", block)])
    named = {f"{sec}.{key}" for sec, key in pattern.findall(code)
             if key not in ("py", "yaml", "json", "md")}
    return sorted(named - keys - NOT_KEYS)


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p}" for p in PAGES])
def test_named_config_keys_exist(name):
    assert _unknown_keys(_all_docs()[name]) == []


def test_control_a_misspelt_key_is_caught():
    assert _unknown_keys("set `data.sensitiv` or `--set x`\n```bash\nprivimage run "
                         "--set finetune.step=3\n```\n") == ["data.sensitiv", "finetune.step"]


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p}" for p in PAGES])
def test_yaml_examples_are_valid_configs(name):
    for block in re.findall(r"```yaml\n(.*?)```", _all_docs()[name], re.S):
        from_dict(yaml.safe_load(block))


def _options(argv: list[str]) -> set[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(argv + ["--help"])
    return set(re.findall(r"(--[a-z-]+)", out.getvalue()))


@pytest.fixture(scope="module")
def cli_options() -> dict[str, set[str]]:
    sub = ("run", "validate", "tune", "compare", "evaluate")
    return {**{c: _options([c]) for c in sub}, "data": _options(["data", "subsample"])}


def _command_problems(text: str, options: dict[str, set[str]]) -> list[str]:
    """`privimage <cmd> --opt` uses in ``text`` that the CLI does not have."""
    problems = [f"privimage {c}" for c in re.findall(r"`privimage (\w+)", text)
                if c not in options]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        m = re.search(r"privimage (\w+)", line)
        if not m:
            continue
        if m[1] not in options:
            problems.append(f"privimage {m[1]}")
            continue
        for opt in re.findall(r"(?<![\w-])(--[a-z-]+)", line.split("#")[0][m.end():]):
            if opt not in options[m[1]]:
                problems.append(f"privimage {m[1]} {opt}")
    return problems


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{p}" for p in PAGES])
def test_documented_commands_and_options_exist(name, cli_options):
    assert _command_problems(_all_docs()[name], cli_options) == []


def test_control_a_wrong_command_or_option_is_caught(cli_options):
    text = ("`privimage train`\n```bash\n.venv/bin/privimage run --config a.yaml \\\n"
            "  --sett x=1\nprivimage data subsample --source mnist --count 5\n```\n")
    assert _command_problems(text, cli_options) == [
        "privimage train", "privimage run --sett", "privimage data --count"]


def test_documented_methods_are_registered():
    text = (ROOT / "README.md").read_text()
    listed = re.search(r"Methods \(`method:` in the config\): (.*?);", text, re.S)[1]
    assert re.findall(r"`(\w+)`", listed) == list(METHODS)


def test_family_interface_table_lists_base_members():
    text = (DOCS / "extending.md").read_text()
    members = {n for n, v in vars(ModelFamily).items() if callable(v)}
    members |= set(ModelFamily.__annotations__)
    for n in sorted(m for m in members if not m.startswith("_")):
        assert f"`{n}" in text, f"docs/extending.md does not describe ModelFamily.{n}"
