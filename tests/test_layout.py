"""The package's layout: no import circle (imports inside functions count), the command line on top,
no source file over 600 lines, an opening docstring in every module, every error class in
``icdistill.errors``, and README's module map naming every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "icdistill"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The project modules an import statement runs: ``from X import Y`` names module X.Y when Y is a
    submodule, else X. The parent packages Python imports on the way are not edges (a package's
    ``__init__`` importing its own submodules is no circle)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
    out = set()
    for target in targets:
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and ".".join(parts) != name:
            out.add(".".join(parts))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in it (top level, functions, methods)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _imported(name, path, node, modules)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # cli.py imports its subcommands inside functions only
    assert "icdistill.eval.cli" in graph["icdistill.cli"]
    assert "icdistill.service.cli" in graph["icdistill.cli"]


def test_cycle_detection_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, f"import circles: {found}"


def test_errors_are_on_the_ground_floor():
    graph = import_graph()
    assert graph["icdistill.errors"] == set()
    errors = _modules()["icdistill.errors"]
    defined = {n.name for n in ast.parse(errors.read_text()).body if isinstance(n, ast.ClassDef)}
    elsewhere = []
    for name, path in _modules().items():
        if name == "icdistill.errors":
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if bases & (defined | {"Exception", "RuntimeError", "ValueError"}):
                elsewhere.append(f"{name}.{node.name}")
    assert not elsewhere, f"error classes outside icdistill.errors: {elsewhere}"


def test_no_source_file_over_600_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_module_says_what_it_is_for():
    missing = [name for name, p in _modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without an opening docstring: {missing}"


def test_the_command_line_is_on_top():
    """Only ``icd`` imports its subcommands, and nothing imports ``icd``'s module."""
    graph = import_graph()
    commands = {"icdistill.cli", "icdistill.eval.cli", "icdistill.service.cli"}
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps & commands
        if m not in ("icdistill.cli", "icdistill.__main__")
    )
    assert not upward, f"imports of the command line: {upward}"


def test_the_readme_module_map_names_every_module():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Module map")
    section = text[start : text.index("\n## ", start + 1) if "\n## " in text[start + 1 :] else len(text)]
    words = set(section.replace("/", " ").split())
    missing = [
        str(p.relative_to(PACKAGE))
        for p in _modules().values()
        if p.name not in ("__init__.py", "__main__.py") and p.name not in words
    ]
    assert not missing, f"modules missing from README's module map: {missing}"
    packages = {p.parent.name + "/" for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert all(pkg in section for pkg in packages)


def test_a_run_imports_nothing_of_the_eval_above_it():
    """``icd run`` is a floor below ``icd eval``: what the run needs (its summary metrics) lives beside it."""
    graph = import_graph()
    for module in ("icdistill.runner", "icdistill.run_summary", "icdistill.report", "icdistill.distiller"):
        upward = sorted(d for d in graph[module] if d.startswith("icdistill.eval"))
        assert not upward, f"{module} imports the eval above it: {upward}"
