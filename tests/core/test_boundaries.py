"""The import rules of docs/architecture.md, read from the source.

fota/core decides and never waits or touches the world: no I/O imports there. Around it, each
layer imports only the layers below it (issue 18). Where a rule lists the exceptions that exist
today, the list only shrinks: an exception that no longer occurs fails its test too, so
whoever removes one also removes it here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).parents[2] / "fota" / "core"
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
    "fota.app.cli",
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


# -- layers (issue 18) ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2] / "fota"

APPLICATION = ("fota.app", "fota.__main__")
"""The program around the library: commands, the daemon, its settings and control socket."""
TOOLS = ("fota.testing", "fota.tools")
"""The test server, the fleet harness, the `fota server` view and the demo."""


def test_the_layout_shows_the_layers() -> None:
    """Issue 18 §4: the application is `fota/app`, the tools `fota/tools` and `fota/testing`;
    every other module of `fota/` is the library. A new module lands in one of them."""
    top = {p.stem for p in ROOT.glob("*.py")} | {
        p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    application = {"cli", "cli_control", "daemon", "settings", "systemd", "control", "logs"}
    assert not top & (application | {"command_handler", "server_view", "demo"}), sorted(top)
    assert {"app", "tools", "testing", "core", "transport", "install"} <= top
    assert (ROOT / "app" / "daemon.py").exists() and (ROOT / "tools" / "server_view.py").exists()


KNOWN_LIBRARY_TO_APPLICATION: set[tuple[str, str]] = set()
"""(Was the config <-> settings cycle: ``fota run --install-config`` is read in settings now.)"""
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()
"""None left (the `fota server` view borrowed two private names of the settings)."""


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _fota_imports() -> dict[str, set[tuple[str, str]]]:
    """Each module's imports of fota modules, at any depth (lazy ones too): (module, name)."""
    found: dict[str, set[tuple[str, str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        seen: set[tuple[str, str]] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "fota" or node.module.startswith("fota."):
                    seen |= {(node.module, alias.name) for alias in node.names}
            elif isinstance(node, ast.Import):
                seen |= {(a.name, "") for a in node.names if a.name.startswith("fota")}
        found[_module(path)] = seen
    return found


IMPORTS = _fota_imports()


def _in(module: str, groups: tuple[str, ...]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in groups)


def _targets(module: str) -> set[str]:
    """The fota modules ``module`` imports (``from fota.x import y`` counts ``fota.x.y``
    only when ``fota.x.y`` is a module)."""
    out = set()
    for source, name in IMPORTS[module]:
        out.add(f"{source}.{name}" if f"{source}.{name}" in IMPORTS else source)
    return out


def test_the_rules_see_every_module() -> None:
    assert "fota.core.machine" in IMPORTS and "fota.transport.window" in IMPORTS
    assert ("fota.core", "codes") in IMPORTS["fota.transport"]


def test_the_core_imports_only_the_core_and_the_errors() -> None:
    """Sans-I/O: the table, the record and the manifest know no engine, journal or network."""
    bad = {
        (m, t)
        for m in IMPORTS
        if _in(m, ("fota.core",))
        for t in _targets(m)
        if not _in(t, ("fota.core", "fota.errors"))
    }
    assert not bad, sorted(bad)


def test_the_transport_imports_only_itself_the_core_and_the_errors() -> None:
    """The network layer hands blocks and announcements up; it never reaches into the engine,
    the journal or the downloader."""
    bad = {
        (m, t)
        for m in IMPORTS
        if _in(m, ("fota.transport",))
        for t in _targets(m)
        if not _in(t, ("fota.transport", "fota.core", "fota.errors"))
    }
    assert not bad, sorted(bad)


def test_effects_and_intake_know_neither_the_engine_nor_the_machine() -> None:
    """Issue 18 §2: the engine drives, effects do. A child task's body (``fota.effects``) and
    the announcement intake (``fota.intake``) return or post events; they never reach into the
    engine or the machine's model."""
    bad = {
        (m, t)
        for m in IMPORTS
        if _in(m, ("fota.effects", "fota.intake"))
        for t in _targets(m)
        if _in(t, ("fota.engine", "fota.core.machine", "fota.client"))
    }
    assert not bad, sorted(bad)
    assert {"fota.effects", "fota.intake"} <= set(IMPORTS)


def test_the_library_imports_neither_the_application_nor_the_tools() -> None:
    """No library module imports `fota.testing`, the CLI, the daemon or its settings.

    `fota/__init__.py` is the public surface: it names everything, lazily.
    """
    found = {
        (m, t)
        for m in IMPORTS
        if m != "fota" and not _in(m, APPLICATION) and not _in(m, TOOLS)
        for t in _targets(m)
        if _in(t, APPLICATION) or _in(t, TOOLS)
    }
    assert found - KNOWN_LIBRARY_TO_APPLICATION == set(), sorted(found)
    assert found >= KNOWN_LIBRARY_TO_APPLICATION, "an exception is gone: drop it from the list"


def test_no_module_imports_another_ones_private_names() -> None:
    found = {
        (m, source, name)
        for m, names in IMPORTS.items()
        for source, name in names
        if name.startswith("_") and not name.startswith("__")
    }
    assert found == KNOWN_PRIVATE, sorted(found)


def test_the_public_surface_is_the_application_s_api() -> None:
    """Issue 18 §4: ``fota.__all__`` names the application's API; installers are in
    ``fota.install``. The old top-level names still resolve, with a DeprecationWarning."""
    import warnings

    import fota
    import fota.install

    installers = {
        "ABInstaller",
        "ArchiveInstaller",
        "ByComponent",
        "CommandInstaller",
        "FileInstaller",
        "Installer",
        "Outcome",
        "RaucInstaller",
        "SwupdateInstaller",
    }
    assert not installers & set(fota.__all__)
    assert installers <= set(fota.install.__all__)
    for name in installers:
        assert getattr(fota.install, name).__name__ == name
    for name in fota.__all__:
        assert getattr(fota, name) is not None, name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fota.FileInstaller is fota.install.FileInstaller
    assert [w.category for w in caught] == [DeprecationWarning]
    assert "fota.install.FileInstaller" in str(caught[0].message)
