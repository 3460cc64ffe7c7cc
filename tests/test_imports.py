"""The package's import graph: no cycle, the layers of the README's layout (kernels → ops → patch → ... →
experiments → cli, nothing importing upward), and no function-local import of the package's own modules
except the optional ones (the C++ extension, the Triton kernels)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lofit_fast"

# Bottom up. A module may import its own unit and any unit of a lower layer, never one of its own layer or above.
LAYERS = [
    {"_version", "_files", "_switch", "_C", "kernels"},
    {"ops", "data"},
    {"patch", "losses", "analysis"},
    {"hooks", "steer", "models", "eval"},
    {"adapter", "train"},
    {"methods"},
    {"integrations", "harness"},
    {"experiments"},
    {"cli"},
    {"__main__"},
]
OPTIONAL = {"lofit_fast._C", "lofit_fast.kernels"}  # the compiled extension and the Triton kernels


def _modules():
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["lofit_fast", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()
KNOWN = set(MODULES) | OPTIONAL


def _imports(name, path):
    """(target module, line, function-local?) for every import of a lofit_fast module in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - (node.level - (1 if is_package else 0))]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("lofit_fast"):
                continue
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in KNOWN]
            targets = subs if subs and len(subs) == len(node.names) else [module, *subs]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("lofit_fast")]
        for target in targets:
            yield target, node.lineno, id(node) not in top


def _unit(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(unit):
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"unit {unit!r} is in no layer of LAYERS: add it where it belongs")


EDGES = {name: list(_imports(name, path)) for name, path in MODULES.items()}


def test_every_unit_has_a_layer():
    for name in MODULES:
        if name != "lofit_fast":
            _layer(_unit(name))


def test_no_import_cycle():
    graph = {name: {t for t, _, _ in edges if t in MODULES and t != name} for name, edges in EDGES.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_only_import_downward():
    bad = []
    for name, edges in EDGES.items():
        if name == "lofit_fast":  # the public facade re-exports every layer
            continue
        unit = _unit(name)
        for target, line, _ in edges:
            other = _unit(target)
            if target == "lofit_fast":
                bad.append(f"{name}:{line} imports the package root (import the module itself)")
            elif other != unit and _layer(other) >= _layer(unit):
                bad.append(f"{name}:{line} imports {target} (layer {_layer(other)} >= its own {_layer(unit)})")
    assert not bad, "\n".join(bad)


def test_no_function_local_imports_of_the_package():
    bad = [f"{name}:{line} imports {target} inside a function"
           for name, edges in EDGES.items() for target, line, local in edges
           if local and not any(target == o or target.startswith(o + ".") for o in OPTIONAL)]
    assert not bad, "\n".join(bad)


def test_the_graph_is_read_correctly():
    """The walker sees the edges that are certainly there (a walker that finds nothing would pass every test)."""
    def targets(name):
        return {t for t, _, _ in EDGES[name]}

    assert "lofit_fast.experiments" in targets("lofit_fast.cli.lofit_cmds")
    assert "lofit_fast.train" in targets("lofit_fast.methods.lofit")
    assert "lofit_fast.ops" in targets("lofit_fast.patch.module")
    assert {"lofit_fast.cli", "lofit_fast.experiments"}.isdisjoint(
        {t for name, edges in EDGES.items() if _unit(name) not in ("cli", "experiments", "__main__", "")
         for t, _, _ in edges})
