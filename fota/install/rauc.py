"""The RAUC adapter: install a signed RAUC bundle into the inactive slot; RAUC switches the boot.

The candidate is a RAUC bundle (``.raucb``, **plain** format) that fota verified against its
own signed manifest; RAUC then checks the bundle's own CMS signature against its keyring, the
``compatible`` and the slots, writes the inactive slot of the booted slot's class and makes it
the bootloader's primary. The new image runs after a restart.

Contract with the tool (RAUC 1.8, as run on Debian 12; docs/installers.md)
-------------------------------------------------------------------------

Every call is the ``rauc`` client (``rauc`` setting, an argument list), run through
:func:`fota.hooks.run` with the ``env`` setting added (``DBUS_SYSTEM_BUS_ADDRESS`` for a private
bus). The client talks to ``rauc service`` over the D-Bus *system* bus; nothing works without
both (exit status 2 and ``Error creating proxy: Could not connect`` or
``The name de.pengutronix.rauc was not provided by any .service files``).

* ``rauc install <candidate>``: progress lines ``printf("%3d%% %s")`` (`` 40% Checking bundle
  done.``) are parsed into ``progress(N)``, only rising values are passed on, ending at 100.
  Exit status 0: installed; 1: the install failed, RAUC says why in a ``LastError: <message>``
  line (``Compatible mismatch: Expected 'test-board' but bundle manifest has 'other-board'``,
  ``signature verification failed: ...``), which becomes the :class:`InstallError`'s message
  (the last line when there is none); 2: a D-Bus problem (no service, no bus, or
  ``Already processing a different method``: another install runs, see below). The candidate's
  file name does not matter: RAUC 1.8 installed a bundle named ``candidate.bin`` (and through a
  symbolic or a hard link) the same as a ``.raucb``, so the candidate is passed as it is.
* ``rauc status [--detailed] --output-format=json-pretty``: ``booted`` is the *bootname* of the
  running slot, ``boot_primary`` the *slot name* the bootloader boots next (``null`` with
  ``bootloader=noop``), ``slots`` a list of one-key objects. The pretty form is read because
  :func:`fota.hooks.run` cuts lines at 500 characters and the compact form is one long line;
  lines around the JSON (``rauc-WARNING``/``rauc-Message`` on stderr, merged) are skipped.
* ``rauc status mark-good booted`` (commit), ``mark-bad booted`` and ``mark-active <slot>``
  (rollback).

While a ``rauc install`` runs in the service (for instance one started before fota was killed),
every other call fails with ``already processing a different method``; fota then waits and
tries again, once a second, up to ``timeout``.

What is journaled where
-----------------------

``<state_dir>/rauc/state.json`` (atomic writes, :class:`fota.fileops.FileOps`) holds the update
id and version, the *source* slot (the slot that ran when the install started: its slot name
and bootname, read from ``rauc status`` before ``rauc install`` is run) and, once ``rauc
install`` exited 0 (crash point ``rauc:installed`` comes first), the *target*: the slot RAUC
wrote. The target is ``boot_primary`` after the install (RAUC makes the slot it wrote primary;
that needs a bootloader backend that reports the primary slot: a real one or
``bootloader=custom``), else the only other bootable slot of the source's class (the slot RAUC
always installs to), else the other slot whose ``slot_status.bundle.version`` is the manifest's
version (``--detailed``). The file is removed when the update is committed or rolled back.

Idempotence (every call runs again after a crash)
-------------------------------------------------

* ``install`` with a recorded target: the new slot already runs (the device restarted after
  the install) -> :data:`DONE`, nothing installed again (a second ``rauc install`` would write
  the *other* slot, the one with the previous image); the target is still primary ->
  :data:`RESTART`, nothing installed again; otherwise it installs again. Without a target but
  with a source slot that no longer runs, the install finished before the crash and the
  device restarted into it: the running slot is recorded as the target and :data:`DONE` is
  returned. Otherwise ``rauc install`` runs (again); writing the inactive slot again is
  harmless. A ``rauc install`` that exits 2 on a first attempt leaves no state: RAUC was never
  asked to change anything.
* ``booted``: true iff the running slot's bootname is the target's.
* ``commit``: ``mark-good booted`` (again) while the state file exists, then removes it.
* ``rollback``: the source slot runs (no restart yet, or the bootloader fell back) ->
  ``mark-active <source>`` (makes the running slot primary and good again), removes the state
  file, :data:`DONE`. The new slot runs -> ``mark-bad booted`` and ``mark-active <source>``,
  :data:`RESTART`; after the restart the next rollback call sees the source running and ends
  with :data:`DONE`. No state for this update: nothing was asked of RAUC, :data:`DONE`.

What does not work here (Debian 12, a Firecracker VM without systemd)
---------------------------------------------------------------------

* **verity bundles**: ``rauc install`` fails with ``LastError: Failed mounting bundle: Failed to
  open /dev/mapper/control: No such file or directory``; the kernel has no device-mapper
  (neither are ``crypt`` bundles possible). Only ``format=plain`` bundles are tested.
* RAUC needs a D-Bus system bus and a running ``rauc service`` that knows the booted slot
  (``rauc.slot=`` on the kernel command line, or ``--override-boot-slot=<bootname>`` as the
  tests do). Without it: ``LastError: Bootname or device of booted slot not found``.
* ``bootloader=noop`` reports no primary slot and every slot's boot state as ``bad``; the
  target is then the other slot of the class, and ``mark-*`` change nothing that a restart
  would honour. The tests use ``bootloader=custom`` with a file-backed backend script.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from fota import crashpoints, hooks
from fota.core.manifest import Manifest
from fota.errors import ConfigError, InstallError
from fota.fileops import FileOps
from fota.install.base import DONE, RESTART, Outcome, Progress, load_state, save_state
from fota.install.spec import Context, Spec

log = structlog.get_logger(__name__)

STATE_DIR = "rauc"
STATE_NAME = "state.json"
BUSY_RETRY = 1.0
"""Seconds between attempts while the service is busy with another method."""
MAX_LINES = 20000

_PROGRESS = re.compile(r"^\s*(\d{1,3})% (.*)$")


def parse_progress(line: str) -> int | None:
    """The percentage of a ``rauc install`` progress line (``' 40% Checking bundle'``), or None."""
    m = _PROGRESS.match(line)
    if m is None:
        return None
    value = int(m.group(1))
    return value if value <= 100 else None


def last_error(lines: Sequence[str]) -> str | None:
    """The text of the last ``LastError: ...`` line of ``rauc install``, or None."""
    for line in reversed(lines):
        if line.startswith("LastError:"):
            return line.removeprefix("LastError:").strip() or None
    return None


def _busy(lines: Sequence[str]) -> bool:
    return any("already processing a different method" in line.lower() for line in lines)


@dataclass(frozen=True, slots=True)
class Slot:
    """One slot as ``rauc status`` describes it."""

    name: str
    klass: str | None
    bootname: str | None
    state: str | None
    boot_status: str | None
    version: str | None  # slot_status.bundle.version (``--detailed`` only)


@dataclass(frozen=True, slots=True)
class Status:
    """What ``rauc status`` says: the booted bootname, the primary slot name, the slots."""

    booted: str | None
    primary: str | None
    slots: tuple[Slot, ...]

    def slot(self, name: str | None) -> Slot | None:
        """The slot with this slot name."""
        return next((s for s in self.slots if s.name == name), None)

    def booted_slot(self) -> Slot | None:
        """The slot that runs (by bootname, else by ``state: booted``)."""
        found = next((s for s in self.slots if s.bootname and s.bootname == self.booted), None)
        return found or next((s for s in self.slots if s.state == "booted"), None)


def _json_block(lines: Sequence[str]) -> Any:
    """The JSON object in ``rauc status --output-format=json-pretty`` output (noise skipped)."""
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "{"), None)
    end = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].rstrip() == "}"), None)
    if start is not None and end is not None and start < end:
        return json.loads("\n".join(lines[start : end + 1]))
    for line in lines:  # a compact one-line answer (--output-format=json)
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON object in the output")


def parse_status(lines: Sequence[str]) -> Status:
    """Read ``rauc status --output-format=json-pretty`` (or ``json``) output.

    Raises:
        ValueError: it is not what RAUC 1.8 prints.
    """
    data = _json_block(lines)
    if not isinstance(data, dict) or not isinstance(data.get("slots"), list):
        raise ValueError("no 'slots' list")

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    slots: list[Slot] = []
    for entry in data["slots"]:
        if not isinstance(entry, dict):
            raise ValueError(f"slot entry {entry!r} is not an object")
        for name, info in entry.items():
            info = info if isinstance(info, dict) else {}
            status = info.get("slot_status")
            bundle = status.get("bundle") if isinstance(status, dict) else None
            version = bundle.get("version") if isinstance(bundle, dict) else None
            slots.append(
                Slot(
                    str(name),
                    text(info.get("class")),
                    text(info.get("bootname")),
                    text(info.get("state")),
                    text(info.get("boot_status")),
                    text(version),
                )
            )
    return Status(text(data.get("booted")), text(data.get("boot_primary")), tuple(slots))


@dataclass(frozen=True, slots=True)
class _Record:
    update_id: str
    version: str
    source: str  # slot name of the slot that ran when the install started
    source_boot: str  # its bootname
    target: str | None = None  # slot name RAUC wrote (known once rauc install exited 0)
    target_boot: str | None = None


class RaucInstaller:
    """Install RAUC bundles through ``rauc install``; boot, commit and roll back through RAUC.

    Args:
        state_dir: fota's state directory; the installer keeps ``rauc/state.json`` in it.
        rauc: the ``rauc`` client program and its first arguments.
        env: extra environment variables for every ``rauc`` call (``DBUS_SYSTEM_BUS_ADDRESS``).
        timeout: seconds each ``rauc`` call may take (and the longest wait for a busy service).

    Raises:
        ConfigError: an empty ``rauc`` command.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        rauc: Sequence[str] = ("rauc",),
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
    ) -> None:
        if not rauc:
            raise ConfigError("rauc installer: rauc: must not be empty")
        self.rauc = list(rauc)
        self.env = dict(env or {})
        self.timeout = timeout
        self.dir = Path(state_dir) / STATE_DIR
        self.state_path = self.dir / STATE_NAME
        self._ops = FileOps()

    # -- running rauc ---------------------------------------------------------------------

    async def _run(
        self, what: str, args: Sequence[str], on_line: Callable[[str], None] | None = None
    ) -> tuple[hooks.Completed, list[str]]:
        """Run ``rauc args``; while the service is busy with another method, wait and retry."""
        deadline = time.monotonic() + self.timeout
        while True:
            lines: list[str] = []

            def collect(line: str, lines: list[str] = lines) -> None:
                if len(lines) < MAX_LINES:
                    lines.append(line)
                if on_line is not None:
                    on_line(line)

            try:
                done = await hooks.run(
                    [*self.rauc, *args],
                    name=f"rauc {what}",
                    timeout=self.timeout,
                    env=self.env,
                    on_line=collect,
                )
            except hooks.CommandNotFound as exc:
                raise InstallError(f"rauc installer: {exc}") from exc
            if done.ok or done.timed_out or not _busy(lines) or time.monotonic() >= deadline:
                return done, lines
            log.info("rauc_busy", command=what, retry_in=BUSY_RETRY)
            await asyncio.sleep(BUSY_RETRY)

    def _failed(self, what: str, done: hooks.Completed, lines: Sequence[str]) -> InstallError:
        error = last_error(lines)
        if error is None or done.timed_out:
            return InstallError(
                "rauc installer: " + hooks.describe(f"rauc {what}", done, self.timeout)
            )
        return InstallError(f"rauc installer: rauc {what}: exit status {done.code}: {error}")

    async def _status(self, *, detailed: bool = False) -> Status:
        args = ["status", *(["--detailed"] if detailed else []), "--output-format=json-pretty"]
        done, lines = await self._run("status", args)
        if not done.ok:
            raise self._failed("status", done, lines)
        try:
            return parse_status(lines)
        except ValueError as exc:
            raise InstallError(f"rauc installer: cannot read rauc status output: {exc}") from exc

    async def _mark(self, how: str, slot: str) -> None:
        done, lines = await self._run(f"mark-{how}", ["status", f"mark-{how}", slot])
        if not done.ok:
            raise self._failed(f"status mark-{how} {slot}", done, lines)
        log.info("rauc_marked", how=how, slot=slot)

    # -- the state file -------------------------------------------------------------------

    def _load(self) -> _Record | None:
        return load_state(self.state_path, "rauc installer", lambda d: _Record(**d))

    def _save(self, record: _Record) -> None:
        save_state(self.state_path, record, make_dir=True)

    def _forget(self) -> None:
        self._ops.unlink(self.state_path)
        if self.dir.exists():
            self._ops.fsync_dir(self.dir)

    def _mine(self, manifest: Manifest) -> _Record | None:
        record = self._load()
        return record if record is not None and record.update_id == manifest.update_id else None

    # -- which slot -----------------------------------------------------------------------

    @staticmethod
    def _target_of(status: Status, record: _Record, version: str) -> Slot | None:
        """The slot ``rauc install`` just wrote (see the module's docstring for the rules)."""
        source = status.slot(record.source)
        primary = status.slot(status.primary)
        if primary is not None and primary.name != record.source and primary.bootname:
            return primary
        klass = source.klass if source is not None else None
        others = [s for s in status.slots if s.name != record.source and s.bootname]
        same_class = [s for s in others if s.klass == klass]
        if len(same_class) == 1:
            return same_class[0]
        by_version = [s for s in others if s.version == version]
        return by_version[0] if len(by_version) == 1 else None

    # -- the contract ---------------------------------------------------------------------

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Run ``rauc install`` on the bundle; record the slot it wrote; ask for a restart."""
        record = self._mine(manifest)
        fresh = record is None
        status = await self._status()
        if record is None:
            booted = status.booted_slot()
            if booted is None or not booted.bootname:
                raise InstallError(
                    f"rauc installer: rauc status names no booted slot (booted={status.booted!r})"
                )
            record = _Record(
                manifest.update_id, manifest.body.version, booted.name, booted.bootname
            )
            await asyncio.to_thread(self._save, record)
        elif record.target is not None:
            if status.booted == record.target_boot:
                log.info("rauc_already_running", slot=record.target, update_id=record.update_id)
                progress(100)
                return DONE
            if status.primary == record.target:
                log.info("rauc_already_installed", slot=record.target, update_id=record.update_id)
                progress(100)
                return RESTART
        elif status.booted != record.source_boot:
            # rauc install finished before the crash and the device restarted into its slot.
            running = status.booted_slot()
            if running is not None:
                record = replace(record, target=running.name, target_boot=running.bootname)
                await asyncio.to_thread(self._save, record)
                log.info("rauc_already_running", slot=running.name, update_id=record.update_id)
                progress(100)
                return DONE

        reported = -1

        def on_line(line: str) -> None:
            nonlocal reported
            value = parse_progress(line)
            if value is not None and value > reported:
                reported = value
                progress(value)

        done, lines = await self._run("install", ["install", str(candidate)], on_line)
        if not done.ok:
            if fresh and done.code == 2 and not done.timed_out:
                # A D-Bus problem: the service never started this install; nothing changed.
                await asyncio.to_thread(self._forget)
            raise self._failed("install", done, lines)
        crashpoints.point("rauc:installed")

        after = await self._status(detailed=True)
        target = self._target_of(after, record, manifest.body.version)
        if target is None:
            raise InstallError(
                "rauc installer: rauc install succeeded, but rauc status does not tell which slot "
                f"it wrote (boot_primary={after.primary!r}; bootloader=noop?)"
            )
        record = replace(record, target=target.name, target_boot=target.bootname)
        await asyncio.to_thread(self._save, record)
        if reported < 100:
            progress(100)
        log.info(
            "rauc_installed",
            slot=target.name,
            bootname=target.bootname,
            primary=after.primary,
            version=manifest.body.version,
        )
        return RESTART

    async def booted(self, manifest: Manifest) -> bool:
        """Whether the slot RAUC wrote for ``manifest`` is the one running."""
        record = self._mine(manifest)
        if record is None or record.target_boot is None:
            return False
        status = await self._status()
        log.info("rauc_booted", booted=status.booted, expected=record.target_boot)
        return status.booted == record.target_boot

    async def commit(self, manifest: Manifest) -> None:
        """``rauc status mark-good booted`` (the new slot), then forget the update."""
        record = self._mine(manifest)
        if record is None:
            return  # already committed
        status = await self._status()
        if record.target_boot is None or status.booted != record.target_boot:
            raise InstallError(
                f"rauc installer: commit: the running slot is {status.booted!r}, "
                f"not the one installed ({record.target_boot!r})"
            )
        await self._mark("good", "booted")
        await asyncio.to_thread(self._forget)
        log.info("rauc_committed", slot=record.target, version=manifest.body.version)

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Make the previous slot primary again; ask for a restart while the new one runs."""
        record = self._mine(manifest)
        if record is None:
            return DONE  # nothing was asked of RAUC for this update (or it is undone)
        status = await self._status()
        if status.booted == record.source_boot:
            await self._mark("active", "booted")
            await asyncio.to_thread(self._forget)
            log.info("rauc_rolled_back", slot=record.source, version=manifest.body.version)
            return DONE
        await self._mark("bad", "booted")
        await self._mark("active", record.source)
        log.info("rauc_rolling_back", slot=record.source, running=status.booted)
        return RESTART


def from_spec(spec: Spec, context: Context) -> RaucInstaller:
    """Build from ``kind = "rauc"``: ``rauc`` (argv), ``env`` (table), ``timeout`` (seconds)."""
    env = spec.mapping("env", {})
    env_spec = Spec(f"{spec.where}.env", env)
    return RaucInstaller(
        context.state_dir,
        rauc=spec.argv("rauc", ["rauc"]),
        env={str(k): env_spec.string(k) for k in env},
        timeout=spec.number("timeout", 600.0),
    )
