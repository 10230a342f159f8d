"""Dependencies point one way: server -> training -> feedback; engines are reached through ``server.engines``."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
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


# The bot client runs in bot processes and imports only the standard library and websockets
# (tested below), so its errors have their own root; their codes mirror ErrorCode (tests/test_client.py).
CLIENT = ROOT / "server" / "client"


def _server_side(package: str) -> list[Path]:
    return [p for p in sorted((ROOT / package).rglob("*.py")) if CLIENT not in p.parents]


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every class defined in our packages whose name ends in Error."""
    found = []
    for package in ("feedback", "training", "server"):
        for path in _server_side(package):
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
        for path in _server_side(package)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id in ("Exception", "BaseException") for b in node.bases)
    ]
    assert roots == (["feedback/exceptions.py:LearnloopError"] if package == "feedback" else [])


ENGINES = ROOT / "server" / "engines"
ENGINE_MODULES = sorted(p.stem for p in ENGINES.glob("*.py") if p.stem != "__init__")


def engine_module_imports(path: Path) -> list[str]:
    """The ``server.engines.<module>`` imports of a file (``from server.engines import <module>`` too)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("server.engines.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("server.engines."):
                found.append(node.module)
            elif node.module == "server.engines":
                found += [f"server.engines.{a.name}" for a in node.names if a.name in ENGINE_MODULES]
    return found


def test_engine_modules_are_imported_through_the_package_only() -> None:
    """Outside ``server/engines/``, engines come from ``server.engines`` (``create_engine`` and its
    re-exports), never from one of its modules."""
    assert ENGINE_MODULES  # the check below looks at something
    for folder in ("server", "training", "feedback", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ENGINES in path.parents:
                continue
            bad = engine_module_imports(path)
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}: import from server.engines instead"


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engines_do_not_import_training(module: str) -> None:
    """What an engine needs from training (adapter checks, the cache folder) is passed in by its caller."""
    bad = imported_packages(ENGINES / f"{module}.py") & {"training"}
    assert not bad, f"server/engines/{module}.py imports training: pass what it needs in instead"


def test_importing_the_engines_package_loads_no_engine() -> None:
    """llama_cpp, httpx and torch are imported when their engine is chosen, not with ``server.engines``."""
    code = (
        "import sys, server.engines\n"
        "heavy = {'llama_cpp', 'httpx', 'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert server.engines.fit_prompt and server.engines.create_engine\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_bot_client_imports_neither_the_model_stack_nor_the_store() -> None:
    """A bot process imports server.client: it must not pull in torch, the store or the web stack."""
    import subprocess
    import sys

    heavy = ["torch", "transformers", "aiosqlite", "fastapi", "feedback", "training"]
    probe = (
        "import sys, server.client; print(sorted(m for m in sys.modules"
        f" if m in {heavy!r} or m.startswith('server.') and not m.startswith('server.client')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing server.client loaded {out.stdout.strip()}"
    # the package above it stays import-free too, or every bot would pay for what it imports
    tree = ast.parse((ROOT / "server" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imported_packages(ROOT / "server" / "client" / "__init__.py") <= {"server"}
    for path in sorted((ROOT / "server" / "client").glob("*.py")):
        outside = {p for p in imported_packages(path) if p not in sys.stdlib_module_names} - {"server", "websockets"}
        assert not outside, f"{path.name} imports {outside}: the client needs only the standard library and websockets"


# configuration comes from one place: server/settings.py (and the model cache folder helper,
# which the training subprocess and the CLI need before any settings exist)
ENVIRONMENT_READERS = {"server/settings.py", "training/models.py"}


def environment_reads(path: Path) -> list[int]:
    """Lines that read the process environment (``os.environ`` or ``os.getenv``), except
    ``os.environ.setdefault("KNOB", "value")``, which sets a third-party library's knob."""
    tree = ast.parse(path.read_text())
    knobs = {
        id(node.func.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "setdefault"
        and all(isinstance(a, ast.Constant) for a in node.args)
    }
    lines = []
    for node in ast.walk(tree):
        is_os = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
        if is_os and (node.attr == "getenv" or (node.attr == "environ" and id(node) not in knobs)):
            lines.append(node.lineno)
    return lines


def test_only_settings_read_the_environment() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("server", "training", "feedback")
        for path in sorted((ROOT / package).rglob("*.py"))
        if str(path.relative_to(ROOT)) not in ENVIRONMENT_READERS
        for line in environment_reads(path)
    ]
    assert offenders == [], "read settings (server/settings.py) instead of the environment: " + ", ".join(offenders)
