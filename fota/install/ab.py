"""The A/B slot installer: write the inactive slot, then switch to it; roll back by switching back.

Two modes, chosen by configuration:

* **link**: the running image is reached through a symlink (``/opt/fw/current -> slot-a``).
  The switch is an atomic symlink flip (a new link renamed over the old one, then a directory
  fsync); the new image runs when its users next open it, so no restart is needed.
* **bootloader**: a command tells the bootloader which slot to boot (``fw_setenv`` for U-Boot,
  ``grub-editenv``), with ``{slot}`` replaced by the slot's name; another prints the slot that
  booted. The new image runs after a restart, so :meth:`ABInstaller.install` asks for one and
  :meth:`ABInstaller.booted` checks, after it, that the new slot is the one running (a
  bootloader that fell back to the old slot means the new image did not start).

Before writing a slot the installer saves its plan (which slot it comes from, which it writes)
atomically in ``state_dir``: after a crash, install and rollback read the plan instead of asking
which slot is inactive, which after the switch would be the old one.

Root file operations (docs/installers.md, :mod:`fota.safefs`): a slot's directory (and the
link's) is opened once from ``/`` and refused if a non-root user can write it or one above it
(unless ``allow_writable_target``). A slot named by a root-owned symlink
(``/dev/disk/by-partlabel/b``) is followed; a user's is not. A slot that is a regular file (or
is missing) is written as a new file, ``O_EXCL | O_NOFOLLOW`` under an unpredictable name, and
renamed over it; a block or character device is written in place, opened ``O_NOFOLLOW`` and
checked with ``fstat``; anything else (a FIFO, a socket, a directory) is refused. The bytes
come from the descriptor the signed digest was checked over, exactly ``image_size`` of them,
and the slot is read back through a descriptor too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from fota import crashpoints, hooks, safefs
from fota.core.manifest import Manifest
from fota.errors import ConfigError, FotaError, InstallError
from fota.fileops import FileOps
from fota.install.base import DONE, RESTART, Outcome, Progress, load_state, save_state

log = structlog.get_logger(__name__)

PLAN_NAME = "ab-plan.json"


@dataclass(frozen=True, slots=True)
class _Plan:
    update_id: str
    source: str | None  # the slot that ran before (None: nothing did, link mode on a new device)
    target: str


class ABInstaller:
    """Two slots; the inactive one is written, verified, then switched to.

    Args:
        slots: exactly two slot names and their paths (files or block devices).
        state_dir: where the installer keeps its plan (fota's state directory).
        link: link mode: the symlink that names the active slot.
        switch_command: bootloader mode: argv that makes ``{slot}`` the one to boot.
        booted_command: bootloader mode: argv that prints the name of the slot that booted.
        commit_command: optional argv run at commit (``{slot}``: the new slot), e.g. to clear
            a bootloader's "upgrade available" flag so it stops counting boot attempts.
        timeout: seconds each command may take.
        allow_writable_target: write slots and the link even if a non-root user can write
            their directories (a warning is logged; docs/installers.md says why not).

    Raises:
        ConfigError: not two slots, or neither (or both) of ``link`` and ``switch_command``.
    """

    def __init__(
        self,
        slots: Mapping[str, Path],
        state_dir: Path,
        *,
        link: Path | None = None,
        switch_command: Sequence[str] | None = None,
        booted_command: Sequence[str] | None = None,
        commit_command: Sequence[str] | None = None,
        timeout: float = 60.0,
        allow_writable_target: bool = False,
    ) -> None:
        if len(slots) != 2:
            raise ConfigError(f"ab installer: slots: needs exactly 2 slots, got {len(slots)}")
        if (link is None) == (switch_command is None):
            raise ConfigError("ab installer: set exactly one of link and switch_command")
        if switch_command is not None and not booted_command:
            raise ConfigError("ab installer: booted_command is needed with switch_command")
        self.slots = {name: Path(path) for name, path in slots.items()}
        self.link = Path(link) if link is not None else None
        self.switch_command = list(switch_command or [])
        self.booted_command = list(booted_command or [])
        self.commit_command = list(commit_command or [])
        self.timeout = timeout
        self.allow_writable_target = allow_writable_target
        self.plan_path = Path(state_dir) / PLAN_NAME
        self._ops = FileOps()

    # -- which slot ---------------------------------------------------------------------

    def _slot_of(self, path: Path) -> str | None:
        for name, slot in self.slots.items():
            if slot == path or slot.resolve() == path.resolve():
                return name
        return None

    async def _running(self) -> str | None:
        """The slot that runs now (link mode: the link's target; else the bootloader's)."""
        if self.link is not None:
            try:
                target = Path(os.readlink(self.link))
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise InstallError(f"ab installer: cannot read link {self.link}: {exc}") from exc
            if not target.is_absolute():
                target = self.link.parent / target
            slot = self._slot_of(target)
            if slot is None:  # never take it away: nothing could be put back
                raise InstallError(f"ab installer: link {self.link} -> {target} names no slot")
            return slot
        done = await self._command("booted", self.booted_command, None)
        name = done.tail.strip().splitlines()[-1].strip() if done.tail.strip() else ""
        if name not in self.slots:
            raise InstallError(f"ab installer: booted_command printed {name!r}, not a slot name")
        return name

    async def _command(self, what: str, argv: list[str], slot: str | None) -> hooks.Completed:
        args = [a.replace("{slot}", slot) if slot is not None else a for a in argv]
        try:
            done = await hooks.run(args, name=f"ab {what}", timeout=self.timeout)
        except hooks.CommandNotFound as exc:
            raise InstallError(f"ab installer: {exc}") from exc
        if not done.ok:
            raise InstallError(
                "ab installer: " + hooks.describe(f"{what} command", done, self.timeout)
            )
        return done

    # -- the plan -----------------------------------------------------------------------

    def _load_plan(self) -> _Plan | None:
        return load_state(self.plan_path, "ab installer", lambda d: _Plan(**d))

    async def _plan_for(self, manifest: Manifest) -> _Plan:
        plan = self._load_plan()
        if plan is not None and plan.update_id == manifest.update_id:
            return plan  # install runs again after a crash: the same slot, whatever runs now
        source = await self._running()
        names = list(self.slots)
        target = names[0] if source is None else next(n for n in names if n != source)
        plan = _Plan(manifest.update_id, source, target)
        await asyncio.to_thread(save_state, self.plan_path, plan)
        crashpoints.point("ab:planned")
        log.info("ab_planned", source=source, target=target, update_id=manifest.update_id)
        return plan

    # -- switching ------------------------------------------------------------------------

    def _flip(self, slot: str | None) -> None:
        assert self.link is not None
        dir_fd = safefs.open_trusted_dir(
            self.link.parent, allow_writable=self.allow_writable_target, what="ab installer link"
        )
        try:
            safefs.sweep_temps(dir_fd, self.link.name)
            if slot is None:
                safefs.unlink(dir_fd, self.link.name)
            else:
                # symlink() never follows what is at its name, and the name is new and
                # unpredictable; the rename replaces the link itself, never what it names.
                tmp = safefs.temp_name(self.link.name)
                os.symlink(self.slots[slot], tmp, dir_fd=dir_fd)
                try:
                    os.replace(tmp, self.link.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    safefs.unlink(dir_fd, tmp)
                    raise
            safefs.fsync_dir(dir_fd)
        finally:
            os.close(dir_fd)

    async def _switch(self, slot: str | None) -> None:
        if self.link is not None:
            await asyncio.to_thread(self._flip, slot)
        else:
            assert slot is not None  # bootloader mode always has a running slot
            await self._command("switch", self.switch_command, slot)

    # -- the contract ---------------------------------------------------------------------

    def _open_slot(self, slot: Path) -> tuple[int, str]:
        """The slot's directory (checked) and its name there, root-owned links followed."""
        return safefs.open_parent(
            slot,
            what="ab installer slot",
            allow_writable=self.allow_writable_target,
            follow=True,
        )

    def _slot_digest(self, slot: Path, size: int) -> bytes | None:
        dir_fd, name = self._open_slot(slot)
        try:
            return _digest_at(dir_fd, name, size)
        finally:
            os.close(dir_fd)

    def _write_slot(
        self, image: safefs.VerifiedImage, slot: Path, progress: Progress
    ) -> bytes | None:
        size = max(1, image.size)

        def copied(done: int) -> None:
            progress(min(99, done * 100 // size))

        dir_fd, name = self._open_slot(slot)
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None or stat.S_ISREG(st.st_mode):
                # A file slot: a new file renamed over it, so nothing planted at the name is
                # written through. Its mode and owner stay; setuid/setgid only if root owns it.
                safefs.sweep_temps(dir_fd, name)  # what a crash mid-write left
                safefs.write_atomic(
                    dir_fd,
                    name,
                    lambda fd: image.copy_to(fd, copied),
                    safefs.safe_mode(st) if st is not None else 0o644,
                    (st.st_uid, st.st_gid) if st is not None else None,
                )
            elif stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
                fd = _open_device(dir_fd, name, os.O_WRONLY)
                try:
                    image.copy_to(fd, copied)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                raise InstallError(
                    f"ab installer: slot {slot} is a {safefs.file_type(st)}, not a file or device"
                )
            # Read back what the slot holds: a bad sector or a short write is caught here,
            # before the bootloader is told to boot it.
            return _digest_at(dir_fd, name, image.size)
        finally:
            os.close(dir_fd)

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Write the inactive slot, check it, and switch to it."""
        plan = await self._plan_for(manifest)
        if await self._running() == plan.target:
            # Run again after a power cut past the switch, and the device booted the new slot
            # (or, link mode, the link names it): it is in use and must not be written again
            # (a mounted file system changes its bytes, so its hash says nothing).
            progress(100)
            log.info("ab_already_running", slot=plan.target, version=manifest.body.version)
            return DONE
        slot = self.slots[plan.target]
        size, want = manifest.body.image_size, manifest.body.image_sha256

        def write() -> bytes | None:
            # Run again after a crash past the write (the switch may have happened too): a
            # slot that already holds the image is not written again while it may be in use.
            written = self._slot_digest(slot, size)
            if written == want:
                return written
            with safefs.open_verified(candidate, want, size, what="candidate") as image:
                return self._write_slot(image, slot, progress)

        try:
            written = await asyncio.to_thread(write)
        except FotaError:
            raise
        except OSError as exc:
            raise InstallError(f"ab installer: writing slot {plan.target} ({slot}): {exc}") from exc
        if written != want:
            raise InstallError(f"ab installer: slot {plan.target} ({slot}) reads back differently")
        crashpoints.point("ab:slot_written")
        await self._switch(plan.target)
        crashpoints.point("ab:switched")
        if self.link is None and await self._running() == plan.target:
            # No restart happened, yet booted_command names the new slot: it reports the slot
            # to boot next, not the one that booted, and every later check would be wrong.
            raise InstallError(
                "ab installer: booted_command names the new slot before any restart: it must "
                "print the slot that booted (e.g. from /proc/cmdline), not the one to boot next"
            )
        progress(100)
        log.info("ab_switched", slot=plan.target, version=manifest.body.version)
        return DONE if self.link is not None else RESTART

    async def booted(self, manifest: Manifest) -> bool:
        """Whether the slot written for ``manifest`` is the one running."""
        plan = self._load_plan()
        if plan is None or plan.update_id != manifest.update_id:
            return False
        running = await self._running()
        log.info("ab_booted", running=running, expected=plan.target)
        return running == plan.target

    async def commit(self, manifest: Manifest) -> None:
        """Keep the new slot: run the commit command, forget the plan."""
        plan = self._load_plan()
        if plan is None or plan.update_id != manifest.update_id:
            return  # already committed
        if self.commit_command:
            await self._command("commit", self.commit_command, plan.target)
        await asyncio.to_thread(self._ops.unlink, self.plan_path)
        crashpoints.point("ab:committed")

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Switch back to the slot that ran before; ask for a restart until it runs again."""
        plan = self._load_plan()
        if plan is None or plan.update_id != manifest.update_id:
            return DONE  # nothing was switched for this update (or it is already undone)
        await self._switch(plan.source)
        crashpoints.point("ab:switched_back")
        if self.link is None and await self._running() != plan.source:
            return RESTART  # the new slot still runs: the old one comes back at the restart
        await asyncio.to_thread(self._ops.unlink, self.plan_path)
        log.info("ab_rolled_back", slot=plan.source, version=manifest.body.version)
        return DONE


def _open_device(dir_fd: int, name: str, flags: int) -> int:
    """Open a block or character device slot in place (``O_NOFOLLOW``, type checked on the fd)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise InstallError(f"ab installer: slot {name} is a {safefs.file_type(st)} now")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _digest_at(dir_fd: int, name: str, size: int) -> bytes | None:
    """SHA-256 of the first ``size`` bytes of a slot; None if it is missing or shorter.

    Opened ``O_NOFOLLOW | O_NONBLOCK`` relative to the slot's directory: a FIFO or a link
    planted at the name is never read through.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        fd = safefs.open_regular(dir_fd, name, what="ab installer slot")
    elif stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        fd = _open_device(dir_fd, name, os.O_RDONLY)
    else:
        return None  # written over (file slots) or refused (anything else) by _write_slot
    try:
        hasher = hashlib.sha256()
        pos = 0
        while pos < size:
            chunk = os.pread(fd, min(safefs.CHUNK, size - pos), pos)
            if not chunk:
                return None  # shorter than the image
            hasher.update(chunk)
            pos += len(chunk)
        return hasher.digest()
    finally:
        os.close(fd)
