"""Layers only point down: common -> client / inference_api -> server -> simulations -> benchmarks, with the
`fedxray` command on top. Every import in the source (module level and inside functions) is read with `ast`;
an import from a lower layer into a higher one, or between the two sibling layers, or any circle of modules,
fails here with the files that form it."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> the packages it may import (besides itself)
MAY_IMPORT = {
    "common": set(),
    "client": {"common"},
    "inference_api": {"common"},
    "server": {"common", "client"},
    "simulations": {"common", "client", "server"},
    "benchmarks": {"common", "client", "inference_api", "server", "simulations"},
    "fedxray": {"common", "client", "inference_api", "server", "simulations"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in MAY_IMPORT:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from a.b import c` counts a.b.c when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            submodules = {f"{mod}.{a.name}" for a in node.names} & known
            found |= submodules if len(submodules) == len(node.names) else submodules | {mod}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_points_up_or_sideways():
    wrong = []
    for mod, deps in _graph().items():
        top = mod.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != top and other not in MAY_IMPORT[top]:
                wrong.append(f"{mod} imports {dep} ({top} may import only {sorted(MAY_IMPORT[top]) or 'itself'})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_circle_of_imports():
    graph, cycles, state = _graph(), [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_walk_sees_the_imports_it_checks():
    """The checks above are only worth something if the walk finds imports, also inside functions."""
    graph = _graph()
    assert "common.settings" in graph["client.data"]
    assert "server.launch" in graph["server.cli"]            # imported inside a function
