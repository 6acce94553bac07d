"""The package's layering, checked by parsing the imports (module level and inside functions).

- ``fastrlhf/kernels/*`` are leaves: they import nothing of fastrlhf outside ``kernels/``.
- ``fastrlhf/reference/`` (the oracle) imports nothing of fastrlhf outside itself, and no module
  under ``fastrlhf/`` imports it: only tests and benchmarks do, so a bug in shared code cannot
  hide from the tests that compare against the oracle.
- No import cycle between fastrlhf modules; no file under ``fastrlhf/`` above 600 lines.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastrlhf"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Every fastrlhf module this file imports (``from . import x`` resolved to ``pkg.x`` when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fastrlhf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "fastrlhf":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names]
            subs = [s for s in subs if (PKG.parent / Path(*s.split("."))).with_suffix(".py").exists()
                    or (PKG.parent / Path(*s.split("."))).is_dir()]
            # `from . import memory` needs the submodule (its package is already being imported)
            found.update(subs if len(subs) == len(node.names) else subs + [mod])
    return found


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_kernels_are_leaves():
    for mod, deps in _graph().items():
        if mod.startswith("fastrlhf.kernels"):
            outside = {d for d in deps if not d.startswith("fastrlhf.kernels")}
            assert not outside, f"{mod} imports {sorted(outside)}: kernels must know no other fastrlhf module"


def _is_reference(mod: str) -> bool:
    return mod == "fastrlhf.reference" or mod.startswith("fastrlhf.reference.")


def test_reference_is_apart_from_production():
    graph = _graph()
    assert "fastrlhf.reference" in graph
    for mod, deps in graph.items():
        if _is_reference(mod):
            outside = sorted(d for d in deps if not _is_reference(d))
            assert not outside, f"the oracle module {mod} imports {outside}"
    users = sorted(m for m, deps in graph.items() if not _is_reference(m) and any(map(_is_reference, deps)))
    assert not users, f"production modules import the oracle: {users}"


def test_no_import_cycle():
    graph = _graph()
    modules = set(graph)

    def edges(m):
        # importing a.b.c imports its packages a.b and a too; a package's __init__ is its own node
        out = set()
        for d in graph[m]:
            while d and d not in modules:
                d = d.rpartition(".")[0]
            if d and d != m and d != "fastrlhf":  # the top-level re-exports are not a layer
                out.add(d)
        return out

    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in edges(m):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(modules):
        if m not in state and m != "fastrlhf":
            visit(m, [m])


def test_no_file_above_600_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files above {MAX_LINES} lines: {long}"
