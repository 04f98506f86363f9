"""The installer seam: a Protocol, and the backends that implement it.

An installer receives only verified bytes: the engine calls :meth:`Installer.install` after the
whole candidate matched the signed manifest (checked again right before the call). All three
calls must be idempotent: after a power cut the engine runs ``install`` again in INSTALLING,
``commit`` again in IDLE and ``rollback`` again in FAILED. ``rollback`` restores the previous
image, and is a no-op when there is nothing to restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fota.core.manifest import Manifest
from fota.install.file import FileInstaller


class Installer(Protocol):
    """What the engine needs to put an image in place and take it back."""

    async def install(self, candidate: Path, manifest: Manifest) -> None:
        """Install the verified candidate; raise :class:`~fota.errors.InstallError` on failure."""
        ...

    async def commit(self, manifest: Manifest) -> None:
        """Make the installed image permanent (drop what rollback would need)."""
        ...

    async def rollback(self, manifest: Manifest) -> None:
        """Restore the image that ran before ``manifest``'s was installed."""
        ...


__all__ = ["FileInstaller", "Installer"]
