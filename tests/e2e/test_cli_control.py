"""``fota status | watch | authorize | reject | defer | resume | check | inhibit | release``.

The commands run as real subprocesses (``python -m fota ...``, started with asyncio so the
daemon side keeps running) against a real Client and ControlServer in the test's event loop
(the fixture pattern of tests/integration/test_control.py), on a short socket path, with a
ManualClock.
Every wait is on an event, a process's output or its exit, each with a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fota import State
from fota.app.cli_control import (
    MIN_RETRY,
    RETRY,
    _hold_while,
    _Lock,
    parse_duration,
    parse_when,
    relative,
    span,
    status_rows,
)
from fota.app.control.server import ControlServer, status_dict
from fota.testing import UpdateServer
from tests.conftest import Signing
from tests.control_rig import Rig, running_rig, short_dir

pytestmark = pytest.mark.timeout(90)

BOUND = 20.0
KiB = 1024
ROOT = Path(__file__).parents[2]
LABELS = [label for label, _ in status_rows({"state": "IDLE"})]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir("fcli-") as path:
        yield path


@pytest.fixture
async def rig(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path
) -> AsyncIterator[Rig]:
    async with running_rig(tmp_path, server, signing, sockdir) as r:
        yield r


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
    return await launch(argv, extra)


async def launch(
    argv: Sequence[str], extra: dict[str, str], *, session: bool = False
) -> asyncio.subprocess.Process:
    """``python -m fota ARGV``; with ``session``, in a session (and process group) of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env(**extra),
        start_new_session=session,
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


