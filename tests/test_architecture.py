"""The layering of docs/architecture.md, checked on the source: what each module imports, and who prints."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# docs/architecture.md's layers, top (1) to bottom (5); a module may import only its own layer or the ones above
LAYERS = {
    1: ["errors", "configuration_macrl", "modeling_macrl", "modeling_macrl_backbone", "image_processing_macrl",
        "contrastive_loss", "distributed", "timm_layout", "precision", "devices", "atomic_files", "write_failures",
        "presets", "openmp_waiting"],
    2: ["data"],
    3: ["loading", "feature_extraction", "feature_files", "hub", "model_card", "model_cards", "visualization"],
    4: ["evaluation", "training"],
    5: ["command_line", "pretrain", "extract", "evaluate", "convert", "conversion", "visualize"],
}  # fmt: skip
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
COMMANDS = {"command_line", "pretrain", "extract", "evaluate", "convert", "visualize"}


def _modules() -> list[tuple[str, Path]]:
    """(top-level macrl module or package name, file) of every source file of the package."""
    found = []
    for path in sorted((ROOT / "macrl").rglob("*.py")):
        relative = path.relative_to(ROOT / "macrl")
        found.append((relative.parts[0].removesuffix(".py"), path))
    for path in sorted((ROOT / "conversion").glob("*.py")):
        found.append(("conversion", path))
    return [(name, path) for name, path in found if name != "__init__"]


def _imported_macrl_modules(path: Path, package: str) -> set[str]:
    """The top-level macrl modules that `path` imports (absolute `macrl.X` and relative imports alike)."""
    tree = ast.parse(path.read_text())
    inside = path.parent.name if package in ("data", "evaluation", "training", "conversion") else None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("macrl."):
                names.add(node.module.split(".")[1])
            elif node.level == 1 and inside is None and node.module:  # from .X import (a module of macrl/)
                names.add(node.module.split(".")[0])
            elif node.level == 1 and inside is not None:  # within a subpackage
                names.add(package)
            elif node.level == 2 and node.module:  # from ..X import, in a subpackage
                names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("macrl."))
    return names


def test_every_module_has_a_layer():
    assert {name for name, _ in _modules()} <= set(LAYER_OF), {name for name, _ in _modules()} - set(LAYER_OF)


@pytest.mark.parametrize("name, path", _modules(), ids=lambda value: str(value).replace(str(ROOT) + "/", ""))
def test_imports_only_go_up_the_layers(name, path):
    imported = _imported_macrl_modules(path, name) - {"__version__"}
    below = sorted(module for module in imported if LAYER_OF.get(module, 0) > LAYER_OF[name])
    assert not below, f"{path.relative_to(ROOT)} (layer {LAYER_OF[name]}) imports {below} from a lower layer"


def test_only_commands_print():
    printing = []
    for name, path in _modules():
        if name in COMMANDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not printing, f"library code prints (log through the 'macrl' logger instead): {printing}"


def test_no_module_imports_another_modules_private_names():
    """A helper one module imports from another is a public name of the module that owns it (no `_name` imports
    between macrl's modules, the converters, the benchmarks and the tests' helpers)."""
    own = ("macrl", "conversion", "benchmarks", "tests")
    private = []
    for path in sorted([*ROOT.glob("macrl/**/*.py"), *ROOT.glob("conversion/*.py"), *ROOT.glob("benchmarks/*.py"),
                        *ROOT.glob("tests/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or (node.level == 0 and not (node.module or "").startswith(own)):
                continue
            names = [alias.name for alias in node.names if alias.name.startswith("_") and not alias.name.endswith("__")]
            private += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for name in names]
    assert not private, private


def test_test_modules_import_no_other_test_module():
    """What two test modules share is a helper module of tests/ (tests/__init__.py lists them), never one test
    module's insides imported into another."""
    found = []
    for path in sorted(ROOT.glob("tests/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("test_"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}")
    assert not found, found
