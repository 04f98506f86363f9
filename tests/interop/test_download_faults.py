"""The download engine against a misbehaving server, end to end over loopback UDP.

Real :class:`~fota.Client` and real :class:`~fota.testing.UpdateServer`, with the server's seeded
:class:`~fota.testing.FaultPlan`: request loss, response delay (to see the client's window at the
server), a smaller block size mid-transfer, an ETag change, 5.03 with Max-Age, 4.04. Last,
libcoap's ``coap-server-notls`` as a server we did not write. Nothing here sleeps to wait: tests
wait on client states, server reports and request hooks; timing claims are read from the server's
request log (a property of the run, not a race against the clock).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fota import Client, Config, ResultCode, State, Status
from fota.core import events as ev
from fota.core import manifest as mf
from fota.core.manifest import Component, ManifestBody, Severity
from fota.core.record import bitmap_new
from fota.download import Downloader
from fota.journal import FileOps
from fota.testing import FaultPlan, Published, RequestLog, UpdateServer
from fota.testing.server import fragment_digests
from fota.transport.coap import CoapTransport
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config

KiB = 1024
MiB = 1024 * KiB
pytestmark = pytest.mark.timeout(30)


def image_of(size: int, seed: int) -> bytes:
    """Reproducible image bytes (a failing run can be repeated with the same image)."""
    return random.Random(seed).randbytes(size)


def sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def idle_with(version: str) -> Callable[[Status], bool]:
    def check(s: Status) -> bool:
        return s.installed_version == version and s.state is State.IDLE and s.reports_pending == 0

    return check


def configure(
    tmp_path: Path, server: UpdateServer, signing: Signing, *, ack_timeout: float, **kw: Any
) -> Config:
    """``make_config`` with a shorter ACK timeout (the first per-request retransmission wait)."""
    return dataclasses.replace(
        make_config(tmp_path, server, signing, **kw), ack_timeout=ack_timeout
    )


async def install(server: UpdateServer, config: Config, image: bytes) -> Published:
    """First install on an empty device (no one is asked); return what was published."""
    async with Client(config) as client:
        published = server.publish(image, "1.0", device_class=DEVICE_CLASS)
        await client.wait_for(idle_with("1.0"), 25)
    assert config.target is not None
    assert sha(config.target) == published.image_sha256 == hashlib.sha256(image).digest()
    return published


def served_bytes(requests: list[RequestLog], size: int) -> int:
    """Bytes of the image the server sent back, each offset counted once.

    Equal to the image size when the answered ranges tile the image without overlap. A
    retransmission (same offset, its first answer only late) is not counted twice: it is
    CoAP timing, not the download logic asking for bytes it already had.
    """
    spans = {
        r.offset: min(r.block_size or 0, size - (r.offset or 0))
        for r in requests
        if "lost" not in r.faults and "busy" not in r.faults
    }
    return sum(spans.values())


# -- (a) request loss -------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [10, 30])
async def test_download_completes_despite_request_loss(
    percent: int, tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    server.faults = FaultPlan(seed=percent).lose(percent)
    image = image_of(512 * KiB, percent)
    # max_attempts: at 30 % a block is lost 5 times in a row with p = 0.24 %, so an attempt may
    # end with TransportError; the next one resumes from the verified fragments.
    config = configure(tmp_path, server, signing, ack_timeout=0.05, max_attempts=10)
    published = await install(server, config, image)

    requests = server.image_requests(published.image_sha256)
    lost = [r for r in requests if "lost" in r.faults]
    assert percent / 2 <= 100 * len(lost) / len(requests) <= percent * 1.5, "the plan drops"
    # Every block was answered at least once: each lost one was asked again.
    answered = {r.offset for r in requests if "lost" not in r.faults}
    assert answered == set(range(0, len(image), 1024))
    # A lost request was sent again, unless it was itself a retransmission of a request whose
    # answer was only late (ack_timeout is short, and loopback under load is not instant).
    asks: dict[int | None, list[RequestLog]] = {}
    for r in requests:
        asks.setdefault(r.offset, []).append(r)
    for r in lost:
        again = any(o.at > r.at for o in asks[r.offset])
        late = any(o.at < r.at and "lost" not in o.faults for o in asks[r.offset])
        assert again or late, f"lost request for byte {r.offset} never sent again"


# -- (b) the window ---------------------------------------------------------------------------


@pytest.mark.parametrize("window", [4, 16])
async def test_window_keeps_exactly_w_requests_in_flight(
    window: int, tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    # Every answer is held back 3 ms, one after the other (a slow link): requests the client
    # sends meanwhile queue at the server, so its window is what the server sees in flight.
    # (A plain per-request delay would not do: answers to a burst of requests leave in a burst
    # and their successors arrive one by one, so the server would count fewer than W.)
    server.faults.throttle(0.003)
    image = image_of(512 * KiB, window)
    # A long, fixed timeout: a retransmitted request still queued at the server would be
    # counted there twice (correct behaviour, but not what this test measures), and the
    # window fixed at W (the congestion-controlled one has its own tests).
    config = configure(
        tmp_path,
        server,
        signing,
        window=window,
        ack_timeout=2.0,
        retransmission="rfc7252",
        congestion="fixed",
    )
    published = await install(server, config, image)

    samples = [r.in_flight for r in server.image_requests(published.image_sha256)]
    assert None not in samples and len(samples) >= len(image) // 1024
    assert server.max_in_flight == window, "never more than W, and W reached"
    steady = samples[window:-window]  # after the first W requests, before the last W
    share = steady.count(window) / len(steady)
    assert share >= 0.8, f"only {share:.0%} of arrivals saw {window} in flight: {steady[:60]}"
    assert server.in_flight == 0


async def test_window_caps_overlapping_requests_under_jittered_delay(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    window = 8
    server.faults.delay(0.004, jitter=0.004)  # answers overtake each other
    image = image_of(512 * KiB, 8)
    config = configure(tmp_path, server, signing, window=window, ack_timeout=2.0)
    published = await install(server, config, image)

    assert len(server.in_flight_samples) == len(server.image_requests(published.image_sha256))
    assert max(server.in_flight_samples) == server.max_in_flight == window
    assert server.in_flight == 0


# -- (c) a smaller block size from the server -------------------------------------------------


async def test_server_shrinks_block_size_mid_transfer(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    window, switch = 8, 300
    server.faults.shrink_block(after_requests=switch, size=256)
    image = image_of(MiB, 3)
    config = configure(tmp_path, server, signing, window=window, ack_timeout=0.2)
    published = await install(server, config, image)

    requests = server.image_requests(published.image_sha256)
    assert {r.block_size for r in requests[:switch]} == {1024}
    assert {r.block_size for r in requests[switch:]} == {256}, "served at 256 from the switch"
    assert requests[switch].asked == 1024  # sent before any 256-byte answer came back
    # At most the W requests already in flight asked for 1024 once the first 256 answer came:
    # every block asked for the first time after them asks for 256.
    first: dict[int | None, RequestLog] = {}
    for r in requests:
        first.setdefault(r.offset, r)
    late = [r for r in requests[switch + window :] if first[r.offset] is r]
    assert late and {r.asked for r in late} == {256}
    assert {r.offset for r in requests} >= set(range(switch * 1024, len(image), 256))
    # Following the smaller size wasted nothing: no byte was asked for twice.
    assert served_bytes(requests, len(image)) == len(image)


# -- (d) an ETag change -----------------------------------------------------------------------


async def test_etag_change_is_only_a_hint(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    window, switch = 8, 500
    server.faults.change_etag(after_requests=switch)
    image = image_of(MiB, 4)
    config = configure(tmp_path, server, signing, window=window, ack_timeout=0.2)
    published = await install(server, config, image)

    requests = server.image_requests(published.image_sha256)
    assert ["etag" in r.faults for r in requests] == [i >= switch for i in range(len(requests))]
    # The fragment digests decided: the download went on, nothing restarted.
    blocks = len(image) // 1024
    assert len(requests) <= blocks + window, "no more than W blocks fetched again"
    assert {r.offset for r in requests} == set(range(0, len(image), 1024))


# -- (e) 4.04 ---------------------------------------------------------------------------------


async def test_missing_image_fails_once_without_a_retry_storm(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    window = 8
    image = image_of(MiB, 5)
    published = server.make_manifest(image, "1.0", device_class=DEVICE_CLASS)
    server.faults.missing(published.image_sha256)
    handler = RecordingHandler()
    # not_found_budget 0: a 4.04 fails at once (issue 17 §3 waits it out by default).
    config = configure(
        tmp_path, server, signing, window=window, ack_timeout=0.1, not_found_budget=0.0
    )
    async with Client(config, handler=handler) as client:
        server.announce_raw(published.raw, published.sequence)
        report = await server.wait_for_report(lambda r: r[4] == ResultCode.INVALID_URI, 20)
        assert State(report[3]) is State.FAILED and report[5] == published.update_id
        assert "4.04" in report[8]
        requests_at_report = len(server.image_requests(published.image_sha256))
        status = await client.wait_for(
            lambda s: s.state is State.FAILED and s.reports_pending == 0, 10
        )
        assert status.update_id == published.update_id
        _, result, _ = await asyncio.wait_for(handler.completions.get(), 10)
        assert result is ResultCode.INVALID_URI
        # Let the client do a whole update meanwhile: had a retry of the missing image been
        # left armed, it would hit the server while this one runs.
        v2 = server.publish(image_of(100 * KiB, 6), "2.0", device_class=DEVICE_CLASS)
        await client.wait_for(idle_with("2.0"), 20)
    assert config.target is not None and sha(config.target) == v2.image_sha256
    requests = server.image_requests(published.image_sha256)
    assert len(requests) == requests_at_report, "no request after the failure report"
    assert 1 <= len(requests) <= window + 1, "no retry storm"
    assert all("missing" in r.faults for r in requests)


# -- (f) 5.03 with Max-Age --------------------------------------------------------------------


async def test_service_unavailable_pauses_for_max_age(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    window, busy, max_age = 8, 3, 1
    server.faults.busy(busy, max_age=max_age)
    image = image_of(512 * KiB, 7)
    # A fixed window: this is about 5.03, and the first W requests must go out together.
    config = configure(
        tmp_path, server, signing, window=window, ack_timeout=0.1, congestion="fixed"
    )
    published = server.make_manifest(image, "1.0", device_class=DEVICE_CLASS)
    path = f"/fota/img/{published.image_sha256.hex()}"
    image_requests = 0
    resumed = asyncio.Event()

    def count(r: RequestLog) -> None:
        nonlocal image_requests
        image_requests += r.path == path
        if image_requests > window:
            resumed.set()

    server.request_hook = count
    async with Client(config) as client:
        server.announce_raw(published.raw, published.sequence)
        # The first W requests go out before any answer; after the 5.03s the client must ask
        # again once Max-Age is over (bounded here only to fail fast, not to measure speed).
        await asyncio.wait_for(resumed.wait(), max_age + 4)
        await client.wait_for(idle_with("1.0"), 20)
    assert config.target is not None and sha(config.target) == published.image_sha256

    requests = server.image_requests(published.image_sha256)
    assert ["busy" in r.faults for r in requests[:window]] == [True] * busy + [False] * (
        window - busy
    )
    assert not any("busy" in r.faults for r in requests[window:])
    # It waited Max-Age after the last 5.03 (server and client share one monotonic clock).
    waited = requests[window].at - requests[busy - 1].at
    assert waited >= max_age - 0.001, f"asked again after {waited:.3f} s"
    # The refused blocks were asked for again, first.
    refused = {r.offset for r in requests[:busy]}
    assert {r.offset for r in requests[window : window + busy]} == refused
    assert served_bytes(requests, len(image)) == len(image)


# -- (g) libcoap's coap-server-notls as the image server ---------------------------------------


def libcoap(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install libcoap3-bin (scripts/test does)"
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def coap_client(*args: str, wait: int = 5) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        libcoap("coap-client-notls"),
        "-B",
        str(wait),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), wait + 10)
    assert proc.returncode is not None
    return proc.returncode, out


@asynccontextmanager
async def peer_server(
    name: str, argv: Callable[[int], list[str]], probe: str, expect: bytes, log: Path
) -> AsyncIterator[str]:
    """Run a CoAP server we did not write on a free port; yield its URI once it answers.

    ``argv(port)`` starts it; it is up when a GET of ``probe`` returns a body with ``expect``
    (coap-client-notls exits 0 even when nothing answered: the body tells).
    """
    port = free_udp_port()  # neither peer can report an ephemeral port: pick a free one first
    uri = f"coap://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv(port), stdout=out, stderr=out)
    try:
        for _ in range(20):  # bounded: each try waits at most 1 s for an answer
            assert proc.returncode is None, f"{name} exited: {log.read_text()}"
            code, body = await coap_client("-m", "get", f"{uri}{probe}", wait=1)
            if code == 0 and expect in body:
                break
        else:
            raise AssertionError(f"{name} on {uri} never answered: {log.read_text()}")
        yield uri
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def libcoap_server(log: Path) -> AbstractAsyncContextManager[str]:
    """``coap-server-notls`` with dynamic resources (a PUT creates one)."""
    binary = libcoap("coap-server-notls")
    return peer_server(
        "coap-server-notls",
        lambda port: [binary, "-A", "127.0.0.1", "-p", str(port), "-d", "10"],
        "/.well-known/core",
        b"</",
        log,
    )


def aiocoap_fileserver(root: Path, log: Path) -> AbstractAsyncContextManager[str]:
    """aiocoap's ``aiocoap-fileserver`` (a separate program) serving ``root``."""
    # Installed with aiocoap, next to this interpreter (a venv's bin is not always on PATH).
    beside = Path(sys.executable).parent / "aiocoap-fileserver"
    binary = str(beside) if beside.exists() else shutil.which("aiocoap-fileserver")
    assert binary, "aiocoap-fileserver is missing (it ships with aiocoap)"
    return peer_server(
        "aiocoap-fileserver",
        lambda port: [binary, "--bind", f"127.0.0.1:{port}", str(root)],
        "/",
        b"img",
        log,
    )


