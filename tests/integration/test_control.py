"""The control socket in process: the real Client and server, a real Unix socket, real peers.

The daemon as a subprocess is tests/e2e/test_daemon.py; here the ControlServer runs in the test's
event loop so a ManualClock can move lock TTLs and deferrals. Peers that are other processes
(Python control clients, socat as an unprivileged user) are real subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fota import Client, ResultCode, State
from fota.app.control import ControlError
from fota.app.control import protocol as proto
from fota.app.control.server import ControlServer
from fota.testing import UpdateServer
from tests.conftest import Signing, make_config
from tests.control_rig import Rig, running_rig, short_dir

pytestmark = pytest.mark.timeout(60)

BOUND = 15.0
KiB = 1024


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir("fctl-") as path:
        yield path


@pytest.fixture
async def rig(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> AsyncIterator[Rig]:
    async with running_rig(
        tmp_path, server, signing, sockdir, max_clients=60, max_message=4096
    ) as r:
        yield r


def python_client(sock: Path, body: str) -> list[str]:
    """Argv of another process that runs ``body`` with ``fota`` (a ControlClient) connected."""
    program = (
        "import asyncio, json, sys\n"
        "from fota.app.control import ControlClient\n"
        "async def main():\n"
        f"    async with ControlClient({str(sock)!r}) as fota:\n"
        + "".join(f"        {line}\n" for line in body.strip().splitlines())
        + "asyncio.run(main())\n"
    )
    return [sys.executable, "-c", program]


async def run_python_client(sock: Path, body: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *python_client(sock, body), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 0, err.decode()
    return out.decode()


# -- protocol (no sockets) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "names"),
    [
        (b"{not json", "bad_json", "not JSON"),
        (b"[1, 2]", "bad_json", "JSON object"),
        (b'"status"', "bad_json", "JSON object"),
        (b"\xff\xfe", "bad_json", "not JSON"),
        (b'{"id": 1}', "bad_request", "op"),
        (b'{"op": 7}', "bad_request", "op"),
        (b'{"op": "launch"}', "unknown_op", "launch"),
        (b'{"op": "status", "verbose": true}', "bad_request", "verbose"),
        (b'{"op": "defer", "for": "soon"}', "bad_request", "for: expected a number"),
        (b'{"op": "defer", "for": -5}', "bad_request", "positive"),
        (b'{"op": "defer"}', "bad_request", "exactly one of until and for"),
        (b'{"op": "defer", "for": 5, "until": 9}', "bad_request", "exactly one"),
        (b'{"op": "defer", "until": "2027-01-01T00:00"}', "bad_request", "no time zone"),
        (b'{"op": "defer", "until": "tomorrow"}', "bad_request", "not ISO 8601"),
        (b'{"op": "defer", "for": 1e999}', "bad_request", "positive"),
        (b'{"op": "inhibit", "name": "backup"}', "bad_request", "ttl is required"),
        (b'{"op": "inhibit", "name": "b", "ttl": true}', "bad_request", "ttl: expected a number"),
        (b'{"op": "reject", "reason": "' + b"x" * 300 + b'"}', "bad_request", "at most 256"),
        (b'{"op": "reject", "reason": "a\\u0007b"}', "bad_request", "control characters"),
        (b'{"op": "subscribe", "events": ["progress", "gossip"]}', "bad_request", "gossip"),
        (b'{"op": "subscribe", "answers": "yes"}', "bad_request", "answers"),
        (b'{"op": "status", "id": [1]}', "bad_request", "id"),
        (b'{"op": "status", "id": true}', "bad_request", "id"),
    ],
)
def test_bad_requests_name_the_field(line: bytes, code: str, names: str) -> None:
    with pytest.raises(ControlError) as caught:
        proto.parse_request(line)
    assert caught.value.code == code
    assert names in str(caught.value)


def test_good_requests_parse() -> None:
    r = proto.parse_request(b'{"id": "a", "op": "defer", "until": "2027-01-01T00:00Z"}\n')
    assert (r.op, r.id, r.args["until"]) == ("defer", "a", 1798761600.0)
    r = proto.parse_request(b'{"op": "inhibit", "name": "backup", "ttl": 60}')
    assert r.args == {"name": "backup", "ttl": 60.0} and r.id is None


# -- a polite update driven over the socket --------------------------------------------------


async def test_a_polite_update_answered_over_the_socket(rig: Rig) -> None:
    await rig.provisioned()
    async with rig.connect() as app:
        status = await app.subscribe()
        assert status["state"] == "IDLE" and status["installed_version"] == "1.0"
        uid = rig.publish("2.0", size=200 * KiB)
        available = await app.wait_event("update_available", timeout=BOUND)
        assert (available["update_id"], available["version"]) == (uid, "2.0")
        assert available["installed_version"] == "1.0" and available["polite"] is True
        ask = await app.wait_event("authorization_needed", timeout=BOUND)
        assert (ask["step"], ask["update_id"]) == ("download", uid)
        assert (await app.status())["awaiting"] == "download"
        assert await app.authorize() == uid  # the pending update by default
        progress = await app.wait_event("progress", timeout=BOUND)
        assert progress["total"] == 200 * KiB and 0 < progress["done"] <= progress["total"]
        ask = await app.wait_event("authorization_needed", timeout=BOUND)
        assert ask["step"] == "install"
        await app.authorize(uid)
        done = await app.wait_event(("completed", "failed"), timeout=BOUND)
    assert (done["event"], done["result"], done["version"]) == ("completed", "SUCCESS", "2.0")
    assert done["result_code"] == ResultCode.SUCCESS
    assert rig.client.status().installed_version == "2.0"


async def test_answers_for_nothing_are_clear_errors(rig: Rig) -> None:
    await rig.provisioned()
    async with rig.connect() as app:
        with pytest.raises(ControlError) as caught:
            await app.authorize()
        assert caught.value.code == "invalid_state" and "no update is pending" in str(caught.value)
        with pytest.raises(ControlError) as caught:
            await app.resume()
        assert caught.value.code == "invalid_state"
        with pytest.raises(ControlError) as caught:
            await app.inhibit("x", 10 * 86400)
        assert caught.value.code == "refused" and "max_lock_ttl" in str(caught.value)
        hello = await app.hello()
        assert hello["protocol"] == proto.PROTOCOL and hello["pid"] == os.getpid()


async def test_another_process_defers_then_resumes(rig: Rig) -> None:
    await rig.provisioned()
    async with rig.connect() as watcher:
        await watcher.subscribe(["authorization_needed", "deferred"])
        uid = rig.publish("2.0")
        await watcher.wait_event("authorization_needed", timeout=BOUND)
        out = await run_python_client(
            rig.control.path,
            'print(json.dumps(await fota.defer(seconds=3600, reason="shift change")))',
        )
        until = json.loads(out)
        assert until == pytest.approx(rig.clock() + 3600)
        deferred = await watcher.wait_event("deferred", timeout=BOUND)
        assert deferred["update_id"] == uid and deferred["reason"] == "shift change"
        assert deferred["step"] == "download" and deferred["until"] == until
        assert (await watcher.status())["deferred_step"] == "download"
        await run_python_client(rig.control.path, "await fota.resume()")
        again = await watcher.wait_event("authorization_needed", timeout=BOUND)
        assert again["step"] == "download" and again["update_id"] == uid


async def test_answering_subscribers_count_as_the_handler(rig: Rig) -> None:
    await rig.provisioned()
    async with rig.connect() as a, rig.connect() as b:
        await a.subscribe(answers=True)
        await b.subscribe(answers=True)
        await a.subscribe(answers=False)
        assert rig.answerers == [1, 2, 1]
        assert rig.client._engine.handler is not None
    changed = rig.answerers_changed
    while len(rig.answerers) < 4:
        changed.clear()
        await asyncio.wait_for(changed.wait(), BOUND)  # the server sees b leave
    # ...then b left: 0 (the engine's unanswered rules apply again).
    assert rig.answerers == [1, 2, 1, 0]
    assert rig.client._engine.handler is None


async def test_a_late_subscriber_hears_the_authorization_it_missed(rig: Rig) -> None:
    await rig.provisioned()
    uid = rig.publish("2.0")
    await rig.client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, BOUND)
    for answers in (False, True):
        async with rig.connect() as app:
            status = await app.subscribe(answers=answers)
            assert status["awaiting"] == "download"
            ask = await app.wait_event("authorization_needed", timeout=BOUND)
            assert (ask["update_id"], ask["step"], ask["version"]) == (uid, "download", "2.0")
    async with rig.connect() as app:  # not to those that did not ask for it
        await app.subscribe(["progress"])
        await app.authorize(uid)
        event = await app.next_event(BOUND)
        assert event["event"] == "progress"


# -- inhibitor locks from other processes ----------------------------------------------------


async def test_two_lock_holders_and_one_that_dies(rig: Rig) -> None:
    await rig.provisioned()
    sock = rig.control.path
    await run_python_client(sock, 'await fota.inhibit("backup", 600)')
    # The second holder is killed -9 while it holds its lock: only the TTL frees it.
    dying = await asyncio.create_subprocess_exec(
        *python_client(
            sock,
            'await fota.inhibit("recording", 120)\nprint("held", flush=True)\n'
            "await asyncio.Event().wait()",
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    assert dying.stdout is not None
    assert await asyncio.wait_for(dying.stdout.readline(), BOUND) == b"held\n"
    dying.kill()
    await dying.wait()

    async with rig.connect() as app:
        await app.subscribe(["authorization_needed", "held", "completed", "failed"])
        uid = rig.publish("2.0")
        for _ in range(2):
            await app.wait_event("authorization_needed", timeout=BOUND)
            await app.authorize(uid)
        held = await app.wait_event("held", timeout=BOUND)
        assert sorted(held["held"]) == ["lock backup", "lock recording"]
        await run_python_client(sock, 'await fota.release("backup")')
        held = await app.wait_event("held", timeout=BOUND)
        assert held["held"] == ["lock recording"], "the dead holder's lock still holds"
        status = await app.status()
        assert status["state"] == "INSTALL_HELD"
        assert [lock["name"] for lock in status["locks"]] == ["recording"]
        rig.clock.advance(121)
        done = await app.wait_event(("completed", "failed"), timeout=BOUND)
    assert done["result"] == "SUCCESS"


# -- hostile and broken input ------------------------------------------------------------------


async def raw_exchange(path: Path, payload: bytes, *, half_close: bool = True) -> list[Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    if half_close:
        writer.write_eof()
    lines = []
    while line := await asyncio.wait_for(reader.readline(), BOUND):
        lines.append(json.loads(line))
    writer.close()
    return lines


async def test_malformed_oversized_and_partial_messages(rig: Rig) -> None:
    path = rig.control.path
    got = await raw_exchange(path, b'{oops\n[]\n{"op":"status","id":3}\n\n{"op":"nope","id":4}\n')
    assert [m.get("error", {}).get("code") for m in got] == [
        "bad_json",
        "bad_json",
        None,
        "unknown_op",
    ]
    assert got[2]["id"] == 3 and got[2]["result"]["state"] == "IDLE"
    assert got[3]["id"] == 4
    # Longer than max_message (4096 here): one clear answer, then the daemon hangs up.
    got = await raw_exchange(path, b'{"op":"status","pad":"' + b"x" * 10000, half_close=False)
    assert [m["error"]["code"] for m in got] == ["too_large"]
    assert "4096" in got[0]["error"]["message"]
    # End of input in the middle of a message.
    got = await raw_exchange(path, b'{"id":1,"op":"status"}\n{"op":"sta')
    assert got[0]["ok"] is True
    assert got[1]["error"]["code"] == "incomplete"
    # A message split across writes is one message.
    reader, writer = await asyncio.open_unix_connection(str(path))
    for piece in (b'{"op":', b'"hello",', b'"id":9}\n'):
        writer.write(piece)
        await writer.drain()
    answer = json.loads(await asyncio.wait_for(reader.readline(), BOUND))
    assert answer["id"] == 9 and answer["result"]["protocol"] == proto.PROTOCOL
    writer.close()
    # Valid JSON nested deeper than the parser goes; an id of 0 is still echoed.
    got = await raw_exchange(path, b"[" * 4000 + b"\n" + b'{"id":0,"op":"resume"}\n')
    assert [m["error"]["code"] for m in got] == ["bad_json", "invalid_state"]
    assert "nested too deeply" in got[0]["error"]["message"] and got[1]["id"] == 0
    got = await raw_exchange(path, b'{"id":0,"op":"defer","for":1e20}\n')
    assert got[0]["id"] == 0 and got[0]["error"]["code"] == "bad_request"
    # A burst of requests far beyond the queue limit is answered, in order, not dropped.
    burst = b"".join(b'{"id":%d,"op":"hello"}\n' % i for i in range(3000))
    got = await raw_exchange(path, burst)
    assert [m["id"] for m in got] == list(range(3000))
    # Raw bytes that are no text at all.
    got = await raw_exchange(path, os.urandom(300).replace(b"\n", b"") + b"\n")
    assert got[0]["error"]["code"] == "bad_json"
    # After all that, the update still goes through.
    await rig.provisioned()
    assert rig.control.connections == 0


async def test_fifty_simultaneous_connections_and_one_too_many(rig: Rig) -> None:
    clients = [rig.connect() for _ in range(50)]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        results = await asyncio.gather(*(c.status() for c in clients))
        assert all(r["state"] == "IDLE" for r in results)
        assert rig.control.connections == 50
        extra = [rig.connect() for _ in range(10)]  # up to max_clients = 60
        await asyncio.gather(*(c.connect() for c in extra))
        await asyncio.gather(*(c.hello() for c in extra))
        with pytest.raises(ControlError) as caught:
            async with rig.connect() as late:
                await late.hello()
        assert caught.value.code == "busy" and "max_clients" in str(caught.value)
        await asyncio.gather(*(c.aclose() for c in extra))
        await asyncio.gather(*(c.subscribe() for c in clients))
        await rig.provisioned()
        # Every subscriber saw the first install complete.
        events = await asyncio.gather(*(c.wait_event("completed", timeout=BOUND) for c in clients))
        assert {e["version"] for e in events} == {"1.0"}
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


# -- the socket file ---------------------------------------------------------------------------


async def test_stale_socket_is_replaced_live_one_and_other_files_are_not(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> None:
    from fota.errors import ConfigError

    path = sockdir / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what kill -9 leaves behind
    client = Client(make_config(tmp_path, server, signing))
    async with client:
        first = ControlServer(client, path, mode=0o600)
        await first.start()
        assert (path.stat().st_mode & 0o777) == 0o600
        second = ControlServer(client, path)
        with pytest.raises(ConfigError, match="in use by another process"):
            await second.start()
        await first.aclose()
        assert not path.exists()
        path.write_text("not a socket")
        with pytest.raises(ConfigError, match="not a socket"):
            await ControlServer(client, path).start()
        assert path.read_text() == "not a socket"
    assert sorted(p.name for p in sockdir.iterdir()) == ["ctl.sock"]


SOCAT = shutil.which("socat")
NOBODY = 65534


def socat_as_nobody(
    path: Path, extra_groups: list[int] | None = None
) -> subprocess.CompletedProcess[str]:
    """One ``hello`` from socat running as the unprivileged user nobody (uid 65534)."""
    assert SOCAT is not None, "socat is missing: scripts/test installs it (Debian package socat)"
    return subprocess.run(
        [SOCAT, "-t", "5", "-", f"UNIX-CONNECT:{path}"],
        input='{"op":"hello","id":1}\n',
        capture_output=True,
        text=True,
        timeout=BOUND,
        user=NOBODY,
        group=NOBODY,
        extra_groups=extra_groups or [],
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
async def test_socket_mode_and_group_decide_who_may_connect(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> None:
    client = Client(make_config(tmp_path, server, signing))
    daemon_group = 1  # "daemon": nobody is not a member
    async with client:
        control = ControlServer(client, sockdir / "ctl.sock", mode=0o660, group=daemon_group)
        await control.start()
        st = control.path.stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, daemon_group)
        # root ignores file modes, so the refusal is shown with an unprivileged peer.
        refused = await asyncio.to_thread(socat_as_nobody, control.path)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        allowed = await asyncio.to_thread(socat_as_nobody, control.path, [daemon_group])
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout)["result"]["protocol"] == proto.PROTOCOL
        await control.aclose()


# -- the documented message schema -------------------------------------------------------------


def control_schema(first: str) -> Any:
    """docs/control.md's CDDL with ``first`` as the rule pycddl validates against."""
    import pycddl

    from tests.core.test_docs import cddl_blocks

    return pycddl.Schema(f"root = {first}\n" + cddl_blocks("control.md"))


