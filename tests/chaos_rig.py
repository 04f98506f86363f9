"""A seeded chaos rig: the real daemon, the real test server, and faults drawn from one seed.

Issue 17's promise is that the updater is never stuck and never needs a person. This rig tries
to break it the way the field does, many times in a row, and checks after every cycle what
must hold. ``tests/e2e/test_chaos.py`` runs a few dozen cycles in CI; ``bench/chaos.py`` runs
hundreds and prints a summary.

Theory of operation
-------------------
* ``fota daemon`` runs as a subprocess on a TOML file, as systemd runs it: the rig waits for
  ``READY=1`` on a ``NOTIFY_SOCKET``, and after a ``kill -9`` it starts the daemon again at
  once, repairing nothing (systemd's ``Restart=always``). A kill takes the whole process tree
  (the installer program too), as systemd's control-group kill does: the tree is stopped
  with SIGSTOP first, so nothing forks while it is listed.
* The update server (:class:`fota.testing.UpdateServer`) runs in the rig's event loop. A
  server restart stops it, throws its observation list away, and binds the same port again:
  the daemon hears nothing and must re-register by itself (``observe_refresh`` is short).
  Reports the server received are kept across restarts (a real server keeps them in a
  database), de-duplicated by (device, sequence number) as the server does.
* The installer is a command installer: a small program of the rig's that logs what it was
  handed (the candidate's SHA-256 and size, the daemon's pid), tells the rig over a datagram
  socket when it begins and ends, and then does the work with fota's own file installer
  (:class:`fota.install.file.FileInstaller`) onto a target file. So the rig can kill the daemon
  in the middle of an install or a commit, count installs per update, and prove that no
  unverified byte was ever handed on or installed.
* The daemon's wall clock is stepped with libfaketime (``LD_PRELOAD``, an offset file re-read
  at most once a second, monotonic time left alone). The rig refuses to start without it: a
  chaos run that silently leaves out a fault would pass for the wrong reason.
* The state directory is a small tmpfs (root only), filled to the last byte for ENOSPC.

Each cycle publishes a new update (a small image, small fragments) and draws one to four
faults from ``random.Random(seed)``; each fault waits for its moment (at once, after the N-th
image request of the cycle, when the installer begins or ends an install or a commit, or after
the update's final report) and then happens. A fault with a window (4.04, loss, a full disk)
ends after a drawn number of image requests or a drawn time, whichever comes first, and
always before the update could give up (the budgets are set well above every window). When
every fault is over, the rig waits, on the server's report log, for the update's final report.
No sleep synchronises anything: the sleeps are the lengths of fault windows.

Invariants checked after every cycle (a failure names the seed, the cycle and its faults):

1. ``running``: the daemon answers on its control socket, idle, running the new version; every
   restart reached ``READY=1`` without help.
2. ``verified``: every candidate the installer was handed had the signed image's digest and
   size, and the target file's bytes are the signed image's.
3. ``one_install``: an update was installed at most once: a second install of one update is
   allowed only as the re-run of an install whose daemon was killed before the update ended
   (the installer contract, ``fota/install/base.py``), never after its final report.
4. ``one_final``: exactly one final report per attempt of every update so far reached the
   server, checked again every cycle (an attempt that failed is revived by its announcement
   as the next one, report key 10; the server counts one final per attempt).
5. ``completes``: once the faults stopped, the update ended ``SUCCESS`` within a bound; an
   earlier attempt may have failed only with ``NOT_ENOUGH_SPACE`` in a cycle with a full disk
   (final for its attempt when no fragment was verified yet, docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from fota import ResultCode, State
from fota.app.control import ControlClient, ControlError
from fota.core.manifest import PrivateKey
from fota.keys import generate, save_keypair
from fota.testing import RequestLog, UpdateServer
from fota.testing.server import FaultPlan, Published, _Announcements

KiB = 1024
DEVICE = "chaos-gw"
DEVICE_CLASS = "chaos-class"
LOCKED_EXIT = 75
"""``fota daemon``'s exit status when another instance holds the state directory."""
BOUND = 30.0
"""Seconds any single step (a start, a stop, a second instance) may take before it is a failure."""
COMPLETE_BOUND = 90.0
"""Seconds from the end of the faults to the update's final report before ``completes`` fails."""

KINDS = (
    "kill",
    "server_restart",
    "not_found",
    "loss_burst",
    "enospc",
    "clock_step",
    "second_instance",
    "truncate_journal",
)
"""Every fault the rig draws."""
IMAGE_SIZES = (16 * KiB, 64 * KiB)
"""Smallest and largest image of a cycle: its download takes 16 to 64 requests of 1 KiB (kills,
4.04 windows and loss bursts land in it), and a few dozen cycles fit in CI's time."""
_WEIGHTS = (5, 2, 2, 2, 2, 2, 1, 2)
_MOMENTS = ("publish", "requests", "requests", "requests", "hook", "after")
_HOOKS = ("install-begin", "install-done", "commit-begin", "commit-done")
STEPS = frozenset(
    {ResultCode.INITIAL, ResultCode.DEFERRED, ResultCode.AUTHORIZED, ResultCode.FORCED}
)
"""Results of step reports (as :class:`fota.testing.pytest_plugin.Reports` counts them)."""

FAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)
"""Where Debian's ``libfaketime`` package puts the multi-threaded preload library."""


class RigError(RuntimeError):
    """The rig cannot run as asked (a missing tool, not root): a failure, never a skip."""


def find_libfaketime() -> str:
    """The path of libfaketime's multi-threaded preload library.

    Raises:
        RigError: it is not installed (Debian package ``libfaketime``; scripts/test installs it).
    """
    for pattern in FAKETIME_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise RigError(
        "libfaketime is missing (Debian package libfaketime, pulled in by faketime): the chaos "
        "rig steps the daemon's wall clock with it; scripts/test installs it when run as root"
    )


# -- what a cycle is made of ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault of a cycle, as drawn.

    Attributes:
        kind: one of :data:`KINDS`.
        moment: when it happens: ``publish`` (at once), ``requests`` (after the ``n``-th
            image request of the cycle), ``hook`` (when the installer says ``hook``), or
            ``after`` (after the update's final report: the daemon idle).
        n: the image request count for ``requests``.
        hook: ``install-begin``, ``install-done``, ``commit-begin`` or ``commit-done``.
        size: the window in image requests (4.04, loss), or bytes kept (truncated journal,
            as a share in per mille of its size).
        seconds: the longest window (4.04, loss, full disk, server down), or the clock step.
        percent: the loss rate of a loss burst.
    """

    kind: str
    moment: str
    n: int = 0
    hook: str = ""
    size: int = 0
    seconds: float = 0.0
    percent: float = 0.0

    def describe(self) -> str:
        """A one-line description, enough to see what happened and to replay it by seed."""
        when = {"requests": f"after {self.n} image requests", "hook": f"at {self.hook}"}.get(
            self.moment, f"at {self.moment}"
        )
        what = {
            "not_found": f"4.04 for {self.size} requests or {self.seconds:.1f} s",
            "loss_burst": f"{self.percent:.0f} % loss for {self.size} requests "
            f"or {self.seconds:.1f} s",
            "enospc": f"disk full for {self.seconds:.2f} s",
            "clock_step": f"wall clock {self.seconds:+.0f} s",
            "server_restart": f"down {self.seconds:.2f} s, observers forgotten",
            "truncate_journal": f"journal cut to {self.size / 10:.1f} %",
        }.get(self.kind, "")
        return f"{self.kind} {when}" + (f" ({what})" if what else "")


def draw_faults(rng: random.Random, blocks: int, *, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """Draw one cycle's faults (1 to 4) for an image of ``blocks`` 1 KiB blocks."""
    weights = [w for k, w in zip(KINDS, _WEIGHTS, strict=True) if k in kinds]
    faults: list[Fault] = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choices(kinds, weights)[0]
        moment = rng.choice(_MOMENTS)
        if kind in ("not_found", "loss_burst"):
            moment = rng.choice(("publish", "requests", "requests"))  # while it downloads
        n = rng.randrange(blocks) if moment == "requests" else 0
        hook = rng.choice(_HOOKS) if moment == "hook" else ""
        size, seconds, percent = 0, 0.0, 0.0
        if kind == "not_found":
            size, seconds = rng.randint(2, 10), rng.uniform(0.5, 4.0)
        elif kind == "loss_burst":
            size, seconds = rng.randint(20, 150), rng.uniform(0.5, 3.0)
            percent = rng.uniform(20, 60)
        elif kind == "enospc":
            seconds = rng.uniform(0.2, 1.5)
        elif kind == "clock_step":
            seconds = rng.choice((-1, 1)) * rng.choice((5, 90, 3600, 86400 * 3))
        elif kind == "server_restart":
            seconds = rng.uniform(0.0, 0.5)
        elif kind == "truncate_journal":
            size = rng.randrange(1000)  # per mille of the journal kept (0: an empty file)
        faults.append(Fault(kind, moment, n, hook, size, seconds, percent))
    return faults


def draw_cycle(
    rng: random.Random,
    number: int,
    kinds: tuple[str, ...] = KINDS,
    image_sizes: tuple[int, int] = IMAGE_SIZES,
    fragments: tuple[int, ...] = (4 * KiB, 8 * KiB, 16 * KiB),
) -> tuple[bytes, int, list[Fault]]:
    """One cycle's image, fragment size and faults (cycle 0, the first install: no faults)."""
    size = rng.randint(*image_sizes)
    image = rng.randbytes(size)
    fragment = rng.choice(fragments)
    faults = draw_faults(rng, -(-size // KiB), kinds=kinds) if number else []
    return image, fragment, faults


def plan(seed: int, cycles: int, kinds: tuple[str, ...] = KINDS) -> list[list[Fault]]:
    """The faults a run of ``cycles`` cycles with ``seed`` draws, cycle by cycle (from 1).

    What :class:`ChaosRig` will do with the same seed and kinds (its default sizes), without
    running anything: to read a failed run's sequence again, or to choose a seed.
    """
    rng = random.Random(seed)
    return [draw_cycle(rng, n, kinds)[2] for n in range(cycles + 1)][1:]


@dataclass
class CycleResult:
    """What one cycle did and what it broke.

    Attributes:
        cycle: its number (1-based; 0 is the first install, without faults).
        version: the version it published.
        update_id: the update's id.
        faults: the faults drawn, as described (those that happened, in the order they did).
        violations: broken invariants, each ``name: detail``.
        seconds: wall time of the cycle.
        restarts: daemon starts in the cycle (after kills).
    """

    cycle: int
    version: str
    update_id: str
    faults: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    restarts: int = 0


# -- the installer the daemon runs -------------------------------------------------------------

INSTALLER = r'''
"""The chaos rig's command installer: log what was handed over, tell the rig, then install
with fota's file installer. Written by tests/chaos_rig.py; argv[-1] is the action."""
import asyncio, hashlib, json, os, socket, sys, types
sys.path.insert(0, os.environ["CHAOS_REPO"])
from fota.install.file import FileInstaller

action = sys.argv[-1]
env = os.environ
uid = env["FOTA_UPDATE_ID"]
manifest = types.SimpleNamespace(
    update_id=uid,
    body=types.SimpleNamespace(
        image_sha256=bytes.fromhex(env["FOTA_IMAGE_SHA256"]),
        image_size=int(env["FOTA_IMAGE_SIZE"]),
        version=env["FOTA_VERSION"],
    ),
)
entry = {"action": action, "update_id": uid, "daemon": os.getppid(), "pid": os.getpid(),
         "expected": env["FOTA_IMAGE_SHA256"], "size_expected": int(env["FOTA_IMAGE_SIZE"])}
if action == "install":
    with open(env["FOTA_CANDIDATE"], "rb") as f:
        data = f.read()
    entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)


def log(what):
    fd = os.open(env["CHAOS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps({**entry, "step": what}) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def tell(what):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(f"{action}-{what} {uid}".encode(), env["CHAOS_EVENTS"])
    except OSError:
        pass  # the rig is not listening: nothing to tell
    finally:
        s.close()


log("begin")
tell("begin")
installer = FileInstaller(__import__("pathlib").Path(env["CHAOS_TARGET"]))
if action == "install":
    asyncio.run(installer.install(__import__("pathlib").Path(env["FOTA_CANDIDATE"]), manifest,
                                  lambda p: None))
elif action == "commit":
    asyncio.run(installer.commit(manifest))
elif action == "rollback":
    asyncio.run(installer.rollback(manifest))
log("done")
tell("done")
'''


# -- processes ------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # Field 4 (ppid) follows the command name, which may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant of it."""
    children = _children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def signal_tree(pid: int, sig: int) -> list[int]:
    """Stop ``pid`` (so it forks no more), then send ``sig`` to it and all its descendants."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    tree = process_tree(pid)
    for p in reversed(tree):  # children first
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    return tree


def _state(pid: int) -> str:
    """The process state letter from ``/proc/PID/stat`` ("" when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


async def until_stopped(pids: list[int], timeout: float = BOUND) -> None:
    """Wait until each of ``pids`` has stopped (or ended).

    kill() only queues a SIGSTOP: a process running on the other CPU, or in the middle of a
    write, stops a moment later, and what it writes meanwhile must not count as someone
    else's change. The kernel says when it has stopped (``T`` in ``/proc/PID/stat``); this
    looks every few milliseconds (no event tells a non-parent).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while any(_state(p) not in ("", "T", "t", "Z", "X") for p in pids):
        if loop.time() > end:
            raise RigError(f"processes {pids} did not stop within {timeout:.0f} s")
        await asyncio.sleep(0.005)  # polling the kernel's answer, not a guess at a duration


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket the daemon sends to, read all along.

    Every datagram is read as it comes (a full socket buffer would make the daemon's sends
    fail); :meth:`arm` before a start, then :meth:`ready` waits for that start's ``READY=1``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self._ready = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                if b"READY=1" in self.sock.recv(4096).split(b"\n"):
                    self._ready.set()

    def arm(self) -> None:
        self._read()  # what an earlier process sent is not this start's
        self._ready.clear()

    async def ready(self) -> None:
        await self._ready.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class _HookEvents(asyncio.DatagramProtocol):
    """What the installer tells the rig (``install-begin <update id>`` ...), as events."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._waiters: list[tuple[str, str, asyncio.Future[None]]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        what, _, uid = data.decode(errors="replace").partition(" ")
        self.seen.append((what, uid))
        for waiter in [w for w in self._waiters if w[0] == what and w[1] == uid]:
            self._waiters.remove(waiter)
            if not waiter[2].done():
                waiter[2].set_result(None)

    def wait(self, what: str, uid: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if (what, uid) in self.seen:
            future.set_result(None)
        else:
            self._waiters.append((what, uid, future))
        return future


def _snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under ``roots``: mode and content digest (directories: "")."""
    out: dict[str, tuple[int, str]] = {}
    for root in roots:
        for here, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(here, name)
                st = os.lstat(path)
                digest = ""
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                out[path] = (st.st_mode, digest)
    return out


def is_final(report: dict[int, Any]) -> bool:
    """Whether a report (the server's CBOR map) ends its update.

    Step reports (INITIAL, DEFERRED, AUTHORIZED, FORCED), a ROLLING_BACK step and the
    STATE_RECOVERED notice of a recovery are not final; every other result is.
    """
    result = report.get(4)
    return (
        isinstance(report.get(5), str)
        and result not in STEPS
        and result != ResultCode.STATE_RECOVERED
        and report.get(3) != State.ROLLING_BACK
    )


# -- the rig --------------------------------------------------------------------------------------


class ChaosRig:
    """One device, one server, and a seeded sequence of faulty update cycles.

    Args:
        workdir: an empty directory of the rig's (root-owned; a tmpfs is mounted in it).
        seed: seeds every draw (images, faults, the server's loss).
        kinds: the fault kinds to draw from (default: all of :data:`KINDS`).
        image_sizes: smallest and largest image, bytes.
        fragments: fragment sizes to draw from.

    Raises:
        RigError: at start, when not root (the tmpfs) or libfaketime is missing.
    """

    def __init__(
        self,
        workdir: Path,
        seed: int,
        *,
        kinds: tuple[str, ...] = KINDS,
        image_sizes: tuple[int, int] = IMAGE_SIZES,
        fragments: tuple[int, ...] = (4 * KiB, 8 * KiB, 16 * KiB),
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds: unknown {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.dir = Path(workdir)
        self.seed = seed
        self.kinds = kinds
        self.image_sizes = image_sizes
        self.fragments = fragments
        self.rng = random.Random(seed)
        self.key: PrivateKey = generate()
        self.state_dir = self.dir / "fs" / "state"
        self.target = self.dir / "device" / "firmware.bin"
        self.install_log = self.dir / "installs.jsonl"
        self.daemon_log = self.dir / "daemon.log"
        self.config = self.dir / "fota.toml"
        self.clock_file = self.dir / "faketime"
        self.clock_offset = 0
        # Unix socket paths hold 108 bytes: keep them in a short directory of their own.
        self.rundir = Path(tempfile_dir())
        self.socket = self.rundir / "ctl.sock"
        self.server: UpdateServer | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.updates: dict[str, Published] = {}
        self.versions: dict[str, str] = {}
        self.killed: set[int] = set()
        self.daemons: list[int] = []
        self.fault_counts: Counter[str] = Counter()
        self.results: list[CycleResult] = []
        self._mounted = False
        self._notify: NotifySocket | None = None
        self._hooks = _HookEvents()
        self._hook_transport: asyncio.DatagramTransport | None = None
        self._lock = asyncio.Lock()
        self._image_path = ""
        self._image_seen = 0
        self._request_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._restarts = 0
        self._start_failures: list[str] = []
        self._fillers: list[Path] = []
        self._faketime = ""
        self._second_problems: list[str] = []
        self._stuck: list[str] = []
        # Per update that has ended: how many installs it had then (no more may follow).
        self._ended_before: dict[str, int] = {}
        self._reported: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> ChaosRig:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Mount the state tmpfs, start the server and the daemon, install 1.0 (no faults).

        Raises:
            RigError: not root, or libfaketime missing.
        """
        self._faketime = find_libfaketime()
        if os.geteuid() != 0:
            raise RigError("the chaos rig mounts a tmpfs for ENOSPC: run it as root (CI does)")
        self.dir.mkdir(parents=True, exist_ok=True)
        fs = self.dir / "fs"
        fs.mkdir()
        _run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(fs)])
        self._mounted = True
        self.target.parent.mkdir(mode=0o755)
        self.clock_file.write_text("+0s\n")
        (self.dir / "installer.py").write_text(INSTALLER)
        trust = save_keypair(self.key, self.dir / "signing.key")
        loop = asyncio.get_running_loop()
        events = self.rundir / "events"
        self._hook_transport, _ = await loop.create_datagram_endpoint(
            lambda: self._hooks, local_addr=str(events), family=socket.AF_UNIX
        )
        self.server = UpdateServer(
            self.dir / "server", self.key, _kid(self.key), faults=FaultPlan(seed=self.seed)
        )
        await self.server.start()
        self.server.request_hook = self._on_request
        self._write_config(trust, events)
        self._notify = NotifySocket(self.rundir / "notify")
        await self.start_daemon()
        first = await self.cycle(0)
        if first.violations:
            raise RigError(f"the first install (no faults) failed: {first.violations}")

    def _write_config(self, trust: Path, events: Path) -> None:
        assert self.server is not None
        env = {
            "CHAOS_REPO": str(Path(__file__).resolve().parent.parent),
            "CHAOS_LOG": str(self.install_log),
            "CHAOS_EVENTS": str(events),
            "CHAOS_TARGET": str(self.target),
        }
        table = ", ".join(f'{k} = "{v}"' for k, v in env.items())
        # Budgets well above every fault window: a fault must never be what fails an update.
        self.config.write_text(
            f"""
server = "{self.server.uri}"
device_id = "{DEVICE}"
device_class = "{DEVICE_CLASS}"
state_dir = "{self.state_dir}"
trust = ["{trust}"]
ack_timeout = 0.25
min_rto = 0.05
retry_base = 0.05
retry_cap = 0.2
report_retry_cap = 0.2
journal_retry = 0.2
observe_refresh = 0.5
observe_backoff_base = 0.05
observe_backoff_cap = 0.5
not_found_budget = 20.0
max_attempts = 50
restart_limit = 50

[installers.firmware]
kind = "command"
command = ["{sys.executable}", "{self.dir / "installer.py"}"]
timeout = 60
env = {{ {table} }}

[authorization]
mode = "auto"

[control]
socket = "{self.socket}"
mode = "0600"

[log]
level = "info"
format = "json"
"""
        )

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LD_PRELOAD": self._faketime,
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
            # Re-read at most once a second: a step lands within a second, and reading the
            # file at every clock call (FAKETIME_NO_CACHE) made the daemon ten times slower
            # (a 64 KiB download took 10 s instead of 0.8 s).
            "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    async def start_daemon(self) -> None:
        """Start ``fota daemon`` and wait for ``READY=1`` (a start that fails is recorded)."""
        assert self._notify is not None
        for _attempt in range(3):
            self._notify.arm()
            with open(self.daemon_log, "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "fota",
                    "daemon",
                    "--config",
                    str(self.config),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.dir,
                    env={**self._env(), "NOTIFY_SOCKET": str(self._notify.path)},
                )
            self.proc = proc
            self.daemons.append(proc.pid)
            ready = asyncio.ensure_future(self._notify.ready())
            exited = asyncio.ensure_future(proc.wait())
            done, _ = await asyncio.wait(
                {ready, exited}, timeout=BOUND, return_when="FIRST_COMPLETED"
            )
            ready.cancel()
            if ready in done and not ready.cancelled():
                exited.cancel()
                return
            if exited in done:
                code = exited.result()
                self._start_failures.append(f"daemon {proc.pid} exited {code} before READY=1")
                self.proc = None
                if code == LOCKED_EXIT:
                    continue  # what systemd does: try again (the lock is the kernel's to free)
                raise RigError(f"daemon exited {code} before READY=1 (see {self.daemon_log})")
            exited.cancel()
            self._start_failures.append(f"daemon {proc.pid} not ready in {BOUND} s")
            raise RigError(f"daemon {proc.pid} not ready within {BOUND} s")
        raise RigError(f"daemon kept exiting {LOCKED_EXIT} (locked) after a kill")

    async def kill_daemon(self) -> None:
        """``kill -9`` the daemon and everything it started, and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            signal_tree(proc.pid, signal.SIGKILL)
            self.killed.add(proc.pid)
        await asyncio.wait_for(proc.wait(), BOUND)

    async def aclose(self) -> None:
        """Stop the daemon (SIGTERM), the server, and unmount; leave the logs."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), BOUND)
            except TimeoutError:
                signal_tree(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self.server is not None:
            await self.server.stop()
        if self._hook_transport is not None:
            self._hook_transport.close()
        if self._notify is not None:
            self._notify.close()
        if self._mounted:
            _run(["umount", "-l", str(self.dir / "fs")])
            self._mounted = False
        shutil.rmtree(self.rundir, ignore_errors=True)

    # -- moments --------------------------------------------------------------------------------

    def _on_request(self, entry: RequestLog) -> None:
        if entry.path != self._image_path:
            return
        self._image_seen += 1
        for waiter in [w for w in self._request_waiters if w[0] <= self._image_seen]:
            self._request_waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(None)

    def _after_requests(self, count: int) -> asyncio.Future[None]:
        """Done when the cycle's image has seen ``count`` requests in all."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._image_seen >= count:
            future.set_result(None)
        else:
            self._request_waiters.append((count, future))
        return future

    async def _first(self, *waits: asyncio.Future[Any], timeout: float | None = None) -> bool:
        """Wait until one of ``waits`` is done (or ``timeout`` passed); cancel the rest.

        Returns whether one was done in time.
        """
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            for w in waits:
                if not w.done():
                    w.cancel()
        return bool(done)

    # -- faults ---------------------------------------------------------------------------------

    async def _fault(
        self, fault: Fault, uid: str, final: asyncio.Future[Any], done: list[str]
    ) -> None:
        """Wait for the fault's moment (or the update's end), then make it happen."""
        # A moment that does not come is an update that does not move: that is a failure
        # (the fault then happens anyway, so the cycle goes on).
        came = True
        if fault.moment == "requests":
            moment = self._after_requests(fault.n)
            came = await self._first(moment, asyncio.shield(final), timeout=COMPLETE_BOUND)
        elif fault.moment == "hook":
            moment = self._hooks.wait(fault.hook, uid)
            came = await self._first(moment, asyncio.shield(final), timeout=COMPLETE_BOUND)
        elif fault.moment == "after":
            came = await self._first(asyncio.shield(final), timeout=COMPLETE_BOUND)
        if not came:
            self._stuck.append(
                f"completes: the update did not get to the moment of '{fault.describe()}' "
                f"within {COMPLETE_BOUND:.0f} s"
            )
        assert self.server is not None
        digest = self.updates[uid].image_sha256
        async with self._lock:
            done.append(fault.describe())
            self.fault_counts[fault.kind] += 1
            if fault.kind == "kill":
                await self.kill_daemon()
                self._restarts += 1
                await self.start_daemon()
            elif fault.kind == "truncate_journal":
                await self.kill_daemon()
                journal = self.state_dir / "journal.cbor"
                with contextlib.suppress(FileNotFoundError):
                    size = journal.stat().st_size
                    os.truncate(journal, size * fault.size // 1000)
                self._restarts += 1
                await self.start_daemon()
            elif fault.kind == "server_restart":
                await self.server.stop()
                # A restarted server has no observers: the daemon must find that out itself.
                self.server._ann = _Announcements(self.server)
                await asyncio.sleep(fault.seconds)  # the length of the outage, not a wait on it
                await self.server.start()
            elif fault.kind == "clock_step":
                self.clock_offset += int(fault.seconds)
                self.clock_file.write_text(f"{self.clock_offset:+d}s\n")
            elif fault.kind == "second_instance":
                await self._second_instance()
            elif fault.kind == "not_found":
                self.server.faults.missing(digest)
            elif fault.kind == "loss_burst":
                self.server.faults.lose(fault.percent)
            elif fault.kind == "enospc":
                self._fillers.append(_fill(self.dir / "fs"))
        # Windows: they end after so many image requests, or a time, or the update's end.
        if fault.kind in ("not_found", "loss_burst"):
            await self._first(
                self._after_requests(self._image_seen + fault.size),
                asyncio.shield(final),
                timeout=fault.seconds,
            )
            if fault.kind == "not_found":
                self.server.faults.missing_images.discard(digest.hex())
            else:
                self.server.faults.lose(0)
        elif fault.kind == "enospc":
            await asyncio.sleep(fault.seconds)  # how long the disk stays full
            for filler in self._fillers:
                filler.unlink(missing_ok=True)
            self._fillers.clear()

    async def _second_instance(self) -> None:
        """Start a second daemon on the same state directory while the first is frozen.

        It must exit 75 and change nothing: the state directory and the target's directory
        are compared before and after (the first daemon and its children are stopped
        meanwhile, so that only the second could have changed them).
        """
        assert self.proc is not None
        frozen = signal_tree(self.proc.pid, signal.SIGSTOP)
        try:
            await until_stopped(frozen)
            before = _snapshot(self.state_dir, self.target.parent)
            other = self.rundir / "second.sock"
            config = self.dir / "second.toml"
            config.write_text(self.config.read_text().replace(str(self.socket), str(other)))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fota",
                "daemon",
                "--config",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.dir,
                env=self._env(),
            )
            out, _ = await asyncio.wait_for(proc.communicate(), BOUND)
            after = _snapshot(self.state_dir, self.target.parent)
            problems = []
            if proc.returncode != LOCKED_EXIT:
                problems.append(f"exit {proc.returncode}, not {LOCKED_EXIT}")
            if other.exists():
                problems.append("it bound its control socket")
            changed = sorted(
                k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
            )
            if changed:
                problems.append(f"it changed {changed}")
            if problems:
                self._second_problems.append(
                    "; ".join(problems) + f" (output: {out.decode(errors='replace')[-400:]!r})"
                )
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    # -- a cycle --------------------------------------------------------------------------------

    async def cycle(self, number: int) -> CycleResult:
        """Publish one update, run its faults, wait for its end, check every invariant."""
        assert self.server is not None
        started = time.monotonic()
        image, fragment, faults = draw_cycle(
            self.rng, number, self.kinds, self.image_sizes, self.fragments
        )
        version = f"2.{number}.0"
        published = self.server.make_manifest(
            image, version, device_class=DEVICE_CLASS, fragment_size=fragment, polite=False
        )
        uid = published.update_id
        self.updates[uid] = published
        self.versions[uid] = version
        result = CycleResult(number, version, uid)
        self._second_problems = []
        self._stuck = []
        self._start_failures = []
        self._restarts = 0
        self._image_path = f"/fota/img/{published.image_sha256.hex()}"
        self._image_seen = 0
        self._request_waiters.clear()

        def mine(r: dict[int, Any]) -> bool:
            # The update's end: its SUCCESS (a failed attempt may be revived; see below).
            return r.get(5) == uid and is_final(r) and r.get(4) == ResultCode.SUCCESS

        final = asyncio.ensure_future(
            self.server.wait_for_report(mine, COMPLETE_BOUND * 4, device=DEVICE)
        )

        def ended(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                return  # it did not end
            # Installs of the update so far: every one began (and was logged) before the end.
            runs = [e for e in self.install_entries() if _is_install(e) and e["update_id"] == uid]
            self._ended_before.setdefault(uid, len(runs))

        final.add_done_callback(ended)
        self.server.announce_raw(published.raw, published.sequence)
        self.server.published.append(published)
        happened: list[str] = []
        try:
            tasks = [asyncio.ensure_future(self._fault(f, uid, final, happened)) for f in faults]
            if tasks:
                await asyncio.wait_for(asyncio.gather(*tasks), COMPLETE_BOUND * 2)
            # The faults have stopped: the update must now end, and end well.
            try:
                await asyncio.wait_for(asyncio.shield(final), COMPLETE_BOUND)
            except TimeoutError:
                result.violations.append(
                    f"completes: no SUCCESS report {COMPLETE_BOUND:.0f} s after the faults "
                    f"stopped (final reports: {self._finals_of(uid)})"
                )
            # An attempt that failed before the SUCCESS: only a full disk before the first
            # fragment may do that (NOT_ENOUGH_SPACE is final for its attempt, docs/protocol.md;
            # the announcement, seen again, revives the update as its next attempt).
            for r in self.final_reports().get(uid, []):
                if r.get(4) == ResultCode.SUCCESS:
                    continue
                if r.get(4) == ResultCode.NOT_ENOUGH_SPACE and any(
                    f.kind == "enospc" for f in faults
                ):
                    continue
                result.violations.append(
                    f"completes: attempt {r.get(10, 0)} ended {_result_name(r)}: {r.get(8, '')!r}"
                )
            result.violations.extend(await self.check(uid))
        except Exception as exc:  # a fault that could not be made is a failure of the run
            result.violations.append(f"rig: {type(exc).__name__}: {exc}")
        finally:
            if not final.done():
                final.cancel()
            for filler in self._fillers:
                filler.unlink(missing_ok=True)
            self._fillers.clear()
            self.server.faults.lose(0)
            self.server.faults.missing_images.clear()
        result.faults = happened
        result.restarts = self._restarts
        result.seconds = time.monotonic() - started
        self.results.append(result)
        return result

    # -- invariants -----------------------------------------------------------------------------

    async def check(self, uid: str) -> list[str]:
        """Every invariant after a cycle whose update is ``uid``; the broken ones, described."""
        assert self.server is not None
        out: list[str] = []
        published = self.updates[uid]
        # 1. running, without help
        out.extend(f"running: {p}" for p in self._start_failures)
        out.extend(f"second_instance: {p}" for p in self._second_problems)
        out.extend(self._stuck)
        if self.proc is None or self.proc.returncode is not None:
            out.append("running: the daemon is not running")
        else:
            problem = await self._settle(self.versions[uid])
            if problem:
                out.append(f"running: {problem}")
        # 2. verified (what was handed on) and 3. one install per update
        images = {
            u: (p.image_sha256.hex(), p.image_path.stat().st_size) for u, p in self.updates.items()
        }
        out.extend(
            install_violations(
                self.install_entries(), images, self.killed, self._ended_before, self.versions
            )
        )
        # 2. verified: what is in place
        try:
            installed = hashlib.sha256(self.target.read_bytes()).digest()
        except FileNotFoundError:
            installed = b""
        if installed != published.image_sha256:
            out.append(f"verified: the target is not {self.versions[uid]}'s signed image")
        # 4. exactly one final report per update
        out.extend(final_violations(self.final_reports(), self.versions))
        # What the run's history broke is told once, in the cycle that saw it first.
        new = [v for v in out if v not in self._reported]
        self._reported.update(new)
        return new

    async def _settle(self, version: str) -> str:
        """Wait (on control socket events) until the daemon is idle, running ``version``.

        The final report may come before the daemon's last step is journaled, or a fault after
        it (a truncated journal) may make it do that step again: the daemon must still get
        there by itself. Returns the problem ("" when there is none).
        """
        status: dict[str, Any] = {}

        def settled() -> bool:
            return status.get("state") == "IDLE" and status.get("installed_version") == version

        try:
            async with ControlClient(self.socket, timeout=BOUND) as control:
                status = await control.subscribe(["state", "completed", "failed"])

                async def wait() -> None:
                    nonlocal status
                    while not settled():
                        await control.next_event()
                        status = await control.status()

                await asyncio.wait_for(wait(), COMPLETE_BOUND)
        except (ControlError, OSError) as exc:
            return f"the control socket did not answer: {exc}"
        except TimeoutError:
            return (
                f"status {status.get('state')} running {status.get('installed_version')}, "
                f"not IDLE running {version}, {COMPLETE_BOUND:.0f} s after the faults"
            )
        return ""

    def install_entries(self) -> list[dict[str, Any]]:
        """Every line the installer logged, oldest first."""
        try:
            text = self.install_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _finals_of(self, uid: str) -> list[str]:
        finals = self.final_reports().get(uid, [])
        return [f"{_result_name(r)} (attempt {r.get(10, 0)})" for r in finals]

    def final_reports(self) -> dict[str, list[dict[int, Any]]]:
        """The final reports the server received, by update id."""
        assert self.server is not None
        out: dict[str, list[dict[int, Any]]] = {}
        for report in self.server.reports_for(DEVICE):
            if is_final(report):
                out.setdefault(report[5], []).append(report)
        return out

    # -- the whole run --------------------------------------------------------------------------

    async def run(
        self, cycles: int, on_cycle: Callable[[CycleResult], None] | None = None
    ) -> list[CycleResult]:
        """Run ``cycles`` faulty cycles (after the first install); return their results."""
        out = []
        for number in range(1, cycles + 1):
            result = await self.cycle(number)
            out.append(result)
            if on_cycle is not None:
                on_cycle(result)
        return out

    def replay_hint(self, result: CycleResult) -> str:
        """What a failed cycle needs to be looked at and replayed."""
        lines = [
            f"chaos seed {self.seed}, cycle {result.cycle} ({result.version}, "
            f"update {result.update_id[:16]}):",
            *(f"  fault: {f}" for f in result.faults),
            *(f"  VIOLATION {v}" for v in result.violations),
            f"  logs: {self.daemon_log}, installs: {self.install_log}",
            f"  replay: python bench/chaos.py --seed {self.seed} --cycles {result.cycle}",
        ]
        return "\n".join(lines)


# -- invariants as plain functions (tests/e2e/test_chaos.py checks that they can fail) --------


def install_violations(
    entries: list[dict[str, Any]],
    images: dict[str, tuple[str, int]],
    killed: set[int],
    ended_before: dict[str, int],
    versions: dict[str, str],
) -> list[str]:
    """Invariants 2 and 3 over the installer's log.

    Args:
        entries: the installer's log lines (``action``, ``step``, ``update_id``, ``daemon``,
            and for an install ``sha256`` and ``size`` of the candidate it was handed).
        images: per update id, the signed image's SHA-256 (hex) and size.
        killed: pids of the daemons the rig killed with SIGKILL.
        ended_before: per update that has ended, how many installs it had begun by then.
        versions: per update id, its version (for messages).
    """
    out: list[str] = []
    by_update: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if not _is_install(e):
            continue
        by_update.setdefault(e["update_id"], []).append(e)
        want = images.get(e["update_id"])
        if want is None:
            out.append(f"verified: an install of an update never published: {e}")
        elif (e["sha256"], e["size"]) != want:
            out.append(
                f"verified: the installer was handed {e['size']} bytes with digest "
                f"{e['sha256'][:16]} for {versions.get(e['update_id'], e['update_id'])}, "
                "not the signed image"
            )
    for u, runs in by_update.items():
        name = versions.get(u, u)
        for earlier, later in itertools.pairwise(runs):
            if earlier["daemon"] == later["daemon"] or earlier["daemon"] not in killed:
                out.append(
                    f"one_install: {name} installed twice, by daemons {earlier['daemon']} and "
                    f"{later['daemon']} (the first was not killed)"
                )
        if len(runs) > ended_before.get(u, len(runs)):
            out.append(f"one_install: {name} installed again after its final report")
    return out


def final_violations(
    finals: dict[str, list[dict[int, Any]]], versions: dict[str, str]
) -> list[str]:
    """Invariant 4: exactly one final report per attempt of every update published.

    An update has at least one attempt (report key 10, absent for the first); each attempt
    ends with exactly one final report (docs/protocol.md, "Result codes").
    """
    out = []
    for u, version in versions.items():
        got = finals.get(u, [])
        attempts: dict[int, list[dict[int, Any]]] = {}
        for r in got:
            attempts.setdefault(int(r.get(10, 0)), []).append(r)
        if not got:
            out.append(f"one_final: {version} has 0 final reports []")
        for attempt, reports in sorted(attempts.items()):
            if len(reports) != 1:
                names = [_result_name(r) for r in reports]
                which = f" attempt {attempt}" if attempt else ""
                out.append(f"one_final: {version}{which} has {len(reports)} final reports {names}")
    return out


# -- small helpers --------------------------------------------------------------------------------


def tempfile_dir() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="chaos-", dir="/tmp")
    os.chmod(path, 0o700)
    return path


def _kid(key: PrivateKey) -> bytes:
    from fota.core.manifest import kid_for

    return kid_for(key.public_key())


def _is_install(entry: dict[str, Any]) -> bool:
    return bool(entry["action"] == "install" and entry["step"] == "begin")


def _result_name(report: dict[int, Any]) -> str:
    result = report.get(4)
    try:
        return ResultCode(result).name if isinstance(result, int) else str(result)
    except ValueError:
        return str(result)


def _run(argv: list[str]) -> None:
    subprocess.run(
        argv,
        check=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def _fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; return the filler."""
    filler = directory / f"filler-{len(os.listdir(directory))}"
    chunk = bytes(64 * KiB)
    with open(filler, "wb", buffering=0) as f:
        for piece in (chunk, bytes(512), bytes(1)):
            with contextlib.suppress(OSError):
                while True:
                    f.write(piece)
    return filler


__all__ = [
    "KINDS",
    "ChaosRig",
    "CycleResult",
    "Fault",
    "NotifySocket",
    "RigError",
    "draw_faults",
    "final_violations",
    "find_libfaketime",
    "install_violations",
    "is_final",
    "plan",
    "signal_tree",
]
