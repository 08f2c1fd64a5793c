"""The package's layers, read from the source (AST, nothing imported): imports run one way, and no two
modules import each other, directly or around a loop, not even inside a function.

    cli  ->  evals, training, server  ->  inference  ->  model  ->  leaves (errors, files, devices, compat)
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "olmo2kit"
# Layer of each subpackage or top-level module; a module may import its own layer's modules and lower
# layers', and a layer shared by subpackages (evals, training, server) does not let them import each other.
# The leaves (rank 0) may use each other; the cycle check keeps that one way too.
RANKS = {"errors": 0, "files": 0, "devices": 0, "compat": 0, "model": 1, "inference": 2, "evals": 3, "training": 3,
         "server": 3, "cli": 4, "__main__": 5}


def module_imports(src: Path) -> dict[str, set[str]]:
    """Each module of the package (its __init__ files left out) and the package modules it imports."""
    files = {}
    for path in (src / PACKAGE).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    imports: dict[str, set[str]] = {}
    for name, path in files.items():
        if path.name == "__init__.py":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: -node.level]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                resolved = resolve(target) if target.split(".")[0] == PACKAGE else None
                # a subpackage's __init__ is a name space here; the package's own is its public API
                is_subpackage = resolved != PACKAGE and resolved and files[resolved].name == "__init__.py"
                if resolved and resolved != name and not is_subpackage:
                    found.add(resolved)
        imports[name] = found
    return imports


def layer(module: str) -> str:
    return module.split(".")[1]


def allowed(module: str, target: str) -> bool:
    source_rank, target_rank = RANKS[layer(module)], RANKS.get(layer(target), 99)
    return layer(target) == layer(module) or target_rank < source_rank or target_rank == source_rank == 0


def problems(src: Path) -> list[str]:
    imports = module_imports(src)
    found = []
    for module, targets in sorted(imports.items()):
        if layer(module) not in RANKS:
            found.append(f"{module} is in no layer: add it to the table in tests/test_layers.py")
            continue
        for target in sorted(targets):
            if target == PACKAGE:
                found.append(f"{module} imports the package's public API {PACKAGE}: import the module it needs")
            elif not allowed(module, target):
                found.append(f"{module} imports {target}, which is not in a lower layer")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(imports)]
    return found


def cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each set of modules that import each other (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(imports.get(module, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module)
    return found


def test_imports_run_one_way_without_cycles():
    assert problems(SRC) == []


def test_every_layer_exists():
    assert {layer(module) for module in module_imports(SRC)} == set(RANKS)


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    return tmp_path


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_an_import_inside_a_function_that_closes_a_cycle_fails(copy):
    append(copy / PACKAGE / "inference" / "sampling.py",
           "\n\ndef _later():\n    from olmo2kit.inference.generation import Generation\n\n    return Generation\n")
    assert any(p.startswith("import cycle: olmo2kit.inference.") and "olmo2kit.inference.sampling" in p
               for p in problems(copy)), problems(copy)


def test_an_upward_import_fails(copy):
    append(copy / PACKAGE / "model" / "sizes.py", "\n\nfrom olmo2kit.inference.sampling import DEFAULTS  # noqa\n")
    assert problems(copy) == [
        "olmo2kit.model.sizes imports olmo2kit.inference.sampling, which is not in a lower layer"
    ]


def test_siblings_of_one_layer_do_not_import_each_other(copy):
    append(copy / PACKAGE / "training" / "data.py", "\n\nfrom ..evals import perplexity  # noqa\n")
    assert problems(copy) == ["olmo2kit.training.data imports olmo2kit.evals.perplexity, which is not in a lower layer"]


def test_a_command_module_importing_the_app_fails(copy):
    append(copy / PACKAGE / "cli" / "models.py", "\n\nfrom olmo2kit.cli.app import app  # noqa\n")
    assert any("olmo2kit.cli.app -> olmo2kit.cli.models -> olmo2kit.cli.app" in p for p in problems(copy))
