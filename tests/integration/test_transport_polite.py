"""Transport tier: announcements that cancel, check_now(), and poll jitter.

The real :class:`~fota.transport.coap.CoapTransport` against the real
:class:`~fota.testing.UpdateServer` on ``127.0.0.1:0`` (UDP). Nothing sleeps to wait: the tests
wait on the announcement iterator (``asyncio.timeout`` only bounds a failure), on the transport's
decodes, and on the moment the watcher starts waiting for ``check_now()``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code

from fota.errors import TransportError
from fota.testing import UpdateServer
from fota.testing.server import Published
from fota.transport import Announcement
from fota.transport.coap import CoapTransport, poll_delay
from tests.conftest import ACK_TIMEOUT

pytestmark = pytest.mark.timeout(30)
BOUND = 10.0
"""Failure bound for a wait: loopback answers in microseconds, so only a bug gets near it."""
DEVICE = "dev1"


class WaitSignal(asyncio.Event):
    """The transport's check_now() event, telling the test when the watcher waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def wait(self) -> bool:  # type: ignore[override]  # Literal[True] upstream
        self.waiting.set()  # the wait below suspends in this same step
        return await super().wait()


class Spy(CoapTransport):
    """A CoapTransport that records its decodes and poll pauses (behaviour unchanged)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check = self.signal = WaitSignal()
        self.decoded: asyncio.Queue[Announcement | None] = asyncio.Queue()
        self.pauses: list[float] = []
        self.failing_gets = 0
        """This many announcement fetches fail with a TransportError before reaching out."""

    async def _request(self, uri: str, **options: Any) -> Any:
        if uri == self.announce_uri and self.failing_gets > 0:
            self.failing_gets -= 1
            raise TransportError(f"{uri}: injected failure")
        return await super()._request(uri, **options)

    def _decode_announcement(self, response: Any) -> Announcement | None:
        ann = super()._decode_announcement(response)
        self.decoded.put_nowait(ann)
        return ann

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        await super()._pause(seconds)

    async def watcher_waiting(self) -> None:
        """Return once the announcement watcher waits (for a timer, a notification or a check)."""
        self.signal.waiting.clear()
        await self.signal.waiting.wait()


@pytest.fixture
async def transports(server: UpdateServer) -> AsyncIterator[list[Spy]]:
    made: list[Spy] = []
    yield made
    for transport in made:
        await transport.aclose()


def spy(server: UpdateServer, made: list[Spy], **kw: Any) -> Spy:
    transport = Spy(server.uri, DEVICE, ack_timeout=ACK_TIMEOUT, **kw)
    made.append(transport)
    return transport


def publish(server: UpdateServer, version: str, **kw: Any) -> Published:
    return server.publish(bytes(2000), version, device_class="gw", fragment_size=1024, **kw)


async def next_of(announcements: AsyncIterator[Announcement]) -> Announcement:
    async with asyncio.timeout(BOUND):
        return await anext(announcements)


def announced(server: UpdateServer, pub: Published) -> Announcement:
    return Announcement(
        pub.sequence, pub.digest, f"{server.uri}/fota/m/{pub.digest.hex()}", cancel=None
    )


def announcement_gets(server: UpdateServer) -> int:
    return sum(1 for r in server.requests if r.path == f"/fota/ann/{DEVICE}")


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_announcement_arrives_by_observe(
    server: UpdateServer, transports: list[Spy]
) -> None:
    pub = publish(server, "1.0")
    transport = spy(server, transports)
    async with aclosing(transport.announcements()) as anns:
        assert await next_of(anns) == announced(server, pub)
        sequence = server.cancel(pub.digest, devices=[DEVICE])
        cancel = await next_of(anns)
    assert cancel == Announcement(sequence, None, None, cancel=pub.digest)
    assert sequence > pub.sequence
    assert transport.pauses == []  # observed: no poll timer ran
    # The withdrawn manifest stays downloadable.
    uri = f"{server.uri}/fota/m/{pub.digest.hex()}"
    assert await transport.fetch(uri, limit=1 << 16) == pub.raw


async def test_cancel_then_a_new_manifest(server: UpdateServer, transports: list[Spy]) -> None:
    """After a cancel the next publish announces a manifest again, with a higher sequence."""
    v1 = publish(server, "1.0")
    transport = spy(server, transports)
    async with aclosing(transport.announcements()) as anns:
        await next_of(anns)
        seq = server.cancel(v1.digest)
        assert (await next_of(anns)).cancel == v1.digest
        v2 = publish(server, "2.0")
        assert await next_of(anns) == announced(server, v2)
    assert v2.sequence > seq > v1.sequence


MALFORMED_CANCELS = [
    pytest.param({1: 5, 4: bytes(31)}, id="short"),
    pytest.param({1: 5, 4: bytes(33)}, id="long"),
    pytest.param({1: 5, 4: "ab" * 16}, id="text"),
    pytest.param({1: 5, 4: 7}, id="int"),
    pytest.param({1: 5, 4: None}, id="null"),
    pytest.param({1: 5, 2: bytes(32), 3: "../m/x", 4: bytes(16)}, id="beside-a-manifest"),
]


@pytest.mark.parametrize("body", MALFORMED_CANCELS)
def test_decode_refuses_a_malformed_cancel(body: dict[int, Any]) -> None:
    transport = CoapTransport("coap://127.0.0.1:9", DEVICE)
    response = aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(body))
    assert transport._decode_announcement(response) is None


def test_decode_accepts_a_cancel_alone_and_beside_a_manifest() -> None:
    transport = CoapTransport("coap://127.0.0.1:9", DEVICE)

    def decode(body: dict[int, Any]) -> Announcement | None:
        response = aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(body))
        return transport._decode_announcement(response)

    digest = bytes(range(32))
    assert decode({1: 9, 4: digest}) == Announcement(9, None, None, digest)
    both = decode({1: 9, 2: bytes(32), 3: "../m/ab", 4: digest})
    assert both == Announcement(9, bytes(32), "coap://127.0.0.1:9/fota/m/ab", digest)


async def test_malformed_cancel_is_ignored_and_the_watcher_keeps_running(
    server: UpdateServer, transports: list[Spy]
) -> None:
    pub = publish(server, "1.0")
    transport = spy(server, transports)
    async with aclosing(transport.announcements()) as anns:
        assert await next_of(anns) == announced(server, pub)
        assert transport.decoded.get_nowait() is not None
        waiting = asyncio.create_task(next_of(anns))
        server.announce_body({1: 99, 4: bytes(31)}, devices=[DEVICE])  # a 31-byte cancel
        async with asyncio.timeout(BOUND):
            assert await transport.decoded.get() is None  # received, judged unusable
        assert not waiting.done()  # ... and not yielded
        sequence = server.cancel(pub.digest, devices=[DEVICE])
        assert await waiting == Announcement(sequence, None, None, pub.digest)
    assert sequence > 99  # a cancel's sequence is above every announced one


# -- check_now ---------------------------------------------------------------------------------


async def test_check_now_while_polling_fetches_at_once(
    server: UpdateServer, transports: list[Spy]
) -> None:
    v1 = publish(server, "1.0")
    transport = spy(server, transports, poll_interval=3600.0)
    async with aclosing(transport.announcements()) as anns:
        assert await next_of(anns) == announced(server, v1)
        assert announcement_gets(server) == 1
        waiting = asyncio.create_task(next_of(anns))
        await transport.watcher_waiting()  # in the hour-long poll pause
        assert len(transport.pauses) == 1 and 3240.0 <= transport.pauses[0] <= 3960.0
        v2 = publish(server, "2.0")  # nobody observes: only a fetch can see it
        transport.check_now()
        assert await waiting == announced(server, v2)
        assert announcement_gets(server) == 2
        # Unchanged, it is yielded again: check_now() means "tell me what is there now".
        transport.check_now()
        assert await next_of(anns) == announced(server, v2)
        assert announcement_gets(server) == 3


async def test_check_now_before_the_pause_is_not_lost(
    server: UpdateServer, transports: list[Spy]
) -> None:
    """A check made while the application handles the previous announcement still fetches."""
    publish(server, "1.0")
    transport = spy(server, transports, poll_interval=3600.0)
    async with aclosing(transport.announcements()) as anns:
        await next_of(anns)
        v2 = publish(server, "2.0")
        transport.check_now()
        transport.check_now()  # several calls before the fetch make one fetch
        assert await next_of(anns) == announced(server, v2)
        assert announcement_gets(server) == 2
        waiting = asyncio.create_task(next_of(anns))
        await transport.watcher_waiting()  # back in the hour-long pause: no second fetch
        assert announcement_gets(server) == 2
        transport.check_now()
        assert await waiting == announced(server, v2)
        assert announcement_gets(server) == 3


async def test_check_now_while_observing_fetches_at_once(
    server: UpdateServer, transports: list[Spy]
) -> None:
    v1 = publish(server, "1.0")
    transport = spy(server, transports)
    async with aclosing(transport.announcements()) as anns:
        assert await next_of(anns) == announced(server, v1)
        waiting = asyncio.create_task(next_of(anns))
        await transport.watcher_waiting()  # waiting for a notification or a check
        # The announcement changes and the notification is lost (a device that slept).
        server.announcements[DEVICE] = {1: 7, 2: v1.digest, 3: f"../m/{v1.digest.hex()}"}
        gets = announcement_gets(server)
        transport.check_now()
        assert await waiting == Announcement(7, v1.digest, announced(server, v1).manifest_uri)
        assert announcement_gets(server) == gets + 1
        # The observation is still there: a notification still arrives.
        v2 = publish(server, "2.0", devices=[DEVICE])
        assert await next_of(anns) == announced(server, v2)
    assert transport.pauses == []  # no re-registration, no back-off


async def test_check_now_cuts_the_back_off_short(
    server: UpdateServer, transports: list[Spy]
) -> None:
    """A device that woke from sleep checks now even while the watcher backs off an error."""
    v1 = publish(server, "1.0")
    transport = spy(server, transports, poll_interval=3600.0)
    transport.failing_gets = 1  # the first fetch fails, as with the uplink down
    async with aclosing(transport.announcements()) as anns:
        waiting = asyncio.create_task(next_of(anns))
        await transport.watcher_waiting()  # in the back-off after the failed fetch
        assert len(transport.pauses) == 1 and 0.9 <= transport.pauses[0] <= 1.1  # 1 s ± jitter
        transport.check_now()
        assert await waiting == announced(server, v1)
    assert len(transport.pauses) == 1  # fetched without waiting the second out


class Impatient(Spy):
    """Records each pause and returns at once (to see a long back-off without waiting it)."""

    async def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


async def test_a_polling_device_backs_off_failed_polls_up_to_its_poll_interval(
    server: UpdateServer,
) -> None:
    """A sleepy device does not retry every minute while its uplink is down."""
    publish(server, "1.0")
    transport = Impatient(server.uri, DEVICE, ack_timeout=ACK_TIMEOUT, poll_interval=3600.0)
    transport.failing_gets = 14
    try:
        async with aclosing(transport.announcements()) as anns:
            await next_of(anns)
    finally:
        await transport.aclose()
    backoffs = transport.pauses[:14]
    nominal = [min(2.0**i, 3600.0) for i in range(14)]  # 1, 2, 4, ... 2048, 3600, 3600
    assert all(n * 0.9 <= b <= n * 1.1 for b, n in zip(backoffs, nominal, strict=True))
    assert len(set(backoffs)) == len(backoffs), "each back-off drawn with its own jitter"


# -- poll jitter -------------------------------------------------------------------------------


def test_poll_delay_is_drawn_within_the_jitter_bounds() -> None:
    rng = random.Random(1234)
    delays = [poll_delay(3600.0, 0.1, rng) for _ in range(1000)]
    assert all(3240.0 <= d <= 3960.0 for d in delays)
    assert len(set(delays)) > 900  # not in lockstep
    # Spread over the whole range, both sides of the interval.
    assert min(delays) < 3300.0 and max(delays) > 3900.0
    # Seeded: the same seed draws the same intervals.
    assert poll_delay(3600.0, 0.1, random.Random(1234)) == delays[0]
    assert {poll_delay(60.0, 0.0, rng) for _ in range(10)} == {60.0}


def test_transport_draws_each_poll_interval_with_its_jitter() -> None:
    transport = CoapTransport("coap://127.0.0.1:9", DEVICE, poll_interval=100.0, poll_jitter=0.25)
    transport._random = random.Random(7)
    delays = [transport.next_poll_delay() for _ in range(200)]
    assert all(75.0 <= d <= 125.0 for d in delays)
    assert len(set(delays)) == len(delays)
    expected = random.Random(7)
    assert delays[:3] == [100.0 * expected.uniform(0.75, 1.25) for _ in range(3)]
    assert CoapTransport("coap://h", DEVICE).poll_jitter == 0.1  # the default


@pytest.mark.parametrize("jitter", [-0.1, 1.0, 1.5, float("nan")])
def test_poll_jitter_outside_zero_to_one_is_refused(jitter: float) -> None:
    with pytest.raises(ValueError, match="poll_jitter"):
        CoapTransport("coap://h", DEVICE, poll_interval=10.0, poll_jitter=jitter)
