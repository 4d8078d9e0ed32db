"""Write docs/configuration.md: the configuration reference, generated from
the config classes so that it cannot drift from them.

    python scripts/config_reference.py           # rewrite docs/configuration.md
    python scripts/config_reference.py --check   # exit 1 if the file is stale

Every section of ``privimage_core.config.SECTIONS`` (the core sections and
those a model family adds from its folder) becomes one table: each key with
its type (the annotation as written), its default, and the comment block that
sits directly above the field in the dataclass source. The class docstring
(or, for a module that defines a single section, the module docstring) opens
the section. Allowed values are read from the section's ``validate``
(``self.<key> in <CONSTANT>``) and given with the comment above that
constant. tests/test_docs.py fails when the committed file differs from what
this script writes now.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import re
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "configuration.md"

from privimage_core.config import SCALAR_KEYS, SECTIONS, Config  # noqa: E402 (after sys.path)
from privimage_core.methods import METHODS  # noqa: E402
from privimage_core.models import FAMILY_PACKAGES, family_config_sections  # noqa: E402

REGENERATE = "python scripts/config_reference.py"


# ---------------------------------------------------------------- source reading
@lru_cache(maxsize=None)
def _module_source(module_name: str) -> tuple[str, ast.Module, dict[int, str]]:
    """(source, AST, line -> comment text) of a module."""
    mod = importlib.import_module(module_name)
    path = inspect.getsourcefile(mod)
    src = Path(path).read_text()
    comments: dict[int, str] = {}
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string
    return src, ast.parse(src), comments


def _comment_above(module_name: str, lineno: int) -> str:
    """The block of whole-line comments directly above ``lineno`` (1-based),
    joined into one paragraph; '' when there is none."""
    src, _, comments = _module_source(module_name)
    lines = src.splitlines()
    out: list[str] = []
    i = lineno - 1
    while i >= 1 and i in comments and lines[i - 1].strip().startswith("#"):
        text = comments[i][1:]
        item = re.match(r"\s{2,}(\S+)\s{2,}(.*)", text)  # "#   name   what it means"
        out.insert(0, f"`{item[1]}`: {item[2].strip()}" if item else text.strip())
        i -= 1
    return " ".join(s for s in out if s)


def _class_node(cls: type) -> ast.ClassDef | None:
    _, tree, _ = _module_source(cls.__module__)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__qualname__:
            return node
    return None


def _field_nodes(cls: type) -> dict[str, tuple[type, ast.AnnAssign]]:
    """Field name -> its annotated assignment, the nearest class in the MRO
    that defines it winning (a subclass that changes a default redefines it)."""
    out: dict[str, tuple[type, ast.AnnAssign]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        node = _class_node(klass)
        if node is None:
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[stmt.target.id] = (klass, stmt)
    return out


def _docstring(text: str | None) -> str:
    """A docstring as Markdown: paragraphs kept, lines joined, ``x`` -> `x`."""
    if not text:
        return ""
    paras = [" ".join(line.strip() for line in p.splitlines())
             for p in inspect.cleandoc(text).split("\n\n")]
    return "\n\n".join(p.replace("``", "`") for p in paras if p.strip())


def _section_doc(cls: type, sections: dict[str, type]) -> str:
    node = _class_node(cls)
    doc = ast.get_docstring(node) if node is not None else None
    if doc:
        return _docstring(doc)
    # A module that defines one section only documents it in its docstring.
    if sum(c.__module__ == cls.__module__ for c in sections.values()) == 1:
        _, tree, _ = _module_source(cls.__module__)
        return _docstring(ast.get_docstring(tree))
    return ""


# ---------------------------------------------------------------- allowed values
def _allowed(cls: type) -> dict[str, tuple[list, str]]:
    """Field -> (allowed values, comment above the constant) for every
    ``self.<field> in <expr>`` test in the class's ``validate``."""
    node = _class_node(cls)
    if node is None:
        return {}
    mod = importlib.import_module(cls.__module__)
    out: dict[str, tuple[list, str]] = {}
    for fn in node.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "validate"):
            continue
        local: dict[str, object] = {}
        for stmt in ast.walk(fn):
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)):
                try:
                    local[stmt.targets[0].id] = ast.literal_eval(stmt.value)
                except ValueError:
                    pass
        for cmp in ast.walk(fn):
            if not (isinstance(cmp, ast.Compare) and len(cmp.ops) == 1
                    and isinstance(cmp.ops[0], ast.In)
                    and isinstance(cmp.left, ast.Attribute)
                    and isinstance(cmp.left.value, ast.Name) and cmp.left.value.id == "self"):
                continue
            expr = cmp.comparators[0]
            try:
                values = eval(compile(ast.Expression(expr), "<validate>", "eval"),  # noqa: S307
                              vars(mod), dict(local))
            except Exception:
                continue
            names = [n.id for n in ast.walk(expr) if isinstance(n, ast.Name)]
            note = " ".join(_constant_comment(mod.__name__, n) for n in names).strip()
            out[cmp.left.attr] = (list(values), note)
    return out


