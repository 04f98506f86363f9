"""Soak: many sequential updates through one long-running updater, measured from outside.

    .venv/bin/python bench/soak.py [--updates 1000] [--warmup 100] [--seed 1] [--json]
                                   [--auth control|auto] [--inprocess] [--keep DIR]
                                   [--no-unit-env]

What runs (issue 17: "nothing grows with the number of updates"):

- The update server (:class:`fota.testing.UpdateServer`) in a process of its own (this file,
  role ``_server``), so that its memory, which does grow with what it publishes and logs, is
  not mixed into the numbers. The coordinator (this process) drives it over a pipe in JSON
  lines: ``publish`` signs and announces one image and answers ``final`` once that update's
  final report (a result other than a step result) has reached the server.
- The updater: ``fota daemon`` as a subprocess with a TOML configuration (as
  ``tests/e2e/test_daemon.py`` builds it): the default file installer onto a target file, the
  control socket, ``[authorization] mode = "control"`` (default) with this process as the
  answering application: one subscriber connection that authorizes every
  ``authorization_needed`` (download and install) as it comes; or ``--auth auto``. The first
  install does not ask (an empty device). Readiness is ``READY=1`` on a ``NOTIFY_SOCKET``.
  Its environment is this one plus the ``Environment=`` assignments of
  ``examples/fota.service`` (printed; none at present), so it runs as the unit runs it.
- ``--updates`` images (16..64 KiB, seeded sizes and bytes, 8 KiB fragments: 2..8 fragments
  each) are published one after the other; the next is published when the previous one's
  final report is at the server (event-driven: the server child waits on its report hook).

After each final report, and a control ``status`` round trip (the daemon answered it, so the
report's acknowledgement has been handled), the coordinator samples the daemon from outside:
``VmRSS`` and ``Threads`` from ``/proc/PID/status``, the entries of ``/proc/PID/fd``, and the
state directory's total size and file count (``os.scandir``, no links followed), and the
size of CPython's interned-string table (:class:`InternedProbe`, 3.11 only: insertions after
warm-up are names interned per update, whose deleted slots make the table reallocate). The first
``--warmup`` updates are warm-up (imports, caches, the allocator's arenas settle); the verdicts
apply to the samples after it:

- RSS growth = the largest RSS after warm-up minus the RSS at warm-up end: at most 2 MiB;
- open descriptors: no more after warm-up than during it (min and max);
- state directory: no more files than during warm-up, and no more bytes than warm-up's
  largest plus one image (the candidate of the update in flight);
- reports: exactly one final report per update at the server (counted again at the end, so a
  late duplicate or a second final counts), every final SUCCESS.

``--inprocess`` runs a :class:`fota.Client` (built from the same TOML file, with
``AutoAuthorize``) in this process instead of the daemon, to find a leak: at warm-up end it
starts ``tracemalloc`` and counts objects by type (``gc``); at the end it prints the top
allocations still alive that were made after warm-up, and the types whose counts grew. Its
RSS includes tracemalloc's own bookkeeping, so use the daemon's numbers for the verdict.

Each verdict is printed as PASS or FAIL, then ``soak: PASS`` or ``soak: FAIL``. Exit status:
0 when every verdict passes, 1 when one fails, 2 when the soak itself broke.
Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
ROOT = SELF.parent.parent
sys.path.insert(0, str(ROOT))
from tests.chaos_rig import NotifySocket  # noqa: E402 (the chaos rig's sd_notify side)

KiB = 1024
MiB = 1024 * KiB
DEVICE_CLASS = "soak-gw"
DEVICE_ID = "soak-1"
RSS_BOUND = 2 * MiB
"""Issue 17: RSS after warm-up stays within 2 MiB."""
UNIT = ROOT / "examples" / "fota.service"
"""The daemon runs with the ``Environment=`` this unit sets (``--no-unit-env``: without)."""
LINE_LIMIT = 1 << 20
SETTLE_TRIES = 50
"""Control round trips at most per sample until the state directory holds still."""


# -- the server child ---------------------------------------------------------------------


def _emitter() -> Callable[..., None]:
    """Protocol lines on the real stdout; fd 1 goes to stderr so a stray print cannot break it."""
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)

    def emit(event: str, **fields: Any) -> None:
        stream.write(json.dumps({"event": event, **fields}) + "\n")
        stream.flush()

    return emit


async def _commands() -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield json.loads(line)


async def _serve(root: Path, fragment_size: int, timeout: float) -> None:
    from fota import keys
    from fota.core import manifest as mf
    from fota.testing.fleet import STEP_RESULTS
    from fota.testing.server import DeviceSeen, UpdateServer

    emit = _emitter()
    key = keys.generate()
    trust = keys.save_keypair(key, root / "signing.key")
    server = UpdateServer(root / "srv", key, mf.kid_for(key.public_key()))
    steps = {int(r) for r in STEP_RESULTS}
    # Per update id: [reports, final reports, first final's result]. Fed from the report
    # hook, so a wait costs nothing per report already seen.
    tally: dict[str, list[int]] = {}
    handled = 0
    waiting: dict[str, asyncio.Future[None]] = {}

    def on_device(_seen: DeviceSeen) -> None:
        nonlocal handled
        for report in server.reports[handled:]:
            uid = report.get(5)
            if not isinstance(uid, str):
                continue
            counts = tally.setdefault(uid, [0, 0, 0])
            counts[0] += 1
            if report.get(4) not in steps:
                counts[1] += 1
                if counts[1] == 1:
                    counts[2] = int(report.get(4, -1))
                future = waiting.pop(uid, None)
                if future is not None and not future.done():
                    future.set_result(None)
        handled = len(server.reports)

    server.device_hook = on_device
    await server.start()
    emit("ready", uri=server.uri, trust=str(trust), pid=os.getpid())
    try:
        async for message in _commands():
            if message["cmd"] == "publish":
                size = int(message["size"])
                image = random.Random(int(message["image_seed"])).randbytes(size)
                published = server.publish(
                    image,
                    message["version"],
                    device_class=DEVICE_CLASS,
                    fragment_size=fragment_size,
                )
                uid = published.update_id
                # The image and manifest files stay: a device may ask again for an old one.
                if tally.get(uid, [0, 0])[1] == 0:
                    future = waiting[uid] = asyncio.get_running_loop().create_future()
                    try:
                        await asyncio.wait_for(future, timeout)
                    except TimeoutError:
                        emit(
                            "error",
                            message=f"no final report for {message['version']} in "
                            f"{timeout:g} s; reports: {tally.get(uid)}",
                        )
                        continue
                counts = tally[uid]
                emit(
                    "final",
                    update_id=uid,
                    reports=counts[0],
                    finals=counts[1],
                    result=counts[2],
                    image_requests=len(server.image_requests(published.image_sha256)),
                )
            elif message["cmd"] == "tally":
                emit(
                    "tally",
                    updates={
                        p.update_id: tally.get(p.update_id, [0, 0, 0]) for p in server.published
                    },
                    duplicates=server.duplicate_reports,
                    bad_reports=len(server.bad_reports),
                )
    finally:
        await server.stop()


def _server_main(root: str, fragment_size: str, timeout: str) -> int:
    from fota.app.logs import configure

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops us (stdin EOF)
    configure("warning", "json")
    asyncio.run(_serve(Path(root), int(fragment_size), float(timeout)))
    return 0


# -- measuring from outside ---------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One update's end, seen from outside the updater."""

    update: int
    seconds: float
    rss: int
    threads: int
    fds: int
    state_bytes: int
    state_files: int
    reports: int
    finals: int
    result: int
    reports_pending: int
    py_blocks: int = 0
    """In-process only: ``sys.getallocatedblocks()`` (objects gc does not track count too)."""
    interned: tuple[int, int, int] | None = None
    """The interned-string table (:class:`InternedProbe`): entries, slots filled, log2 size."""


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (bytes) and ``Threads`` from ``/proc/PID/status``."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * KiB
            elif name == "Threads":
                out[name] = int(value)
    return out


