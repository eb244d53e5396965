"""The package's layers import one way: backend -> passes -> ops -> kernels, never back up.

Read from the source (every ``import`` statement, function-level ones included), so it
holds whatever order the modules happen to be imported in.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "int8fx"

# Lowest first. A module may import modules of its own layer or below.
LAYERS = [
    ("leaves", ["int8fx.paths", "int8fx.reference", "int8fx.config", "int8fx.report"]),
    ("kernels", ["int8fx.kernels"]),
    ("ops", ["int8fx.ops"]),
    ("weights and passes", ["int8fx.weights", "int8fx.passes"]),
    ("eager API", ["int8fx.functional", "int8fx.nn", "int8fx.swap"]),
    ("backend", ["int8fx.backend"]),
    ("front ends", ["int8fx.cli", "int8fx.hf", "int8fx.__main__", "int8fx"]),
]


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_int8fx_modules(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.startswith("int8fx")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("int8fx"):
            # `from int8fx import reference` imports the module int8fx.reference
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/")
                ).is_dir()
                imported.add(candidate if is_module else node.module)
    return imported


def upward_imports(path: Path, module: str) -> list[str]:
    return [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for target in sorted(imported_int8fx_modules(path))
        if layer_of(target) > layer_of(module)
    ]


def test_no_module_imports_a_layer_above_its_own():
    offences = [line for path in sorted(PACKAGE.rglob("*.py")) for line in upward_imports(path, module_name(path))]
    assert not offences, "\n".join(offences)


def test_the_checker_sees_an_upward_import(tmp_path):
    # The rule must be able to fail: an ops-layer file importing the backend, even inside a function.
    source = tmp_path / "ops.py"
    source.write_text("def f():\n    from int8fx.backend import compiler\n    import int8fx.passes\n")
    assert upward_imports(source, "int8fx.ops") == [
        "int8fx.ops (ops) imports int8fx.backend.compiler (backend)",
        "int8fx.ops (ops) imports int8fx.passes (weights and passes)",
    ]
