"""Dependencies point one way: server -> training -> feedback."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"feedback": {"training", "server"}, "training": {"server"}}


def imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_backwards(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: {package} must not depend on them"


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every class defined in our packages whose name ends in Error."""
    found = []
    for package in ("feedback", "training", "server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                    found.append((module, node.name))
    return found


def test_every_error_has_the_one_root() -> None:
    import importlib

    from feedback.exceptions import LearnloopError

    classes = _error_classes()
    assert len(classes) >= 14
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, LearnloopError), f"{module}.{name} does not derive from LearnloopError"


def feedback_modules() -> list[str]:
    return sorted(f"feedback.{p.stem}" for p in (ROOT / "feedback").glob("*.py") if p.stem != "__init__")


def test_every_feedback_error_derives_from_the_root() -> None:
    from feedback.exceptions import LearnloopError

    errors = [
        cls
        for module in map(importlib.import_module, feedback_modules())
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls.__module__ == module.__name__
    ]
    assert len(errors) >= 7  # the tree in feedback/exceptions.py
    assert [c.__qualname__ for c in errors if not issubclass(c, LearnloopError)] == []


@pytest.mark.parametrize("package", ["feedback", "training", "server"])
def test_only_feedback_exceptions_subclasses_exception(package: str) -> None:
    """One root: every other error class derives from ``LearnloopError``, not from ``Exception``."""
    roots = [
        f"{path.relative_to(ROOT)}:{node.name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id in ("Exception", "BaseException") for b in node.bases)
    ]
    assert roots == (["feedback/exceptions.py:LearnloopError"] if package == "feedback" else [])
