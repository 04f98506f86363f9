"""The file installer: atomically replace one target file, keeping the previous for rollback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from fota import crashpoints
from fota.core.manifest import Manifest
from fota.errors import InstallError
from fota.fileops import FileOps
from fota.install.base import DONE, Outcome, Progress, copy_durable

log = structlog.get_logger(__name__)


class FileInstaller:
    """Install by atomic replace of ``target``; ``target.previous`` keeps the old file.

    Every step is a copy to a temp file in the target's directory, fsync, ``os.replace`` and a
    directory fsync, so a power cut leaves the old or the new file, never half of one. When
    there was no target file, a marker ``target.absent`` says so, and rollback removes the new
    file.

    Args:
        target: the file the image replaces (its directory must exist).
        mode: permission bits of the installed file (default 0644).
    """

    def __init__(self, target: Path, mode: int = 0o644) -> None:
        self.target = Path(target)
        self.mode = mode
        self.previous = self.target.with_name(self.target.name + ".previous")
        self.absent = self.target.with_name(self.target.name + ".absent")
        self._ops = FileOps()

    def _copy_atomic(self, src: Path, dst: Path, point: str | None = None) -> None:
        tmp = dst.with_name(f".{dst.name}.tmp")
        copy_durable(src, tmp, self.mode)
        if point:
            crashpoints.point(point)
        self._ops.replace(tmp, dst)
        self._ops.fsync_dir(dst.parent)

    def _install(self, candidate: Path) -> None:
        # Keep the running file for rollback, unless a previous attempt already did (install
        # runs again after a crash; what was saved then is the true previous file).
        if not self.previous.exists() and not self.absent.exists():
            if self.target.exists():
                self._copy_atomic(self.target, self.previous)
            else:
                self._ops.write_atomic(self.absent, b"")
            crashpoints.point("file:previous_saved")
        self._copy_atomic(candidate, self.target, "file:temp_written")
        crashpoints.point("file:replaced")

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Copy the candidate over the target atomically."""
        try:
            await asyncio.to_thread(self._install, candidate)
        except OSError as exc:
            raise InstallError(f"file installer: {self.target}: {exc}") from exc
        progress(100)
        log.info("image_installed", target=str(self.target), version=manifest.body.version)
        return DONE

    async def booted(self, manifest: Manifest) -> bool:
        """The file is in place as soon as it is installed (no restart is asked for)."""
        return True

    async def commit(self, manifest: Manifest) -> None:
        """Forget the previous file."""
        self._ops.unlink(self.previous)
        self._ops.unlink(self.absent)
        await asyncio.to_thread(self._ops.fsync_dir, self.target.parent)
        crashpoints.point("file:committed")

    def _rollback(self) -> None:
        if self.previous.exists():
            self._ops.replace(self.previous, self.target)
        elif self.absent.exists():
            self._ops.unlink(self.target)  # there was no file before the install
            self._ops.unlink(self.absent)
        else:
            return  # already rolled back (or nothing was installed)
        self._ops.fsync_dir(self.target.parent)
        crashpoints.point("file:rolled_back")

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Put the previous file back (or remove the new one if there was none)."""
        try:
            await asyncio.to_thread(self._rollback)
        except OSError as exc:
            raise InstallError(f"file installer rollback: {self.target}: {exc}") from exc
        log.info("image_rolled_back", target=str(self.target), version=manifest.body.version)
        return DONE
