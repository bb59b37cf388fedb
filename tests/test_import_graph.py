"""The import graph of the four packages: the core names no face, the faces name each other not,
only the composition root names itself, and no module takes part in an import cycle.

Every ``.py`` file is read with :mod:`ast` (nothing is imported), and every import counts: module
level, inside functions, ``importlib.import_module("…")`` / ``__import__("…")`` with a literal
name, and relative imports resolved against the importing module's package. For the layering
rules a string literal that spells one of our modules (``"dicom_node.cli"`` in a tuple handed to
importlib, ``"-m", "rtseg.cli"`` for a child process) counts too: naming a face in a string is
depending on it.

Cycles: ``import a.b.c`` is an edge to ``a.b.c``; ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``). The implicit import of
parent packages that Python performs for ``import a.b.c`` is *not* an edge: every submodule
would otherwise "depend" on its package's ``__init__`` and a package that re-exports its own
submodules would show as a false cycle, though Python always finishes the parent first. A
submodule that imports a *name* from its package's ``__init__`` that in turn imports the
submodule is a real cycle (it works only by import order) and is reported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rtseg", "dicom_node", "service", "rtseg_app")
FACES = ("dicom_node", "service")
IMPORT_CALLS = {"import_module", "__import__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _ours(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module ``name`` starts with (``rtseg.ct.load_series`` → ``rtseg.ct``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _from_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _import_targets(tree: ast.AST, importer: str, is_package: bool) -> Iterator[str]:
    """Dotted names imported anywhere in ``tree`` (statements and literal importlib calls)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, importer, is_package)
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in IMPORT_CALLS and isinstance(node.args[0].value, str):
                yield node.args[0].value


def _module_strings(tree: ast.AST, modules: dict[str, Path]) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            yield node.value


def import_graph(with_strings: bool = False) -> dict[str, set[str]]:
    """Module → modules of ours it imports (``with_strings``: also those it names in a string)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {_ours(t, modules) for t in _import_targets(tree, name, path.name == "__init__.py")}
        if with_strings:
            targets |= set(_module_strings(tree, modules))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    graph = import_graph(with_strings=True)
    return sorted(
        f"{src} → {dst}"
        for src, targets in graph.items()
        if _top(src) in importers
        for dst in targets
        if _top(dst) in forbidden and _top(dst) != _top(src)
    )


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit); components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def test_the_walker_sees_imports_inside_functions_and_importlib_strings() -> None:
    source = (
        "import importlib\n"
        "def f():\n"
        "    from service.app import create_app\n"
        "    importlib.import_module('dicom_node.node')\n"
        "from . import jobs\n"
    )
    targets = set(_import_targets(ast.parse(source), "rtseg.cli", is_package=False))
    assert {"service.app.create_app", "dicom_node.node", "rtseg.jobs"} <= targets
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_neither_face() -> None:
    found = _violations(("rtseg",), FACES + ("rtseg_app",))
    assert not found, "rtseg/ names a face or the composition root:\n" + "\n".join(found)


def test_the_faces_do_not_import_each_other() -> None:
    found = _violations(FACES, FACES)
    assert not found, "a face names the other face:\n" + "\n".join(found)


def test_only_the_composition_root_imports_itself() -> None:
    found = _violations(("rtseg", "dicom_node", "service"), ("rtseg_app",))
    assert not found, "a package names the composition root rtseg_app:\n" + "\n".join(found)


def test_no_import_cycles() -> None:
    cycles = strongly_connected(import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(" ↔ ".join(c) for c in cycles)


TEST_ONLY = {"rt-utils": "rt_utils"}  # distribution → module: independent readers the tests use


def test_test_only_readers_are_a_test_extra_and_no_runtime_module_imports_them() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {
        kind: [r for r in reqs if r.split("==")[0] in TEST_ONLY]
        for kind, reqs in {
            "runtime": project["dependencies"],
            "test": project["optional-dependencies"]["test"],
        }.items()
    }
    assert not pinned["runtime"], f"test-only readers among the runtime dependencies: {pinned['runtime']}"
    assert len(pinned["test"]) == len(TEST_ONLY), f"missing from the test extra: {pinned['test']}"
    modules = package_modules()
    found = sorted(
        f"{name} → {target}"
        for name, path in modules.items()
        for target in _import_targets(ast.parse(path.read_text(encoding="utf-8")), name, False)
        if target.split(".")[0] in TEST_ONLY.values()
    )
    assert not found, "runtime code imports a test-only reader:\n" + "\n".join(found)