async def test_messages_match_the_documented_cddl(rig: Rig) -> None:
    import cbor2

    reader, writer = await asyncio.open_unix_connection(str(rig.control.path))

    async def lines_until(predicate: Any) -> list[dict[str, Any]]:
        out = []
        while True:
            message = json.loads(await asyncio.wait_for(reader.readline(), BOUND))
            out.append(message)
            if predicate(message):
                return out

    writer.write(b'{"id":1,"op":"hello"}\n{"id":"s","op":"subscribe"}\n{"op":"bogus"}\n')
    messages = await lines_until(lambda m: m.get("error", {}).get("code") == "unknown_op")
    rig.publish("1.0")
    messages += await lines_until(lambda m: m.get("event") == "completed")
    rig.publish("2.0")
    messages += await lines_until(lambda m: m.get("event") == "authorization_needed")
    writer.write(b'{"id":2,"op":"defer","for":60,"reason":"r"}\n{"id":3,"op":"status"}\n')
    messages += await lines_until(lambda m: m.get("id") == 3)
    await rig.control.aclose()  # subscribers hear "stopping", then the daemon hangs up
    messages += await lines_until(lambda m: m.get("event") == "stopping")
    assert await reader.read() == b""
    writer.close()

    answer, event, status = (control_schema(r) for r in ("answer", "event", "status"))
    kinds = set()
    for message in messages:
        (event if "event" in message else answer).validate_cbor(cbor2.dumps(message))
        kinds.add(message.get("event"))
    statuses = [m["result"] for m in messages if m.get("id") in ("s", 3)]
    assert len(statuses) == 2 and statuses[1]["deferred_step"] == "download"
    for s in statuses:
        status.validate_cbor(cbor2.dumps(s))
    assert {
        "state",
        "update_available",
        "authorization_needed",
        "deferred",
        "completed",
        "stopping",
    } <= kinds
    # The schema is not vacuous: a status missing a field or with a wrong state fails.
    broken = {**statuses[0], "state": "NAPPING"}
    import pycddl

    with pytest.raises(pycddl.ValidationError):
        status.validate_cbor(cbor2.dumps(broken))
    with pytest.raises(pycddl.ValidationError):
        answer.validate_cbor(cbor2.dumps({"id": 1, "ok": "yes"}))