def smaps(pid: int) -> dict[str, tuple[int, int]]:
    """Resident bytes per mapping of ``/proc/PID/smaps``: ``"start path": (size, rss)``."""
    out: dict[str, tuple[int, int]] = {}
    key = ""
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                start, _, end = head[0].partition("-")
                key = f"{start} {head[5] if len(head) > 5 else '[anon]'}"
                size = int(end, 16) - int(start, 16)
            elif head and head[0] == "Rss:":
                out[key] = (size, int(head[1]) * KiB)
    return out


def smaps_growth(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[str]:
    """The mappings whose resident size changed the most, largest growth first."""
    rows = []
    for key in set(before) | set(after):
        size, rss = after.get(key, (0, 0))
        grown = rss - before.get(key, (0, 0))[1]
        if grown:
            rows.append((grown, f"{grown / KiB:+.0f} KiB  {key} (mapping {size / KiB:.0f} KiB)"))
    return [text for _, text in sorted(rows, reverse=True)[:12]]


class InternedProbe:
    """Reads CPython 3.11's table of interned strings in another process (``/proc/PID/mem``).

    Why: a string interned once per update (pathlib interns every part of every path it
    parses) fills the table with deleted slots when it is freed, and the table is reallocated
    every few hundred updates: a step of RSS that no Python object shows. The table is the
    static ``interned`` dict of ``Objects/unicodeobject.c``; its address comes from the symbol
    table of the binary or ``libpython`` that maps it (``nm``, binutils), its fields from the
    3.11 layout: ``PyDictObject.ma_used`` (+16), ``ma_keys`` (+32); ``PyDictKeysObject``
    ``dk_log2_size`` (+8), ``dk_nentries`` (+24, the slots filled since the last resize,
    deleted ones included). Any other version, or no ``nm``, reads nothing (``None``).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.address: int | None = None
        if sys.version_info[:2] != (3, 11) or shutil.which("nm") is None:
            return
        real = os.path.realpath(sys.executable)
        bases: dict[str, int] = {}
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                cols = line.split()
                mapped = len(cols) >= 6 and cols[2] == "00000000"
                if mapped and ("libpython" in cols[5] or cols[5] == real):
                    bases.setdefault(cols[5], int(cols[0].partition("-")[0], 16))
        for path, base in bases.items():
            out = subprocess.run(["nm", path], capture_output=True, text=True, check=False)
            for line in out.stdout.splitlines():
                cols = line.split()
                if len(cols) == 3 and cols[2] == "interned" and cols[1] in "bBdD":
                    self.address = base + int(cols[0], 16)
                    return

    def read(self) -> tuple[int, int, int] | None:
        """(entries, slots filled since the last resize, log2 of the table size), or None."""
        if self.address is None:
            return None
        try:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:

                def word(at: int) -> int:
                    mem.seek(at)
                    value: int = struct.unpack("<q", mem.read(8))[0]
                    return value

                table = word(self.address)
                keys = word(table + 32)
                mem.seek(keys + 8)
                log2 = mem.read(1)[0]
                return word(table + 16), word(keys + 24), log2
        except (OSError, struct.error, IndexError):
            return None


def interned_growth(samples: list[Sample]) -> dict[str, int] | None:
    """Insertions into the interned-string table between the first and last sample, resizes."""
    seen = [s.interned for s in samples if s.interned is not None]
    if len(seen) < 2:
        return None
    inserted = resizes = 0
    for (used0, filled0, log0), (_, filled1, log1) in itertools.pairwise(seen):
        if filled1 < filled0 or log1 != log0:  # reallocated: the new table holds what was live
            resizes += 1
            inserted += max(0, filled1 - used0)
        else:
            inserted += filled1 - filled0
    return {
        "entries_first": seen[0][0],
        "entries_last": seen[-1][0],
        "inserted": inserted,
        "resizes": resizes,
        "table_log2": seen[-1][2],
    }


def unit_environment(unit: Path) -> dict[str, str]:
    """The ``Environment=`` assignments of a unit file's ``[Service]`` section (simple form).

    ``KEY=VALUE`` words, optionally quoted as a whole (``"KEY=VALUE"``); a later assignment
    wins, as in systemd. Specifiers and ``EnvironmentFile=`` are not read (the example unit
    uses neither).
    """
    env: dict[str, str] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line
        elif section == "[Service]" and line.startswith("Environment="):
            for word in line.partition("=")[2].split():
                key, sep, value = word.strip('"').partition("=")
                if sep:
                    env[key] = value
    return env


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree_size(path: Path) -> tuple[int, int, list[str]]:
    """Total bytes and count of the regular files below ``path`` (no links followed), names."""
    total = count = 0
    names: list[str] = []
    stack = [path]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):  # a temp file just renamed
                        total += entry.stat(follow_symlinks=False).st_size
                        count += 1
                        names.append(os.path.relpath(entry.path, path))
    return total, count, sorted(names)


# -- the updater under test ---------------------------------------------------------------


def write_config(work: Path, uri: str, trust: str, auth: str, log_level: str) -> Path:
    config = work / "fota.toml"
    config.write_text(
        f"""
server = "{uri}"
device_id = "{DEVICE_ID}"
device_class = "{DEVICE_CLASS}"
state_dir = "state"
trust = ["{trust}"]
target = "firmware.bin"

[control]
socket = "{work / "ctl.sock"}"
mode = "0600"

[authorization]
mode = "{auth}"

[log]
level = "{log_level}"
format = "json"
"""
    )
    return config


class Updater:
    """What the soak measures: the daemon subprocess, or a Client in this process."""

    pid: int

    async def start(self) -> None:
        raise NotImplementedError

    async def quiesce(self) -> int:
        """Reports the updater still holds, after one round trip to it."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class DaemonUpdater(Updater):
    def __init__(
        self,
        work: Path,
        config: Path,
        answer: bool,
        timeout: float,
        env: dict[str, str] | None = None,
    ) -> None:
        from fota.app.control import ControlClient

        self.env = env or {}
        self.work = work
        self.config = config
        self.answer = answer
        self.timeout = timeout
        self.notify = NotifySocket(work / "notify")
        self.log = work / "daemon.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.control = ControlClient(work / "ctl.sock", timeout=timeout)
        self.answers = 0
        self.answer_errors = 0
        self._events: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:  # noqa: ASYNC230 (once, at start)
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fota",
                "daemon",
                "--config",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.work,
                env={**os.environ, **self.env, "NOTIFY_SOCKET": str(self.notify.path)},
            )
        self.pid = self.proc.pid
        await asyncio.wait_for(self.notify.ready(), self.timeout)
        await self.control.connect()
        await self.control.subscribe(["authorization_needed"], answers=self.answer)
        self._events = asyncio.create_task(self._answer(), name="soak-answer")

    async def _answer(self) -> None:
        from fota.errors import ControlError

        async for event in self.control.events():
            if event.get("event") == "authorization_needed" and self.answer:
                try:
                    await self.control.authorize(event.get("update_id"))
                    self.answers += 1
                except ControlError:
                    self.answer_errors += 1

    async def quiesce(self) -> int:
        status = await self.control.status()
        return int(status.get("reports_pending") or 0)

    async def stop(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events
        with contextlib.suppress(Exception):
            await self.control.aclose()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), self.timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.notify.close()


