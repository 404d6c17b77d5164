"""The package's import graph: no cycle, no import from a lower layer to a higher one, no Ray in the pure modules,
no private name imported from another module. Imports inside functions count: they are edges all the same."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spin_ray"

# Bottom to top, as package prefixes; a module may import its own layer (acyclically) and the layers below. The
# package's root holds the cross-cutting few; every other module sits in the subpackage of its layer.
LAYERS = [
    {"spin_ray", "spin_ray.storage", "spin_ray.logs", "spin_ray.workers", "spin_ray.objectives"},
    {"spin_ray.config", "spin_ray.plan", "spin_ray.data", "spin_ray.models"},
    {"spin_ray.generation"},
    {"spin_ray.training"},
    {"spin_ray.run"},
    {"spin_ray.cli"},
]
ROOT_MODULES_AT_MOST = 8
WITHOUT_RAY = {"spin_ray.objectives.losses", "spin_ray.objectives.logprobs", "spin_ray.objectives.packed_attention",
               "spin_ray.objectives.algorithms", "spin_ray.data.tokenization", "spin_ray.data.gsm8k", "spin_ray.plan",
               "spin_ray.models.adapters", "spin_ray.training.loop", "spin_ray.training.parallel",
               "spin_ray.training.reference", "spin_ray.training.gpu", "spin_ray.training.measure",
               "spin_ray.run.collapse", "spin_ray.run.selection"}


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix that holds `module` (the bare package name holds only itself)."""
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            holds = module == prefix or (prefix != "spin_ray" and module.startswith(prefix + "."))
            if holds and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return best[1] if best else None


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text())
    return found


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def _graph(modules):
    graph = {name: set() for name in modules}
    for name, tree in modules.items():
        for target, names in _imports(tree):
            if target in modules:
                graph[name].add(target)
            for imported in names:  # `from spin_ray.generation import pipeline` names a module
                if f"{target}.{imported}" in modules:
                    graph[name].add(f"{target}.{imported}")
    return graph


def test_every_module_is_placed_in_a_layer_and_the_root_holds_few():
    modules = _modules()
    unplaced = sorted(name for name in modules if layer_of(name) is None)
    assert not unplaced, f"unplaced: {unplaced}"
    root = sorted(name for name in modules if name.count(".") == 1 and (PACKAGE / f"{name.split('.')[1]}.py").is_file())
    assert len(root) + 1 <= ROOT_MODULES_AT_MOST, root  # with __init__
    assert all(layer_of(name) is not None for name in WITHOUT_RAY) and WITHOUT_RAY <= set(modules)


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} -> {target}" for name, targets in _graph(_modules()).items() for target in targets
              if layer_of(target) > layer_of(name)]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    graph = _graph(_modules())
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_pure_modules_import_no_ray_and_generation_no_training():
    modules = _modules()
    for name in WITHOUT_RAY:
        assert not any(t == "ray" or t.startswith("ray.") for t, _ in _imports(modules[name])), name
    for name, targets in _graph(modules).items():
        if name.startswith("spin_ray.generation"):
            assert not any(t.startswith("spin_ray.training") for t in targets), name


def test_no_private_name_is_imported_from_another_module():
    private = [f"{name}: from {target} import {imported}" for name, tree in _modules().items()
               for target, names in _imports(tree) if target.startswith("spin_ray")
               for imported in names if imported.startswith("_") and not imported.startswith("__")]
    assert not private, private


def test_every_function_reads_in_one_screen():
    """No function of the package is longer than 80 lines, its docstring included: a longer one is split into named
    steps (training.loop.train: set_up, train_step, end_step, finish)."""
    functions = [(name, node) for name, tree in _modules().items() for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name, node in functions
            if node.end_lineno - node.lineno + 1 > 80]
    assert len(functions) > 500 and not long, long
