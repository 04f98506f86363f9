"""``fota status | watch | authorize | reject | defer | resume | check | inhibit | release``.

The commands run as real subprocesses (``python -m fota ...``, started with asyncio so the
daemon side keeps running) against a real Client and ControlServer in the test's event loop
(the fixture pattern of tests/test_control.py), on a short socket path, with a ManualClock.
Every wait is on an event, a process's output or its exit, each with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fota import Client, State
from fota.cli_control import parse_duration, parse_when, relative, span, status_rows
from fota.control import ControlClient
from fota.control.server import ControlServer, status_dict
from fota.handler import BaseHandler
from fota.testing import ManualClock, UpdateServer
from tests.conftest import DEVICE_CLASS, Signing, make_config

pytestmark = pytest.mark.timeout(90)

BOUND = 20.0
KiB = 1024
ROOT = Path(__file__).parent.parent
LABELS = [label for label, _ in status_rows({"state": "IDLE"})]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short: sun_path holds 108 bytes, and pytest's tmp_path is long.
    path = Path(tempfile.mkdtemp(prefix="fcli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Rig:
    def __init__(
        self, client: Client, control: ControlServer, server: UpdateServer, clock: ManualClock
    ) -> None:
        self.client, self.control, self.server, self.clock = client, control, server, clock

    @property
    def sock(self) -> str:
        return str(self.control.path)

    def publish(self, version: str, size: int = 8 * KiB) -> str:
        return self.server.publish(os.urandom(size), version, device_class=DEVICE_CLASS).update_id

    async def provisioned(self) -> None:
        """1.0 installed (a first install does not ask), every report delivered."""
        self.publish("1.0")
        await self.client.wait_for(
            lambda s: s.installed_version == "1.0" and s.state is State.IDLE, BOUND
        )

    async def offered(self, version: str = "2.0", size: int = 8 * KiB) -> str:
        """After :meth:`provisioned`: ``version`` published and waiting for authorization."""
        uid = self.publish(version, size)
        await self.client.wait_for(
            lambda s: s.update_id == uid and s.state is State.AWAIT_DOWNLOAD_AUTH, BOUND
        )
        return uid

    def connect(self) -> ControlClient:
        return ControlClient(self.control.path, timeout=BOUND)


@pytest.fixture
async def rig(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> AsyncIterator[Rig]:
    clock = ManualClock()
    client = Client(make_config(tmp_path, server, signing), clock=clock)

    def on_answerers(count: int) -> None:
        client.set_handler(BaseHandler() if count else None)

    control = ControlServer(client, sockdir / "ctl.sock", on_answerers=on_answerers)
    async with client:
        await control.start()
        try:
            yield Rig(client, control, server, clock)
        finally:
            await control.aclose()


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("FOTA_CONTROL_SOCKET", "FOTA_NO_RICH")}
    # A wide, colourless console: rich's table is then one line per row, whatever the tty.
    out.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", **extra)
    return out


@dataclass
class Done:
    rc: int
    out: str
    err: str


async def start(*argv: str, **extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env(**extra),
    )


async def fota(*argv: str, **extra: str) -> Done:
    proc = await start(*argv, **extra)
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def ok(*argv: str, **extra: str) -> str:
    done = await fota(*argv, **extra)
    assert done.rc == 0, (done.out, done.err)
    return done.out


async def status_json(rig: Rig) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(await ok("status", "--json", "--socket", rig.sock))
    return status


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    text = await asyncio.wait_for(proc.stdout.readline(), BOUND)
    assert text, "the process ended its output early"
    return text.decode()


async def events_until(
    proc: asyncio.subprocess.Process, kind: str, **match: Any
) -> list[dict[str, Any]]:
    """JSON lines from ``fota watch --json`` up to the first ``kind`` event with ``match``."""
    seen = []
    while True:
        event = json.loads(await line(proc))
        seen.append(event)
        if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
            return seen


async def exited(proc: asyncio.subprocess.Process) -> Done:
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


# -- values (no daemon) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_instants_and_spans() -> None:
    assert parse_when("2027-01-01T02:00:00Z") == 1798768800.0
    assert parse_when("1798768800") == 1798768800.0
    assert span(42 * 60) == "42 min" and span(3900) == "1 h 5 min" and span(2 * 86400) == "2 d"
    assert relative(1000 + 42 * 60, now=1000) == "in 42 min"
    assert relative(1000 - 300, now=1000) == "5 min ago"


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["defer", "--until", "tomorrow"], "neither ISO 8601"),
        (["defer", "--until", "2027-01-01T02:00"], "no time zone"),
        (["defer", "--for", "5x"], "not a duration"),
        (["defer", "--for", "0"], "positive"),
        (["defer"], "one of the arguments --until --for is required"),
        (["inhibit", "backup"], "--ttl"),
        (["inhibit", "backup", "--ttl", "1h", "sh", "-c", "true"], "put -- before the command"),
        (["reject", "--reason", "x" * 300], "at most 256"),
    ],
)
async def test_usage_errors_exit_2_before_connecting(
    argv: list[str], names: str, sockdir: Path
) -> None:
    done = await fota(*argv, "--socket", str(sockdir / "none.sock"))
    assert done.rc == 2, done
    assert names in done.err


async def test_no_daemon_exits_3_naming_the_socket(sockdir: Path) -> None:
    missing = sockdir / "missing.sock"
    done = await fota("status", "--socket", str(missing))
    assert done.rc == 3
    assert str(missing) in done.err and "--socket" in done.err and done.out == ""
    # Through $FOTA_CONTROL_SOCKET, and for a command: it must not run without the lock.
    marker = sockdir / "ran"
    argv = ["inhibit", "backup", "--ttl", "1h", "--", "touch", str(marker)]
    done = await fota(*argv, FOTA_CONTROL_SOCKET=str(missing))
    assert done.rc == 3 and str(missing) in done.err
    assert not marker.exists()


def test_config_names_the_socket(
    monkeypatch: pytest.MonkeyPatch, sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fota.cli import main
    from fota.errors import ConfigError

    # fota.settings is another module's: a stand-in with its one function used here.
    settings = types.ModuleType("fota.settings")
    missing = sockdir / "from-config.sock"
    seen: list[Path] = []

    def load_settings(path: Path) -> Any:
        seen.append(path)
        if path.name == "bad.toml":
            raise ConfigError(f"{path}:3: control.socket: expected a string, got 7")
        return types.SimpleNamespace(control=types.SimpleNamespace(socket=missing))

    settings.load_settings = load_settings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fota.settings", settings)
    assert main(["status", "--config", "/etc/fota/fota.toml"]) == 3
    assert seen == [Path("/etc/fota/fota.toml")]
    assert str(missing) in capsys.readouterr().err
    assert main(["check", "--config", "/etc/fota/bad.toml"]) == 2
    assert "bad.toml:3: control.socket" in capsys.readouterr().err


# -- fota status -------------------------------------------------------------------------------


async def test_status_table_json_and_plain(rig: Rig) -> None:
    await rig.provisioned()
    uid = await rig.offered("2.0")
    await rig.client.inhibit("backup", 600)

    table = await ok("status", "--socket", rig.sock)
    assert "╭" in table and "│" in table  # rich drew it
    for label in LABELS:
        assert label in table
    row = {
        text.split("│")[1].strip(): text.split("│")[2].strip()
        for text in table.splitlines()
        if text.count("│") == 3
    }
    assert row["State"] == "AWAIT_DOWNLOAD_AUTH (waiting for download authorization)"
    assert row["Pending update"] == f"{uid}, version 2.0"
    assert row["Installed"].startswith("1.0 (sequence ")
    assert row["Locks"].startswith("backup until 2027-01-15T08:10:00Z (in ")
    assert row["Progress"].startswith("0% (0 of 8192 bytes")

    raw = await status_json(rig)
    assert raw == json.loads(json.dumps(status_dict(rig.client.status())))
    assert raw["locks"] == [{"name": "backup", "expires": rig.clock() + 600}]

    plain = await fota("status", "--socket", rig.sock, FOTA_NO_RICH="1")
    assert plain.rc == 0
    assert plain.err.count("pip install 'fota[cli]'") == 1
    assert "│" not in plain.out
    lines = plain.out.splitlines()
    assert [text.split("  ")[0] for text in lines] == LABELS  # one line each, in table order
    values = {text[: len("Reports pending")].strip(): text[17:] for text in lines}
    assert values["State"] == row["State"] and values["Locks"] == row["Locks"]


# -- authorize, defer, resume, reject ----------------------------------------------------------


async def test_a_polite_update_driven_by_fota_authorize(rig: Rig) -> None:
    await rig.provisioned()
    async with rig.connect() as app:
        await app.subscribe(["authorization_needed", "completed", "failed"])
        uid = rig.publish("2.0", size=64 * KiB)
        ask = await app.wait_event("authorization_needed", timeout=BOUND)
        assert ask["step"] == "download"
        out = await ok("authorize", "--socket", rig.sock)
        assert out == f"authorized the download of 2.0 (update {uid})\n"
        ask = await app.wait_event("authorization_needed", timeout=BOUND)
        assert ask["step"] == "install"
        out = await ok("authorize", uid, "--socket", rig.sock)
        assert out == f"authorized the install of 2.0 (update {uid})\n"
        done = await app.wait_event(("completed", "failed"), timeout=BOUND)
    assert (done["event"], done["version"]) == ("completed", "2.0")
    assert (await status_json(rig))["installed_version"] == "2.0"


async def test_authorizing_nothing_exits_1_with_the_daemons_reason(rig: Rig) -> None:
    await rig.provisioned()
    done = await fota("authorize", "--socket", rig.sock)
    assert done.rc == 1
    assert done.err == "fota: invalid_state: no update is pending\n"
    done = await fota("resume", "--socket", rig.sock)
    assert done.rc == 1 and done.err.startswith("fota: invalid_state: ")


async def test_defer_for_an_hour_then_resume(rig: Rig) -> None:
    await rig.provisioned()
    uid = await rig.offered("2.0")
    out = await ok("defer", "--for", "1h", "--reason", "x", "--socket", rig.sock)
    assert out.startswith(f"deferred the download of 2.0 (update {uid}) until 2027-01-15T09:00:00Z")
    status = await status_json(rig)
    assert status["state"] == "DOWNLOAD_DEFERRED" and status["deferred_step"] == "download"
    assert status["defer_until"] == rig.clock() + 3600 and status["defer_reason"] == "x"

    assert (await ok("resume", "--socket", rig.sock)).startswith("resumed")
    await rig.client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, BOUND)
    status = await status_json(rig)
    assert status["awaiting"] == "download" and status["defer_until"] is None
    assert status["update_id"] == uid

    # --until: an absolute instant (the daemon's deadline and limits may cut it).
    out = await ok("defer", uid, "--until", "2027-01-15T08:30:00+00:00", "--socket", rig.sock)
    assert "until 2027-01-15T08:30:00Z" in out
    assert (await status_json(rig))["defer_until"] == parse_when("2027-01-15T08:30:00Z")


async def test_reject_with_a_reason(rig: Rig) -> None:
    await rig.provisioned()
    uid = await rig.offered("2.0")
    out = await ok("reject", "--reason", "not on this site", "--socket", rig.sock)
    assert out == f"rejected the download of 2.0 (update {uid}): not on this site\n"
    await rig.client.wait_for(lambda s: s.update_id is None and s.state is State.IDLE, BOUND)
    status = await status_json(rig)
    assert status["installed_version"] == "1.0" and status["update_id"] is None
    assert (await ok("check", "--socket", rig.sock)).startswith("the daemon looks")


# -- fota watch --------------------------------------------------------------------------------


async def test_watch_sees_progress_and_completion_while_another_process_authorizes(
    rig: Rig,
) -> None:
    await rig.provisioned()
    scripted = await start("watch", "--json", "--until-done", "--socket", rig.sock)
    drawn = await start("watch", "--until-done", "--socket", rig.sock)
    plain = await start("watch", "--until-done", "--socket", rig.sock, FOTA_NO_RICH="1")
    first = json.loads(await line(scripted))
    assert first["event"] == "subscribed" and first["status"]["installed_version"] == "1.0"
    assert (await line(drawn)).startswith(f"watching {rig.sock}: ")
    assert (await line(plain)).startswith(f"watching {rig.sock}: ")

    uid = rig.publish("2.0", size=256 * KiB)
    seen = await events_until(scripted, "authorization_needed", step="download")
    assert ("update_available", uid) in [(e["event"], e["update_id"]) for e in seen]
    await ok("authorize", "--socket", rig.sock)
    seen = await events_until(scripted, "authorization_needed", step="install")
    progress = [e for e in seen if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 256 * KiB
    await ok("authorize", "--socket", rig.sock)
    seen = await events_until(scripted, "completed")
    assert seen[-1]["version"] == "2.0" and seen[-1]["result"] == "SUCCESS"

    outs = []
    for proc in (scripted, drawn, plain):
        done = await exited(proc)
        assert done.rc == 0, done
        outs.append(done.out)
    rich_out, plain_out = outs[1:]
    for out in (rich_out, plain_out):
        assert "authorization_needed" in out and "completed" in out and "2.0: SUCCESS" in out
    assert "download 2.0" in rich_out and "━" in rich_out  # the bar's last frame
    assert "progress" in plain_out and "100% (262144 of 262144 bytes)" in plain_out


async def test_watch_until_done_exits_1_when_the_update_fails(rig: Rig) -> None:
    await rig.provisioned()
    uid = await rig.offered("2.0")
    watch = await start("watch", "--json", "--until-done", "--socket", rig.sock)
    assert json.loads(await line(watch))["status"]["update_id"] == uid
    await ok("reject", "--socket", rig.sock)
    seen = await events_until(watch, "failed")
    assert seen[-1]["result"] == "REJECTED"
    assert (await exited(watch)).rc == 1


async def test_watch_ctrl_c_is_quiet_and_a_vanished_daemon_exits_3(rig: Rig) -> None:
    watch = await start("watch", "--socket", rig.sock)
    await line(watch)
    watch.send_signal(signal.SIGINT)
    done = await exited(watch)
    assert (done.rc, done.err) == (130, "")

    watch = await start("watch", "--json", "--socket", rig.sock)
    await line(watch)
    await rig.control.aclose()
    done = await exited(watch)
    assert done.rc == 3
    assert json.loads(done.out.splitlines()[-1])["event"] == "stopping"
    assert f"the daemon at {rig.sock} went away: it is stopping" in done.err


# -- fota inhibit, fota release ----------------------------------------------------------------


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def holder(rig: Rig, sockdir: Path, name: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """``fota inhibit NAME -- sh ...`` whose child waits for a line on a FIFO.

    Returns the process, its child's pid and the FIFO (held open for reading and writing
    here, so neither side's open blocks: the child's ``read`` waits for a line).
    """
    fifo, pidfile = sockdir / f"{name}.fifo", sockdir / f"{name}.pid"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)
    script = f'echo $$ > {pidfile}; echo started; read x < {fifo}; exit "$x"'
    proc = await start(
        "inhibit", name, "--ttl", "1h", "--socket", rig.sock, "--", "sh", "-c", script
    )
    assert await line(proc) == "started\n"  # the child's stdout is ours: it is running
    return proc, int(pidfile.read_text()), fd


async def test_inhibit_holds_the_lock_while_the_command_runs(rig: Rig, sockdir: Path) -> None:
    await rig.provisioned()
    proc, child, fd = await holder(rig, sockdir, "backup")
    try:
        assert parent_of(child) == proc.pid  # run as a child, not exec'd or detached
        status = await status_json(rig)
        assert [lock["name"] for lock in status["locks"]] == ["backup"]
        assert status["locks"][0]["expires"] == rig.clock() + 3600
        os.write(fd, b"7\n")
        done = await exited(proc)
    finally:
        os.close(fd)
    assert done.rc == 7, done  # the command's exit status
    assert done.err == ""
    assert rig.client.status().locks == ()


async def test_sigterm_is_forwarded_and_the_lock_released(rig: Rig, sockdir: Path) -> None:
    await rig.provisioned()
    proc, child, fd = await holder(rig, sockdir, "recording")
    try:
        assert [name for name, _ in rig.client.status().locks] == ["recording"]
        proc.send_signal(signal.SIGTERM)
        done = await exited(proc)
    finally:
        os.close(fd)
    assert done.rc == 128 + signal.SIGTERM, done
    assert rig.client.status().locks == ()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


async def test_inhibit_for_a_time_then_release(rig: Rig) -> None:
    out = await ok("inhibit", "backup", "--ttl", "10m", "--socket", rig.sock)
    assert out.startswith("lock backup held until 2027-01-15T08:10:00Z (in ")
    assert rig.client.status().locks == (("backup", rig.clock() + 600),)
    assert await ok("release", "backup", "--socket", rig.sock) == "released lock backup\n"
    assert rig.client.status().locks == ()
    done = await fota("inhibit", "backup", "--ttl", "30d", "--socket", rig.sock)
    assert done.rc == 1 and done.err.startswith("fota: refused: ") and "max_lock_ttl" in done.err
