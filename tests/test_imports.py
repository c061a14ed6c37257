"""The import graph: one way (CLI -> build -> exporters -> runtime), no cycles, torch-free settings."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"smash_build": ROOT / "build", "smash_build.exporters": ROOT / "exporters",
            "smash_runtime": ROOT / "runtime" / "smash_runtime"}


def _modules() -> dict[str, Path]:
    mods = {}
    for package, root in PACKAGES.items():
        for file in root.rglob("*.py"):
            parts = [p for p in file.relative_to(root).with_suffix("").parts if p != "__init__"]
            if package == "smash_build" and parts[:1] == ["exporters"]:
                continue
            mods[".".join([package, *parts])] = file
    return mods


def _imports(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the project that ``name`` imports at run time (anywhere in the file, but not
    under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, file, modules) for name, file in modules.items()}
    assert _cycles(graph) == []


def test_the_runtime_never_imports_the_builder():
    modules = _modules()
    for name, file in modules.items():
        if name.startswith("smash_runtime"):
            tree = ast.parse(file.read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
            assert not any(m.startswith("smash_build") for m in imported), name


def test_settings_modules_do_not_import_torch():
    modules = _modules()
    torch_free = ["smash_runtime.errors", "smash_runtime.settings", "smash_runtime.anatomy", "smash_build.settings",
                  "smash_build.manifest", "smash_build.evaluate.settings"]
    for name in torch_free:
        tree = ast.parse(modules[name].read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level}
        assert not top & {"torch", "diffusers", "transformers", "torchao"}, name
