"""The installer seam: the contract (:mod:`fota.install.base`) and the backends that implement it.

Backends (docs/installers.md): ``file`` (atomic replace of one file), ``ab`` (two slots, a
symlink flip or a bootloader switch), ``archive`` (a tar bundle with a recipe: files placed
atomically per directory, hooks, package steps), ``command`` (an integrator's program), and
adapters for ``rauc`` and ``swupdate``. :func:`build` makes one from a settings table;
:class:`ByComponent` picks one by the manifest's component.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fota.core.manifest import Component, Manifest
from fota.errors import ConfigError, InstallError
from fota.install.base import DONE, RESTART, Installer, Outcome, Progress
from fota.install.file import FileInstaller
from fota.install.spec import Context, Spec

if TYPE_CHECKING:
    from fota.install.ab import ABInstaller
    from fota.install.archive import ArchiveInstaller
    from fota.install.command import CommandInstaller
    from fota.install.rauc import RaucInstaller
    from fota.install.swupdate import SwupdateInstaller

KINDS = ("file", "ab", "archive", "command", "rauc", "swupdate")
COMPONENTS = tuple(c.name.lower() for c in Component)


def build(name: str, table: Mapping[str, Any], context: Context) -> Installer:
    """Make the installer a settings table describes.

    Args:
        name: the table's name, for messages (``installers.firmware``).
        table: its settings; ``kind`` picks the backend.
        context: the state directory and the default command timeout.

    Raises:
        ConfigError: naming the key at fault.
    """
    spec = Spec(name, table)
    kind = spec.string("kind")
    if kind not in KINDS:
        raise ConfigError(f"{name}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    installer: Installer
    if kind == "file":
        installer = FileInstaller(
            spec.path("target"),
            allow_writable_target=spec.flag("allow_writable_target", False),
        )
    elif kind == "ab":
        from fota.install.ab import ABInstaller

        slots = spec.mapping("slots")
        installer = ABInstaller(
            {str(k): Spec(f"{name}.slots", slots).path(k) for k in slots},
            context.state_dir,
            link=spec.path("link", None),
            switch_command=spec.argv("switch_command", None),
            booted_command=spec.argv("booted_command", None),
            commit_command=spec.argv("commit_command", None),
            timeout=spec.number("timeout", context.timeout),
            allow_writable_target=spec.flag("allow_writable_target", False),
        )
    elif kind == "command":
        from fota.install.command import CommandInstaller

        env = spec.mapping("env", {})
        installer = CommandInstaller(
            spec.argv("command"),
            context.state_dir,
            timeout=spec.number("timeout", 600.0),
            env={str(k): Spec(f"{name}.env", env).string(k) for k in env},
        )
    else:
        from importlib import import_module

        module = import_module(f"fota.install.{kind}")
        installer = module.from_spec(spec, context)
    spec.done()
    return installer


class ByComponent:
    """Route each update to the installer configured for its manifest's component.

    Args:
        installers: installer by component name (``firmware``, ``application``, ``other``)
            and, optionally, ``default`` for the components not named.

    Raises:
        ConfigError: an unknown component name.
    """

    def __init__(self, installers: Mapping[str, Installer]) -> None:
        unknown = set(installers) - {*COMPONENTS, "default"}
        if unknown:
            raise ConfigError(
                f"installers: unknown component {sorted(unknown)[0]!r}, use one of "
                f"{', '.join(COMPONENTS)} or default"
            )
        self.installers = dict(installers)

    def pick(self, manifest: Manifest) -> Installer:
        """The installer for ``manifest``'s component.

        Raises:
            InstallError: none is configured for it (the update fails before anything changes).
        """
        component = manifest.body.component.name.lower()
        found = self.installers.get(component) or self.installers.get("default")
        if found is None:
            raise InstallError(f"no installer is configured for component {component!r}")
        return found

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Install with the component's installer."""
        return await self.pick(manifest).install(candidate, manifest, progress)

    async def booted(self, manifest: Manifest) -> bool:
        """Ask the component's installer."""
        return await self.pick(manifest).booted(manifest)

    async def commit(self, manifest: Manifest) -> None:
        """Commit with the component's installer."""
        await self.pick(manifest).commit(manifest)

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Roll back with the component's installer (none configured: nothing to undo)."""
        try:
            installer = self.pick(manifest)
        except InstallError:
            return DONE
        return await installer.rollback(manifest)


def from_config(tables: Mapping[str, Mapping[str, Any]], context: Context) -> Installer:
    """The installer for ``Config.installers``: one table, or one per component.

    Raises:
        ConfigError: naming the key at fault.
    """
    built = {
        component: build(f"installers.{component}", table, context)
        for component, table in tables.items()
    }
    return ByComponent(built)


_ELSEWHERE = {
    "ABInstaller": "fota.install.ab",
    "ArchiveInstaller": "fota.install.archive",
    "CommandInstaller": "fota.install.command",
    "RaucInstaller": "fota.install.rauc",
    "SwupdateInstaller": "fota.install.swupdate",
}
"""The installers with modules of their own, imported on first use (PEP 562)."""


def __getattr__(name: str) -> Any:
    module = _ELSEWHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fota.install' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DONE",
    "RESTART",
    "ABInstaller",
    "ArchiveInstaller",
    "ByComponent",
    "CommandInstaller",
    "Context",
    "FileInstaller",
    "Installer",
    "Outcome",
    "Progress",
    "RaucInstaller",
    "SwupdateInstaller",
    "build",
    "from_config",
]