class InProcessUpdater(Updater):
    def __init__(self, config: Path) -> None:
        from fota import AutoAuthorize, Client
        from fota.app.settings import load_settings

        settings = load_settings(config)
        self.client = Client(settings.config, handler=AutoAuthorize())
        self.pid = os.getpid()

    async def start(self) -> None:
        await self.client.start()

    async def quiesce(self) -> int:
        with contextlib.suppress(TimeoutError):
            await self.client.wait_for(lambda s: s.reports_pending == 0, timeout=5)
        return self.client.status().reports_pending

    async def stop(self) -> None:
        await self.client.aclose()


class InProcessDaemon(Updater):
    """``fota.app.daemon.serve`` as a task of this process: the daemon's code, traceable."""

    def __init__(self, work: Path, config: Path, answer: bool, timeout: float) -> None:
        from fota.app.settings import load_settings

        self.settings = load_settings(config)
        self.outside = DaemonUpdater(work, config, answer, timeout)
        self.pid = os.getpid()
        self._task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        from fota.app.daemon import serve
        from fota.app.systemd import Notifier

        notifier = Notifier(str(self.outside.notify.path))
        self._task = asyncio.create_task(serve(self.settings, notifier=notifier), name="daemon")
        await asyncio.wait_for(self.outside.notify.ready(), self.outside.timeout)
        await self.outside.control.connect()
        await self.outside.control.subscribe(["authorization_needed"], answers=self.outside.answer)
        self.outside._events = asyncio.create_task(self.outside._answer(), name="soak-answer")

    @property
    def answers(self) -> int:
        return self.outside.answers

    async def quiesce(self) -> int:
        return await self.outside.quiesce()

    async def stop(self) -> None:
        await self.outside.stop()  # no process of its own: answers and sockets only
        if self._task is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # serve() stops on it, as in production
            await asyncio.wait_for(self._task, self.outside.timeout)


