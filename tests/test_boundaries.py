"""fota/core decides and never waits or touches the world: no I/O imports there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).parent.parent / "fota" / "core"
FORBIDDEN = {
    "asyncio",
    "socket",
    "os",
    "pathlib",
    "time",
    "threading",
    "subprocess",
    "selectors",
    "aiocoap",
    "structlog",
    "logging",
    "random",
    "shutil",
    "tempfile",
    "fota.engine",
    "fota.journal",
    "fota.transport",
    "fota.install",
    "fota.client",
    "fota.cli",
    "fota.testing",
    "fota.download",
}
FORBIDDEN_CALLS = {"open", "print", "input"}
CLOCK_READS = {"now", "utcnow", "today", "time", "monotonic"}
"""datetime is allowed for pure conversions (local time in a given zone), not to read a clock."""


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_has_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    bad = {
        name
        for name in _imports(tree)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not calls & FORBIDDEN_CALLS, f"{path.name} calls {sorted(calls & FORBIDDEN_CALLS)}"
    reads = _clock_reads(tree)
    assert not reads, f"{path.name} reads a clock: {sorted(reads)}"


def _clock_reads(tree: ast.AST) -> set[str]:
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in CLOCK_READS
    }


def test_the_check_catches_a_clock_read() -> None:
    tree = ast.parse(
        "from datetime import datetime\nx = datetime.now()\ny = datetime.fromtimestamp(0)\n"
    )
    assert _clock_reads(tree) == {"now"}


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    tree = ast.parse("import asyncio\nfrom aiocoap import Message\n")
    assert {"asyncio", "aiocoap"} <= _imports(tree)
