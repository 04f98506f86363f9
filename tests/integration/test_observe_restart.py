"""Issue 17 §4: a restarted client is not deaf, and the server forgets only dead observers.

A client that dies (``kill -9``) leaves its observation at the server. The next notification to
it draws an ICMP port-unreachable; aiocoap's UDP transport used to blame whatever address it
sent to next (the restarted client) and drop that observation too, so the restarted client
missed announcements until ``observe_refresh``. A client that stops cleanly deregisters.

Real sockets on 127.0.0.1:0, the real :class:`~fota.testing.UpdateServer`, a real child
process for ``kill -9``. Nothing sleeps: the tests wait on the announcement iterator and on
the server's device hook; ``asyncio.timeout`` only bounds a failure (``observe_refresh`` is an
hour, so only a live observation can deliver in time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from fota import Client, Status
from fota.core.states import State
from fota.testing import UpdateServer
from fota.testing.server import DeviceSeen, Published
from fota.transport import Announcement
from fota.transport.coap import CoapTransport
from tests.conftest import ACK_TIMEOUT, DEVICE_CLASS, RecordingHandler, Signing, make_config

pytestmark = pytest.mark.timeout(180)
BOUND = 10.0
"""Failure bound of a wait; loopback delivers in milliseconds, ``observe_refresh`` is 3600 s."""
DEVICE = "dev1"
RESTARTS = 20


def publish(server: UpdateServer, version: str) -> Published:
    return server.publish(bytes(100), version, device_class="gw", fragment_size=1024)


async def next_of(anns: AsyncIterator[Announcement]) -> Announcement:
    async with asyncio.timeout(BOUND):
        return await anext(anns)


def transport_for(server: UpdateServer) -> CoapTransport:
    return CoapTransport(server.uri, DEVICE, ack_timeout=ACK_TIMEOUT, observe_refresh=3600.0)


class Observers:
    """Waits until the server counts a number of observations for DEVICE (its device hook)."""

    def __init__(self, server: UpdateServer) -> None:
        self.server = server
        self.changed = asyncio.Event()
        self.history: list[int] = []
        """Every count the server told, in order."""
        server.device_hook = self._hook

    def _hook(self, seen: DeviceSeen) -> None:
        if seen.device == DEVICE:
            self.history.append(seen.observing)
        self.changed.set()

    def count(self) -> int:
        seen = self.server.devices.get(DEVICE)
        return 0 if seen is None else seen.observing

    async def until(self, check: Callable[[int], bool]) -> None:
        async with asyncio.timeout(BOUND):
            while not check(self.count()):
                self.changed.clear()
                await self.changed.wait()

    async def told(self, count: int, since: int) -> None:
        """Wait until the server told ``count`` at position ``since`` of the history or later."""
        async with asyncio.timeout(BOUND):
            while count not in self.history[since:]:
                self.changed.clear()
                await self.changed.wait()


async def dead_observer(server: UpdateServer) -> None:
    """Register an observation the way a client does, then vanish without a word (kill -9).

    aiocoap's client context does not deregister on shutdown: the server keeps the
    observation, and its socket's port is closed.
    """
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        request = ctx.request(
            aiocoap.Message(code=Code.GET, uri=f"{server.uri}/fota/ann/{DEVICE}", observe=0)
        )
        response = await asyncio.wait_for(request.response, BOUND)
        assert response.opt.observe is not None
    finally:
        await ctx.shutdown()


@pytest.fixture
def aiocoap_errors(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.ERROR, logger="coap-server")
    return caplog


def assert_no_pipe_crash(caplog: pytest.LogCaptureFixture) -> None:
    crashes = [r.getMessage() for r in caplog.records if "not iterable" in r.getMessage()]
    crashes += [
        repr(r.exc_info[1])
        for r in caplog.records
        if r.exc_info and "not iterable" in str(r.exc_info[1])
    ]
    assert crashes == [], "aiocoap's pipe crashed on a notification"


async def test_restarted_client_gets_the_next_announcement_every_time(
    server: UpdateServer, aiocoap_errors: pytest.LogCaptureFixture
) -> None:
    """20 times: a client dies, a new one (new port, same device) observes, the server publishes.

    On the old code about a third of the restarts missed the announcement: the notification
    to the dead client drew an ICMP error that aiocoap blamed on the live one.
    """
    observers = Observers(server)
    current = publish(server, "0")
    for i in range(RESTARTS):
        await dead_observer(server)
        transport = transport_for(server)
        try:
            async with aclosing(transport.announcements()) as anns:
                assert (await next_of(anns)).sequence == current.sequence
                current = publish(server, f"{i + 1}")
                got = await next_of(anns)
                assert got.sequence == current.sequence, f"restart {i}: {got}"
        finally:
            await transport.aclose()
        # The dead observer is gone and the live one deregistered: nothing is left over.
        await observers.until(lambda n: n == 0)
    assert_no_pipe_crash(aiocoap_errors)


async def test_a_stopped_client_deregisters(server: UpdateServer) -> None:
    """Closing the watcher (and the transport) removes the observation at the server at once."""
    observers = Observers(server)
    publish(server, "1")
    for _ in range(3):
        transport = transport_for(server)
        try:
            async with aclosing(transport.announcements()) as anns:
                await next_of(anns)
                assert observers.count() == 1
        finally:
            await transport.aclose()
        await observers.until(lambda n: n == 0)


async def test_transport_close_deregisters_a_suspended_watcher(server: UpdateServer) -> None:
    """aclose() deregisters even when the watcher was left suspended (not closed) by its user."""
    observers = Observers(server)
    publish(server, "1")
    transport = transport_for(server)
    anns = transport.announcements()
    try:
        await next_of(anns)
        assert observers.count() == 1
        await transport.aclose()
        await observers.until(lambda n: n == 0)
    finally:
        await anns.aclose()
        await transport.aclose()


async def test_a_dead_observer_is_dropped_when_its_device_registers_again(
    server: UpdateServer, aiocoap_errors: pytest.LogCaptureFixture
) -> None:
    """``fota server`` lists a device observing only while an observation is alive.

    The restarted device's registration makes the server look at the device's older
    observations (one notification each): a dead one draws its ICMP error and is dropped, the
    live one is kept.
    """
    observers = Observers(server)
    publish(server, "1")
    await dead_observer(server)
    await dead_observer(server)
    transport = transport_for(server)
    try:
        async with aclosing(transport.announcements()) as anns:
            await next_of(anns)
            await observers.until(lambda n: n == 1)
            v2 = publish(server, "2")
            assert (await next_of(anns)).sequence == v2.sequence
            assert observers.count() == 1
    finally:
        await transport.aclose()
    assert_no_pipe_crash(aiocoap_errors)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from fota.transport.coap import CoapTransport

    async def main():
        t = CoapTransport(sys.argv[1], sys.argv[2], ack_timeout=0.25, observe_refresh=3600.0)
        async for ann in t.announcements():
            print(ann.sequence, flush=True)

    asyncio.run(main())
    """
)


