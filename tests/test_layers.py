"""The layer map of afkv/__init__.py, checked against the code's own imports.

Every import of every module under afkv/ is read with `ast` (module level, inside functions,
under TYPE_CHECKING: all of them), and resolved to the afkv module it names. Then:

- each import goes down the map (or stays inside its own package);
- the module graph has no cycle;
- tests import afkv.bench only where a benchmark itself is under test (test_bench_*).
"""

from __future__ import annotations

import ast
from pathlib import Path

import afkv

ROOT = Path(afkv.__file__).parent
TESTS = Path(__file__).parent

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """afkv modules imported by the file at `path` -> [(module, line)]. `from P import n` names
    module P.n when that is a module, else P."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path) if path.is_relative_to(ROOT) else ""
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "afkv"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "afkv":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno))
    return out


# Rank of each layer: an import goes to a lower rank, or stays in its own package. Layers of one
# rank are siblings and do not import each other. eplb and plan are leaves: eplb reads only
# afkv.errors, plan only model and what is below it. The package root (afkv/__init__.py) is the
# public API, above serve.
RANKS = {"errors": 0, "ops": 1, "transport": 1, "eplb": 1, "model": 2, "kv": 3, "plan": 3, "config": 4,
         "nodes": 5, "engine": 6, "serve": 7, "": 8, "bench": 9, "cli": 10}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations() -> list[str]:
    mods = modules()
    out = []
    for mod, path in mods.items():
        for target, line in imports(path, set(mods)):
            a, b = layer(mod), layer(target)
            if target not in mods:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: imports {target}, which does not exist")
            elif a != b and RANKS[b] >= RANKS[a]:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: {mod} ({a or 'afkv'}) imports {target} "
                           f"({b or 'afkv'}), not below it")
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {mod: {t for t, _ in imports(path, set(mods)) if t != mod and t in mods} for mod, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
                out.append(tuple(sorted(comp)))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_imports_follow_the_layer_map():
    assert violations() == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def _bench_tests(path: Path) -> set[int]:
    """Lines of `path` inside a test of a benchmark (a test_bench_* function), where importing
    afkv.bench is the point."""
    tree = ast.parse(path.read_text(), str(path))
    return {n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name.startswith("test_bench_")
            for n in ast.walk(f) if hasattr(n, "lineno")}


def test_tests_do_not_import_bench():
    """Tests import afkv.bench only to test a benchmark: in a test_bench_*.py file or a
    test_bench_* function (fixtures and helpers live below bench)."""
    known = set(modules())
    bad = [f"{p.relative_to(TESTS.parent)}:{line}: imports {t}" for p in sorted(TESTS.rglob("*.py"))
           if not p.name.startswith("test_bench_") for t, line in imports(p, known)
           if layer(t) == "bench" and line not in _bench_tests(p)]
    assert bad == []


def test_the_map_is_stated_once_in_the_package_docstring():
    doc = afkv.__doc__
    assert "errors <- ops, transport <- model <- kv <- config <- nodes <- engine <- serve <- cli" in doc
    for name in RANKS:
        if name:
            assert name in doc, name
