"""The HTTP face's structure: blueprints share a context module, never the application factory."""

from __future__ import annotations

import ast
from pathlib import Path

import service

SERVICE = Path(service.__file__).parent
BLUEPRINTS = ("segmentations", "model", "health", "metrics", "openapi")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports, with whether the import sits inside a function."""
    tree = ast.parse(path.read_text())
    nested = {
        id(node)
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(func)
    }
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(name, id(node) in nested) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in nested) for a in node.names]
    return found


def test_no_blueprint_imports_the_app_factory() -> None:
    offenders = sorted(
        f"{module}.py imports {name}"
        for module in BLUEPRINTS
        for name, _ in _imports(SERVICE / f"{module}.py")
        if name == "service.app" or name.startswith("service.app.")
    )
    assert offenders == []


def test_the_factory_imports_its_blueprints_at_module_level() -> None:
    imported = _imports(SERVICE / "app.py")
    hidden = sorted(name for name, inside in imported if inside)
    assert hidden == []
    top = {name for name, inside in imported if not inside}
    assert {f"service.{bp}" for bp in BLUEPRINTS} <= top