async def download_verified(
    base: str,
    image_uri: str,
    file: Path,
    block_size: int,
    fragment: int,
    tmp: Path,
    signing: Signing,
) -> None:
    """fota's downloader fetches ``image_uri`` block-wise and verifies every fragment."""
    image = file.read_bytes()
    body = ManifestBody(
        sequence=1,
        component=Component.FIRMWARE,
        version="1.0",
        device_class=DEVICE_CLASS,
        image_size=len(image),
        image_sha256=hashlib.sha256(image).digest(),
        image_uri=image_uri,
        fragment_size=fragment,
        fragment_sha256=fragment_digests(file, fragment),
        polite=False,
        severity=Severity.OPTIONAL,
    )
    manifest = mf.verify(mf.sign(body, signing.key, signing.kid), signing.trust)
    events: list[ev.Event] = []
    candidate = tmp / "candidate"
    transport = CoapTransport(base, "dev-interop", ack_timeout=0.2)
    try:
        downloader = Downloader(
            transport.block_fetcher,
            FileOps(),
            candidate,
            events.append,
            block_size=block_size,
            window=8,
        )
        await downloader.run(manifest, body.image_uri, bitmap_new(manifest.fragment_count))
    finally:
        await transport.aclose()
    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    verified = sorted(i for e in events if isinstance(e, ev.FragmentVerified) for i in e.indexes)
    assert verified == list(range(manifest.fragment_count))
    assert sha(candidate) == body.image_sha256


