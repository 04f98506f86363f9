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

Root file operations (docs/installers.md, :mod:`fota.safefs`): the target's directory is
opened once, walking from ``/`` without following a user's symlink, and refused if a non-root
user can write it or any directory above it (unless ``allow_writable_target``); every file is
created ``O_EXCL | O_NOFOLLOW`` under an unpredictable name relative to that descriptor, and
renamed into place there. The running file is opened ``O_NOFOLLOW | O_NONBLOCK`` (a planted
symlink or FIFO is refused, named); its setuid/setgid bits are kept only if root owns it. The
new file's bytes are copied from the descriptor the signed digest was checked over, exactly
``image_size`` of them, and hashed again as they are copied.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from fota import crashpoints, safefs
from fota.core.manifest import Manifest
from fota.errors import FotaError, InstallError
from fota.install.base import DONE, STATE_LIMIT, Outcome, Progress

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _State:
    update_id: str
    absent: bool  # there was no target file before this update
    committed: bool = False  # the commit started: the copy for rollback may be gone


class FileInstaller:
    """Install by atomic replace of ``target``; ``target.previous`` keeps the old file.

    The new file gets the permission bits of the file it replaces (an executable stays
    executable; setuid and setgid only if root owns that file), or ``mode`` when there was none.
    It is owned by root.

    Args:
        target: the file the image replaces (its directory must exist; the target itself may
            not be a symbolic link).
        mode: permission bits of a file installed where there was none (default 0644).
        allow_writable_target: install even if a non-root user can write the target's
            directory or one above it (a warning is logged; docs/installers.md says why not).
    """

    def __init__(
        self, target: Path, mode: int = 0o644, *, allow_writable_target: bool = False
    ) -> None:
        self.target = Path(target)
        self.mode = mode
        self.allow_writable_target = allow_writable_target
        self.previous = self.target.with_name(self.target.name + ".previous")
        self.state_path = self.target.with_name(self.target.name + ".fota")
        self._name = self.target.name
        self._what = f"file installer {self.target}"

    # -- the directory and the state --------------------------------------------------------

    def _open_dir(self, *, check: bool) -> int:
        if check:
            return safefs.open_trusted_dir(
                self.target.parent, allow_writable=self.allow_writable_target, what=self._what
            )
        return safefs.open_dir(self.target.parent)

    def _fsync_dir(self, dir_fd: int) -> None:
        safefs.fsync_dir(dir_fd)

    def _load(self, dir_fd: int) -> _State | None:
        try:
            raw = safefs.read_small(dir_fd, self.state_path.name, STATE_LIMIT, what=self._what)
            return _State(**json.loads(raw))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, InstallError) as exc:
            raise InstallError(
                f"file installer: state {self.state_path} unreadable: {exc}"
            ) from exc

    def _save(self, dir_fd: int, state: _State) -> None:
        safefs.write_atomic(dir_fd, self.state_path.name, json.dumps(asdict(state)).encode())

    def _open_current(self, dir_fd: int) -> int | None:
        """The file in place (never through a symlink, never a FIFO), or None if there is none."""
        try:
            return safefs.open_regular(dir_fd, self._name, what=self._what)
        except FileNotFoundError:
            return None

    # -- the contract ---------------------------------------------------------------------

    def _install(self, image: safefs.VerifiedImage, update_id: str) -> None:
        dir_fd = self._open_dir(check=True)
        try:
            # What a crash left (unpredictable names: nothing else would ever reuse them).
            safefs.sweep_temps(dir_fd, self._name, self.previous.name, self.state_path.name)
            state = self._load(dir_fd)
            current = self._open_current(dir_fd)
            try:
                st = os.fstat(current) if current is not None else None
                if state is None or state.update_id != update_id:
                    if state is not None:  # an earlier update's leftovers: the file in place stays
                        log.warning("file_installer_stale_state", update_id=state.update_id)
                        safefs.unlink(dir_fd, self.previous.name)
                    # Keep the running file for rollback, then say so. A crash in between copies
                    # it again: the target is still the file that ran.
                    if current is not None and st is not None:
                        safefs.write_atomic(
                            dir_fd,
                            self.previous.name,
                            current,
                            safefs.safe_mode(st),
                            (st.st_uid, st.st_gid),
                            limit=st.st_size,
                        )
                    self._save(dir_fd, _State(update_id, current is None))
                    crashpoints.point("file:previous_saved")
            finally:
                if current is not None:
                    os.close(current)
            mode = safefs.safe_mode(st) if st is not None else self.mode
            safefs.write_atomic(
                dir_fd,
                self._name,
                image.copy_to,
                mode,
                before_replace=lambda: crashpoints.point("file:temp_written"),
            )
            crashpoints.point("file:replaced")
        finally:
            os.close(dir_fd)

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Copy the verified candidate over the target atomically.

        Raises:
            IntegrityError: the candidate does not match the manifest (checked over the
                descriptor the bytes are copied from; only ``image_size`` bytes are used).
            UnsafePathError: a non-root user can write the target's directory (or one above).
            InstallError: anything else that stopped it.
        """
        body = manifest.body

        def run() -> None:
            with safefs.open_verified(
                candidate, body.image_sha256, body.image_size, what="candidate"
            ) as image:
                self._install(image, manifest.update_id)

        try:
            await asyncio.to_thread(run)
        except FotaError:
            raise
        except OSError as exc:
            raise InstallError(f"file installer: {self.target}: {exc}") from exc
        progress(100)
        log.info("image_installed", target=str(self.target), version=body.version)
        return DONE

    async def booted(self, manifest: Manifest) -> bool:
        """The file is in place as soon as it is installed (no restart is asked for)."""
        return True

    def _commit(self, update_id: str) -> None:
        dir_fd = self._open_dir(check=False)
        try:
            state = self._load(dir_fd)
            if state is None or state.update_id != update_id:
                return  # already committed
            self._save(dir_fd, _State(update_id, state.absent, committed=True))
            safefs.unlink(dir_fd, self.previous.name)
            self._fsync_dir(dir_fd)
            safefs.unlink(dir_fd, self.state_path.name)
            self._fsync_dir(dir_fd)
            crashpoints.point("file:committed")
        finally:
            os.close(dir_fd)

    async def commit(self, manifest: Manifest) -> None:
        """Forget the previous file."""
        try:
            await asyncio.to_thread(self._commit, manifest.update_id)
        except FotaError:
            raise
        except OSError as exc:
            raise InstallError(f"file installer commit: {self.target}: {exc}") from exc

    def _rollback(self, update_id: str) -> None:
        dir_fd = self._open_dir(check=False)
        try:
            state = self._load(dir_fd)
            if state is None or state.update_id != update_id:
                return  # nothing of this update's is in place (or it is already undone)
            if state.committed:
                raise InstallError(
                    f"file installer: the commit of {update_id} already started; "
                    f"{self.previous} may be gone, the new file stays"
                )
            if state.absent:
                safefs.unlink(dir_fd, self._name)  # there was no file before the install
            else:
                try:
                    st = os.stat(self.previous.name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None  # a re-run after the previous file was put back
                if st is not None:
                    if not stat.S_ISREG(st.st_mode):  # only fota writes that name
                        raise InstallError(
                            f"file installer: {self.previous} is a {safefs.file_type(st)}, "
                            "not the copy fota made"
                        )
                    os.replace(self.previous.name, self._name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            self._fsync_dir(dir_fd)
            safefs.unlink(dir_fd, self.state_path.name)
            self._fsync_dir(dir_fd)
            crashpoints.point("file:rolled_back")
        finally:
            os.close(dir_fd)

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Put the previous file back (or remove the new one if there was none)."""
        try:
            await asyncio.to_thread(self._rollback, manifest.update_id)
        except FotaError:
            raise
        except OSError as exc:
            raise InstallError(f"file installer rollback: {self.target}: {exc}") from exc
        log.info("image_rolled_back", target=str(self.target), version=manifest.body.version)
        return DONE
