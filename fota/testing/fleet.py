"""Fleet simulation: N fota clients against one update server, each with its own socket and state.

    python -m fota.testing.fleet --devices 200 [--size BYTES] [--seed S] [--workers K] [--json]

One command runs a whole fleet on this machine and reports how an update round went:

1. The update server (:class:`~fota.testing.UpdateServer`) runs in a subprocess of its own, so
   that its CPU time is measured alone (from ``/proc/PID/stat``, by the coordinator).
2. The devices run in K worker subprocesses (default: the CPU count), each running its share of
   :class:`~fota.Client` objects in one asyncio loop. Every device has its own state directory,
   target file and sockets: its ``CoapTransport`` opens an aiocoap context (one UDP socket) and
   each download opens the windowed downloader's own socket, as on a real gateway.
3. Round 1, *first install*: ``1.0`` (a polite image) is published; an empty device installs
   at once without asking (``docs/polite-deployment.md``, precedence 1).
4. Round 2, *polite*: ``2.0`` is published and timed, from the publish to the last final report
   the server receives. Each device's handler answers the download and the install questions
   with seeded-random polite decisions (:class:`Mix`, drawn by :func:`plan_for`): authorize at
   once, defer a short random time through ``Decision.defer`` (the client's own deferral
   machinery asks again when it ends), or reject with a small probability.

The coordinator (this process) talks to its children over pipes, in JSON lines: commands on a
child's stdin, events on its stdout (the children move their own stdout to stderr, so a stray
print cannot break the protocol; their logs go to files in the work directory). It waits on
those lines, never on sleeps. A child ends when its stdin closes, so a coordinator that dies
(Ctrl-C, ``kill -9``) leaves no orphans; the children also ask the kernel for SIGTERM when their
parent dies, and ignore SIGINT so that Ctrl-C shuts them down in order, through the coordinator.

What a round reports (:class:`RoundResult`): completion time, per-device completion p50 / p95 /
max, server and devices' CPU seconds, errors (devices that did not end as planned within the
timeout, and error reports), retries (image requests beyond one per block per downloading
device, from the server's request log; the downloaders' own retransmissions; report deliveries
that failed and were retried; reports the server received twice), rejections and deferrals, and
whether every device that did not reject installed the published digest.

Simulation limits, on purpose: all processes share this machine's cores, so a large fleet is
CPU-bound here long before a real server would be; and each worker gives its default executor a
thread per device, since every download runs in a worker thread and on a real gateway each
device is a process of its own (asyncio's default of ``min(32, cpus + 4)`` threads would queue
downloads behind each other and measure the simulator, not fota).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from fota.errors import ResultCode

if TYPE_CHECKING:
    from fota.handler import Decision, UpdateInfo
    from fota.transport import Announcement, Block, BlockFetcher, Transport

DEVICE_CLASS = "fleet-gw"
"""The device class of every simulated device."""

STEP_RESULTS = frozenset(
    {ResultCode.INITIAL, ResultCode.DEFERRED, ResultCode.FORCED, ResultCode.AUTHORIZED}
)
"""Results of step reports; every other result ends an update (as in the pytest plugin)."""
EXPECTED_RESULTS = frozenset(
    {*STEP_RESULTS - {ResultCode.FORCED}, ResultCode.SUCCESS, ResultCode.REJECTED}
)
"""Results a healthy polite round reports (nothing forces: no deadline, no deferral bound);
any other is counted as an error report."""


def result_name(code: int) -> str:
    """The name of a result code (the number itself when it is not one of fota's)."""
    try:
        return ResultCode(code).name
    except ValueError:
        return str(code)


LINE_LIMIT = 64 * 1024 * 1024
"""Longest JSON line from a child (a worker's collection of 100 devices is about 30 KB)."""
STOP_GRACE = 30.0
"""Seconds a child gets to shut down after its stdin closed, before it is killed."""
OBSERVE_WAIT = 120.0
"""Seconds the server waits for every device to observe its announcement before a publish."""


class FleetError(Exception):
    """The simulation itself failed (a child died or broke the protocol), not a device."""


# -- polite decisions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mix:
    """How simulated applications answer an authorization question, drawn per question.

    Each question (download, then install) draws: reject with probability ``reject``, defer
    with probability ``defer`` for a time uniform in ``defer_min..defer_max`` seconds (then the
    client asks again and the next draw decides), else authorize. After ``max_defers``
    deferrals of one step a draw that would defer authorizes instead, so a round ends.

    The default mix is a polite fleet on an ordinary day: most devices say yes at once, about a
    third are busy for a moment (up to two deferrals of 0.2..2 s per step), one in twenty
    declines the update at each step.

    Attributes:
        defer: probability of a deferral per draw, 0..1.
        reject: probability of a rejection per draw, 0..1.
        defer_min: shortest deferral, seconds.
        defer_max: longest deferral, seconds.
        max_defers: most deferrals of one step.
    """

    defer: float = 0.30
    reject: float = 0.05
    defer_min: float = 0.2
    defer_max: float = 2.0
    max_defers: int = 2

    def __post_init__(self) -> None:
        if not (0 <= self.defer <= 1 and 0 <= self.reject <= 1 and self.defer + self.reject <= 1):
            raise ValueError(
                f"mix: defer {self.defer} and reject {self.reject} must be probabilities"
                " with a sum of at most 1"
            )
        if not 0 <= self.defer_min <= self.defer_max:
            raise ValueError(f"mix: need 0 <= defer_min {self.defer_min} <= defer_max")
        if self.max_defers < 0:
            raise ValueError(f"mix: max_defers {self.max_defers} must not be negative")


AUTHORIZE_ALL = Mix(defer=0.0, reject=0.0)
"""Every question answered yes at once (pure throughput; the first install's mix)."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step's answers: deferrals in order, then a rejection or an authorization.

    Attributes:
        defers: the deferrals' lengths in seconds, in the order they are answered.
        reject: after them, reject (else authorize).
    """

    defers: tuple[float, ...] = ()
    reject: bool = False


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device's answers for one update.

    Attributes:
        download: answers to the download question.
        install: answers to the install question (not asked after a download rejection).
    """

    download: StepPlan
    install: StepPlan

    @property
    def downloads(self) -> bool:
        """The device downloads the image (it did not reject the download)."""
        return not self.download.reject

    @property
    def rejects(self) -> bool:
        """The update ends REJECTED on this device."""
        return self.download.reject or self.install.reject

    @property
    def deferrals(self) -> int:
        """Deferrals this device answers (those of the install only if it downloads)."""
        return len(self.download.defers) + (len(self.install.defers) if self.downloads else 0)


def plan_for(seed: int, device: str, version: str, mix: Mix) -> DevicePlan:
    """The answers ``device`` gives for ``version``: a function of these arguments only.

    The simulator's handler and the coordinator's expectations both call it, so which devices
    reject is known before the round runs, whichever worker a device lands in.
    """
    rng = random.Random(f"fota-fleet:{seed}:{device}:{version}")

    def step() -> StepPlan:
        defers: list[float] = []
        while True:
            draw = rng.random()
            if draw < mix.reject:
                return StepPlan(tuple(defers), True)
            if draw < mix.reject + mix.defer and len(defers) < mix.max_defers:
                defers.append(round(rng.uniform(mix.defer_min, mix.defer_max), 3))
                continue
            return StepPlan(tuple(defers), False)

    # Both steps are always drawn, so one step's plan does not shift the other's draws.
    download = step()
    install = step()
    return DevicePlan(download, install)


def device_names(count: int) -> list[str]:
    """The simulated devices' ids: ``dev0000`` .. (at least four digits)."""
    width = max(4, len(str(max(0, count - 1))))
    return [f"dev{i:0{width}d}" for i in range(count)]


class FleetHandler:
    """A simulated application: answers as :func:`plan_for` says and counts what it was asked.

    Implements :class:`fota.UpdateHandler`. The mix of each version comes from ``mixes``
    (set by the worker before each round); a version without one is authorized at once.

    Args:
        device: the device id.
        seed: the fleet's seed.
        mixes: the mix per version (shared with the worker, which fills it in).
        clock: wall-clock source for deferral ends (the client's clock).
    """

    def __init__(
        self,
        device: str,
        seed: int,
        mixes: dict[str, Mix],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device = device
        self.seed = seed
        self.mixes = mixes
        self.clock = clock
        self._asked: dict[tuple[str, str], int] = {}
        self.asks = {"download": 0, "install": 0}
        self.defers = 0
        self.rejects = 0
        self.results: list[str] = []

    def reset(self) -> None:
        """Forget the counts (at the start of a round)."""
        self.asks = {"download": 0, "install": 0}
        self.defers = 0
        self.rejects = 0
        self.results = []

    def _answer(self, update: UpdateInfo, step: str) -> Decision:
        from fota.handler import Decision

        plan = plan_for(
            self.seed, self.device, update.version, self.mixes.get(update.version, AUTHORIZE_ALL)
        )
        steps = plan.download if step == "download" else plan.install
        key = (update.update_id, step)
        asked = self._asked.get(key, 0)
        self._asked[key] = asked + 1
        self.asks[step] += 1
        if asked < len(steps.defers):
            self.defers += 1
            until = datetime.fromtimestamp(self.clock(), UTC) + timedelta(
                seconds=steps.defers[asked]
            )
            return Decision.defer(until, "fleet: busy")
        if steps.reject:
            self.rejects += 1
            return Decision.reject("fleet: declined")
        return Decision.authorize()

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        """Answer the download question from the plan."""
        return self._answer(update, "download")

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        """Answer the install question from the plan."""
        return self._answer(update, "install")

    async def on_progress(self, update: UpdateInfo, done: int, total: int) -> None:
        """Ignore progress."""

    async def on_install_progress(self, update: UpdateInfo, percent: int) -> None:
        """Ignore install progress."""

    async def on_complete(self, update: UpdateInfo, result: Any, detail: str) -> None:
        """Remember how the update ended."""
        self.results.append(f"{update.version}:{getattr(result, 'name', result)}")

    async def on_forced(self, update: UpdateInfo, step: str, reason: str) -> None:
        """Ignore forcing (nothing forces in a fleet run: no deadline, no deferral bound)."""


class CountingTransport:
    """A :class:`~fota.transport.Transport` around another that counts retries.

    ``fota.Client`` does not expose its downloaders; the windowed one counts its own
    retransmissions (``WindowFetcher.retransmits``) and requests (``sent``), so this keeps
    every fetcher it hands out. Report deliveries are counted here: a failed one is retried by
    the engine with a back-off. aiocoap's own CON retransmissions (reports, manifest fetches,
    announcements) stay inside aiocoap and are not counted.

    Args:
        inner: the transport that does the work.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.fetchers: list[BlockFetcher] = []
        self.report_posts = 0
        self.report_failures = 0

    def reset(self) -> None:
        """Forget the counts (at the start of a round)."""
        self.fetchers = []
        self.report_posts = 0
        self.report_failures = 0

    @property
    def retransmits(self) -> int:
        """Block requests the downloaders sent again after a timeout."""
        return sum(int(getattr(f, "retransmits", 0)) for f in self.fetchers)

    @property
    def block_requests(self) -> int:
        """Block requests the downloaders sent, retransmissions included."""
        return sum(int(getattr(f, "sent", 0)) for f in self.fetchers)

    def announcements(self) -> AsyncIterator[Announcement]:
        """The inner transport's announcements."""
        return self.inner.announcements()

    def check_now(self) -> None:
        """Fetch the announcement now."""
        self.inner.check_now()

    async def fetch(self, uri: str, *, limit: int) -> bytes:
        """Fetch a small resource."""
        return await self.inner.fetch(uri, limit=limit)

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        """Fetch one block."""
        return await self.inner.fetch_block(uri, offset, block_size)

    def block_fetcher(self, uri: str, *, window: int, block_size: int) -> BlockFetcher:
        """The inner transport's fetcher, kept for its counters (one per download attempt)."""
        fetcher = self.inner.block_fetcher(uri, window=window, block_size=block_size)
        self.fetchers.append(fetcher)
        return fetcher

    async def post_report(self, body: bytes) -> None:
        """Deliver a report, counting the attempt and its failure."""
        self.report_posts += 1
        try:
            await self.inner.post_report(body)
        except Exception:
            self.report_failures += 1
            raise

    async def aclose(self) -> None:
        """Release the inner transport's sockets."""
        await self.inner.aclose()


# -- what a run measures --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetOptions:
    """Settings of a fleet run.

    Attributes:
        devices: number of simulated devices.
        size: image size in bytes (both rounds).
        seed: seeds the decisions and the images' bytes.
        workers: device worker processes (None: the CPU count).
        mix: the polite round's decisions.
        timeout: seconds a round may take before unfinished devices count as errors.
        ack_timeout: the clients' CoAP ACK_TIMEOUT (also the downloader's first timeout).
        window: the clients' image requests in flight (``Config.window``).
        block_size: the clients' Block2 size.
        fragment_size: the manifest's fragment size (each verified fragment is fsynced and
            journaled).
        work_dir: where the server's and devices' files go (None: a temporary directory,
            removed afterwards).
    """

    devices: int = 20
    size: int = 64 * 1024
    seed: int = 1
    workers: int | None = None
    mix: Mix = field(default_factory=Mix)
    timeout: float = 600.0
    ack_timeout: float = 2.0
    window: int = 16
    block_size: int = 1024
    fragment_size: int = 16 * 1024
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices: {self.devices} must be at least 1")
        if self.size < 1:
            raise ValueError(f"size: {self.size} must be at least 1 byte")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: {self.workers} must be at least 1")
        if self.timeout <= 0:
            raise ValueError(f"timeout: {self.timeout} must be positive")

    @property
    def worker_count(self) -> int:
        """Worker processes actually started (never more than devices)."""
        return max(1, min(self.devices, self.workers or os.cpu_count() or 1))


@dataclass
class RoundResult:
    """How one update round went across the fleet.

    Times are seconds from the publish (the server's monotonic clock). Percentiles are
    nearest-rank, over the devices that completed with SUCCESS.

    Attributes:
        name: ``first install`` or ``polite``.
        version: the published version.
        update_id: the update's id.
        devices: devices in the fleet.
        completed: devices that reported SUCCESS and hold the published image's digest.
        rejected: devices that were planned to reject, reported REJECTED and kept their image.
        errors: every other device (see ``error_devices``).
        wall: publish to the last final report the server received.
        completion_p50: median device's completion time.
        completion_p95: 95th percentile of the devices' completion times.
        completion_max: the slowest device's completion time.
        server_cpu: the server process's CPU seconds (user + system) during the round.
        devices_cpu: the worker processes' CPU seconds during the round.
        image_blocks: Block2 requests one complete download needs.
        downloads_expected: devices that download (all but those rejecting the download).
        image_requests: image requests the server logged.
        image_retries: image requests beyond one per block per downloading device.
        client_block_requests: image requests the devices' downloaders sent.
        client_retransmits: of those, sent again after a timeout.
        download_attempts: downloads started (a failed attempt is retried by a new one).
        manifest_requests: manifest requests the server logged.
        server_requests: every request the server logged.
        max_in_flight: most image requests the server held at once (received, not yet
            answered; the test server answers each at once, so 1 unless faults delay them).
        udp_rcvbuf_drops: datagrams the kernel dropped because a UDP socket's receive buffer
            was full, machine-wide (``/proc/net/snmp`` RcvbufErrors; None where unreadable):
            on loopback that is the only way a request gets lost.
        report_posts: report POSTs the server logged.
        reports_received: distinct reports the server recorded.
        reports_sent: reports the devices created (each is delivered until acknowledged).
        report_failures: report deliveries that failed on the device and were retried.
        duplicate_reports: reports the server received more than once (and counted once).
        reports_consistent: ``reports_received == reports_sent``, no report pending, every
            duplicate explained by a failed delivery, and each device's sequence numbers in
            this round consecutive.
        deferrals: DEFERRED reports the server received.
        deferred_devices: devices with at least one deferral.
        asks: authorization questions the handlers answered, per step.
        error_reports: reports with a result outside a healthy round's (see
            :data:`EXPECTED_RESULTS`).
        digests_verified: devices whose target holds the digest they should (the new image,
            or the old one after a rejection).
        error_devices: device -> why it counts as an error.
        outcomes: device -> ``completed``, ``rejected`` or ``error``.
    """

    name: str
    version: str
    update_id: str
    devices: int
    completed: int = 0
    rejected: int = 0
    errors: int = 0
    wall: float | None = None
    completion_p50: float | None = None
    completion_p95: float | None = None
    completion_max: float | None = None
    server_cpu: float = 0.0
    devices_cpu: float = 0.0
    image_blocks: int = 0
    downloads_expected: int = 0
    image_requests: int = 0
    image_retries: int = 0
    client_block_requests: int = 0
    client_retransmits: int = 0
    download_attempts: int = 0
    manifest_requests: int = 0
    server_requests: int = 0
    max_in_flight: int = 0
    udp_rcvbuf_drops: int | None = None
    report_posts: int = 0
    reports_received: int = 0
    reports_sent: int = 0
    report_failures: int = 0
    duplicate_reports: int = 0
    reports_consistent: bool = True
    deferrals: int = 0
    deferred_devices: int = 0
    asks: dict[str, int] = field(default_factory=dict)
    error_reports: int = 0
    digests_verified: int = 0
    error_devices: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The round as a JSON-ready dict."""
        return asdict(self)


@dataclass
class FleetResult:
    """A whole fleet run: its options and both rounds (the polite one is the timed one).

    Attributes:
        options: what ran.
        rounds: the first install, then the polite round.
        total_server_cpu: the server's CPU seconds over the whole run.
        total_devices_cpu: the workers' CPU seconds over the whole run.
    """

    options: FleetOptions
    rounds: list[RoundResult]
    total_server_cpu: float = 0.0
    total_devices_cpu: float = 0.0

    @property
    def timed(self) -> RoundResult:
        """The polite round (the last one)."""
        return self.rounds[-1]

    @property
    def ok(self) -> bool:
        """No device errors in any round."""
        return all(r.errors == 0 for r in self.rounds)

    def as_dict(self) -> dict[str, Any]:
        """The run as one JSON object: the timed round's numbers at the top level."""
        options = asdict(self.options)
        options["work_dir"] = str(self.options.work_dir) if self.options.work_dir else None
        options["workers"] = self.options.worker_count
        return {
            **self.timed.as_dict(),
            "retries": {
                "image_requests": self.timed.image_retries,
                "client_retransmits": self.timed.client_retransmits,
                "report_failures": self.timed.report_failures,
                "duplicate_reports": self.timed.duplicate_reports,
            },
            "options": options,
            "total_server_cpu": self.total_server_cpu,
            "total_devices_cpu": self.total_devices_cpu,
            "rounds": [r.as_dict() for r in self.rounds],
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from ``/proc``.

    Raises:
        OSError: no such process (or no ``/proc``).
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # comm (field 2) may contain spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def udp_rcvbuf_errors() -> int | None:
    """Datagrams Linux dropped for a full UDP receive buffer since boot (machine-wide)."""
    try:
        with open("/proc/net/snmp", encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        names, values = rows[0], rows[1]
        return int(values[names.index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -- the coordinator ------------------------------------------------------------------------


class _Child:
    """One child process of the coordinator and the JSON lines it sends."""

    def __init__(
        self,
        name: str,
        proc: asyncio.subprocess.Process,
        log_path: Path,
        on_event: Callable[[_Child, dict[str, Any]], bool],
        on_exit: Callable[[_Child], None],
    ) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._on_event = on_event
        self._on_exit = on_exit
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.exited = False
        self._reader = asyncio.create_task(self._read(), name=f"fleet-read-{name}")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not a protocol line; the child's logs go to its log file
                if not self._on_event(self, message):
                    self._queue.put_nowait(message)
        finally:
            self.exited = True
            self._queue.put_nowait(None)
            self._on_exit(self)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        if self.exited or self.proc.stdin.is_closing():
            raise FleetError(f"{self.name} is gone:\n{self.log_tail()}")
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        try:
            await self.proc.stdin.drain()
        except ConnectionError as exc:
            raise FleetError(f"{self.name} is gone ({exc}):\n{self.log_tail()}") from exc

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            message = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise FleetError(f"{self.name}: no {event!r} within {timeout:g} s") from None
        if message is None:
            raise FleetError(
                f"{self.name} exited (status {self.proc.returncode}) while we waited for "
                f"{event!r}:\n{self.log_tail()}"
            )
        if message.get("event") == "error":
            raise FleetError(f"{self.name}: {message.get('message')}")
        if message.get("event") != event:
            raise FleetError(f"{self.name}: expected {event!r}, got {message!r}")
        return message

    def cpu(self) -> float:
        try:
            return cpu_seconds(self.pid)
        except (OSError, ValueError, IndexError):
            return 0.0  # already gone: nothing more to count

    async def close(self) -> None:
        """Close its stdin (the child's signal to stop) and wait; kill it if it hangs."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class Fleet:
    """The fleet's processes, for :func:`run_fleet` and benchmarks that need the server too.

    Use as ``async with Fleet(options) as fleet:``, then :meth:`round` once per update. The
    server stays up between rounds, so a benchmark can point another client at
    :attr:`server_uri` (``/fota/img/<sha256>`` serves a round's image).

    Args:
        options: what to run.
        progress: called with a line of text at each step (the command prints them on
            stderr; tests wait on them); None: silent.
    """

    def __init__(
        self, options: FleetOptions, progress: Callable[[str], None] | None = None
    ) -> None:
        self.options = options
        self.progress = progress or (lambda line: None)
        self.devices = device_names(options.devices)
        self.server_uri = ""
        self.server: _Child | None = None
        self.workers: list[_Child] = []
        self.installed: dict[str, str | None] = dict.fromkeys(self.devices)
        """The image digest (hex) each device's target should hold now (None: no file)."""
        self.rounds: list[RoundResult] = []
        self._finals: dict[str, dict[str, tuple[int, float]]] = {}
        self._changed = asyncio.Event()
        self._gone: list[str] = []
        self._own_dir = options.work_dir is None
        self.work = Path(options.work_dir or tempfile.mkdtemp(prefix="fota-fleet-"))

    # -- processes ------------------------------------------------------------------------

    async def _spawn(self, role: str, name: str, spec: dict[str, Any]) -> _Child:
        log_path = self.work / f"{name}.log"
        log_file = _open_log(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fota.testing.fleet",
                role,
                json.dumps(spec),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                limit=LINE_LIMIT,
            )
        finally:
            log_file.close()  # the child has its own copy of the descriptor
        return _Child(name, proc, log_path, self._event, self._exited)

    def _event(self, child: _Child, message: dict[str, Any]) -> bool:
        """Route a final report (sent whenever it arrives); True when handled here."""
        if message.get("event") != "final":
            return False
        finals = self._finals.setdefault(message["update_id"], {})
        finals.setdefault(message["device"], (int(message["result"]), float(message["at"])))
        self._wake()
        return True

    def _exited(self, child: _Child) -> None:
        self._gone.append(child.name)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (checked whenever a child's line arrives)."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    # No await between the check and the clear: no wake-up can be lost.
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def start(self) -> None:
        """Start the server, then the workers, and wait until each says it is ready.

        Raises:
            FleetError: the work directory is not empty (devices would resume old journals
                instead of starting empty), or a child did not start.
        """
        if not self._own_dir and _has_files(self.work):
            raise FleetError(f"work directory {self.work} is not empty")
        (self.work / "devices").mkdir(parents=True, exist_ok=True)
        o = self.options
        self.server = await self._spawn(
            "_server",
            "server",
            {"root": str(self.work / "server"), "fragment_size": o.fragment_size},
        )
        ready = await self.server.expect("ready", 60)
        self.server_uri = ready["uri"]
        self.progress(f"server pid {self.server.pid} at {self.server_uri}")
        shares = [self.devices[i :: o.worker_count] for i in range(o.worker_count)]
        for i, share in enumerate(shares):
            spec = {
                "server": self.server_uri,
                "trust": ready["trust"],
                "root": str(self.work / "devices"),
                "devices": share,
                "seed": o.seed,
                "ack_timeout": o.ack_timeout,
                "window": o.window,
                "block_size": o.block_size,
            }
            self.workers.append(await self._spawn("_worker", f"worker{i}", spec))
        for worker, share in zip(self.workers, shares, strict=True):
            await worker.expect("ready", 120)
            self.progress(f"{worker.name} pid {worker.pid} runs {len(share)} devices")

    async def stop(self) -> None:
        """Stop the workers, then the server (each within :data:`STOP_GRACE`, else killed)."""
        children = [*self.workers, *([self.server] if self.server else [])]
        try:
            await asyncio.gather(*(w.close() for w in self.workers))
        finally:
            if self.server is not None:
                await self.server.close()
            for child in children:  # belt and braces: nothing outlives the fleet
                if child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
                    await child.proc.wait()
            if self._own_dir:
                shutil.rmtree(self.work, ignore_errors=True)

    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def server_cpu(self) -> float:
        """The server's CPU seconds so far."""
        assert self.server is not None
        return self.server.cpu()

    def devices_cpu(self) -> float:
        """The workers' CPU seconds so far."""
        return sum(w.cpu() for w in self.workers)

    def image_uri(self, sha256_hex: str) -> str:
        """Where the server serves the image with this digest."""
        return f"{self.server_uri}/fota/img/{sha256_hex}"

    # -- a round --------------------------------------------------------------------------

    async def round(self, name: str, version: str, mix: Mix) -> RoundResult:
        """Publish ``version``, let every device answer by ``mix``, and measure until done.

        Raises:
            FleetError: a child died or broke the protocol (device failures are counted in
                the result instead).
        """
        assert self.server is not None
        o = self.options
        for worker in self.workers:
            await worker.send({"cmd": "round", "version": version, "mix": asdict(mix)})
        for worker in self.workers:
            await worker.expect("round_ready", 60)
        server_before, devices_before = self.server_cpu(), self.devices_cpu()
        drops_before = udp_rcvbuf_errors()
        image_seed = f"fota-fleet-image:{o.seed}:{version}"
        await self.server.send(
            {
                "cmd": "publish",
                "version": version,
                "size": o.size,
                "image_seed": image_seed,
                "observers": len(self.devices),
            }
        )
        published = await self.server.expect("published", OBSERVE_WAIT + 60)
        uid = published["update_id"]
        t0 = float(published["at"])
        self.progress(f"{name}: published {version} (update {uid})")
        finals = self._finals.setdefault(uid, {})

        def settled() -> bool:
            return len(finals) >= len(self.devices) or bool(self._gone)

        await self._wait_until(settled, o.timeout)
        server_after, devices_after = self.server_cpu(), self.devices_cpu()
        drops_after = udp_rcvbuf_errors()
        if self._gone:
            raise FleetError(f"{', '.join(self._gone)} exited during the round")
        await self.server.send({"cmd": "stats", **published})
        stats = await self.server.expect("stats", 120)
        collected: dict[str, dict[str, Any]] = {}
        for worker in self.workers:
            await worker.send({"cmd": "collect"})
        for worker in self.workers:
            collected.update((await worker.expect("collected", 120))["devices"])
        result = self._judge(name, version, mix, published, stats, collected, finals, t0)
        result.server_cpu = round(server_after - server_before, 3)
        result.devices_cpu = round(devices_after - devices_before, 3)
        self.progress(
            f"{name}: {result.completed} completed, {result.rejected} rejected, "
            f"{result.errors} errors in {result.wall} s"
        )
        if drops_before is not None and drops_after is not None:
            result.udp_rcvbuf_drops = drops_after - drops_before
        self.rounds.append(result)
        return result

    def _judge(
        self,
        name: str,
        version: str,
        mix: Mix,
        published: dict[str, Any],
        stats: dict[str, Any],
        collected: dict[str, dict[str, Any]],
        finals: dict[str, tuple[int, float]],
        t0: float,
    ) -> RoundResult:
        o = self.options
        sha = published["image_sha256"]
        r = RoundResult(name, version, published["update_id"], len(self.devices))
        plans = {d: plan_for(o.seed, d, version, mix) for d in self.devices}
        times: list[float] = []
        for device in self.devices:
            plan, info = plans[device], collected.get(device, {})
            final = finals.get(device)
            digest = info.get("target_sha256")
            previous = self.installed[device]
            why = ""
            if final is None:
                why = f"no final report within {o.timeout:g} s (state {info.get('state')})"
            elif plan.rejects:
                if final[0] != ResultCode.REJECTED:
                    why = f"planned to reject, reported {result_name(final[0])}"
                elif digest != previous:
                    why = "rejected, but its target changed"
            elif final[0] != ResultCode.SUCCESS:
                why = f"final report {result_name(final[0])}"
            elif digest != sha:
                why = "reported SUCCESS, but its target does not hold the image's digest"
            finals_reported = sum(
                1 for _, _, result in stats["reports"].get(device, ()) if result not in STEP_RESULTS
            )
            if not why and finals_reported != 1:
                why = f"{finals_reported} final reports"
            if why:
                r.errors += 1
                r.error_devices[device] = why
                r.outcomes[device] = "error"
                continue
            r.digests_verified += 1
            if plan.rejects:
                r.rejected += 1
                r.outcomes[device] = "rejected"
            else:
                r.completed += 1
                r.outcomes[device] = "completed"
                self.installed[device] = sha
                assert final is not None
                times.append(final[1] - t0)
        if finals:
            r.wall = round(max(at for _, at in finals.values()) - t0, 3)
        r.completion_p50 = _rounded(percentile(times, 0.50))
        r.completion_p95 = _rounded(percentile(times, 0.95))
        r.completion_max = _rounded(percentile(times, 1.0))
        r.image_blocks = math.ceil(o.size / o.block_size)
        r.downloads_expected = sum(1 for p in plans.values() if p.downloads)
        r.image_requests = int(stats["image_requests"])
        r.image_retries = max(0, r.image_requests - r.image_blocks * r.downloads_expected)
        r.manifest_requests = int(stats["manifest_requests"])
        r.server_requests = int(stats["requests"])
        r.max_in_flight = int(stats["max_in_flight"])
        r.report_posts = int(stats["report_posts"])
        r.reports_received = int(stats["reports_received"])
        r.duplicate_reports = int(stats["duplicate_reports"])
        r.asks = {"download": 0, "install": 0}
        pending = 0
        for info in collected.values():
            r.client_block_requests += int(info["block_requests"])
            r.client_retransmits += int(info["retransmits"])
            r.download_attempts += int(info["download_attempts"])
            r.report_failures += int(info["report_failures"])
            r.reports_sent += int(info["reports_sent"])
            pending += int(info["reports_pending"])
            for step in r.asks:
                r.asks[step] += int(info["asks"][step])
        r.reports_consistent = (
            r.reports_received == r.reports_sent
            and pending == 0
            and r.duplicate_reports <= r.report_failures
            and len(collected) == len(self.devices)
        )
        reports: dict[str, list[list[int]]] = stats["reports"]
        for device_reports in reports.values():
            # Each report once, in order: a device's sequence numbers rise by one.
            numbers = [number for number, _, _ in device_reports]
            if numbers != list(range(numbers[0], numbers[0] + len(numbers)) if numbers else []):
                r.reports_consistent = False
            results = [result for _, _, result in device_reports]
            deferred = results.count(ResultCode.DEFERRED)
            r.deferrals += deferred
            r.deferred_devices += bool(deferred)
            r.error_reports += sum(1 for x in results if x not in EXPECTED_RESULTS)
        return r


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _open_log(path: Path) -> BinaryIO:
    # Handed to a child as its stderr; the caller closes our copy once the child has its own.
    return open(path, "ab")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def run_fleet(
    options: FleetOptions, progress: Callable[[str], None] | None = None
) -> FleetResult:
    """Run a fleet: the first install of ``1.0`` everywhere, then the timed polite ``2.0``.

    Args:
        options: what to run.
        progress: called with a line of text at each step (see :class:`Fleet`).

    Raises:
        FleetError: the simulation itself failed (device failures are in the result).
    """
    async with Fleet(options, progress) as fleet:
        await fleet.round("first install", "1.0", AUTHORIZE_ALL)
        await fleet.round("polite", "2.0", options.mix)
        return FleetResult(
            options, list(fleet.rounds), round(fleet.server_cpu(), 3), round(fleet.devices_cpu(), 3)
        )


def format_table(result: FleetResult) -> str:
    """The run as a human-readable table, one column per round."""

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    rows: list[tuple[str, Callable[[RoundResult], str]]] = [
        ("version", lambda r: r.version),
        ("devices", lambda r: str(r.devices)),
        ("completed (SUCCESS, digest ok)", lambda r: str(r.completed)),
        ("rejected", lambda r: str(r.rejected)),
        ("errors", lambda r: str(r.errors)),
        ("deferred devices (deferrals)", lambda r: f"{r.deferred_devices} ({r.deferrals})"),
        ("asked: download / install", lambda r: f"{r.asks['download']} / {r.asks['install']}"),
        ("completion time (publish to last)", lambda r: secs(r.wall)),
        (
            "per device p50 / p95 / max",
            lambda r: " / ".join(
                secs(x) for x in (r.completion_p50, r.completion_p95, r.completion_max)
            ),
        ),
        ("server CPU", lambda r: secs(r.server_cpu)),
        ("devices' CPU", lambda r: secs(r.devices_cpu)),
        (
            "image requests (minimum)",
            lambda r: f"{r.image_requests} ({r.image_blocks * r.downloads_expected})",
        ),
        ("image requests beyond minimum", lambda r: str(r.image_retries)),
        ("downloader retransmissions", lambda r: str(r.client_retransmits)),
        ("download attempts", lambda r: str(r.download_attempts)),
        (
            "UDP receive-buffer drops (machine)",
            lambda r: "-" if r.udp_rcvbuf_drops is None else str(r.udp_rcvbuf_drops),
        ),
        ("reports received (sent)", lambda r: f"{r.reports_received} ({r.reports_sent})"),
        ("report deliveries retried", lambda r: str(r.report_failures)),
        ("duplicate reports", lambda r: str(r.duplicate_reports)),
        ("error reports", lambda r: str(r.error_reports)),
        ("digests verified", lambda r: f"{r.digests_verified}/{r.devices}"),
    ]
    rounds = result.rounds
    head = ["", *(f"{r.name}" for r in rounds)]
    body = [[label, *(fn(r) for r in rounds)] for label, fn in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        f"fleet: {result.options.devices} devices, {result.options.worker_count} workers, "
        f"image {result.options.size} B, seed {result.options.seed}",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    for r in rounds:
        for device, why in sorted(r.error_devices.items())[:20]:
            lines.append(f"error ({r.name}) {device}: {why}")
    lines.append(
        f"whole run: server CPU {result.total_server_cpu:.2f} s, "
        f"devices' CPU {result.total_devices_cpu:.2f} s"
    )
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fleet command's options to ``parser`` (``fota fleet`` uses this too)."""
    d = FleetOptions()
    m = Mix()
    parser.add_argument("--devices", type=int, default=200, help="devices (default 200)")
    parser.add_argument("--size", type=int, default=d.size, help="image bytes")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds decisions and images")
    parser.add_argument(
        "--workers", type=int, default=None, help="device worker processes (default: CPUs)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--defer", type=float, default=m.defer, help="deferral probability")
    parser.add_argument("--reject", type=float, default=m.reject, help="rejection probability")
    parser.add_argument(
        "--defer-max", type=float, default=m.defer_max, help="longest deferral, seconds"
    )
    parser.add_argument("--timeout", type=float, default=d.timeout, help="seconds a round may take")
    parser.add_argument(
        "--ack-timeout", type=float, default=d.ack_timeout, help="the clients' ACK_TIMEOUT"
    )
    parser.add_argument("--window", type=int, default=d.window, help="image requests in flight")
    parser.add_argument("--block-size", type=int, default=d.block_size, help="Block2 size")
    parser.add_argument(
        "--fragment-size", type=int, default=d.fragment_size, help="manifest fragment size"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the files here (default: temporary)"
    )


def options_from(args: argparse.Namespace) -> FleetOptions:
    """:class:`FleetOptions` from parsed :func:`add_arguments` options.

    Raises:
        ValueError: a bad value, naming the option.
    """
    mix = Mix(
        defer=args.defer,
        reject=args.reject,
        defer_min=min(Mix().defer_min, args.defer_max),
        defer_max=args.defer_max,
    )
    return FleetOptions(
        devices=args.devices,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        mix=mix,
        timeout=args.timeout,
        ack_timeout=args.ack_timeout,
        window=args.window,
        block_size=args.block_size,
        fragment_size=args.fragment_size,
        work_dir=args.work_dir,
    )


def cmd_fleet(args: argparse.Namespace) -> int:
    """Run the fleet from parsed options; print the table (or JSON). 0: no device errors."""
    try:
        options = options_from(args)
    except ValueError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    if options.work_dir is not None:
        options.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run_fleet(options, _progress))
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result.as_dict()) if args.json else format_table(result), flush=True)
    return 0 if result.ok else 1


def _progress(line: str) -> None:
    print(f"fleet: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, prog: str = "python -m fota.testing.fleet") -> int:
    """The fleet command (or one of its child roles, which the coordinator starts).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        prog: the command's name in its help (``fota fleet`` forwards its arguments here).

    Returns:
        0 when every device ended as planned, 1 when some did not, 2 when the simulation
        itself failed, 130 when interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _ROLES:
        return _child_main(argv[0], json.loads(argv[1]))
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run N fota clients against one update server and report how it went.",
    )
    add_arguments(parser)
    return cmd_fleet(parser.parse_args(argv))


# -- the children ---------------------------------------------------------------------------


def _protocol_stream() -> TextIO:
    """Keep the real stdout for protocol lines and point fd 1 at stderr for anything else."""
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return stream


def _emitter(stream: TextIO) -> Callable[..., None]:
    def emit(event: str, **fields: Any) -> None:
        stream.write(json.dumps({"event": event, **fields}) + "\n")
        stream.flush()

    return emit


async def _commands() -> AsyncIterator[dict[str, Any]]:
    """The coordinator's commands from stdin, one JSON object a line, until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        message = json.loads(line)
        if message.get("cmd") == "stop":
            return
        yield message


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the coordinator dies (stdin EOF covers the rest)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        raise SystemExit(1)


async def _serve(spec: dict[str, Any]) -> None:
    from fota import keys
    from fota.core import manifest as mf
    from fota.testing.server import DeviceSeen, UpdateServer

    emit = _emitter(_protocol_stream())
    root = Path(spec["root"])
    key = keys.generate()
    trust = keys.save_keypair(key, root / "signing.key")
    server = UpdateServer(root / "srv", key, mf.kid_for(key.public_key()))
    handled: dict[str, int] = {}
    observing = asyncio.Event()
    wanted = 0

    def on_device(seen: DeviceSeen) -> None:
        reports = server.reports_for(seen.device)
        done = handled.get(seen.device, 0)
        if len(reports) > done:
            now = time.monotonic()
            handled[seen.device] = len(reports)
            for report in reports[done:]:
                if report.get(4) not in STEP_RESULTS:
                    emit(
                        "final",
                        device=seen.device,
                        update_id=report.get(5),
                        result=report.get(4),
                        at=now,
                    )
        if wanted and sum(1 for d in server.devices.values() if d.observing) >= wanted:
            observing.set()

    server.device_hook = on_device
    await server.start()
    try:
        emit("ready", uri=server.uri, trust=str(trust), pid=os.getpid())
        async for message in _commands():
            if message["cmd"] == "publish":
                wanted = int(message.get("observers", 0))
                if wanted and sum(1 for d in server.devices.values() if d.observing) < wanted:
                    observing.clear()
                    try:
                        await asyncio.wait_for(observing.wait(), OBSERVE_WAIT)
                    except TimeoutError:
                        count = sum(1 for d in server.devices.values() if d.observing)
                        emit("error", message=f"only {count} of {wanted} devices observe")
                        continue
                image = random.Random(message["image_seed"]).randbytes(int(message["size"]))
                requests_before = len(server.requests)
                reports_before = len(server.reports)
                duplicates_before = server.duplicate_reports
                at = time.monotonic()
                published = server.publish(
                    image,
                    message["version"],
                    device_class=DEVICE_CLASS,
                    polite=True,
                    fragment_size=int(spec["fragment_size"]),
                )
                emit(
                    "published",
                    version=message["version"],
                    update_id=published.update_id,
                    image_sha256=published.image_sha256.hex(),
                    manifest_digest=published.digest.hex(),
                    at=at,
                    requests_before=requests_before,
                    reports_before=reports_before,
                    duplicates_before=duplicates_before,
                )
            elif message["cmd"] == "stats":
                emit("stats", **_server_stats(server, message))
    finally:
        await server.stop()


def _server_stats(server: Any, round_: dict[str, Any]) -> dict[str, Any]:
    requests = server.requests[int(round_["requests_before"]) :]
    image = f"/fota/img/{round_['image_sha256']}"
    manifest = f"/fota/m/{round_['manifest_digest']}"
    images = [r for r in requests if r.path == image]
    uid = round_["update_id"]
    return {
        "requests": len(requests),
        "image_requests": len(images),
        "max_in_flight": max((r.in_flight or 0 for r in images), default=0),
        "manifest_requests": sum(1 for r in requests if r.path == manifest),
        "report_posts": sum(1 for r in requests if r.path.startswith("/fota/report/")),
        "reports_received": len(server.reports) - int(round_["reports_before"]),
        "duplicate_reports": server.duplicate_reports - int(round_["duplicates_before"]),
        "reports": {
            device: [
                [r[2], r.get(3), r.get(4)] for r in server.reports_for(device) if r.get(5) == uid
            ]
            for device in server.devices
        },
    }


async def _work(spec: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fota.client import Client, transport_for
    from fota.config import Config
    from fota.keys import trust_store

    emit = _emitter(_protocol_stream())
    devices: list[str] = spec["devices"]
    loop = asyncio.get_running_loop()
    # A thread per device: each download runs its window in a worker thread (see the module
    # docstring); the default executor would serialize downloads beyond cpus + 4.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=len(devices) + 8, thread_name_prefix="fleet-device")
    )
    trust = trust_store([Path(spec["trust"])])
    root = Path(spec["root"])
    mixes: dict[str, Mix] = {}
    members: list[tuple[str, Client, CountingTransport, FleetHandler]] = []
    sent_before: dict[str, int] = {}
    try:
        for device in devices:
            config = Config(
                server=spec["server"],
                device_id=device,
                device_class=DEVICE_CLASS,
                state_dir=root / device / "state",
                trust=trust,
                target=root / device / "firmware.bin",
                ack_timeout=float(spec["ack_timeout"]),
                window=int(spec["window"]),
                block_size=int(spec["block_size"]),
                boot_id_path=None,
            )
            transport = CountingTransport(transport_for(config))
            handler = FleetHandler(device, int(spec["seed"]), mixes)
            client = Client(config, handler=handler, transport=transport)
            members.append((device, client, transport, handler))
            await client.start()
        emit("ready", devices=len(devices), pid=os.getpid())
        async for message in _commands():
            if message["cmd"] == "round":
                mixes[message["version"]] = Mix(**message["mix"])
                for device, client, transport, handler in members:
                    transport.reset()
                    handler.reset()
                    sent_before[device] = _reports_created(client)
                emit("round_ready")
            elif message["cmd"] == "collect":
                # Together: each may wait (bounded) for its last report's acknowledgement.
                collected = await asyncio.gather(
                    *(_collect(c, t, h, sent_before.get(d, 0)) for d, c, t, h in members)
                )
                emit("collected", devices=dict(zip(devices, collected, strict=True)))
    finally:
        for _, client, transport, _ in reversed(members):
            with contextlib.suppress(Exception):
                await client.aclose()
            with contextlib.suppress(Exception):
                await transport.aclose()


def _reports_created(client: Any) -> int:
    return int(client.reports_created)


def _digest_of(path: Path) -> str | None:
    from fota.fileops import sha256_prefix

    if not path.exists():
        return None
    return sha256_prefix(path, path.stat().st_size).hex()


async def _collect(
    client: Any, transport: CountingTransport, handler: FleetHandler, sent_before: int
) -> dict[str, Any]:
    # The server has the final report; the device may not have seen its acknowledgement yet.
    with contextlib.suppress(TimeoutError):
        await client.wait_for(lambda s: s.reports_pending == 0, timeout=30)
    status = client.status()
    digest = await asyncio.to_thread(_digest_of, Path(client.config.target))
    return {
        "state": status.state.name,
        "installed_version": status.installed_version,
        "target_sha256": digest,
        "reports_pending": status.reports_pending,
        "reports_sent": _reports_created(client) - sent_before,
        "block_requests": transport.block_requests,
        "retransmits": transport.retransmits,
        "download_attempts": len(transport.fetchers),
        "report_posts": transport.report_posts,
        "report_failures": transport.report_failures,
        "asks": handler.asks,
        "defers": handler.defers,
        "rejects": handler.rejects,
        "results": handler.results,
    }


_ROLES = {"_server": _serve, "_worker": _work}


def _child_main(role: str, spec: dict[str, Any]) -> int:
    from fota.app.logs import configure

    if role == "_server":
        Path(spec["root"]).mkdir(parents=True, exist_ok=True)

    # Ctrl-C reaches the whole process group: the coordinator shuts the children down in
    # order (closing their stdin), so they must not die half-way on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    configure("warning", "json")
    asyncio.run(_ROLES[role](spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