async def test_engine_health_for_the_watchdog(rig: Rig) -> None:
    engine = rig.client._engine
    assert engine.healthy(10.0)
    # An event stuck in the machine (a wedged transition) makes it unhealthy; alive alone
    # is not enough.
    model = engine.model
    assert model is not None
    entered, release = asyncio.Event(), asyncio.Event()
    real = model.trigger

    async def stuck(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await real(*args, **kwargs)

    model.trigger = stuck
    rig.client.check_now()
    rig.publish("1.0")
    await asyncio.wait_for(entered.wait(), BOUND)
    assert engine.alive and engine.healthy(10.0)
    assert not engine.healthy(0.0)
    model.trigger = real
    release.set()
    await rig.client.wait_for(lambda s: s.installed_version == "1.0", BOUND)
    assert engine.healthy(10.0)


async def test_a_subscriber_that_stops_reading_cannot_hold_up_the_stop(rig: Rig) -> None:
    _reader, writer = await asyncio.open_unix_connection(str(rig.control.path))
    # Never read: requests whose answers fill the socket buffers and then the queue.
    writer.write(b'{"op":"subscribe"}\n' + b'{"op":"status"}\n' * 5000)
    await writer.drain()
    async with rig.connect() as other:
        await other.hello()  # the others are served meanwhile
    await asyncio.wait_for(rig.control.aclose(), BOUND)
    assert rig.control.connections == 0
    writer.close()


async def test_a_deadline_forces_the_update_and_subscribers_are_told(rig: Rig) -> None:
    await rig.provisioned()
    async with rig.connect() as app:
        await app.subscribe(["authorization_needed", "forced", "completed", "failed"])
        deadline = int(rig.clock()) + 600
        uid = rig.publish("2.0", deadline=deadline)
        ask = await app.wait_event("authorization_needed", timeout=BOUND)
        assert ask["deadline"] == deadline and ask["step"] == "download"
        rig.clock.advance(601)  # nobody answered: the deadline decides
        forced = await app.wait_event("forced", timeout=BOUND)
        assert (forced["update_id"], forced["step"], forced["reason"]) == (
            uid,
            "download",
            "deadline",
        )
        done = await app.wait_event(("completed", "failed"), timeout=BOUND)
    assert done["event"] == "completed" and done["version"] == "2.0"


async def test_a_flooding_client_that_resets_frees_its_slot(rig: Rig) -> None:
    _reader, writer = await asyncio.open_unix_connection(str(rig.control.path))
    # Never read: the answers fill the socket, the server's queue fills, it stops reading.
    writer.write(b'{"op":"status"}\n' * 20000)
    # Bounded: the server stops reading once its queue for us is full (backpressure).
    await asyncio.wait_for(rig.control.backlogged.wait(), BOUND)
    writer.transport.abort()  # a reset, not a close
    # The server's task for that connection ends by itself (no stop needed).
    await asyncio.wait_for(asyncio.gather(*rig.control._tasks), BOUND)
    assert rig.control.connections == 0
    async with rig.connect() as c:
        assert (await c.hello())["protocol"] == proto.PROTOCOL
