"""Issue 17 §5: nothing dies silently.

Every engine child task is supervised: an exception nobody expected becomes the failure event
of the command the task ran, so the update ends with a result instead of sitting in its state
forever. Long-lived tasks (announcements, report delivery) run again after a crash. The TCP
fetcher stops at once, and manifest and keyset retries draw their jitter.

Tiers: engine unit tests with fakes (a crashing child injected per command), and end to end
with the real client, the real test server and a small RFC 8323 peer on 127.0.0.1:0 serving
an image at the empty path (the case that made the Block2 encoder raise ``ValueError``).
Waits are on events and reports; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest
import structlog
from structlog.testing import capture_logs

from fota import AutoAuthorize, Client, Manifest, ResultCode, supervision
from fota import effects as effects_mod
from fota.core import commands as cmd
from fota.core import events as ev
from fota.core import manifest as mf
from fota.core import policy
from fota.core.machine import Model
from fota.core.record import Record
from fota.core.states import State
from fota.engine import GATES_CRASHED, Engine
from fota.errors import JournalError, TaskCrashed, TransportError
from fota.journal import Journal
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import Reports
from fota.testing.pytest_plugin import Signing as ServerSigning
from fota.transport import Announcement, tcp, wire
from fota.transport.tcp import TcpFetcher
from tests.conftest import DEVICE_CLASS, Signing
from tests.integration.test_engine_resume import (
    BASE,
    FakeTransport,
    MemoryInstaller,
    config,
    finished,
)

pytestmark = pytest.mark.timeout(60)
KiB = 1024


async def boom(*args: Any, **kwargs: Any) -> None:
    """A child task with a bug: not a FotaError, not an OSError."""
    raise ValueError("boom")


# -- a minimal RFC 8323 peer -------------------------------------------------------------


def _option(delta: int, value: bytes) -> bytes:
    def nibble(n: int) -> tuple[int, bytes]:
        return (n, b"") if n < 13 else (13, bytes([n - 13]))

    d, dx = nibble(delta)
    n, nx = nibble(len(value))
    return bytes([(d << 4) | n]) + dx + nx + value


def _options(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(number, value) of each option of a message body (stops at the payload marker)."""
    at, number = 0, 0
    while at < len(body) and body[at] != 0xFF:
        delta, length = body[at] >> 4, body[at] & 0x0F
        at += 1
        ext = {13: (1, 13), 14: (2, 269)}
        if delta in ext:
            size, base = ext[delta]
            delta = int.from_bytes(body[at : at + size], "big") + base
            at += size
        if length in ext:
            size, base = ext[length]
            length = int.from_bytes(body[at : at + size], "big") + base
            at += size
        number += delta
        yield number, body[at : at + length]
        at += length


