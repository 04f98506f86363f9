"""The SWUpdate adapter: install a signed ``.swu`` with ``swupdate -i``; keep what it overwrites.

The candidate is an SWUpdate image (a cpio archive: ``sw-description`` first, its CMS
signature ``sw-description.sig`` second, then the images) that fota verified against its own
signed manifest; SWUpdate then checks the CMS signature against ``-k``, the hardware
compatibility against ``-H`` and every image's sha256, and runs the handlers.

Two ways to use it:

* **single copy** (``restart = false``, the default): the image is in place when ``swupdate``
  returns. So that such an install can still be rolled back, fota copies the files that the
  ``.swu`` overwrites (the ``backup`` setting: absolute paths of regular files) aside before
  ``swupdate -i`` runs and puts them back atomically on rollback, as
  :class:`fota.install.file.FileInstaller` does (a file that did not exist is removed again).
* **dual copy** (``restart = true``): the ``.swu`` writes the other copy and switches the
  bootloader (an SWUpdate ``bootenv`` section or ``-B uboot``); the new image runs after a
  restart. ``booted_command`` (required then) exits 0 iff the new image runs;
  ``rollback_command`` switches back, ``commit_command`` confirms (``fw_setenv ustate 0``).
  Each command gets ``FOTA_UPDATE_ID``, ``FOTA_VERSION`` and ``FOTA_COMPONENT``; each must be
  idempotent (set a state, never toggle one): it may run again after a crash.

Contract with the tool (SWUpdate 2022.12, the Debian 12 build; docs/installers.md)
---------------------------------------------------------------------------------

``[*swupdate, "-i", <copy>, *args]`` through :func:`fota.hooks.run`, with ``TMPDIR`` set
to a fresh private directory for every run (under ``tmpdir``, default the system's temporary
directory, mode 0700, removed afterwards). ``<copy>`` is a copy, in that directory, of exactly
the ``image_size`` bytes whose digest fota checked, read from the descriptor it checked them
over (hashed again as they are copied): nothing a writer appends to or swaps at the candidate's
path reaches swupdate. So ``tmpdir`` needs room for the image twice (the copy, and what
swupdate extracts). ``swupdate -i`` extracts every image to ``$TMPDIR`` (it needs
free space for the image) and creates its IPC sockets ``$TMPDIR/sockinstctrl`` and
``$TMPDIR/swupdateprog`` there: two runs sharing a TMPDIR corrupt each other's images (``HASH
mismatch``), and a run with the default ``/tmp`` removes a running swupdate daemon's socket.
A socket path has at most 107 bytes, so ``tmpdir`` must be short.

The Debian build enforces signed images and checks hardware compatibility: ``args`` must hold
``-k <CA certificate PEM>`` (a certificate, not a bare public key; or ``-f <cfg>`` with a
``public-key-file``) and ``-H <board>:<revision>`` (or ``/etc/hwrevision`` must exist).

Exit status and output (stdout and stderr merged):

* 0: installed.
* 1 with a ``SWUPDATE successful`` line and no ``[ERROR]`` line: installed too. About 5-12 % of
  successful runs exit 1: at exit swupdate signals its forked ``chunks_downloader`` child,
  which exits 1, and swupdate's SIGCHLD handler exits with that status. A warning is logged.
  (The opposite, a failed run with status 0, was never seen.)
* anything else: :class:`InstallError` naming the first ``[ERROR] : SWUPDATE failed [n] ERROR
  : <message>`` (``HASH mismatch : ...``, ``Signature verification failed``, ``Authentication
  of all signatures failed``, ``SW not compatible with hardware``) and the last one (``Image
  invalid or corrupted. Not installing ...``), or the last line if there is none (``Error:
  SWUpdate is built for signed images, provide a public key file.``). The final ``SWUpdate
  *failed* !`` line is sometimes missing (not flushed before exit): it is not relied on.
* the timeout: the process group is killed (a leftover child once held the output open in
  about 1 of 250 runs); if swupdate itself had already exited, its status is judged as above.

Progress: ``swupdate -i`` prints no percentages at any log level (they are published only on
the ``$TMPDIR/swupdateprog`` socket, for ``swupdate-progress``/``swupdate-ipc monitor``), so
fota reports ``progress(100)`` when it returns; the ``[INFO]`` lines are logged, not parsed.
Crash point ``swupdate:installed`` comes right after a successful run.

What is journaled where
-----------------------

``<state_dir>/swupdate/state.json`` (atomic writes): the update id, the backup paths as they
were when the install started and whether ``swupdate`` finished. ``<state_dir>/swupdate/backup/``
holds ``<n>`` (a durable copy of the n-th path, with its mode and owner; setuid/setgid only if
root owned it) or ``<n>.absent`` (it did not exist). Both are removed by commit and by a
finished rollback.

Backed-up paths are read and restored as :mod:`fota.safefs` says: each one's directory is
opened once from ``/`` and refused if a non-root user can write it or one above it (unless
``allow_writable_target``); the file is opened ``O_NOFOLLOW | O_NONBLOCK`` (a symlink, FIFO or
device there is refused, named); a restored file is a new one, created ``O_EXCL | O_NOFOLLOW``
under an unpredictable name, ``fchown``/``fchmod`` on its descriptor, renamed over the path.

Idempotence
-----------

* ``install``: the state file is written before anything else; a backup that exists is never
  made again (it is the true previous file, whatever a crashed run left in place). After a
  finished run ``swupdate`` does not run again: :data:`DONE` (single copy), :data:`RESTART` or,
  if ``booted_command`` says the new image already runs, :data:`DONE`. A run that did not
  finish runs again (single copy: writing the same files again is harmless; dual copy: unless
  the new image already runs, in which case it finished).
* ``booted``: single copy: true. Dual copy: ``booted_command``.
* ``commit``: ``commit_command`` (again, until the state file is gone), then the backups go.
* ``rollback``: restores every backup (again: the same bytes), runs ``rollback_command``; then
  :data:`RESTART` if ``restart`` is set and ``booted_command`` says the new image still runs
  (the state stays, the next call after the restart finishes; without a ``rollback_command``
  nothing would switch back, so that is an :class:`InstallError`), else the backups and the
  state go and it is :data:`DONE` (also with ``restart`` set when the previous copy runs: no
  restart yet, or the bootloader fell back). No state for this update: nothing was changed,
  :data:`DONE`.

What does not work here (Debian 12, no bootloader)
--------------------------------------------------

``-B uboot`` without ``/etc/fw_env.config`` writes the files and then fails (``Configuration
file /etc/fw_env.config wrong or corrupted`` / ``Cannot persistently store INSTALLED update
state.``, status 1; ``-m -M`` avoid it); ``-B grub`` fails without ``/boot/grub/grubenv``. The
default bootloader interface is ``none``: no ``ustate`` is written. ``installed-directly = true;``
writes a file *before* its hash is checked (a bad image overwrites the target): avoid it, or
list the file in ``backup``. ``rawfile`` creates files with mode 0600 and does not create
missing directories (``create-destination`` does not help in 2022.12).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from fota import crashpoints, hooks, safefs
from fota.core.manifest import Manifest
from fota.errors import ConfigError, FotaError, InstallError
from fota.fileops import FileOps
from fota.install.base import (
    DONE,
    RESTART,
    Outcome,
    Progress,
    load_state,
    save_state,
)
from fota.install.spec import Context, Spec

log = structlog.get_logger(__name__)

STATE_DIR = "swupdate"
STATE_NAME = "state.json"
BACKUP_DIR = "backup"
SOCKET_LIMIT = 107
"""Longest unix socket path (``sun_path`` is 108 bytes with its terminating zero)."""
MAX_LINES = 20000

_ERROR = re.compile(r"^\[ERROR\]\s*:\s*(?:SWUPDATE failed \[\d+\]\s*)?(?:ERROR\s*:\s*)?(.*)$")
_SUCCESS = re.compile(r"SWUPDATE successful|SWUpdate was successful")
_GENERIC = ("SWUpdate *failed* !", "Image invalid or corrupted. Not installing ...")


@dataclass(frozen=True, slots=True)
class Verdict:
    """How a ``swupdate -i`` run ended, judged from its status and its output.

    Attributes:
        ok: the image is installed.
        quirk: ok, though the status said otherwise (status 1 after success, a leftover child).
        message: why it failed (empty when ok).
    """

    ok: bool
    quirk: bool = False
    message: str = ""


def error_text(line: str) -> str | None:
    """The message of an ``[ERROR] : SWUPDATE failed [n] ERROR : <message>`` line, or None."""
    m = _ERROR.match(line.strip())
    return m.group(1).strip() if m is not None else None


def classify(code: int, lines: Sequence[str], *, timed_out: bool = False) -> Verdict:
    """Judge a ``swupdate -i`` run by its exit status and its (merged) output lines."""
    errors = [text for line in lines if (text := error_text(line))]
    success = any(_SUCCESS.search(line) for line in lines)
    if code == 0:
        return Verdict(True, quirk=timed_out)
    if code == 1 and success and not errors:
        return Verdict(True, quirk=True)
    if timed_out and code < 0:
        return Verdict(False, message="timed out")
    status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    if errors:
        specific = [e for e in errors if e not in _GENERIC]
        first = (specific or errors)[0]
        last = next((e for e in reversed(errors) if e != first and e != _GENERIC[0]), None)
        return Verdict(False, message=f"{status}: {first}" + (f" ({last})" if last else ""))
    tail = [line.strip() for line in lines if line.strip()]
    return Verdict(False, message=status + (f": {tail[-1]}" if tail else ""))


@dataclass(frozen=True, slots=True)
class _Record:
    update_id: str
    paths: tuple[str, ...]
    installed: bool = False


class SwupdateInstaller:
    """Install ``.swu`` images with ``swupdate -i``; roll back by restoring the backed-up files.

    Args:
        state_dir: fota's state directory; the installer keeps ``swupdate/`` in it.
        swupdate: the program and its first arguments.
        args: arguments after ``-i <candidate>`` (``-k``, ``-H``, ``-f``, ...).
        restart: the new image runs only after a restart (dual copy).
        booted_command: with ``restart``: exits 0 iff the new image runs (1: it does not).
        commit_command: run at commit.
        rollback_command: run at rollback, after the backups are restored.
        backup: absolute paths of the files the image overwrites, restored on rollback.
        timeout: seconds each command may take.
        tmpdir: where each run's private ``TMPDIR`` is made (short: sockets live there).
        allow_writable_target: back up and restore ``backup`` paths even if a non-root user
            can write their directories (a warning is logged; docs/installers.md says why not).

    Raises:
        ConfigError: an empty command, ``restart`` without ``booted_command``, a relative or
            repeated backup path, a ``tmpdir`` too long for a socket path.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        swupdate: Sequence[str] = ("swupdate",),
        args: Sequence[str] = (),
        restart: bool = False,
        booted_command: Sequence[str] | None = None,
        commit_command: Sequence[str] | None = None,
        rollback_command: Sequence[str] | None = None,
        backup: Sequence[Path | str] = (),
        timeout: float = 600.0,
        tmpdir: Path | None = None,
        allow_writable_target: bool = False,
    ) -> None:
        if not swupdate:
            raise ConfigError("swupdate installer: swupdate: must not be empty")
        if restart and not booted_command:
            raise ConfigError("swupdate installer: booted_command is needed with restart = true")
        paths = [Path(p) for p in backup]
        for p in paths:
            if not p.is_absolute():
                raise ConfigError(f"swupdate installer: backup: {str(p)!r} is not absolute")
        if len({os.path.normpath(p) for p in paths}) != len(paths):
            raise ConfigError("swupdate installer: backup: a path is named twice")
        self.swupdate = list(swupdate)
        self.args = list(args)
        self.restart = restart
        self.booted_command = list(booted_command or [])
        self.commit_command = list(commit_command or [])
        self.rollback_command = list(rollback_command or [])
        self.backup = tuple(str(p) for p in paths)
        self.timeout = timeout
        self.allow_writable_target = allow_writable_target
        self.tmpdir = Path(tmpdir) if tmpdir is not None else Path(tempfile.gettempdir())
        # mkdtemp's name (fota-swu- + 8) and the longest socket name, "sockinstctrl"
        if len(str(self.tmpdir / ("fota-swu-" + "n" * 8) / "sockinstctrl")) > SOCKET_LIMIT:
            raise ConfigError(
                f"swupdate installer: tmpdir: {str(self.tmpdir)!r} is too long for swupdate's "
                f"IPC socket paths (at most {SOCKET_LIMIT} bytes)"
            )
        self.dir = Path(state_dir) / STATE_DIR
        self.state_path = self.dir / STATE_NAME
        self.backup_dir = self.dir / BACKUP_DIR
        self._ops = FileOps()

    # -- the state file and the backups -------------------------------------------------------

    def _load(self) -> _Record | None:
        return load_state(
            self.state_path,
            "swupdate installer",
            lambda d: _Record(d["update_id"], tuple(d["paths"]), bool(d["installed"])),
        )

    def _save(self, record: _Record) -> None:
        save_state(self.state_path, record, make_dir=True)

    def _mine(self, manifest: Manifest) -> _Record | None:
        record = self._load()
        return record if record is not None and record.update_id == manifest.update_id else None

    def _begin(self, record: _Record) -> None:
        """Drop what an abandoned update left, then journal this one (before any backup)."""
        if self.backup_dir.exists():
            log.warning("swupdate_stale_backup_dropped", path=str(self.backup_dir))
            shutil.rmtree(self.backup_dir)
        self._save(record)

    def _open_backup_dir(self, *, create: bool) -> int:
        if create:
            self.backup_dir.mkdir(parents=True, exist_ok=True)
        return safefs.open_dir(self.backup_dir)

    def _open_target(self, path: Path) -> tuple[int, str] | None:
        """A backed-up path's directory (checked: fota writes there on rollback) and name."""
        try:
            return safefs.open_parent(
                path,
                what="swupdate installer backup",
                allow_writable=self.allow_writable_target,
            )
        except FileNotFoundError:
            return None  # its directory does not exist (yet): the file does not either

    def _back_up(self, record: _Record) -> None:
        backup_fd = self._open_backup_dir(create=True)
        try:
            for i, name in enumerate(record.paths):
                self._back_up_one(backup_fd, i, Path(name))
        finally:
            os.close(backup_fd)
        log.info("swupdate_backed_up", paths=list(record.paths))

    def _back_up_one(self, backup_fd: int, i: int, path: Path) -> None:
        copy, absent = str(i), f"{i}.absent"
        if any(_exists(backup_fd, made) for made in (copy, absent)):
            return  # made by an earlier run: that is the true previous file
        opened = self._open_target(path)
        if opened is None:
            safefs.write_atomic(backup_fd, absent, b"")
            return
        dir_fd, base = opened
        try:
            try:
                # O_NOFOLLOW | O_NONBLOCK, type checked on the descriptor: a symlink, a FIFO or
                # a device at the path is refused, named, and never read.
                src = safefs.open_regular(dir_fd, base, what=f"swupdate installer backup {path}")
            except FileNotFoundError:
                safefs.write_atomic(backup_fd, absent, b"")
                return
            try:
                st = os.fstat(src)
                safefs.write_atomic(
                    backup_fd,
                    copy,
                    src,
                    safefs.safe_mode(st),
                    (st.st_uid, st.st_gid),
                    limit=st.st_size,
                )
            finally:
                os.close(src)
        finally:
            os.close(dir_fd)

    def _restore(self, record: _Record) -> None:
        try:
            backup_fd = self._open_backup_dir(create=False)
        except FileNotFoundError:
            return  # no backup was made, so swupdate never ran for this update
        try:
            for i, name in enumerate(record.paths):
                self._restore_one(backup_fd, i, Path(name))
        finally:
            os.close(backup_fd)
        log.info("swupdate_restored", paths=list(record.paths))

    def _restore_one(self, backup_fd: int, i: int, path: Path) -> None:
        try:
            src: int | None = safefs.open_regular(backup_fd, str(i), what="swupdate backup")
        except FileNotFoundError:
            src = None
        try:
            if src is None and not _exists(backup_fd, f"{i}.absent"):
                return  # neither: no backup was made, so swupdate never ran for it
            opened = self._open_target(path)
            if opened is None:
                if src is not None:
                    raise InstallError(
                        f"swupdate installer: rollback: the directory of {path} is gone"
                    )
                return  # it did not exist before, and its directory does not now
            dir_fd, base = opened
            try:
                if src is None:
                    safefs.unlink(dir_fd, base)  # it did not exist before the install
                else:
                    # A new file under an unpredictable name, owner and mode set on its
                    # descriptor, renamed over whatever is at the path (never followed).
                    safefs.sweep_temps(dir_fd, base)  # what a crashed restore left
                    st = os.fstat(src)
                    safefs.write_atomic(
                        dir_fd,
                        base,
                        src,
                        safefs.safe_mode(st),
                        (st.st_uid, st.st_gid),
                        limit=st.st_size,
                    )
                safefs.fsync_dir(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            if src is not None:
                os.close(src)

    def _forget(self) -> None:
        """Drop the backups, then the state file (in that order: a crash leaves the state)."""
        if self.backup_dir.exists():
            shutil.rmtree(self.backup_dir)
            self._ops.fsync_dir(self.dir)
        self._ops.unlink(self.state_path)
        if self.dir.exists():
            self._ops.fsync_dir(self.dir)

    # -- commands -------------------------------------------------------------------------

    @staticmethod
    def _env(manifest: Manifest) -> dict[str, str]:
        return {
            "FOTA_UPDATE_ID": manifest.update_id,
            "FOTA_VERSION": manifest.body.version,
            "FOTA_COMPONENT": manifest.body.component.name.lower(),
        }

    async def _command(self, what: str, argv: list[str], manifest: Manifest) -> hooks.Completed:
        try:
            return await hooks.run(
                argv, name=f"swupdate {what}", timeout=self.timeout, env=self._env(manifest)
            )
        except hooks.CommandNotFound as exc:
            raise InstallError(f"swupdate installer: {exc}") from exc

    async def _checked(self, what: str, argv: list[str], manifest: Manifest) -> None:
        done = await self._command(what, argv, manifest)
        if not done.ok:
            raise InstallError(
                "swupdate installer: " + hooks.describe(f"{what} command", done, self.timeout)
            )

    async def _new_runs(self, manifest: Manifest) -> bool:
        """``booted_command``: 0 = the new image runs, 1 = it does not."""
        done = await self._command("booted", self.booted_command, manifest)
        if done.timed_out or done.code not in (0, 1):
            raise InstallError(
                "swupdate installer: " + hooks.describe("booted command", done, self.timeout)
            )
        return done.code == 0

    async def _swupdate(self, image: safefs.VerifiedImage) -> None:
        # The private directory is made in tmpdir and then used by path (swupdate gets paths).
        # A user who can write tmpdir could rename it and put theirs in its place, with the
        # image and swupdate's IPC sockets in it: tmpdir must be root's and writable by no one
        # else, or sticky (/tmp: only root renames root's entries there), and so up to /.
        try:
            parent = await asyncio.to_thread(
                safefs.resolve_trusted_dir,
                self.tmpdir,
                allow_writable=False,
                what="swupdate installer tmpdir",
            )
        except OSError as exc:
            raise InstallError(f"swupdate installer: tmpdir {self.tmpdir}: {exc}") from exc
        tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="fota-swu-", dir=parent))
        lines: list[str] = []

        def collect(line: str) -> None:
            if len(lines) < MAX_LINES:
                lines.append(line)

        try:
            try:
                swu = tmp / await asyncio.to_thread(_private_copy, image, tmp)
            except OSError as exc:
                raise InstallError(
                    f"swupdate installer: copying the image to {tmp}: {exc}"
                ) from exc
            argv = [*self.swupdate, "-i", str(swu), *self.args]
            done = await hooks.run(
                argv,
                name="swupdate",
                timeout=self.timeout,
                env={"TMPDIR": str(tmp)},
                on_line=collect,
            )
        except hooks.CommandNotFound as exc:
            raise InstallError(f"swupdate installer: {exc}") from exc
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
        verdict = classify(done.code, lines, timed_out=done.timed_out)
        if not verdict.ok:
            message = verdict.message
            if done.timed_out:
                message = f"timed out after {self.timeout:g} s" + (
                    f" ({message})" if message != "timed out" else ""
                )
            raise InstallError(f"swupdate installer: swupdate -i: {message}")
        if verdict.quirk:
            log.warning(
                "swupdate_status_ignored",
                code=done.code,
                timed_out=done.timed_out,
                why="the output says SWUPDATE successful and has no [ERROR] line",
            )

    # -- the contract ---------------------------------------------------------------------

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Back up the files the image overwrites, then run ``swupdate -i``.

        ``swupdate`` reads a private copy of exactly the verified bytes (``image_size`` of
        them, hashed again as they are copied from the descriptor the digest was checked
        over), in the run's own ``TMPDIR``.

        Raises:
            IntegrityError: the candidate does not match the manifest.
            UnsafePathError: a non-root user can write the directory of a ``backup`` path.
            InstallError: the backup or ``swupdate`` failed.
        """
        body = manifest.body
        try:
            image = await asyncio.to_thread(
                safefs.open_verified,
                candidate,
                body.image_sha256,
                body.image_size,
                what="candidate",
            )
        except OSError as exc:
            raise InstallError(f"swupdate installer: candidate: {exc}") from exc
        try:
            return await self._install(image, manifest, progress)
        finally:
            image.close()

    async def _install(
        self, image: safefs.VerifiedImage, manifest: Manifest, progress: Progress
    ) -> Outcome:
        record = self._mine(manifest)
        if record is not None and record.installed:
            log.info("swupdate_already_installed", update_id=record.update_id)
            progress(100)
            if self.restart and not await self._new_runs(manifest):
                return RESTART
            return DONE
        if record is not None and self.restart and await self._new_runs(manifest):
            # swupdate finished before the crash and the device restarted into the new copy.
            await asyncio.to_thread(self._save, replace(record, installed=True))
            progress(100)
            return DONE
        try:
            if record is None:
                record = _Record(manifest.update_id, self.backup)
                await asyncio.to_thread(self._begin, record)
            await asyncio.to_thread(self._back_up, record)
        except FotaError:
            raise
        except OSError as exc:
            raise InstallError(f"swupdate installer: backup: {exc}") from exc

        await self._swupdate(image)
        crashpoints.point("swupdate:installed")
        try:
            await asyncio.to_thread(self._save, replace(record, installed=True))
        except OSError as exc:
            raise InstallError(f"swupdate installer: {self.state_path}: {exc}") from exc
        progress(100)
        log.info("swupdate_installed", version=manifest.body.version, restart=self.restart)
        return RESTART if self.restart else DONE

    async def booted(self, manifest: Manifest) -> bool:
        """Single copy: the image is in place. Dual copy: ``booted_command``."""
        if not self.restart:
            return True
        if self._mine(manifest) is None:
            return False
        return await self._new_runs(manifest)

    async def commit(self, manifest: Manifest) -> None:
        """Run ``commit_command``; drop the backups."""
        if self._mine(manifest) is None:
            return  # already committed
        if self.commit_command:
            await self._checked("commit", self.commit_command, manifest)
        try:
            await asyncio.to_thread(self._forget)
        except OSError as exc:
            raise InstallError(f"swupdate installer: commit: {exc}") from exc
        log.info("swupdate_committed", version=manifest.body.version)

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Restore the backed-up files; run ``rollback_command``; restart if the new image runs."""
        record = self._mine(manifest)
        if record is None:
            return DONE  # nothing was changed for this update (or it is undone)
        try:
            await asyncio.to_thread(self._restore, record)
        except FotaError:
            raise
        except OSError as exc:
            raise InstallError(f"swupdate installer: rollback: {exc}") from exc
        if self.rollback_command:
            await self._checked("rollback", self.rollback_command, manifest)
        if self.restart and await self._new_runs(manifest):
            if not self.rollback_command:
                raise InstallError(
                    "swupdate installer: rollback: the new image runs and no rollback_command "
                    "is configured to switch back to the previous one"
                )
            log.info("swupdate_rolling_back", version=manifest.body.version)
            return RESTART  # the previous copy comes back at the restart
        try:
            await asyncio.to_thread(self._forget)
        except OSError as exc:
            raise InstallError(f"swupdate installer: rollback: {exc}") from exc
        log.info("swupdate_rolled_back", version=manifest.body.version)
        return DONE


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _private_copy(image: safefs.VerifiedImage, directory: Path) -> str:
    """Copy the verified bytes into ``directory`` (fota's own, 0700); return the file's name."""
    dir_fd = safefs.open_dir(directory)
    try:
        fd, name = safefs.create_temp(dir_fd, "candidate.swu", 0o600)
        try:
            image.copy_to(fd)
        finally:
            os.close(fd)
        return name
    finally:
        os.close(dir_fd)


def from_spec(spec: Spec, context: Context) -> SwupdateInstaller:
    """Build from ``kind = "swupdate"`` (see the module's docstring for the keys)."""
    where = spec.where
    backup = spec.strings("backup", [])
    for path in backup:
        if not Path(path).is_absolute():
            raise ConfigError(f"{where}.backup: expected absolute paths, got {path!r}")
    try:
        return SwupdateInstaller(
            context.state_dir,
            swupdate=spec.argv("swupdate", ["swupdate"]),
            args=spec.strings("args", []),
            restart=spec.flag("restart", False),
            booted_command=spec.argv("booted_command", None),
            commit_command=spec.argv("commit_command", None),
            rollback_command=spec.argv("rollback_command", None),
            backup=backup,
            timeout=spec.number("timeout", 600.0),
            tmpdir=spec.path("tmpdir", None),
            allow_writable_target=spec.flag("allow_writable_target", False),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
