"""Issue 17 §4: the announcement watcher backs off errors and polls a server without Observe.

An empty server answers the announcement 4.04 (nothing announced yet: its normal state), and
some servers answer without Observe. The old watcher reset its back-off on any answer and asked
about once a second, forever. Here the real :class:`~fota.transport.coap.CoapTransport` talks
over UDP on 127.0.0.1 to real servers (fota's test server, a plain aiocoap server, libcoap's
``coap-server-notls``) through a relay that counts the requests arriving at the server.

No wall time is asserted and nothing sleeps: the transport's pauses run on a virtual clock (each
pause adds its length and returns at once), and every request is stamped with that clock when
it reaches the server. The back-off schedule is then checked in virtual seconds.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from fota.testing import UpdateServer
from fota.testing.server import bound_port
from fota.transport import Announcement
from fota.transport.coap import CoapTransport
from tests.conftest import ACK_TIMEOUT
from tests.interop.test_download_faults import libcoap_server

pytestmark = pytest.mark.timeout(120)
BOUND = 30.0
"""Failure bound of a wait (real seconds); the virtual schedules below take milliseconds."""
DEVICE = "dev1"
HORIZON = 1200.0
"""Virtual seconds each watcher runs for: 20 minutes."""


class Virtual(CoapTransport):
    """A CoapTransport whose pauses pass on a virtual clock (``now``) and return at once.

    Past ``horizon`` it parks in its pause (the test then stops it); ``pauses`` records
    every pause taken.
    """

    def __init__(self, *args: Any, horizon: float = HORIZON, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.now = 0.0
        self.horizon = horizon
        self.pauses: list[float] = []
        self.past_horizon = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        if self.now >= self.horizon:
            self.past_horizon.set()
            await asyncio.Event().wait()  # parked until the test cancels the watcher


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.relay.client is not None and self.relay.front is not None:
            self.relay.front.sendto(data, self.relay.client)

    def error_received(self, exc: Exception) -> None:
        pass  # the server is not up (yet): the client's request times out


class Relay(asyncio.DatagramProtocol):
    """A UDP relay in front of a server: stamps every CoAP request it passes with ``clock()``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.arrivals: list[float] = []
        self.client: Any = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        if len(data) >= 4 and data[1] >> 5 == 0 and data[1] & 0x1F:  # class 0, not Empty
            self.arrivals.append(self.clock())
        if self.back is not None:
            self.back.sendto(data)


@asynccontextmanager
async def relay_to(port: int, clock: Callable[[], float]) -> AsyncIterator[tuple[Relay, str]]:
    loop = asyncio.get_running_loop()
    relay = Relay(clock)
    front, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    back, _ = await loop.create_datagram_endpoint(
        lambda: _Upstream(relay), remote_addr=("127.0.0.1", port)
    )
    relay.front, relay.back = front, back
    try:
        yield relay, f"coap://127.0.0.1:{front.get_extra_info('sockname')[1]}"
    finally:
        front.close()
        back.close()


class Clock:
    """The virtual clock of the transport made later (the relay is made first)."""

    transport: Virtual | None = None

    def __call__(self) -> float:
        return 0.0 if self.transport is None else self.transport.now


async def run_until_horizon(transport: Virtual) -> list[Announcement]:
    """Iterate the watcher until its virtual clock passes the horizon; return what it yielded."""
    got: list[Announcement] = []

    async def consume() -> None:
        async for ann in transport.announcements():
            got.append(ann)

    task = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(BOUND):
            done, _ = await asyncio.wait(
                (task, asyncio.create_task(transport.past_horizon.wait())),
                return_when=asyncio.FIRST_COMPLETED,
            )
        assert task not in done, f"the watcher ended: {task.exception()!r}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await transport.aclose()
    return got


def nominal(failures: int, base: float, cap: float) -> float:
    return min(cap, base * 2.0 ** (failures - 1))


