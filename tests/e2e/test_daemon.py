"""`fota daemon` as a real subprocess: TOML config, systemd notify, signals, control socket, CLI.

The update server runs in the test; the daemon is a child process configured by a TOML file,
with ``NOTIFY_SOCKET`` pointing at a datagram socket the test reads, so readiness, status and
stopping are awaited as systemd would see them, never slept for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fota import ResultCode, State
from fota.app.control import ControlClient, ControlError
from fota.core.record import Record, bitmap_get
from fota.keys import save_keypair
from fota.testing import RequestLog, UpdateServer
from tests.conftest import ACK_TIMEOUT, DEVICE_CLASS, Signing

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

BOUND = 30.0
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def rundir() -> Iterator[Path]:
    # Short (sun_path holds 108 bytes) and world-traversable (for unprivileged peers).
    path = Path(tempfile.mkdtemp(prefix="fd-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Notify:
    """The systemd side of sd_notify: a datagram socket the daemon sends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[dict[str, str]] = []

    async def next(self) -> dict[str, str]:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.seen.append(fields)
        return fields

    async def wait(self, key: str, contains: str = "") -> dict[str, str]:
        async def find() -> dict[str, str]:
            while True:
                fields = await self.next()
                if key in fields and contains in fields[key]:
                    return fields

        return await asyncio.wait_for(find(), BOUND)

    def drain(self) -> list[dict[str, str]]:
        """Everything sent and not read yet (after the daemon exited: no waiting needed)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.seen
            fields = dict(kv.split("=", 1) for kv in data.decode().splitlines() if "=" in kv)
            self.seen.append(fields)

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """One device's daemon: its TOML file, state, logs, and the process while it runs."""

    def __init__(self, tmp_path: Path, rundir: Path, server: UpdateServer, trust_pem: Path) -> None:
        self.dir = tmp_path
        self.socket = rundir / "ctl.sock"
        self.notify = Notify(rundir / "notify")
        self.server = server
        self.config = tmp_path / "fota.toml"
        self.log = tmp_path / "daemon.log"
        self.target = tmp_path / "firmware.bin"
        self.trust_pem = trust_pem
        self.proc: asyncio.subprocess.Process | None = None
        self.write_config()

    def write_config(self, extra: str = "", top: str = "") -> None:
        self.config.write_text(
            f"""
server = "{self.server.uri}"
device_id = "gw-daemon"
device_class = "{DEVICE_CLASS}"
state_dir = "state"
trust = ["{self.trust_pem}"]
target = "firmware.bin"
ack_timeout = {ACK_TIMEOUT}
retry_base = 0.05
{top}

[control]
socket = "{self.socket}"
mode = "0660"

[log]
level = "info"
format = "json"
{extra}
"""
        )

    async def start(self, env: dict[str, str] | None = None) -> None:
        with open(self.log, "ab") as log:
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
                env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})},
            )
        await self.notify.wait("READY", "1")

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), BOUND)
        self.proc = None
        return code

    def control(self) -> ControlClient:
        return ControlClient(self.socket, timeout=BOUND)

    async def fota(self, *args: str) -> tuple[int, str, str]:
        """Run the ``fota`` command (another process) against this daemon's socket."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fota",
            *args,
            "--socket",
            str(self.socket),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), BOUND)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def journal(self) -> Record:
        return Record.from_bytes((self.dir / "state" / "journal.cbor").read_bytes())


@pytest.fixture
async def daemon(
    tmp_path: Path, rundir: Path, server: UpdateServer, signing: Signing
) -> AsyncIterator[Daemon]:
    d = Daemon(tmp_path, rundir, server, save_keypair(signing.key, tmp_path / "signing.key"))
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.returncode is None:
            d.proc.kill()
            await d.proc.wait()
        d.notify.close()


def publish(server: UpdateServer, version: str, size: int = 16 * KiB, **kw: Any) -> Any:
    return server.publish(os.urandom(size), version, device_class=DEVICE_CLASS, **kw)


async def provision(d: Daemon) -> None:
    """1.0 installed (a first install does not ask)."""
    async with d.control() as c:
        await c.subscribe(["completed", "failed"])
        publish(d.server, "1.0")
        done = await c.wait_event(("completed", "failed"), timeout=BOUND)
    assert done["result"] == "SUCCESS"


# -- a polite update driven from the command line ----------------------------------------------


async def test_a_polite_update_authorized_with_the_cli(daemon: Daemon) -> None:
    await daemon.start()
    await provision(daemon)
    async with daemon.control() as watcher:
        await watcher.subscribe(["authorization_needed", "completed", "failed"])
        v2 = publish(daemon.server, "2.0", size=256 * KiB)
        ask = await watcher.wait_event("authorization_needed", timeout=BOUND)
        assert ask["step"] == "download"
        await daemon.notify.wait("STATUS", "Update 2.0: waiting for download authorization")
        code, out, err = await daemon.fota("authorize")
        assert code == 0, err
        assert v2.update_id in out
        ask = await watcher.wait_event("authorization_needed", timeout=BOUND)
        assert ask["step"] == "install"
        code, out, err = await daemon.fota("authorize", v2.update_id)
        assert code == 0, err
        done = await watcher.wait_event(("completed", "failed"), timeout=BOUND)
    assert (done["result"], done["version"]) == ("SUCCESS", "2.0")
    assert hashlib.sha256(daemon.target.read_bytes()).digest() == v2.image_sha256
    await daemon.notify.wait("STATUS", "Idle; running 2.0")
    assert await daemon.stop() == 0
    assert any("STOPPING" in fields for fields in daemon.notify.drain())
    assert not daemon.socket.exists(), "the control socket is removed at a clean stop"
    # Every log line is one JSON object; lines of the update carry its id, version and state.
    lines = daemon.log_lines()
    assert lines
    assert {"timestamp", "level", "logger", "event"} <= set(lines[0])
    bound = [line for line in lines if line.get("update_id") == v2.update_id]
    assert any(line.get("version") == "2.0" and line.get("state") for line in bound)
    audit = [line for line in lines if line["event"] == "authorized_via_control"]
    assert len(audit) == 2 and all(line["uid"] == os.getuid() for line in audit)


async def test_sigterm_mid_download_exits_0_and_a_restart_completes(daemon: Daemon) -> None:
    image = os.urandom(4 * MiB)
    published = daemon.server.publish(image, "1.0", device_class=DEVICE_CLASS)
    image_path = f"/fota/img/{published.image_sha256.hex()}"
    fragment = 64 * KiB
    reached = asyncio.Event()
    seen = 0

    def on_request(entry: RequestLog) -> None:
        nonlocal seen
        if entry.path == image_path:
            seen += 1
            if seen >= len(image) // KiB // 2:  # half-way
                reached.set()

    daemon.server.request_hook = on_request
    await daemon.start()
    await asyncio.wait_for(reached.wait(), BOUND)
    assert await daemon.stop(signal.SIGTERM) == 0
    record = daemon.journal()
    verified = {i for i in range(len(image) // fragment) if bitmap_get(record.verified, i)}
    assert record.state is State.DOWNLOADING
    assert 1 <= len(verified) < len(image) // fragment
    daemon.server.request_hook = None
    before = len(daemon.server.requests)

    await daemon.start()
    async with daemon.control() as c:
        status = await c.subscribe(["completed", "failed"])
        if status["installed_version"] != "1.0":
            done = await c.wait_event(("completed", "failed"), timeout=BOUND)
            assert done["result"] == "SUCCESS"
    assert hashlib.sha256(daemon.target.read_bytes()).digest() == published.image_sha256
    refetched = [
        r.offset
        for r in daemon.server.requests[before:]
        if r.path == image_path and r.offset is not None and r.offset // fragment in verified
    ]
    assert refetched == [], "verified fragments were fetched again after the restart"
    assert await daemon.stop(signal.SIGINT) == 0


async def test_stop_lets_an_install_finish_and_a_second_sigint_forces(daemon: Daemon) -> None:
    fifo = daemon.dir / "go"
    os.mkfifo(fifo)
    started = daemon.dir / "started"  # the script says it runs; open() waits for the reader
    os.mkfifo(started)
    script = daemon.dir / "flash.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = install ]; then echo started > {started}; read x < {fifo}; '
        f'cp "$FOTA_CANDIDATE" {daemon.target}; fi\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    daemon.write_config(extra=f'\n[installers.default]\nkind = "command"\ncommand = ["{script}"]\n')
    await daemon.start()
    async with daemon.control() as c:
        await c.subscribe(["state"])
        publish(daemon.server, "1.0")
        await c.wait_event("state", lambda e: e["state"] == "INSTALLING", timeout=BOUND)
    assert await asyncio.wait_for(asyncio.to_thread(started.read_text), BOUND) == "started\n"
    daemon.send(signal.SIGTERM)
    await daemon.notify.wait("STOPPING", "1")
    await daemon.notify.wait("STATUS", "Stopping once Installing 1.0 ends")
    assert daemon.proc is not None and daemon.proc.returncode is None
    daemon.send(signal.SIGINT)
    assert await daemon.stop() == 130
    forced = [line for line in daemon.log_lines() if line["event"] == "daemon_forced_exit"]
    assert [line["commands_killed"] for line in forced] == [1], "the installer was left running"

    # Restarted, the install runs again (crash-safe); this time SIGTERM waits for it.
    await daemon.start()
    async with daemon.control() as c:
        status = await c.subscribe(["state", "completed"])
        if status["state"] != "INSTALLING":
            await c.wait_event("state", lambda e: e["state"] == "INSTALLING", timeout=BOUND)
        assert await asyncio.wait_for(asyncio.to_thread(started.read_text), BOUND) == "started\n"
        daemon.send(signal.SIGTERM)
        await daemon.notify.wait("STATUS", "Stopping once")
        # A FIFO's open waits for its reader (the installer script): off the event loop.
        await asyncio.to_thread(fifo.write_text, "go\n")
    assert await daemon.stop() == 0
    assert daemon.journal().state is not State.INSTALLING


# -- control clients in other processes ---------------------------------------------------------


async def test_defer_and_resume_from_the_cli(daemon: Daemon) -> None:
    await daemon.start()
    await provision(daemon)
    async with daemon.control() as watcher:
        await watcher.subscribe(["authorization_needed", "deferred"])
        v2 = publish(daemon.server, "2.0")
        await watcher.wait_event("authorization_needed", timeout=BOUND)
        code, _, err = await daemon.fota("defer", "--for", "2h", "--reason", "night shift")
        assert code == 0, err
        deferred = await watcher.wait_event("deferred", timeout=BOUND)
        assert deferred["update_id"] == v2.update_id and deferred["reason"] == "night shift"
        await daemon.notify.wait("STATUS", "download deferred until")
        code, out, err = await daemon.fota("status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["deferred_step"] == "download" and status["defer_reason"] == "night shift"
        code, _, err = await daemon.fota("resume")
        assert code == 0, err
        again = await watcher.wait_event("authorization_needed", timeout=BOUND)
        assert again["update_id"] == v2.update_id
    reports = [r for r in daemon.server.reports if r.get(5) == v2.update_id]
    assert any(r[4] == ResultCode.DEFERRED and r.get(8) == "night shift" for r in reports)
    assert await daemon.stop() == 0


async def test_hostile_control_traffic_leaves_the_daemon_working(daemon: Daemon) -> None:
    await daemon.start()

    async def raw(payload: bytes, half_close: bool = True) -> list[Any]:
        reader, writer = await asyncio.open_unix_connection(str(daemon.socket))
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        out = [json.loads(line) async for line in reader]
        writer.close()
        return out

    got = await raw(b'{"op": "status"\n\x00\x01\n{"op":"defer","for":"x","id":1}\n')
    assert [m["error"]["code"] for m in got] == ["bad_json", "bad_json", "bad_request"]
    assert got[2]["id"] == 1 and "for: expected a number" in got[2]["error"]["message"]
    got = await raw(b"{" + b'"a":1,' * 20000, half_close=False)  # 120 kB, over 64 KiB
    assert [m["error"]["code"] for m in got] == ["too_large"]
    got = await raw(b'{"op":"hello"')
    assert [m["error"]["code"] for m in got] == ["incomplete"]

    clients = [daemon.control() for _ in range(50)]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        await asyncio.gather(*(c.subscribe(["completed"]) for c in clients))
        publish(daemon.server, "1.0")
        events = await asyncio.gather(*(c.wait_event("completed", timeout=BOUND) for c in clients))
        assert {e["version"] for e in events} == {"1.0"}
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    assert daemon.proc is not None and daemon.proc.returncode is None
    assert await daemon.stop() == 0


# -- configuration and systemd -----------------------------------------------------------------


async def test_a_bad_config_fails_fast_naming_the_key(daemon: Daemon) -> None:
    daemon.write_config(top='block_size = "big"')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        "daemon",
        "--config",
        str(daemon.config),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": str(daemon.notify.path)},
    )
    _, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode == 2
    message = err.decode()
    line = next(
        i
        for i, text in enumerate(daemon.config.read_text().splitlines(), 1)
        if "block_size" in text
    )
    assert f"{daemon.config}:{line}: block_size" in message, message
    assert "integer" in message and "big" in message
    assert not (daemon.dir / "state").exists(), "nothing was started"
    daemon.write_config(top="blok_size = 512")
    check = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        "config",
        "check",
        "--config",
        str(daemon.config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(check.communicate(), BOUND)
    assert check.returncode == 2 and "blok_size" in err.decode(), (out, err)


async def test_watchdog_pings_while_the_engine_runs(daemon: Daemon) -> None:
    await daemon.start({"WATCHDOG_USEC": "200000"})
    for _ in range(3):
        await daemon.notify.wait("WATCHDOG", "1")
    assert await daemon.stop() == 0


async def test_command_authorization_hook(daemon: Daemon) -> None:
    count = daemon.dir / "asked"
    hook = daemon.dir / "authorize.sh"
    # The first download ask says "retry later" (Mender's 21) for 1 s, then yes to all.
    hook.write_text(
        "#!/bin/sh\n"
        f'echo "$FOTA_STEP $FOTA_VERSION" >> {count}\n'
        f'if [ "$FOTA_STEP" = download ] && [ $(wc -l < {count}) -eq 1 ]; then\n'
        "  echo FOTA_REASON=busy; echo FOTA_DEFER_UNTIL=$(( $(date +%s) + 1 )); exit 21\n"
        "fi\nexit 0\n"
    )
    hook.chmod(0o755)
    daemon.write_config(extra=f'\n[authorization]\nmode = "command"\ncommand = ["{hook}"]\n')
    await daemon.start()
    await provision(daemon)
    async with daemon.control() as c:
        await c.subscribe(["deferred", "completed", "failed"])
        v2 = publish(daemon.server, "2.0")
        deferred = await c.wait_event("deferred", timeout=BOUND)
        assert deferred["reason"] == "busy" and deferred["update_id"] == v2.update_id
        done = await c.wait_event(("completed", "failed"), timeout=BOUND)
    assert done["result"] == "SUCCESS" and done["version"] == "2.0"
    assert count.read_text().split("\n")[:3] == ["download 2.0", "download 2.0", "install 2.0"]
    assert await daemon.stop() == 0


async def test_socket_mode_and_group_from_the_config(daemon: Daemon) -> None:
    config = daemon.config.read_text().replace('mode = "0660"', 'mode = "0660"\ngroup = "daemon"')
    daemon.config.write_text(config)
    await daemon.start()
    st = daemon.socket.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, 1)
    if os.geteuid() == 0:
        from tests.integration.test_control import socat_as_nobody

        refused = await asyncio.to_thread(socat_as_nobody, daemon.socket)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        allowed = await asyncio.to_thread(socat_as_nobody, daemon.socket, [1])
        assert allowed.returncode == 0 and json.loads(allowed.stdout)["ok"] is True
    with pytest.raises(ControlError) as caught:
        async with ControlClient(daemon.socket.with_name("nothing.sock")) as c:
            await c.hello()
    assert caught.value.code == "unreachable"
    assert await daemon.stop() == 0


# -- the examples, against the daemon ----------------------------------------------------------

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize(
    ("argv", "ready"),
    [
        pytest.param(
            lambda sock, busy: [
                sys.executable,
                str(EXAMPLES / "control_app.py"),
                "--socket",
                str(sock),
                "--busy-file",
                str(busy),
                "--once",
            ],
            b"app: connected",
            id="python",
        ),
        pytest.param(
            lambda sock, busy: ["bash", str(EXAMPLES / "control.sh"), str(sock), str(busy)],
            b"app: subscribed",
            id="socat",
        ),
    ],
)
async def test_control_examples_defer_while_busy_then_authorize(
    daemon: Daemon, argv: Any, ready: bytes
) -> None:
    assert shutil.which("socat"), "socat is missing: scripts/test installs it (Debian socat)"
    busy = daemon.dir / "busy"
    busy.touch()
    await daemon.start()
    await provision(daemon)
    app = await asyncio.create_subprocess_exec(
        *argv(daemon.socket, busy), stdout=asyncio.subprocess.PIPE
    )
    assert app.stdout is not None
    try:
        line = await asyncio.wait_for(app.stdout.readline(), BOUND)
        assert line.startswith(ready), line
        async with daemon.control() as watcher:
            await watcher.subscribe(["deferred"])
            v2 = publish(daemon.server, "2.0")
            deferred = await watcher.wait_event("deferred", timeout=BOUND)
            assert deferred["reason"] == "busy" and deferred["update_id"] == v2.update_id
        busy.unlink()  # the application's work is done
        code, _, err = await daemon.fota("resume")
        assert code == 0, err
        out = (await asyncio.wait_for(app.stdout.read(), BOUND)).decode()
        assert await app.wait() == 0, out
    finally:
        if app.returncode is None:
            app.kill()
            await app.wait()
    said = out.splitlines()
    assert said[0].startswith("app: busy") and "authorized" in said[1], said
    assert said[-1] in ("app: 2.0: SUCCESS", "app: update completed")
    assert hashlib.sha256(daemon.target.read_bytes()).digest() == v2.image_sha256
    assert await daemon.stop() == 0