def test_config_names_the_socket(tmp_path: Path, sockdir: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fota.keys import save_keypair

    pem = save_keypair(ed25519.Ed25519PrivateKey.generate(), tmp_path / "k.key")
    missing = sockdir / "from-config.sock"
    base = (
        'server = "coap://127.0.0.1:61616"\ndevice_class = "gw"\nstate_dir = "state"\n'
        f'trust = ["{pem}"]\ntarget = "fw.bin"\n[control]\n'
    )
    good, bad = tmp_path / "fota.toml", tmp_path / "bad.toml"
    good.write_text(base + f'socket = "{missing}"\n')
    bad.write_text(base + "socket = 7\n")

    def fota(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fota", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    out = fota("status", "--config", str(good))
    assert out.returncode == 3 and str(missing) in out.stderr, out.stderr
    out = fota("check", "--config", str(bad))
    assert out.returncode == 2 and f"{bad}:7: control.socket" in out.stderr, out.stderr


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


async def holder(
    rig: Rig, sockdir: Path, name: str, ttl: str = "1h"
) -> tuple[asyncio.subprocess.Process, int, int]:
    """``fota inhibit NAME --ttl TTL -- sh ...`` whose child waits for a line on a FIFO.

    Returns the process, its child's pid and the FIFO (held open for reading and writing
    here, so neither side's open blocks: the child's ``read`` waits for a line).
    """
    fifo, pidfile = sockdir / f"{name}.fifo", sockdir / f"{name}.pid"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)
    script = f'echo $$ > {pidfile}; echo started; read x < {fifo}; exit "$x"'
    proc = await start(
        "inhibit", name, "--ttl", ttl, "--socket", rig.sock, "--", "sh", "-c", script
    )
    assert await line(proc) == "started\n"  # the child's stdout is ours: it is running
    return proc, int(pidfile.read_text()), fd


async def test_inhibit_holds_the_lock_while_the_command_runs(rig: Rig, sockdir: Path) -> None:
    await rig.provisioned()
    proc, child, fd = await holder(rig, sockdir, "backup")
    try:
        assert parent_of(child) == proc.pid  # run as a child, not exec'd or detached
        # In a session and process group of its own: a terminal's signals reach it only
        # through fota (which forwards them), not twice.
        assert os.getsid(child) == os.getpgid(child) == child != os.getpgid(proc.pid)
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
        proc.send_signal(signal.SIGTERM)  # to fota alone: the child only gets it forwarded
        done = await exited(proc)
    finally:
        os.close(fd)
    assert done.rc == 128 + signal.SIGTERM, done  # what ended the child: the forwarded one
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


COUNT_SIGINTS = """
import signal, sys
seen = []
signal.signal(signal.SIGINT, lambda *_: (seen.append(1), print("SIGINT", flush=True)))
print("started", flush=True)
with open(sys.argv[1]) as fifo:
    fifo.readline()
sys.exit(len(seen))
"""


async def test_ctrl_c_at_a_terminal_reaches_the_command_once(rig: Rig, sockdir: Path) -> None:
    fifo = sockdir / "ctrl-c.fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR)
    argv = [sys.executable, "-c", COUNT_SIGINTS, str(fifo)]
    # fota in a process group of its own, as a shell runs a job at a terminal.
    command = ["inhibit", "ctrl-c", "--ttl", "1h", "--socket", rig.sock, "--", *argv]
    proc = await launch(command, {}, session=True)
    try:
        assert await line(proc) == "started\n"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the terminal's foreground group
        assert await line(proc) == "SIGINT\n"
        os.write(fd, b"\n")
        done = await exited(proc)
    finally:
        os.close(fd)
    assert done.rc == 1, done  # the child counted one SIGINT: fota's
    assert done.out == "" and done.err == ""
    assert rig.client.status().locks == ()


class Refusing(ControlServer):
    """A ControlServer that reports each connection it answers ``busy`` (all, at max_clients 0)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: asyncio.Queue[None] = asyncio.Queue()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_clients:
            self.refused.put_nowait(None)
        await super()._serve(reader, writer)


async def test_the_lock_is_renewed_across_a_daemon_restart(rig: Rig, sockdir: Path) -> None:
    proc, _, fd = await holder(rig, sockdir, "backup", ttl="3")  # renewed every second
    restarted = Refusing(rig.client, rig.control.path, max_clients=0)
    try:
        assert rig.client.status().locks == (("backup", rig.clock() + 3),)
        await rig.control.aclose()
        rig.clock.advance(1)  # from now on, a renewal moves the expiry forward
        await restarted.start()
        # Busy, then busy again: after a busy answer the next renewal is a new connection.
        for _ in range(2):
            await asyncio.wait_for(restarted.refused.get(), BOUND)
        assert rig.client.status().locks == (("backup", rig.clock() + 2),)
        restarted.max_clients = 64
        renewed = await rig.client.wait_for(
            lambda s: s.locks == (("backup", rig.clock() + 3),), BOUND
        )
        assert renewed.locks[0][1] == rig.clock() + 3
        assert proc.returncode is None  # before the command ended
        os.write(fd, b"0\n")
        done = await exited(proc)
    finally:
        os.close(fd)
        await restarted.aclose()
    assert done.rc == 0, done
    assert done.err.count("fota: cannot renew lock backup: ") == 1, done.err
    assert done.err.endswith("fota: lock backup renewed again\n"), done.err
    assert rig.client.status().locks == ()


async def test_a_renewal_task_that_dies_still_releases_the_lock(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def dies(self: _Lock) -> None:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(_Lock, "keep", dies)
    lock = _Lock(rig.control.path, "backup", 3600)
    code = await _hold_while(lock, [sys.executable, "-c", "raise SystemExit(5)"])
    assert code == 5  # the command's status, not the renewal's error
    assert rig.client.status().locks == ()
    err = capsys.readouterr().err
    assert err.count("fota: renewing lock backup stopped: BrokenPipeError") == 1, err


def test_renewals_are_scheduled_from_the_expiry() -> None:
    lock = _Lock(Path("/nonexistent.sock"), "backup", 90)
    lock.taken = 1000.0  # expires at 1090
    assert (lock.delay(1000), lock.delay(1020), lock.delay(1040)) == (30, 10, 0)
    lock.ok = False  # a renewal failed: again within half the time left, at most RETRY
    assert lock.delay(1030) == RETRY
    assert lock.delay(1080) == 5
    assert lock.delay(1089.9) == MIN_RETRY  # about to expire: soon, but not in a tight loop
    assert lock.delay(1095) == RETRY  # expired: at the ttl/3 pace, at most RETRY
    short = _Lock(Path("/nonexistent.sock"), "backup", 3)
    short.ok = False
    assert (short.delay(1.0), short.delay(2.0), short.delay(4.0)) == (1.0, 0.5, 1.0)