def assert_backs_off(arrivals: list[float], base: float = 1.0, cap: float = 60.0) -> None:
    """Requests follow the back-off: doubling from ``base`` to ``cap``, each ±10 % jitter.

    From the old code (about one request a second) this sees ~1200 requests in 20 minutes.
    """
    # Never asked faster than the schedule allows, and never given up.
    for i in range(1, len(arrivals)):
        gap = arrivals[i] - arrivals[i - 1]
        assert gap >= 0.9 * nominal(i, base, cap) - 1e-9, f"request {i} after {gap:.3f} s"
    expected = 1 + math.ceil(math.log2(cap / base)) + (HORIZON / cap)
    assert len(arrivals) >= expected * 0.8, f"gave up? {len(arrivals)} requests"
    assert len(arrivals) <= expected * 1.2 + 1, f"{len(arrivals)} requests in {HORIZON} s"
    # A handful a minute: once at the cap, no minute holds more than two.
    settled = [t for t in arrivals if t >= 2 * cap]
    for t in settled:
        assert sum(1 for u in settled if t <= u < t + 60.0) <= 2


# -- a server that answers 4.04: nothing announced yet --------------------------------------


@asynccontextmanager
async def empty_aiocoap_server() -> AsyncIterator[int]:
    """A plain aiocoap server with no resources: every GET is answered 4.04."""
    ctx = await aiocoap.Context.create_server_context(
        aiocoap.resource.Site(), bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        yield bound_port(ctx)
    finally:
        await ctx.shutdown()


async def watch_through_relay(port: int, **kw: Any) -> tuple[Relay, Virtual, list[Announcement]]:
    clock = Clock()
    async with relay_to(port, clock) as (relay, uri):
        transport = clock.transport = Virtual(uri, DEVICE, ack_timeout=ACK_TIMEOUT, **kw)
        got = await run_until_horizon(transport)
    return relay, transport, got


async def test_a_404_from_an_aiocoap_server_is_backed_off_to_a_minute() -> None:
    async with empty_aiocoap_server() as port:
        relay, _, got = await watch_through_relay(port)
    assert got == []
    assert_backs_off(relay.arrivals)


async def test_the_back_off_follows_its_configured_base_and_cap() -> None:
    async with empty_aiocoap_server() as port:
        relay, transport, _ = await watch_through_relay(port, backoff_base=5.0, backoff_cap=40.0)
    for i, pause in enumerate(transport.pauses[:-1], start=1):
        assert 0.9 * nominal(i, 5.0, 40.0) <= pause <= 1.1 * nominal(i, 5.0, 40.0)
    assert len(set(transport.pauses)) == len(transport.pauses), "each pause has its own jitter"
    assert_backs_off(relay.arrivals, base=5.0, cap=40.0)


@pytest.mark.interop
async def test_a_404_from_libcoap_is_backed_off_to_a_minute(tmp_path: Path) -> None:
    server: AbstractAsyncContextManager[str] = libcoap_server(tmp_path / "libcoap.log")
    async with server as uri:
        port = int(uri.rsplit(":", 1)[1])
        relay, _, got = await watch_through_relay(port)
    assert got == []
    assert_backs_off(relay.arrivals)


# -- a server that answers without Observe -----------------------------------------------------


class _Plain(aiocoap.resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """An announcement resource that is not observable: 2.05 without an Observe option."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def render_get(self, request: Any) -> Any:
        self.gets += 1
        return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps({1: 0}), content_format=60)


async def test_a_server_without_observe_is_polled() -> None:
    """Polled every ``observe_refresh`` (±10 %), each answer yielded; not asked every second."""
    site = aiocoap.resource.Site()
    plain = _Plain()
    site.add_resource(["fota", "ann", DEVICE], plain)
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        relay, _, got = await watch_through_relay(bound_port(ctx), observe_refresh=300.0)
    finally:
        await ctx.shutdown()
    assert plain.gets == len(relay.arrivals)  # counted at the server too
    gaps = [b - a for a, b in zip(relay.arrivals, relay.arrivals[1:], strict=False)]
    assert gaps and all(270.0 <= g <= 330.0 for g in gaps), gaps
    assert 4 <= len(relay.arrivals) <= 5  # 0, ~300, ~600, ~900 (and ~1200) in 20 minutes
    assert got == [Announcement(0, None, None)] * len(relay.arrivals)


class _Late(aiocoap.resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    """Answers without Observe to its first ``refuse`` registrations, then accepts them."""

    def __init__(self, refuse: int) -> None:
        super().__init__()
        self.refuse = refuse
        self.sequence = 0

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        if self.refuse > 0:
            self.refuse -= 1
            return  # not accepted: the answer carries no Observe
        await super().add_observation(request, serverobservation)

    async def render_get(self, request: Any) -> Any:
        body = cbor2.dumps({1: self.sequence})
        return aiocoap.Message(code=Code.CONTENT, payload=body, content_format=60)


async def test_polling_turns_into_observing_when_the_server_starts_to_support_it() -> None:
    """Each fall-back poll offers to observe; once accepted, a change arrives by notification."""
    site = aiocoap.resource.Site()
    late = _Late(refuse=2)
    site.add_resource(["fota", "ann", DEVICE], late)
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    clock = Clock()
    try:
        async with relay_to(bound_port(ctx), clock) as (relay, uri):
            transport = clock.transport = Virtual(uri, DEVICE, ack_timeout=ACK_TIMEOUT)
            anns = transport.announcements()
            try:
                async with asyncio.timeout(BOUND):
                    for _ in range(3):  # two polls without Observe, then a registration
                        assert (await anext(anns)).sequence == 0
                    late.sequence = 5
                    late.updated_state()
                    assert (await anext(anns)).sequence == 5
            finally:
                await anns.aclose()
                await transport.aclose()
    finally:
        await ctx.shutdown()
    assert len(transport.pauses) == 2  # one poll interval after each answer without Observe
    assert all(270.0 <= pause <= 330.0 for pause in transport.pauses)
    assert len(relay.arrivals) == 4  # three GETs with Observe 0, and the deregistration


class _Fickle(aiocoap.resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    """Accepts every observation and ends it at once with a last notification."""

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        serverobservation.accept(lambda: None)
        serverobservation.trigger(is_last=True)  # sent right after the registration's answer

    async def render_get(self, request: Any) -> Any:
        return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps({1: 0}), content_format=60)


async def test_a_server_that_ends_every_observation_at_once_is_backed_off() -> None:
    """Accepted and at once ended (a 2.05 each time) is not a working observation."""
    site = aiocoap.resource.Site()
    site.add_resource(["fota", "ann", DEVICE], _Fickle())
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        relay, _, got = await watch_through_relay(bound_port(ctx))
    finally:
        await ctx.shutdown()
    assert got  # the answers were taken
    assert_backs_off(relay.arrivals)


# -- fota's own server, nothing announced: observed, not asked -----------------------------


async def test_an_empty_fota_server_is_observed_once(server: UpdateServer) -> None:
    clock = Clock()
    async with relay_to(server.port, clock) as (relay, uri):
        transport = clock.transport = Virtual(uri, DEVICE, ack_timeout=ACK_TIMEOUT)
        anns = transport.announcements()
        try:
            async with asyncio.timeout(BOUND):
                assert (await anext(anns)).sequence == 0  # nothing announced
                published = server.publish(bytes(10), "1", device_class="gw", fragment_size=1024)
                assert (await anext(anns)).sequence == published.sequence
        finally:
            await anns.aclose()
            await transport.aclose()
    assert transport.pauses == []
    assert len(relay.arrivals) == 2  # the registration, and its deregistration on close


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (1.0, math.inf)])
def test_a_back_off_that_is_not_increasing_and_finite_is_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff_base"):
        CoapTransport("coap://127.0.0.1:9", DEVICE, backoff_base=base, backoff_cap=cap)