# -- the coordinator ----------------------------------------------------------------------


class SoakError(Exception):
    pass


class ServerChild:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(
        cls, work: Path, fragment: int, timeout: float
    ) -> tuple[ServerChild, dict[str, Any]]:
        log = work / "server.log"
        root = work / "server"
        root.mkdir()
        with open(log, "ab") as err:  # noqa: ASYNC230 (once, at start)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SELF),
                "_server",
                str(root),
                str(fragment),
                str(timeout),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=LINE_LIMIT,
            )
        child = cls(proc, log)
        return child, await child.expect("ready", timeout)

    async def send(self, **message: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout + 5)
        except TimeoutError:
            raise SoakError(f"server: no {event!r} in {timeout:g} s") from None
        if not line:
            tail = self.log.read_text(errors="replace").splitlines()[-10:]
            raise SoakError(f"server exited waiting for {event!r}: " + "\n".join(tail))
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise SoakError(f"server: expected {event!r}, got {message}")
        return message

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Result:
    updates: int
    warmup: int
    auth: str
    mode: str
    seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    state_files_final: list[str] = field(default_factory=list)
    state_files_over: list[tuple[int, list[str]]] = field(default_factory=list)
    """Samples after warm-up with more files than any during warm-up: (update, names)."""
    state_files_most: tuple[int, list[str]] = (0, [])
    unsettled: int = 0
    """Looks at the state directory that differed from the one before (a save in flight)."""
    """The first sample with the most files (update, names): what a transient file is."""
    tally: dict[str, Any] = field(default_factory=dict)
    answers: int = 0
    leaks: dict[str, Any] = field(default_factory=dict)
    mappings: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


