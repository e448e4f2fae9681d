"""The package's import structure, read from the source with ``ast`` (imports inside
functions included): no cycles, and every import between parts of the package goes down the
stack below. A new module must be given a layer here."""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "spacy_medllm"

# Lowest first. A module may import from lower layers and from its own unit (the package or
# module named here; "spacy_medllm" is the package's __init__ alone); nothing else.
LAYERS: List[List[str]] = [
    ["spacy_medllm.about"],
    ["spacy_medllm", "spacy_medllm.types", "spacy_medllm.errors"],
    [
        "spacy_medllm.extensions",
        "spacy_medllm.safety",
        "spacy_medllm.spans",
        "spacy_medllm.labels",
        "spacy_medllm.tokenizer",
        "spacy_medllm.sharding",
        "spacy_medllm.embedded",
    ],
    ["spacy_medllm.readers", "spacy_medllm.scoring", "spacy_medllm.alignment"],
    ["spacy_medllm.error_taxonomy"],
    ["spacy_medllm.strategies"],
    ["spacy_medllm.llm"],  # the runtime: loading, generation, the copy decoder, serving
    ["spacy_medllm.recognizer", "spacy_medllm.ensemble"],  # recognition
    ["spacy_medllm.components", "spacy_medllm.training", "spacy_medllm.integrations"],
    ["spacy_medllm.corpus"],
    ["spacy_medllm.ray_runner"],
    ["spacy_medllm.cli"],
]


def module_files() -> Dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules that ``name`` imports (``from x import y`` counts as the module
    ``x.y`` when that is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            if not target.startswith("spacy_medllm"):
                continue
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                found.add(target)
    return found


def graph() -> Dict[str, Set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def unit_of(module: str) -> str:
    """The most specific entry of LAYERS that contains ``module``."""
    units = [u for layer in LAYERS for u in layer if module == u or (u != "spacy_medllm" and module.startswith(u + "."))]
    assert units, f"{module} has no layer in tests/test_imports.py: add it to LAYERS"
    return max(units, key=len)


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_reader_sees_relative_and_function_level_imports():
    """The walker itself: relative imports resolve, imports inside functions count."""
    modules = module_files()
    edges = imports_of("spacy_medllm.components.align", modules["spacy_medllm.components.align"], modules)
    assert {"spacy_medllm", "spacy_medllm.alignment", "spacy_medllm.scoring"} <= edges
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_imports_only_go_down():
    upward = []
    for module, targets in graph().items():
        unit = unit_of(module)
        for target in targets:
            other = unit_of(target)
            if other != unit and layer_of(other) >= layer_of(unit):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not go down the stack:\n" + "\n".join(sorted(upward))
