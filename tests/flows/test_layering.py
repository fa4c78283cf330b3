"""Import layering, read from the source with `ast` (nothing is imported): flows -> tasks -> quantlib,
never the reverse; no import cycle among flows modules; only flows/cli.py reaches the CLI modules.

Every import counts, including those inside functions: a lazy import still couples two modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("quantlib", "tasks", "flows")
ORCHESTRATION = ("tasks", "flows", "prefect", "mlflow", "dvc", "yaml")
CLI_ONLY = ("flows.cli_impl", "flows.cli_pipeline")  # command implementations: only flows.cli imports them


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _base(module: str, path: Path, level: int) -> str:
    """The package a relative import with `level` dots starts from."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


def imports(module: str) -> set[str]:
    """Dotted names `module` imports; `from P import x` yields P.x when that is a module, else P."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node.level) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            found |= subs or {target}
    return found


IMPORTS = {m: imports(m) for m in MODULES}


def _top(name: str) -> str:
    return name.split(".")[0]


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A shortest import path start -> ... -> start, or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    return None


def test_the_scan_sees_the_packages():
    assert {"quantlib.spec", "tasks.io", "flows.cli", "flows.methods"} <= set(MODULES)
    assert "flows.commands" in IMPORTS["flows.cli_impl"]  # `from . import commands as C`


def test_no_import_cycle_among_flows_modules():
    flows = {m for m in MODULES if _top(m) == "flows"}
    graph = {m: {i for i in IMPORTS[m] if i in flows and i != m} for m in flows}
    cycles = {" -> ".join(c) for m in sorted(flows) if (c := _cycle_from(m, graph))}
    assert not cycles, "import cycles in flows/:\n" + "\n".join(sorted(cycles))


@pytest.mark.parametrize("package, forbidden", [("quantlib", ORCHESTRATION), ("tasks", ("flows",))])
def test_lower_layers_do_not_import_higher_ones(package, forbidden):
    bad = sorted(f"{m} imports {i}" for m in MODULES if _top(m) == package
                 for i in IMPORTS[m] if _top(i) in forbidden)
    assert not bad, "\n".join(bad)


ENTRY_POINTS = ("flows.cli", "flows.deploy")  # the console script; the flows prefect.yaml deploys (they call the CLI)


def test_only_the_cli_entry_point_imports_the_cli_modules():
    bad = sorted(f"{m} imports {i}" for m in MODULES if m not in ENTRY_POINTS
                 for i in IMPORTS[m] if i in ENTRY_POINTS or i in CLI_ONLY)
    assert not bad, "\n".join(bad)
    assert all(i == "flows.cli" for i in IMPORTS["flows.deploy"] if i.startswith("flows."))