async def soak(args: argparse.Namespace, work: Path) -> Result:
    rng = random.Random(args.seed)
    result = Result(
        args.updates,
        args.warmup,
        args.auth,
        f"in-process {args.inprocess}" if args.inprocess else "daemon",
    )
    server, ready = await ServerChild.start(work, args.fragment * KiB, args.timeout)
    config = write_config(work, ready["uri"], ready["trust"], args.auth, args.log_level)
    updater: Updater
    if args.inprocess == "client":
        updater = InProcessUpdater(config)
    elif args.inprocess == "daemon":
        updater = InProcessDaemon(work, config, args.auth == "control", args.timeout)
    else:
        result.env = unit_environment(UNIT) if args.unit_env else {}
        updater = DaemonUpdater(work, config, args.auth == "control", args.timeout, result.env)
    state = work / "state"
    maps_before: dict[str, tuple[int, int]] = {}
    counts_before: collections.Counter[str] | None = None
    snapshot: tracemalloc.Snapshot | None = None
    warm_files = 0
    try:
        await updater.start()
        probe = InternedProbe(updater.pid)
        start = time.perf_counter()
        for i in range(args.updates):
            began = time.perf_counter()
            size = rng.randint(16 * KiB, 64 * KiB)
            await server.send(
                cmd="publish", version=f"{i + 1}.0", size=size, image_seed=rng.getrandbits(63)
            )
            final = await server.expect("final", args.timeout)
            pending = await updater.quiesce()
            took = time.perf_counter() - began
            # The daemon runs on while we look (the report's acknowledgement may still be
            # queued behind the status answer, and its save follows): sample the state
            # directory once two looks, one control round trip apart, agree, so a file in
            # flight (a save's temporary, the manifest it collects) is not counted as growth.
            # Bounded: at most SETTLE_TRIES round trips.
            size_bytes, files, names = tree_size(state)
            for _ in range(SETTLE_TRIES):
                pending = await updater.quiesce()
                again = tree_size(state)
                if again[2] == names:
                    break
                result.unsettled += 1
                size_bytes, files, names = again
                await asyncio.sleep(0.01)
            if args.inprocess:
                gc.collect()
            status = proc_status(updater.pid)
            result.samples.append(
                Sample(
                    i + 1,
                    took,
                    status["VmRSS"],
                    status["Threads"],
                    fd_count(updater.pid),
                    size_bytes,
                    files,
                    final["reports"],
                    final["finals"],
                    final["result"],
                    pending,
                    sys.getallocatedblocks() if args.inprocess else 0,
                    probe.read(),
                )
            )
            result.state_files_final = names
            if files > len(result.state_files_most[1]):
                result.state_files_most = (i + 1, names)
            if i + 1 <= args.warmup:
                warm_files = max(warm_files, files)
            elif files > warm_files and len(result.state_files_over) < 10:
                result.state_files_over.append((i + 1, names))
            if i + 1 == args.warmup:
                maps_before = smaps(updater.pid)
            if args.inprocess and i + 1 == args.warmup:
                counts_before = _type_counts()
                if args.trace:
                    tracemalloc.start(args.frames)
                    snapshot = tracemalloc.take_snapshot()
            if not args.json and ((i + 1) % args.every == 0 or i + 1 == args.updates):
                s = result.samples[-1]
                print(
                    f"soak: {i + 1:5d}  rss {s.rss / MiB:7.2f} MiB  fds {s.fds:3d}  threads "
                    f"{s.threads:2d}  state {s.state_bytes / KiB:7.1f} KiB / {s.state_files} files"
                    f"  {took * 1000:6.0f} ms"
                    + (f"  blocks {s.py_blocks}" if args.inprocess else ""),
                    file=sys.stderr,
                    flush=True,
                )
        result.seconds = time.perf_counter() - start
        result.mappings = smaps_growth(maps_before, smaps(updater.pid))
        await server.send(cmd="tally")
        result.tally = await server.expect("tally", args.timeout)
        if isinstance(updater, (DaemonUpdater, InProcessDaemon)):
            result.answers = updater.answers
        if args.inprocess and counts_before is not None:
            gc.collect()
            grown = _type_counts() - counts_before
            stats: list[tracemalloc.StatisticDiff] = []
            if snapshot is not None:
                stats = tracemalloc.take_snapshot().compare_to(snapshot, "traceback")
                tracemalloc.stop()
            result.leaks = {
                "types": grown.most_common(20),
                "allocations": [
                    {
                        "size_diff": st.size_diff,
                        "count_diff": st.count_diff,
                        "traceback": [f"{fr.filename}:{fr.lineno}" for fr in st.traceback][
                            -args.frames :
                        ],
                    }
                    for st in stats[: args.top]
                    if st.size_diff > 0
                ],
            }
    finally:
        await updater.stop()
        await server.close()
    return result