class TcpPeer:
    """Serves one image over CoAP over TCP at any path, in 1 KiB Block2 answers (not BERT).

    ``requests`` holds the Uri-Path of every GET; ``asked`` is set at the first one.
    ``silent``: read requests, never answer (a stalled server).
    """

    def __init__(self, image: bytes, *, silent: bool = False) -> None:
        self.image = image
        self.silent = silent
        self.requests: list[tuple[str, ...]] = []
        self.asked = asyncio.Event()
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(tcp.encode_csm(64 * KiB))
            while True:
                code, token, body = await read_message(reader)
                if code != wire.GET:
                    continue  # the client's CSM
                options = list(_options(body))
                self.requests.append(tuple(v.decode() for n, v in options if n == 11))
                self.asked.set()
                if self.silent:
                    continue
                block = next(int.from_bytes(v, "big") for n, v in options if n == 23)
                num = block >> 4
                start = num * KiB
                payload = self.image[start : start + KiB]
                more = start + len(payload) < len(self.image)
                answer = _option(23, wire.encode_uint((num << 4) | (more << 3) | 6)) + _option(
                    28 - 23, wire.encode_uint(len(self.image))
                )
                writer.write(tcp.encode(wire.CONTENT, token, answer, payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


async def read_message(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One RFC 8323 message off the stream: its code, token and options-and-payload."""
    first = (await reader.readexactly(1))[0]
    length, tkl = first >> 4, first & 0x0F
    extra = {13: (1, 13), 14: (2, 269), 15: (4, 65805)}.get(length)
    if extra is not None:
        length = int.from_bytes(await reader.readexactly(extra[0]), "big") + extra[1]
    head = await reader.readexactly(1 + tkl)
    return head[0], head[1:], await reader.readexactly(length)


class Serving(Protocol):
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...


@asynccontextmanager
async def tcp_peer(peer: Serving) -> AsyncIterator[str]:
    """Run ``peer`` on 127.0.0.1:0; yields its origin ``coap+tcp://127.0.0.1:port``."""
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"coap+tcp://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def publish_at(server: UpdateServer, signing: ServerSigning, image: bytes, image_uri: str) -> str:
    """Sign and announce version 1.0 with its image at ``image_uri``; returns its update id."""
    made = server.make_manifest(image, "1.0", device_class=DEVICE_CLASS)
    body = dataclasses.replace(mf.verify(made.raw, signing.trust).body, image_uri=image_uri)
    digest = server.announce_raw(mf.sign(body, server.key, server.kid), made.sequence)
    return mf.update_id_of(digest)


# -- end to end: an image at the empty path of a coap+tcp:// origin ----------------------

StartClient = Callable[..., Awaitable[Client]]


async def test_tcp_image_at_the_empty_path_is_downloaded(
    fota_server: UpdateServer,
    fota_signing: ServerSigning,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    # Before: the Block2 option (delta 23 with no Uri-Path before it) was packed into one
    # byte, ValueError killed the download task, and the update sat in DOWNLOADING forever.
    image = os.urandom(5 * KiB + 100)
    peer = TcpPeer(image)
    async with tcp_peer(peer) as origin:
        uid = publish_at(fota_server, fota_signing, image, origin)
        client = await fota_client(handler=AutoAuthorize(), allowed_origins=[origin])
        await fota_reports.wait_for(uid, ResultCode.SUCCESS)
    assert peer.requests and all(path == () for path in peer.requests)
    assert client.config.target is not None
    assert client.config.target.read_bytes() == image


async def test_a_crashing_download_ends_the_update_with_a_failed_report(
    fota_server: UpdateServer,
    fota_signing: ServerSigning,
    fota_client: StartClient,
    fota_reports: Reports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The old encoder's bug, put back: the fetcher raises ValueError on its first request.
    def crash(self: TcpFetcher, *args: Any) -> tuple[int, bool]:
        raise ValueError("byte must be in range(0, 256)")

    monkeypatch.setattr(TcpFetcher, "_ask", crash)
    image = os.urandom(3 * KiB)
    async with tcp_peer(TcpPeer(image)) as origin:
        uid = publish_at(fota_server, fota_signing, image, origin)
        with capture_logs() as logs:
            client = await fota_client(handler=AutoAuthorize(), allowed_origins=[origin])
            report = await fota_reports.wait_for(uid, ResultCode.FAILED)
    assert "download task crashed: ValueError" in report.detail
    assert client.state is State.FAILED
    # Said where it happens: the crash, the step's failure and the update's end are logged.
    crashed = [e for e in logs if e["event"] == "task_crashed"]
    assert crashed and crashed[0]["task"] == "download" and crashed[0]["log_level"] == "error"
    failed = [e for e in logs if e["event"] == "update_failed"]
    assert [(e["result"], e["update_id"]) for e in failed] == [("FAILED", uid)]
    assert "ValueError" in failed[0]["detail"]


# -- engine unit tests: one crashing child per command ------------------------------------


@pytest.fixture
async def rig(tmp_path: Path, signing: Signing) -> AsyncIterator[tuple[Engine, Manifest]]:
    """An engine (not started) whose model has a pending update, for ``_execute``."""
    net = FakeTransport()
    manifest = net.publish(signing, os.urandom(3 * KiB), "1.0", 1)
    assert net.current is not None
    engine = Engine(
        config(tmp_path, signing.trust),
        transport=net,
        journal=Journal(tmp_path, signing.trust),
        installer=MemoryInstaller(),
        handler=AutoAuthorize(),
    )
    record = Record(state=State.DOWNLOADING, manifest_uri=net.current.manifest_uri)
    engine.model = Model(engine.config.policy(), signing.trust, record, pending=manifest)
    yield engine, manifest
    await engine.aclose()


CRASHES: list[tuple[str, Callable[[str], cmd.Command], type[ev.Event]]] = [
    ("downloader.run", cmd.StartDownload, ev.DownloadFailed),
    ("effects.verify", cmd.VerifyImage, ev.ImageChecked),
    ("effects.install", cmd.Install, ev.InstallFinished),
    ("effects.self_test", cmd.RunSelfTest, ev.SelfTestFinished),
    ("effects.check_boot", cmd.CheckBoot, ev.BootChecked),
    ("effects.commit", cmd.Commit, ev.CommitFinished),
    ("effects.rollback", cmd.Rollback, ev.RollbackFinished),
    ("effects.check_gates", lambda uid: cmd.CheckGates(uid, "download"), ev.GatesChecked),
]


@pytest.mark.parametrize(("child", "command", "failure"), CRASHES, ids=[c[0] for c in CRASHES])
async def test_a_crashing_child_posts_its_commands_failure(
    rig: tuple[Engine, Manifest],
    monkeypatch: pytest.MonkeyPatch,
    child: str,
    command: Callable[[str], cmd.Command],
    failure: type[ev.Event],
) -> None:
    engine, manifest = rig
    owner: Any = engine.downloader if child.startswith("downloader.") else engine.effects
    monkeypatch.setattr(owner, child.rsplit(".", 1)[-1], boom)
    with capture_logs() as logs:
        engine._execute(command(manifest.update_id))
        event, _ = await engine._inbox.get()  # before: nothing ever came
    assert type(event) is failure
    assert getattr(event, "update_id", None) == manifest.update_id
    # It fails: no success, and the reason names the exception where there is room for it.
    error = getattr(event, "error", None)
    if error is not None:
        assert isinstance(error, TaskCrashed) and "ValueError: boom" in str(error)
    for field, failed in (("ok", False), ("failing", (GATES_CRASHED,))):
        if hasattr(event, field):
            assert getattr(event, field) == failed
    if hasattr(event, "detail"):
        assert "ValueError: boom" in event.detail
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["task_crashed"]


# -- long-lived tasks run again -----------------------------------------------------------


class CrashOnceTransport(FakeTransport):
    """The announcement stream raises a bug once, then works."""

    def __init__(self) -> None:
        super().__init__()
        self.crashes = 0

    async def announcements(self) -> AsyncIterator[Announcement]:
        if self.crashes == 0:
            self.crashes += 1
            raise RuntimeError("announcement watcher bug")
        async for ann in super().announcements():
            yield ann


def make_engine(tmp: Path, signing: Signing, net: FakeTransport, journal: Journal) -> Engine:
    return Engine(
        config(tmp, signing.trust),
        transport=net,
        journal=journal,
        installer=MemoryInstaller(),
        handler=AutoAuthorize(),
    )


async def test_a_crashed_announcement_watcher_runs_again(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervision, "SUPERVISE_RETRY", 0.001)
    net = CrashOnceTransport()
    engine = make_engine(tmp_path, signing, net, Journal(tmp_path, signing.trust))
    with capture_logs() as logs:
        await engine.start()
        net.publish(signing, os.urandom(5000), "1.0", 1)
        await engine.wait_for(finished("1.0"), 30)  # before: deaf for good
    await engine.aclose()
    assert net.crashes == 1
    crashed = [e for e in logs if e["event"] == "task_crashed"]
    assert [e["task"] for e in crashed] == ["watch"] and "restart_in" in crashed[0]


class DropFailsOnce(Journal):
    """The write that drops the final report from the outbox fails once (a full disk)."""

    failed = 0

    def save(self, record: Record, manifests: tuple[Manifest | None, ...] = ()) -> None:
        if not self.failed and record.installed is not None and not record.outbox:
            self.failed += 1
            raise JournalError("no space left on device (test)")
        super().save(record, manifests)


async def test_the_report_task_survives_a_journal_error(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the JournalError ended the report task, and the last report stayed in the
    # outbox until some later report was queued (after an update: maybe never).
    monkeypatch.setattr(effects_mod, "REPORT_RETRY", 0.001)
    net = FakeTransport()
    journal = DropFailsOnce(tmp_path, signing.trust)
    engine = make_engine(tmp_path, signing, net, journal)
    await engine.start()
    net.publish(signing, os.urandom(5000), "1.0", 1)
    await engine.wait_for(finished("1.0"), 30)
    await engine.aclose()
    assert journal.failed == 1
    successes = [r for r in net.reports if r[4] == ResultCode.SUCCESS]
    # Sent again after the failed write (the server de-duplicates by sequence).
    assert len(successes) == 2 and successes[0][2] == successes[1][2]


class ReportsFailFirst(FakeTransport):
    """The report server answers the first few reports with a retryable error."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def post_report(self, body: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise TransportError("report server away (test)")
        await super().post_report(body)


async def test_report_log_lines_carry_the_reports_state(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(effects_mod, "REPORT_RETRY", 0.001)
    net = ReportsFailFirst(failures=6)
    engine = make_engine(tmp_path, signing, net, Journal(tmp_path, signing.trust))
    with capture_logs() as logs, structlog.contextvars.bound_contextvars(state="STALE"):
        await engine.start()
        net.publish(signing, os.urandom(5000), "1.0", 1)
        await engine.wait_for(finished("1.0"), 30)
    await engine.aclose()
    retries = [e for e in logs if e["event"] == "report_retry"]
    assert len(retries) == 6
    names = {s.name for s in State}
    # Each line names the state of the report it is about, not the state the task saw when
    # it was spawned (the report task outlives many states).
    assert all(e["state"] in names and e["sequence"] >= 0 for e in retries)


# -- jitter in manifest and keyset retries --------------------------------------------------


class Unreachable(FakeTransport):
    async def fetch(self, uri: str, *, limit: int) -> bytes:
        raise TransportError(f"{uri}: timed out (test)")


@pytest.mark.parametrize("what", ["manifest", "keyset"])
async def test_manifest_and_keyset_retries_draw_their_jitter(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    draws: list[float] = []

    def spy(attempt: int, policy: Any, draw: float = -1.0) -> float:
        draws.append(draw)
        return 0.0

    monkeypatch.setattr(policy, "retry_delay", spy)
    engine = Engine(
        dataclasses.replace(config(tmp_path, signing.trust), max_attempts=4),
        transport=Unreachable(),
        journal=Journal(tmp_path, signing.trust),
        installer=MemoryInstaller(),
    )
    engine._random.seed(17)
    if what == "manifest":
        await engine.effects.fetch_manifest(f"{BASE}/fota/m/x", hashlib.sha256(b"x").digest())
    else:
        await engine.effects.fetch_keyset(f"{BASE}/fota/k/x", 2)
    # Before: no draw passed (the core's default, the same on every device of a fleet).
    assert len(draws) == 4 and all(0 <= d < 1 for d in draws) and len(set(draws)) == 4


# -- the TCP fetcher stops at once ----------------------------------------------------------


async def test_a_stalled_tcp_download_is_cancelled_at_once() -> None:
    # Before: the thread saw the stop only when its blocking recv timed out (here an hour;
    # 30 s by default), and a cancelled download, or SIGTERM, waited for it.
    peer = TcpPeer(b"", silent=True)
    async with tcp_peer(peer) as origin:
        fetcher = TcpFetcher.for_uri(origin + "/img", timeout=3600.0)
        task = asyncio.create_task(fetcher.run(iter([(0, KiB)]), lambda block: None))
        await peer.asked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await peer.closed.wait()  # the connection went with it
    assert peer.requests == [("img",)]


def test_block2_after_no_uri_path_uses_an_extended_delta() -> None:
    fetcher = TcpFetcher("127.0.0.1", 1, ())
    sent: list[bytes] = []

    class Sock:
        def sendall(self, data: bytes) -> None:
            sent.append(data)
            raise ConnectionResetError  # stop after the request

    with pytest.raises(ConnectionResetError):
        fetcher._ask(Sock(), 5 * KiB)  # type: ignore[arg-type]
    # Len 3, TKL 4; GET; token; option delta 13+10=23 (Block2), length 1: num 5, SZX 7.
    message = sent[0]
    assert message[0] == (3 << 4) | 4 and message[1] == wire.GET
    assert message[6:] == bytes([0xD1, 23 - 13, (5 << 4) | 7])
