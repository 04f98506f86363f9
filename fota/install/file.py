"""The file installer: atomically replace one target file, keeping the previous for rollback.

Durable state, beside the target (so on the same filesystem):

* ``target.previous``: a copy of the file that ran before, for rollback;
* ``target.fota``: which update it belongs to, whether there was no file before (rollback
  then removes the new one), and whether the commit started (the copy may be gone: a rollback
  then fails instead of claiming the old file is back).

Each step is atomic (temp file in the same directory, fsync, ``os.replace``, directory fsync)
and ordered so that a re-run after a crash at any point does the right thing. A state left by
an earlier update that ended without finishing its commit or rollback is discarded by the next
install: the file in place is then the one to keep.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from fota import crashpoints
from fota.core.manifest import Manifest
from fota.errors import InstallError
from fota.fileops import FileOps
from fota.install.base import DONE, Outcome, Progress, copy_durable, load_state, save_state

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _State:
    update_id: str
    absent: bool  # there was no target file before this update
    committed: bool = False  # the commit started: the copy for rollback may be gone


class FileInstaller:
    """Install by atomic replace of ``target``; ``target.previous`` keeps the old file.

    The new file gets the permission bits of the file it replaces (an executable stays
    executable), or ``mode`` when there was none.

    Args:
        target: the file the image replaces (its directory must exist).
        mode: permission bits of a file installed where there was none (default 0644).
    """

    def __init__(self, target: Path, mode: int = 0o644) -> None:
        self.target = Path(target)
        self.mode = mode
        self.previous = self.target.with_name(self.target.name + ".previous")
        self.state_path = self.target.with_name(self.target.name + ".fota")
        self._ops = FileOps()

    # -- state ----------------------------------------------------------------------------

    def _load(self) -> _State | None:
        return load_state(self.state_path, "file installer", lambda d: _State(**d))

    def _copy_atomic(self, src: Path, dst: Path, mode: int, point: str | None = None) -> None:
        tmp = dst.with_name(f".{dst.name}.tmp")
        copy_durable(src, tmp, mode)
        if point:
            crashpoints.point(point)
        self._ops.replace(tmp, dst)
        self._ops.fsync_dir(dst.parent)

    def _mode_of(self, path: Path) -> int:
        try:
            return os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            return self.mode

    # -- the contract ---------------------------------------------------------------------

    def _install(self, candidate: Path, update_id: str) -> None:
        state = self._load()
        if state is None or state.update_id != update_id:
            if state is not None:  # an earlier update's leftovers: the file in place stays
                log.warning("file_installer_stale_state", update_id=state.update_id)
                self._ops.unlink(self.previous)
            # Keep the running file for rollback, then say so. A crash in between copies it
            # again: the target is still the file that ran.
            absent = not self.target.exists()
            if not absent:
                self._copy_atomic(self.target, self.previous, self._mode_of(self.target))
            save_state(self.state_path, _State(update_id, absent))
            crashpoints.point("file:previous_saved")
        self._copy_atomic(candidate, self.target, self._mode_of(self.target), "file:temp_written")
        crashpoints.point("file:replaced")

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Copy the candidate over the target atomically."""
        try:
            await asyncio.to_thread(self._install, candidate, manifest.update_id)
        except OSError as exc:
            raise InstallError(f"file installer: {self.target}: {exc}") from exc
        progress(100)
        log.info("image_installed", target=str(self.target), version=manifest.body.version)
        return DONE

    async def booted(self, manifest: Manifest) -> bool:
        """The file is in place as soon as it is installed (no restart is asked for)."""
        return True

    def _commit(self, update_id: str) -> None:
        state = self._load()
        if state is None or state.update_id != update_id:
            return  # already committed
        save_state(self.state_path, _State(update_id, state.absent, committed=True))
        self._ops.unlink(self.previous)
        self._ops.fsync_dir(self.target.parent)
        self._ops.unlink(self.state_path)
        self._ops.fsync_dir(self.target.parent)
        crashpoints.point("file:committed")

    async def commit(self, manifest: Manifest) -> None:
        """Forget the previous file."""
        try:
            await asyncio.to_thread(self._commit, manifest.update_id)
        except OSError as exc:
            raise InstallError(f"file installer commit: {self.target}: {exc}") from exc

    def _rollback(self, update_id: str) -> None:
        state = self._load()
        if state is None or state.update_id != update_id:
            return  # nothing of this update's is in place (or it is already undone)
        if state.committed:
            raise InstallError(
                f"file installer: the commit of {update_id} already started; "
                f"{self.previous} may be gone, the new file stays"
            )
        if state.absent:
            self._ops.unlink(self.target)  # there was no file before the install
        elif self.previous.exists():
            self._ops.replace(self.previous, self.target)
        # else: a re-run after the previous file was put back
        self._ops.fsync_dir(self.target.parent)
        self._ops.unlink(self.state_path)
        self._ops.fsync_dir(self.target.parent)
        crashpoints.point("file:rolled_back")

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Put the previous file back (or remove the new one if there was none)."""
        try:
            await asyncio.to_thread(self._rollback, manifest.update_id)
        except OSError as exc:
            raise InstallError(f"file installer rollback: {self.target}: {exc}") from exc
        log.info("image_rolled_back", target=str(self.target), version=manifest.body.version)
        return DONE
