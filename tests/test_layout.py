"""The package's layout stays navigable: no import cycle between its modules, no oversized hand-written module,
backends reached only through the registry."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dml_kernels"
MAX_LINES = 600


def _modules():
    """{dotted module name: path} for every .py file of the package."""
    found = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name, path, modules):
    """Modules of the package that ``name`` imports (at any depth in the file: lazy imports count too)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule; "from mod import name" imports mod.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a graph with a back edge is reported."""
    graph = _graph()
    graph["dml_kernels._registry"] = graph["dml_kernels._registry"] | {"dml_kernels.backends.cpp.loader"}
    graph["dml_kernels.backends.cpp.loader"] |= {"dml_kernels.backends.cpp.library"}
    graph["dml_kernels.backends.cpp.library"] = graph["dml_kernels.backends.cpp.library"] | {"dml_kernels._registry"}
    assert _cycle(graph) is not None


def test_registry_imports_no_backend():
    """The registry reaches a backend only through its load hook (importlib, by name)."""
    assert not {m for m in _graph()["dml_kernels._registry"] if m.startswith("dml_kernels.backends")}


def test_backends_import_no_public_layer():
    """Backends implement ops; they do not call back into the public API (functional, losses, miners)."""
    public = ("dml_kernels.functional", "dml_kernels.losses", "dml_kernels.miners")
    for name, deps in _graph().items():
        if name.startswith("dml_kernels.backends"):
            assert not {d for d in deps if d.startswith(public)}, (name, deps)


def test_no_oversized_module():
    big = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
