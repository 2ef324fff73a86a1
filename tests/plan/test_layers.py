"""afkv.plan is a leaf: it reads model shapes (afkv.model.spec, afkv.model.random) and errors,
nothing above them; only the CLI and the benchmarks import it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "afkv"
ALLOWED = ("afkv.errors", "afkv.model.spec", "afkv.model.random", "afkv.plan")


def _afkv_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("afkv")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("afkv"):
            out.add(node.module)
    return out


def test_plan_imports_only_what_is_below_it():
    for path in (ROOT / "plan").glob("*.py"):
        bad = {m for m in _afkv_imports(path) if not any(m == a or m.startswith(a + ".") for a in ALLOWED)}
        assert not bad, f"{path.name} imports {bad}"


def test_only_cli_and_bench_import_plan():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("plan", "bench") or rel.name == "cli.py":
            continue
        assert not any(m.startswith("afkv.plan") for m in _afkv_imports(path)), rel