def summarize(result: Result) -> dict[str, Any]:
    warm = [s for s in result.samples if s.update <= result.warmup]
    after = [s for s in result.samples if s.update > result.warmup] or result.samples
    base = warm[-1] if warm else result.samples[0]
    rss_max = max(s.rss for s in after)
    fds = [s.fds for s in after]
    tally_updates: dict[str, list[int]] = result.tally.get("updates", {})
    finals = [counts[1] for counts in tally_updates.values()]
    reports = [counts[0] for counts in tally_updates.values()]
    success = sum(1 for counts in tally_updates.values() if counts[2] == 1)
    max_image = 64 * KiB
    warm_bytes = max((s.state_bytes for s in warm), default=base.state_bytes)
    warm_files = max((s.state_files for s in warm), default=base.state_files)
    times = [s.seconds for s in result.samples]
    out: dict[str, Any] = {
        "mode": result.mode,
        "environment": result.env,
        "auth": result.auth,
        "updates": result.updates,
        "warmup": result.warmup,
        "rss_warmup_end": base.rss,
        "rss_max_after": rss_max,
        "rss_final": result.samples[-1].rss,
        "rss_growth": rss_max - base.rss,
        "rss_final_growth": result.samples[-1].rss - base.rss,
        "rss_first": result.samples[0].rss,
        "rss_steps": [
            [b.update, (b.rss - a.rss) // KiB]
            for a, b in zip(result.samples, result.samples[1:], strict=False)
            if b.update > result.warmup and b.rss - a.rss >= 256 * KiB
        ],
        "threads": [min(s.threads for s in after), max(s.threads for s in after)],
        "fds": [min(fds), max(fds)],
        "fds_warmup": [min(s.fds for s in warm), max(s.fds for s in warm)] if warm else None,
        "state_bytes_warmup_max": warm_bytes,
        "state_bytes": [min(s.state_bytes for s in after), max(s.state_bytes for s in after)],
        "state_files_warmup_max": warm_files,
        "state_files": [min(s.state_files for s in after), max(s.state_files for s in after)],
        "state_files_final": result.state_files_final,
        "state_files_over": result.state_files_over,
        "state_files_most": result.state_files_most,
        "state_unsettled": result.unsettled,
        "reports_per_update": [min(reports), statistics.median(reports), max(reports)],
        "finals_per_update": [min(finals), max(finals)],
        "updates_at_server": len(tally_updates),
        "success": success,
        "duplicate_reports": result.tally.get("duplicates"),
        "bad_reports": result.tally.get("bad_reports"),
        "reports_pending_max": max(s.reports_pending for s in result.samples),
        "answers": result.answers,
        "seconds": round(result.seconds, 1),
        "updates_per_second": round(result.updates / result.seconds, 2),
        "update_ms": [
            round(1000 * statistics.median(times)),
            round(1000 * sorted(times)[int(0.95 * (len(times) - 1))]),
            round(1000 * max(times)),
        ],
    }
    verdicts = {
        "rss_growth_within_2_MiB": out["rss_growth"] <= RSS_BOUND,
        # A descriptor still closing at a sample (a sync thread's) is not growth.
        "fds_not_growing": out["fds_warmup"] is None
        or (min(fds) <= out["fds_warmup"][0] and max(fds) <= out["fds_warmup"][1]),
        "state_files_bounded": out["state_files"][1] <= warm_files,
        "state_bytes_bounded": out["state_bytes"][1] <= warm_bytes + max_image,
        "one_final_per_update": len(finals) == result.updates and set(finals) == {1},
        "all_succeeded": success == result.updates,
    }
    out["verdicts"] = verdicts
    out["ok"] = all(verdicts.values())
    out["mappings_grown"] = result.mappings
    out["interned"] = interned_growth([base, *after])
    if result.leaks:
        out["leaks"] = result.leaks
    return out


def print_table(s: dict[str, Any]) -> None:
    def mib(n: int) -> str:
        return f"{n / MiB:.2f} MiB"

    rows = [
        ("updater", f"{s['mode']} (authorization: {s['auth']})"),
        (
            f"environment added ({UNIT.relative_to(ROOT)} Environment=)",
            " ".join(f"{k}={v}" for k, v in s["environment"].items()) or "none",
        ),
        ("updates (warm-up)", f"{s['updates']} ({s['warmup']})"),
        ("RSS after the first update", mib(s["rss_first"])),
        ("RSS at warm-up end", mib(s["rss_warmup_end"])),
        ("RSS max after warm-up", mib(s["rss_max_after"])),
        ("RSS final", mib(s["rss_final"])),
        (
            "RSS growth after warm-up (max - warm-up end; final - warm-up end)",
            f"{s['rss_growth'] / KiB:+.0f} KiB; {s['rss_final_growth'] / KiB:+.0f} KiB",
        ),
        (
            "RSS steps of 256 KiB or more after warm-up (update: KiB)",
            ", ".join(f"{u}: +{k}" for u, k in s["rss_steps"]) or "none",
        ),
        ("open fds after warm-up (min / max)", f"{s['fds'][0]} / {s['fds'][1]}"),
        ("threads after warm-up (min / max)", f"{s['threads'][0]} / {s['threads'][1]}"),
        (
            "state dir bytes after warm-up (min / max; warm-up max)",
            f"{s['state_bytes'][0]} / {s['state_bytes'][1]}; {s['state_bytes_warmup_max']}",
        ),
        (
            "state dir files after warm-up (min / max; warm-up max)",
            f"{s['state_files'][0]} / {s['state_files'][1]}; {s['state_files_warmup_max']}",
        ),
        ("state dir at the end", ", ".join(s["state_files_final"])),
        (
            "state dir looks that changed under a sample (a save in flight; resampled)",
            str(s["state_unsettled"]),
        ),
        (
            "first sample with the most state files (update: names)",
            f"{s['state_files_most'][0]}: {', '.join(s['state_files_most'][1])}",
        ),
        (
            "samples after warm-up with more state files than warm-up's largest",
            "; ".join(f"{u}: {', '.join(names)}" for u, names in s["state_files_over"]) or "none",
        ),
        (
            "reports per update at the server (min / median / max)",
            " / ".join(str(x) for x in s["reports_per_update"]),
        ),
        (
            "final reports per update (min / max); SUCCESS",
            f"{s['finals_per_update'][0]} / {s['finals_per_update'][1]}; {s['success']}",
        ),
        ("duplicate reports (server de-duplicated)", str(s["duplicate_reports"])),
        ("authorizations answered over the control socket", str(s["answers"])),
        ("total time; updates per second", f"{s['seconds']} s; {s['updates_per_second']}"),
        ("per update p50 / p95 / max", " / ".join(f"{x} ms" for x in s["update_ms"])),
    ]
    interned = s.get("interned")
    if interned is not None:
        rows.append(
            (
                "interned strings after warm-up: entries (warm-up end -> end); insertions; resizes",
                f"{interned['entries_first']} -> {interned['entries_last']}; "
                f"{interned['inserted']} ({interned['inserted'] / (s['updates'] - s['warmup']):.2f}"
                f" per update); {interned['resizes']} (table 2^{interned['table_log2']})",
            )
        )
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()
    for name, ok in s["verdicts"].items():
        detail = ""
        if name == "rss_growth_within_2_MiB":
            detail = f" ({s['rss_growth'] / KiB:+.0f} KiB, bound {RSS_BOUND // KiB} KiB)"
        print(f"{'PASS' if ok else 'FAIL'}  {name}{detail}")
    print(f"\nsoak: {'PASS' if s['ok'] else 'FAIL'}")
    print("\nresident memory by mapping, warm-up end to the end (/proc/PID/smaps):")
    for line in s["mappings_grown"]:
        print(f"  {line}")
    leaks = s.get("leaks")
    if leaks:
        print("\nobject counts grown after warm-up (type: +count):")
        for name, count in leaks["types"]:
            print(f"  {name}: +{count}")
        print("\nallocations alive at the end made after warm-up (tracemalloc):")
        for a in leaks["allocations"]:
            print(f"  {a['size_diff'] / KiB:+.1f} KiB in {a['count_diff']:+d} blocks")
            for frame in a["traceback"]:
                print(f"      {frame}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        return _server_main(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100, help="updates before the verdicts apply")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--auth", choices=("control", "auto"), default="control")
    p.add_argument(
        "--inprocess",
        nargs="?",
        const="client",
        choices=("client", "daemon"),
        help="the updater in this process (a fota.Client, or the daemon's serve()),"
        " with gc counts and tracemalloc",
    )
    p.add_argument(
        "--no-trace",
        dest="trace",
        action="store_false",
        help="--inprocess without tracemalloc (its bookkeeping inflates RSS)",
    )
    p.add_argument("--fragment", type=int, default=8, help="fragment size, KiB")
    p.add_argument(
        "--no-unit-env",
        dest="unit_env",
        action="store_false",
        help=f"run the daemon without the Environment= of {UNIT.relative_to(ROOT)}",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per update")
    p.add_argument("--log-level", default="warning", help="the updater's log level")
    p.add_argument("--every", type=int, default=50, help="progress line every N updates")
    p.add_argument("--frames", type=int, default=8, help="tracemalloc frames (--inprocess)")
    p.add_argument("--top", type=int, default=15, help="allocations shown (--inprocess)")
    p.add_argument("--keep", type=Path, help="work in this (new) directory and keep it")
    args = p.parse_args()
    if not 0 <= args.warmup < args.updates:
        p.error("--warmup must be at least 0 and below --updates")
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    if args.inprocess:
        from fota.app.logs import configure

        configure(args.log_level, "json")
    try:
        result = asyncio.run(soak(args, work))
    except SoakError as exc:
        print(f"soak: {exc} (work directory {work})", file=sys.stderr)
        return 2
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(result)
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
