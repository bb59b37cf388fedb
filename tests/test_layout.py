"""The test tree itself: it mirrors the packages, imports without sys.path edits, one free_port."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACKAGES = ("rtseg", "dicom_node", "service", "rtseg_app")
# checks of the repository's structure as a whole belong to no one package
STRUCTURE_TESTS = {"test_layout.py", "test_import_graph.py"}
SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[.*\]\s*=|\s*[+]?=)")
PORT_ZERO_BIND = re.compile(r"""\.bind\(\(\s*["']127\.0\.0\.1["']\s*,\s*0\s*\)\)""")
BANNER = re.compile(r"^\s*#\s*-{3,}")


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _test_modules() -> list[Path]:
    return [p for p in _python_files() if p.name.startswith("test_")]


def test_every_test_module_sits_in_the_folder_of_the_package_it_tests() -> None:
    misplaced = []
    for path in _test_modules():
        folder = path.parent.relative_to(TESTS)
        if folder == Path("."):
            if path.name not in STRUCTURE_TESTS:
                misplaced.append(str(path.relative_to(REPO)))
        elif not (REPO / folder / "__init__.py").is_file():  # tests/rtseg/model ↔ rtseg/model/
            misplaced.append(str(path.relative_to(REPO)))
    assert misplaced == [], f"test modules outside a mirrored package folder: {misplaced}"


def test_test_module_names_are_unique() -> None:
    # pytest's default "prepend" import mode imports test modules by their bare names
    counts = Counter(p.name for p in _test_modules())
    assert [name for name, n in counts.items() if n > 1] == []


def test_no_test_file_edits_sys_path() -> None:
    editing = [
        f"{p.relative_to(REPO)}:{n}"
        for p in _python_files()
        if p != Path(__file__).resolve()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if SYS_PATH_EDIT.search(line)
    ]
    assert editing == [], f"sys.path edits (use pythonpath in pyproject.toml): {editing}"


def test_one_function_finds_a_free_port() -> None:
    packages = [
        p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py")) if "__pycache__" not in p.parts
    ]
    binders = [
        f"{p.relative_to(REPO)}:{n}"
        for p in [*_python_files(), *packages]
        if p != Path(__file__).resolve()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if PORT_ZERO_BIND.search(line)
    ]
    assert len(binders) == 1 and binders[0].startswith("rtseg/net.py:"), binders


def test_conftest_files_carry_no_banners() -> None:
    banners = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()}"
        for p in sorted(TESTS.rglob("conftest.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if BANNER.match(line)
    ]
    assert banners == [], f"banner comments in conftest files: {banners}"
