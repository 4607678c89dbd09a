"""The package layout docs/concepts.md describes: layers that import only downwards, no import loop, no private name
imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "robustmix"

#: Each part of ``robustmix`` and its layer: a module imports only parts of a lower layer (or its own part).
LAYERS = {
    "checks": 0,
    "version": 0,
    "models": 1,
    "data": 1,
    "core": 2,
    "runs": 2,
    "attacks": 3,
    "stages": 4,
    "training": 4,
    "methods": 5,
    "evaluation": 5,
    "integrations": 5,
    "__init__": 6,
    "cli": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """``robustmix.stages.labels`` -> ``stages``; the package root is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import of a ``robustmix`` module in ``path``, also inside functions: (line, module, names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "robustmix":
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "robustmix"]
    return found


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_part_of_the_package_has_a_layer():
    unplaced = sorted({_part(name) for name in MODULES} - set(LAYERS))
    assert not unplaced, f"give {unplaced} a layer in LAYERS and a line in docs/concepts.md's layout"


def _upward(here: str, path: Path) -> list[str]:
    """The imports of ``path``, a module of part ``here``, that reach its own layer or above in another part."""
    return [
        f"line {line}: {module}"
        for line, module, names in _imports(path)
        for target in [module] + [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        if _part(target) != here and LAYERS[_part(target)] >= LAYERS[here]
    ]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down_a_layer(name):
    here = _part(name)
    upward = _upward(here, MODULES[name])
    assert not upward, f"{name} ({here}, layer {LAYERS[here]}) imports from its own layer or above: {upward}"


def test_the_layer_rule_catches_an_upward_or_sideways_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from robustmix.cli.recipe import run_recipe\n")
    assert _upward("stages", probe) == ["line 2: robustmix.cli.recipe"]
    probe.write_text("from robustmix.training.trainer import Trainer\n")  # training shares the stages' layer
    assert _upward("stages", probe) == ["line 1: robustmix.training.trainer"]
    probe.write_text("from robustmix.core.step import AdversarialStep\n")
    assert _upward("stages", probe) == []


def test_no_private_name_is_imported_from_another_module():
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "recipes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    sources += (ROOT / "tests").glob("*.py")
    private = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0]
                in {
                    "robustmix",
                    "tests",
                    "benchmarks",
                }
            ):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{n}" for n in names]
    assert not private, f"private names imported across modules (make them public, or move them): {private}"


def _find_loop(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` (module -> modules it imports) as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                path = [*stack, node]
                return [*path[path.index(target) :], target]
            if target not in state and (loop := visit(target, [*stack, node])):
                return loop
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (loop := visit(name, [])):
            return loop
    return None


def test_no_import_loop_between_modules():
    graph = {
        name: {
            target
            for _, module, names in _imports(path)
            for target in [module, *(f"{module}.{n}" for n in names)]
            if target in MODULES
            and target != name
            # a package's __init__ importing its own modules is how it re-exports, not a loop of the design
            and not (path.name == "__init__.py" and target.startswith(name + "."))
        }
        for name, path in MODULES.items()
    }
    loop = _find_loop(graph)
    assert loop is None, f"import loop: {' -> '.join(loop)}"


def test_the_loop_check_finds_a_loop():
    assert _find_loop({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert _find_loop({"a": {"b"}, "b": {"c"}, "c": set()}) is None