def _literal_text(node: ast.AST, mod) -> str:
    """The text of a message expression: literals kept, module constants
    filled in, anything computed at run time as '{}'."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v, mod) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        if isinstance(node.value, ast.Name) and hasattr(mod, node.value.id):
            return str(getattr(mod, node.value.id))
        return "{}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_text(node.left, mod) + _literal_text(node.right, mod)
    return "{}"


def _checks(cls: type, section: str) -> dict[str, list[str]]:
    """Field -> the ranges its section's ``validate`` states for it, read off
    the messages of its ``require`` calls ("<section>.<key> must be ...")."""
    node = _class_node(cls)
    if node is None:
        return {}
    mod = importlib.import_module(cls.__module__)
    rule = re.compile(rf"\b{re.escape(section)}\.(\w+) must be (.+?)(?=, got|; |$)")
    out: dict[str, list[str]] = {}
    for fn in node.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "validate"):
            continue
        for call in ast.walk(fn):
            if not (isinstance(call, ast.Call) and len(call.args) >= 2):
                continue
            func = call.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in ("_require", "require"):
                continue
            for m in rule.finditer(_literal_text(call.args[1], mod)):
                text = m[2].strip()
                if "{}" not in text and text not in out.get(m[1], []):
                    out.setdefault(m[1], []).append(text)
    return out


def _constant_comment(module_name: str, name: str) -> str:
    _, tree, _ = _module_source(module_name)
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                 for t in stmt.targets)):
            return _comment_above(module_name, stmt.lineno)
    return ""


# ---------------------------------------------------------------- rendering
def _value(v) -> str:
    """A default as it would be written in a YAML/JSON config."""
    return json.dumps(v)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _value(f.default_factory())
    return "(required)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _source_path(cls: type) -> str:
    return Path(inspect.getsourcefile(importlib.import_module(cls.__module__))
                ).resolve().relative_to(ROOT).as_posix()


def _family_of(section: str) -> str | None:
    cls = family_config_sections().get(section)
    if cls is None:
        return None
    return next((name for name, pkg in FAMILY_PACKAGES.items()
                 if cls.__module__.startswith(pkg + ".")), None)


def render_section(name: str, cls: type, sections: dict[str, type]) -> list[str]:
    fields = _field_nodes(cls)
    allowed = _allowed(cls)
    checks = _checks(cls, name)
    family = _family_of(name) if sections.get(name) is cls else None
    out = [f"## `{name}`", ""]
    origin = f"`{cls.__name__}` in `{_source_path(cls)}`"
    if family:
        origin += f", added by the `{family}` model family"
    out += [f"Defined by {origin}.", ""]
    doc = _section_doc(cls, sections)
    if doc:
        out += [doc, ""]
    out += ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        klass, node = fields.get(f.name, (cls, None))
        tp = ast.unparse(node.annotation) if node is not None else str(f.type)
        desc = _comment_above(klass.__module__, node.lineno) if node is not None else ""
        if f.name in checks and f.name not in allowed:
            desc += (" " if desc else "") + "Must be " + "; ".join(checks[f.name]) + "."
        if f.name in allowed:
            values, note = allowed[f.name]
            desc += (" " if desc else "") + "Allowed: " + ", ".join(
                f"`{_value(v)}`" for v in values) + "."
            if note:
                desc += " " + note
        out.append(f"| `{name}.{f.name}` | `{_cell(tp)}` | `{_cell(_default(f))}` | "
                   f"{_cell(desc.replace('``', '`'))} |")
    out.append("")
    return out


def render(sections: dict[str, type] | None = None) -> str:
    """The whole reference (``sections``: SECTIONS unless given, for tests)."""
    sections = dict(SECTIONS if sections is None else sections)
    top = {f.name: f for f in dataclasses.fields(Config)}
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `" + REGENERATE + "` from the config classes; do not edit "
        "by hand. tests/test_docs.py fails when this file is stale. -->",
        "",
        f"Generated from the config classes by `{REGENERATE}`; to change a key's "
        "description or default, edit the comment above the field (or the field) in "
        "the file named under its section, then rerun that command. "
        "`tests/test_docs.py` fails while this page differs from what the script "
        "writes.",
        "",
        "A config is a YAML or JSON file of sections (`privimage run --config FILE`); "
        "with no file, every key takes the default below (`configs/quickstart.yaml` "
        "spells them out). Override any key on the command line with its dotted "
        "name, e.g. `--set generator.preset=small` or "
        "`--set 'data.public=[\"glyphs\",\"mnist\"]'` (values are parsed as YAML). "
        "Unknown sections or keys, wrong types and out-of-range values are refused "
        "with a one-line message before any work starts (`privimage validate` runs "
        "only these checks and the data checks). Every run records its resolved "
        "config in MLflow (parameters and `resolved_config.json`).",
        "",
        "Sections: " + ", ".join(f"[`{n}`](#{n})" for n in sections) + ".",
        "",
        "## Top-level keys",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for key, tp in SCALAR_KEYS.items():
        desc = ""
        if key == "method":
            desc = ("The method: a model family and a list of stages "
                    "(`privimage_core/methods.py`). Allowed: "
                    + ", ".join(f"`{_value(m)}`" for m in METHODS) + ".")
        lines.append(f"| `{key}` | `{tp.__name__}` | `{_default(top[key])}` | {desc} |")
    lines += ["", "| method | family | what it is |", "|---|---|---|"]
    for m in METHODS.values():
        lines.append(f"| `{m.name}` | `{m.family}` | {_cell(m.summary)} |")
    lines.append("")
    for name, cls in sections.items():
        lines += render_section(name, cls, sections)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 when docs/configuration.md differs from the generated text")
    p.add_argument("--out", default=str(OUT), help="where to write (default: %(default)s)")
    a = p.parse_args(argv)
    text = render()
    out = Path(a.out)
    if a.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale; run: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
