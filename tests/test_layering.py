"""The package's layering, read from the source: module-level imports among `grasp_trl` modules form no cycle,
and the core (the method: directions, LoRA, identification, constraints, projection, engines) imports neither
TRL nor transformers at module level, so it stays usable, and importable, without them."""

import ast
from pathlib import Path

import grasp_trl

PACKAGE = Path(grasp_trl.__file__).parent
CORE = {
    "directions",
    "lora",
    "identify",
    "modules",
    "constraints",
    "projection",
    "deepspeed",
    "fsdp",
    "stopping",
    "verify",
}


def module_imports() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """`module -> {grasp_trl modules it imports}` and `module -> {outside packages it imports}`, at module level
    only (imports inside functions are deferred on purpose and make no cycle at import time). Names are dotted
    paths inside the package (`projection`, `eval.judge`; a package is its `__init__`)."""
    internal, external = {}, {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        package = parts[:-1]  # where relative imports start from
        name = ".".join(package if parts[-1] == "__init__" else parts) or "__init__"
        internal[name], external[name] = set(), set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                internal[name].add(".".join([*base, *(node.module or "").split(".")]).strip(".") or "__init__")
            elif isinstance(node, ast.ImportFrom):
                external[name].add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                external[name].update(alias.name.split(".")[0] for alias in node.names)
    return internal, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (`node -> {nodes it imports}`) as `[a, b, ..., a]`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:  # back on the current path: the cycle is its part from `child` on
                trail = [*path, node]
                return [*trail[trail.index(child) :], child]
            if child not in state and (cycle := visit(child, [*path, node])):
                return cycle
        state[node] = 2
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node, []))), None)


def test_no_import_cycles():
    internal, _ = module_imports()
    assert {"lora", "constraints", "projection", "identify", "eval.judge"} <= set(internal)
    graph = {module: {t for t in targets if t in internal and t != module} for module, targets in internal.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the check can fail: the same graph with constraints importing the projector (a real cycle)
    cycle = find_cycle({**graph, "constraints": graph["constraints"] | {"projection"}})
    assert cycle is not None and set(cycle) == {"constraints", "projection"}, cycle


def test_the_core_needs_no_trainer_library():
    _, external = module_imports()
    for module in CORE:
        assert not external[module] & {"trl", "transformers", "accelerate", "peft"}, (module, external[module])