# Block size -> (image size, fragment size): 16-byte blocks take 1024 requests per 16 KiB.
SIZES = {16: (48 * KiB, 16 * KiB), 256: (512 * KiB, 64 * KiB), 1024: (MiB, 64 * KiB)}


@pytest.mark.interop
@pytest.mark.parametrize("block_size", [16, 256, 1024])
async def test_downloader_fetches_from_libcoap_server(
    block_size: int, tmp_path: Path, signing: Signing
) -> None:
    size, fragment = SIZES[block_size]
    file = tmp_path / "image.bin"
    file.write_bytes(image_of(size, block_size))
    async with libcoap_server(tmp_path / "coap-server.log") as base:
        code, out = await coap_client("-m", "put", "-b", "1024", "-f", str(file), f"{base}/img")
        assert code == 0, out.decode(errors="replace")
        _, links = await coap_client("-m", "get", f"{base}/.well-known/core")
        assert b"</img>" in links, links.decode(errors="replace")  # the PUT created it
        await download_verified(base, f"{base}/img", file, block_size, fragment, tmp_path, signing)


@pytest.mark.interop
@pytest.mark.parametrize("block_size", [16, 256, 1024])
async def test_downloader_fetches_from_aiocoap_fileserver(
    block_size: int, tmp_path: Path, signing: Signing
) -> None:
    size, fragment = SIZES[block_size]
    root = tmp_path / "served"
    root.mkdir()
    file = root / "img"
    file.write_bytes(image_of(size, block_size + 1))
    async with aiocoap_fileserver(root, tmp_path / "fileserver.log") as base:
        await download_verified(base, f"{base}/img", file, block_size, fragment, tmp_path, signing)
