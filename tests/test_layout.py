"""Dependencies point one way: server -> training -> feedback."""

from __future__ import annotations

import ast
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
