"""The file installer: atomically replace one target file, keeping the previous for rollback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import structlog

from fota.core.manifest import Manifest
from fota.errors import InstallError

log = structlog.get_logger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileInstaller:
    """Install by atomic replace of ``target``; ``target.previous`` keeps the old file.

    Every step is a copy to a temp file in the target's directory, fsync, ``os.replace`` and a
    directory fsync, so a power cut leaves the old or the new file, never half of one.

    Args:
        target: the file the image replaces (its directory must exist).
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.previous = self.target.with_name(self.target.name + ".previous")

    def _copy_atomic(self, src: Path, dst: Path) -> None:
        tmp = dst.with_name(f".{dst.name}.tmp")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)

    def _install(self, candidate: Path) -> None:
        # Keep the running file for rollback, unless a previous attempt already saved it
        # (install runs again after a crash; the saved copy is then the true previous file).
        if self.target.exists() and not self.previous.exists():
            self._copy_atomic(self.target, self.previous)
        self._copy_atomic(candidate, self.target)

    async def install(self, candidate: Path, manifest: Manifest) -> None:
        """Copy the candidate over the target atomically."""
        try:
            await asyncio.to_thread(self._install, candidate)
        except OSError as exc:
            raise InstallError(f"file installer: {self.target}: {exc}") from exc
        log.info("image_installed", target=str(self.target), version=manifest.body.version)

    async def commit(self, manifest: Manifest) -> None:
        """Forget the previous file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.previous)

    async def rollback(self, manifest: Manifest) -> None:
        """Put the previous file back (if there was one)."""
        if self.previous.exists():
            try:
                await asyncio.to_thread(os.replace, self.previous, self.target)
                await asyncio.to_thread(_fsync_dir, self.target.parent)
            except OSError as exc:
                raise InstallError(f"file installer rollback: {self.target}: {exc}") from exc
