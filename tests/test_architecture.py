"""The codebase's structure, as contracts: the core library never imports
Ray, no module import circle (over every import, function-local ones
included), every function-local import says why it is lazy, and no file
over 400 lines."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("privimage_core", "services", "benchmarks")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages
    (a package by its __init__'s name)."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for d in PACKAGES for p in (ROOT / d).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported project module, inside a function?) for every
    import in ``path``; ``from pkg import mod`` counts as importing pkg.mod.
    The benchmark scripts import their siblings by bare name."""
    tree = ast.parse(path.read_text())
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            targets = [n for n in names if n in known] or [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if path.parent.name == "benchmarks" and f"benchmarks.{t}" in known:
                t = f"benchmarks.{t}"
            if t in known:
                out.append((node, t, id(node) in local))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    files = _modules()
    known = set(files)
    graph = {}
    for m, p in files.items():
        graph[m] = {t for _, t, _ in _imports(p, known) if t != m}
    return graph


def test_no_import_circle_over_every_import():
    graph = _graph()
    assert len(graph) > 60
    cycles = _cycles(graph)
    assert not cycles, f"import circles (function-local imports included): {cycles}"


def test_the_circle_check_finds_a_circle_hidden_in_a_function():
    """Control: a circle closed only by a function-local import is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    src = "import os\n\ndef f():\n    from privimage_core.config import schema\n"
    tmp = ROOT / "tests" / "_arch_probe.py"
    try:
        tmp.write_text(src)
        found = _imports(tmp, {"privimage_core.config", "privimage_core.config.schema"})
    finally:
        tmp.unlink()
    assert [(t, inside) for _, t, inside in found] == [("privimage_core.config.schema", True)]


def _unexplained_lazy_imports() -> list[str]:
    out = []
    for d in ("privimage_core", "services"):
        for p in (ROOT / d).rglob("*.py"):
            lines = p.read_text().splitlines()
            tree = ast.parse("\n".join(lines))
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for n in ast.walk(fn):
                    if not isinstance(n, (ast.Import, ast.ImportFrom)):
                        continue
                    here = lines[n.lineno - 1]
                    above = lines[n.lineno - 2].strip() if n.lineno > 1 else ""
                    if "# lazy:" not in here and not above.startswith("# lazy:"):
                        out.append(f"{p.relative_to(ROOT)}:{n.lineno}")
    return sorted(set(out))


def test_every_function_local_import_says_why_it_is_lazy():
    """Lazy imports only where they buy start-up time (or keep an optional,
    heavy library off the common path), each with its reason in a
    ``# lazy: ...`` comment on its line or the line above."""
    bad = _unexplained_lazy_imports()
    assert not bad, f"function-local imports without a '# lazy:' reason: {bad}"


def test_no_core_module_imports_ray():
    mods = sorted(m for m in _modules() if m.startswith("privimage_core."))
    assert len(mods) > 40
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "sys.exit(3 if 'ray' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:] or "a privimage_core module imports ray"


def test_no_file_over_400_lines():
    files = {m: p for m, p in _modules().items() if not m.startswith("benchmarks")}
    long = {m: n for m, p in files.items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines: {long}"