async def start_child(server: UpdateServer) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        server.uri,
        DEVICE,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


async def read_sequence(child: asyncio.subprocess.Process) -> int:
    assert child.stdout is not None
    async with asyncio.timeout(BOUND * 3):  # the first read includes the interpreter's start
        line = await child.stdout.readline()
    assert line, "the child died"
    return int(line)


async def test_killed_client_process_restarts_and_hears_the_next_announcement(
    server: UpdateServer, aiocoap_errors: pytest.LogCaptureFixture
) -> None:
    """kill -9 of a real process (no deregistration), then a new process: not deaf."""
    current = publish(server, "0")
    for i in range(6):
        child = await start_child(server)
        try:
            assert await read_sequence(child) == current.sequence
            current = publish(server, f"{i + 1}")
            assert await read_sequence(child) == current.sequence, f"restart {i}"
        finally:
            if child.returncode is None:
                child.send_signal(signal.SIGKILL)
            await child.wait()
    assert_no_pipe_crash(aiocoap_errors)


def installed(version: str) -> Callable[[Status], bool]:
    def check(status: Status) -> bool:
        return status.installed_version == version and status.state is State.IDLE

    return check


async def test_restarted_client_installs_the_next_update_every_time(
    tmp_path: Path, server: UpdateServer, signing: Signing, aiocoap_errors: pytest.LogCaptureFixture
) -> None:
    """The whole client, restarted beside a dead observer 5 times: each next update installs.

    Each round a dead observation (a killed process) is left at the server, a new
    :class:`~fota.Client` on a new port registers (the server now holds two), the dead one is
    dropped, and only then is the update published: it can only arrive by notification.
    """
    observers = Observers(server)
    config = make_config(tmp_path, server, signing, observe_refresh=3600.0)
    for i in range(1, 6):
        await dead_observer(server)
        since = len(observers.history)
        async with Client(config, handler=RecordingHandler()) as client:
            await observers.told(2, since)  # the dead observer and the new client's
            await observers.until(lambda n: n == 1)  # the dead one found and dropped
            version = f"{i}.0"
            server.publish(bytes([i]) * 5000, version, device_class=DEVICE_CLASS, polite=False)
            await client.wait_for(installed(version), BOUND)
        await observers.until(lambda n: n == 0)  # the client deregistered on close
    assert_no_pipe_crash(aiocoap_errors)
