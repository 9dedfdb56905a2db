"""The package's shape: no import circles (lazy imports inside functions count too), nothing below the
command line imports it, no module over 500 lines, no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "miniomni"
BENCHMARKS = ROOT / "benchmarks"


def _module_name(path: Path) -> str:
    if path.is_relative_to(PACKAGE):
        parts = ("miniomni", *path.relative_to(PACKAGE).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return path.stem  # benchmarks import each other by file name


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere (TYPE_CHECKING blocks included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from X import Y`` imports module X.Y when there is one, else a name from X.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph(paths: list[Path]) -> dict[str, set[str]]:
    known = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, known) for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "static" not in p.parts)


def test_no_import_circles_in_the_package():
    graph = _graph(_package_modules())
    # A package's __init__ re-exports its modules; those edges are not the modules' own dependencies.
    graph = {m: {t for t in targets if not (t != "miniomni" and m.startswith(t + "."))} for m, targets in graph.items()}
    assert _cycles(graph) == []


def test_no_import_circles_in_the_benchmarks():
    assert _cycles(_graph(sorted(BENCHMARKS.glob("*.py")))) == []


def test_nothing_imports_the_command_line_upward():
    graph = _graph(_package_modules())
    importers = sorted(m for m, targets in graph.items() if "miniomni.cli" in targets)
    assert importers == [], importers


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*_package_modules(), *BENCHMARKS.glob("*.py")]
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}


def test_no_function_in_the_server_over_60_lines():
    long = {}
    for path in sorted((PACKAGE / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def test_no_private_name_is_imported_from_another_module():
    """A leading underscore means "this module's own": nothing in the package imports one from elsewhere."""
    crossing = []
    for path in _package_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("miniomni")):
                crossing += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []
