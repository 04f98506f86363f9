"""Issue 16 §6: the control socket's slots cannot be held by silent peers; ``stopping`` works.

Real Unix sockets, the real ControlServer and Client in the test's event loop; one hog is
socat running as the unprivileged user nobody in the socket's group (the permission model of
docs/control.md). The timeouts are shortened; every wait is on an event (a reply, an end of
input, a process exit), never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fota.app.control import ControlError
from fota.app.control import protocol as proto
from fota.app.settings import load_settings
from fota.testing import UpdateServer
from tests.conftest import Signing
from tests.control_rig import running_rig, short_dir

pytestmark = pytest.mark.timeout(60)

BOUND = 20.0
SOCAT = shutil.which("socat")
NOBODY = 65534
DAEMON_GID = 1  # the socket's group in these tests; nobody is given it as a supplementary group


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir("fhard-") as path:
        yield path


async def answers_then_eof(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """Every line the daemon sends until it hangs up (bounded: a hog that is never closed
    fails the test here)."""
    data = await asyncio.wait_for(reader.read(), BOUND)
    return [json.loads(line) for line in data.splitlines()]


def codes(messages: list[dict[str, Any]]) -> list[str | None]:
    return [m.get("error", {}).get("code") for m in messages]


@pytest.mark.skipif(os.geteuid() != 0, reason="socat as another user needs root")
async def test_sixty_four_half_written_lines_are_closed_and_a_client_is_served(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> None:
    assert SOCAT is not None, "socat is missing: scripts/test installs it (Debian package socat)"
    async with running_rig(
        tmp_path,
        server,
        signing,
        sockdir,
        max_clients=64,
        group=DAEMON_GID,
        request_timeout=2.0,  # socat must get its hello in within it
        idle_timeout=BOUND * 10,  # this test is about partial lines only
    ) as rig:
        path = rig.sock
        # The unprivileged group member: a complete hello (so we know it is in), then half a
        # line, and it keeps its stdin open, so it never finishes the line.
        hog = await asyncio.create_subprocess_exec(
            SOCAT,
            "-t",
            "30",
            "-",
            f"UNIX-CONNECT:{path}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[DAEMON_GID],
        )
        assert hog.stdin is not None and hog.stdout is not None
        hog.stdin.write(b'{"op":"hello","id":1}\n{"op":"hel')
        await hog.stdin.drain()
        hello = json.loads(await asyncio.wait_for(hog.stdout.readline(), BOUND))
        assert hello["id"] == 1 and hello["ok"] is True
        # 63 more in this process: half of them connect and say nothing at all, the others
        # write half a line.
        streams = [await asyncio.open_unix_connection(path) for _ in range(63)]
        for n, (_, writer) in enumerate(streams):
            if n % 2:
                writer.write(b'{"op":"status","id":' + str(n).encode())
                await writer.drain()
        # Each is answered "timeout" and closed by the daemon (old code: never; the wait
        # below runs into BOUND and the test fails).
        for reader, writer in streams:
            got = await answers_then_eof(reader)
            assert codes(got) == ["timeout"]
            assert "control.request_timeout" in got[0]["error"]["message"]
            assert got[0]["id"] is None
            writer.close()
        closed = json.loads(await asyncio.wait_for(hog.stdout.readline(), BOUND))
        assert codes([closed]) == ["timeout"]
        hog.stdin.close()  # socat waits (-t) for its other side before it exits
        assert await asyncio.wait_for(hog.stdout.read(), BOUND) == b""
        assert await asyncio.wait_for(hog.wait(), BOUND) == 0
        # Every slot is free again: a normal client is served.
        async with rig.connect() as app:
            assert (await app.hello())["protocol"] == proto.PROTOCOL
            assert (await app.status())["state"] == "IDLE"


async def test_idle_clients_are_closed_subscribers_stay(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> None:
    async with (
        running_rig(
            tmp_path,
            server,
            signing,
            sockdir,
            max_clients=8,
            request_timeout=BOUND,
            idle_timeout=0.5,
        ) as rig,
        rig.connect() as listener,
    ):
        await listener.subscribe(["completed"])
        # Seven clients ask once, then sit on their connection without subscribing
        # (blank keep-alive lines do not count as asking). They and the listener fill
        # every slot (busy when full: tests/integration/test_control.py).
        idle = [await asyncio.open_unix_connection(rig.sock) for _ in range(7)]
        for n, (_, writer) in enumerate(idle):
            writer.write(b'{"op":"hello","id":%d}\n\n \n' % n)
            await writer.drain()
        for n, (reader, writer) in enumerate(idle):
            got = await answers_then_eof(reader)
            assert codes(got) == [None, "idle"]
            assert got[0]["id"] == n and "control.idle_timeout" in got[1]["error"]["message"]
            writer.close()
        # The subscriber was as silent for longer, and is still there and still hears.
        async with rig.connect() as late:
            assert (await late.hello())["protocol"] == proto.PROTOCOL
        rig.publish("1.0")
        done = await listener.wait_event("completed", timeout=BOUND)
        assert done["version"] == "1.0"


async def test_a_subscriber_to_stopping_hears_it(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> None:
    async with running_rig(tmp_path, server, signing, sockdir) as rig, rig.connect() as app:
        # Old code: bad_request "events: unknown ['stopping']".
        status = await app.subscribe(["stopping"])
        assert status["state"] == "IDLE"
        await rig.control.aclose()
        stopping = await app.wait_event("stopping", timeout=BOUND)
        assert stopping["update_id"] is None and isinstance(stopping["at"], float)


def test_subscribe_takes_every_documented_event_and_no_other() -> None:
    request = proto.parse_request(b'{"op":"subscribe","events":["stopping","progress"]}')
    assert request.args["events"] == ("stopping", "progress")
    with pytest.raises(ControlError, match="gossip") as caught:
        proto.parse_request(b'{"op":"subscribe","events":["gossip"]}')
    assert caught.value.code == "bad_request" and "stopping" in str(caught.value)


def test_the_timeouts_are_settings(tmp_path: Path) -> None:
    from fota import keys
    from fota.errors import ConfigError

    pub = keys.save_keypair(keys.generate(), tmp_path / "k")
    base = (
        'server = "coap://updates.example.com:61616"\ndevice_class = "gw"\n'
        f'state_dir = "state"\ntrust = ["{pub}"]\ntarget = "fw.bin"\n'
    )
    path = tmp_path / "fota.toml"
    path.write_text(base + "[control]\nrequest_timeout = 2.5\nidle_timeout = 30\n")
    control = load_settings(path).control
    assert (control.request_timeout, control.idle_timeout) == (2.5, 30.0)
    path.write_text(base)
    control = load_settings(path).control
    assert (control.request_timeout, control.idle_timeout) == (10.0, 60.0)
    path.write_text(base + "[control]\nrequest_timeout = 0\n")
    with pytest.raises(ConfigError, match=r"control\.request_timeout: expected 0\.1\.\.86400"):
        load_settings(path)
