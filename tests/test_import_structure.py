"""The import structure of the package, read from the source (ast), not by importing it.

Three floors, imports only go down (search_spaces -> evaluators -> nas); no two project modules
import each other, directly or through others; only the `nas/tune` package imports Ray, so the
rest of the project (run directories, distillation, export, report) works without it. Every
import counts, at module top or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search_spaces", "evaluators", "nas")  # ground floor first
RAY_PACKAGE = "nas.tune"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _project_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = {m for m in _imports(name, path) if m in mods and m != name}
        # a package's __init__ re-exporting its own modules is not an edge back into the package
        graph[name] = {d for d in deps if not (name and d.startswith(name + ".") and path.name == "__init__.py")}
    return graph


def _floor(module: str) -> int:
    return PACKAGES.index(module.split(".")[0])


def test_no_import_circle_among_project_modules():
    graph = _project_graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package importing its own submodule (nas.tune -> nas.tune.driver) is how packages work
    real = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") or c[0].startswith(x + ".")
                                         for x in c)]
    assert not real, "import circles: " + "; ".join(" -> ".join(c) for c in real)


def test_imports_only_go_down_the_floors():
    up = [f"{m} imports {d}" for m, deps in _project_graph().items() for d in deps if _floor(d) > _floor(m)]
    assert not up, "imports going up a floor: " + "; ".join(sorted(up))


def test_only_the_tune_package_imports_ray():
    mods = _modules()
    outside = sorted(m for m, p in mods.items()
                     if not (m == RAY_PACKAGE or m.startswith(RAY_PACKAGE + "."))
                     and any(i == "ray" or i.startswith("ray.") for i in _imports(m, p)))
    assert not outside, f"modules outside {RAY_PACKAGE} importing Ray: {', '.join(outside)}"
    inside = [m for m in mods if m.startswith(RAY_PACKAGE + ".")]
    assert inside, f"{RAY_PACKAGE} holds no modules"


def test_the_graph_reader_sees_a_known_edge():
    # the checks above mean something only if the reader finds imports at all
    graph = _project_graph()
    assert "search_spaces.errors" in graph["nas.cli"]
    assert "search_spaces.architecture" in graph["nas.objective"]
