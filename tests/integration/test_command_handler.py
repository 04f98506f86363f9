"""The hook-command handler: authorization by a command's exit status, events to a command.

Unit tests run :class:`CommandHandler` on small ``sh`` scripts in ``tmp_path`` with a synthetic
:class:`UpdateInfo` and a :class:`ManualClock` (so every expected deferral is exact). The end to
end tests run the real :class:`fota.Client` with it against the real ``UpdateServer``; they wait
on ``client.wait_for``, on server reports and on :meth:`CommandHandler.drain`, never on sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fota import Client, Component, Decision, ResultCode, Severity, State, UpdateInfo, UpdateReason
from fota.app.command_handler import CommandHandler, parse_defer_until
from fota.testing import ManualClock, UpdateServer
from tests.conftest import DEVICE_CLASS, Signing, make_config

pytestmark = pytest.mark.timeout(30)

BOUND = 10.0
"""Failure bound of a wait: loopback answers in microseconds, so only a bug gets near it."""
START = datetime(2027, 1, 15, 10, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0
KiB = 1024

INFO = UpdateInfo(
    update_id="u-0123456789abcdef",
    version="2.0",
    sequence=7,
    component=Component.APPLICATION,
    severity=Severity.MANDATORY,
    image_size=12345,
    installed_version="1.0",
    polite=True,
    reason=UpdateReason.NEW_APPLICATION,
    deadline=datetime(2027, 1, 20, 3, 30, tzinfo=UTC),
    deferred=7200.75,
    deferral_limit=86400.0,
)
BARE = UpdateInfo(
    update_id="u-fedcba9876543210",
    version="1.0",
    sequence=1,
    component=Component.FIRMWARE,
    severity=Severity.OPTIONAL,
    image_size=4096,
    installed_version=None,
    polite=False,
)


def script(tmp_path: Path, body: str, name: str = "auth.sh") -> list[str]:
    """An executable ``sh`` script with ``body``; returns its argv."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return [str(path)]


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(START + seconds, UTC)


def read_env(path: Path) -> dict[str, str]:
    """The FOTA_* variables of an ``env`` dump (values have no newlines here)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if k.startswith("FOTA_")}


def handler(argv: list[str], **kw: Any) -> CommandHandler:
    return CommandHandler(argv, clock=ManualClock(START), **kw)


# -- exit status -> decision --------------------------------------------------------------


async def test_exit_0_authorizes(tmp_path: Path) -> None:
    h = handler(script(tmp_path, "exit 0"))
    assert await h.on_download_authorization(INFO) == Decision.authorize()
    assert await h.on_install_authorization(INFO) == Decision.authorize()


async def test_exit_21_defers_by_the_default_from_the_clock(tmp_path: Path) -> None:
    h = handler(script(tmp_path, "exit 21"), defer=1800)
    assert await h.on_download_authorization(INFO) == Decision.defer(at(1800))


async def test_exit_21_defers_with_the_printed_reason(tmp_path: Path) -> None:
    h = handler(script(tmp_path, "echo 'FOTA_REASON= backup running '; exit 21"))
    assert await h.on_install_authorization(INFO) == Decision.defer(at(HOUR), "backup running")


@pytest.mark.parametrize(
    "value",
    [
        "2027-01-15T14:00:00+02:00",  # 12:00 UTC
        "2027-01-15T12:00:00Z",
        str(int(START + 2 * HOUR)),
        f"{START + 2 * HOUR:.1f}",
    ],
)
async def test_exit_21_defers_until_the_printed_time(tmp_path: Path, value: str) -> None:
    body = f"echo noise; echo 'FOTA_DEFER_UNTIL={value}'; echo FOTA_REASON=night; exit 21"
    decision = await handler(script(tmp_path, body)).on_download_authorization(INFO)
    assert decision == Decision.defer(at(2 * HOUR), "night")
    assert decision.until is not None and decision.until.tzinfo is UTC


async def test_the_last_printed_line_wins(tmp_path: Path) -> None:
    body = (
        "echo FOTA_DEFER_UNTIL=2027-01-15T11:00:00Z; echo FOTA_REASON=first\n"
        "echo FOTA_DEFER_UNTIL=2027-01-15T13:00:00Z; echo FOTA_REASON=second; exit 21"
    )
    decision = await handler(script(tmp_path, body)).on_download_authorization(INFO)
    assert decision == Decision.defer(at(3 * HOUR), "second")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("tomorrow", "Invalid isoformat"),
        ("2027-01-15T12:00:00", "no time zone"),
        ("2027-01-15T09:00:00Z", "not in the future"),  # an hour ago
        (str(int(START)), "not in the future"),  # now is not later
        ("1" * 30, "out of range"),
        ("", "Invalid isoformat"),
    ],
)
async def test_a_bad_defer_until_is_logged_and_the_default_used(
    tmp_path: Path, value: str, why: str
) -> None:
    h = handler(script(tmp_path, f"echo 'FOTA_DEFER_UNTIL={value}'; exit 21"), defer=600)
    with capture_logs() as logs:
        decision = await h.on_download_authorization(INFO)
    assert decision == Decision.defer(at(600))
    [warning] = [e for e in logs if e["event"] == "defer_until_ignored"]
    assert warning["log_level"] == "warning"
    assert warning["value"] == value and why in warning["why"]
    assert warning["update_id"] == INFO.update_id and warning["step"] == "download"


async def test_another_exit_status_rejects_with_the_printed_reason(tmp_path: Path) -> None:
    h = handler(script(tmp_path, "echo FOTA_REASON=busy; exit 3"))
    assert await h.on_download_authorization(INFO) == Decision.reject("busy")


@pytest.mark.parametrize("code", [1, 3, 20, 22, 125])
async def test_another_exit_status_without_a_reason_names_the_status(
    tmp_path: Path, code: int
) -> None:
    h = handler(script(tmp_path, f"exit {code}"))
    expected = Decision.reject(f"authorization command exited {code}")
    assert await h.on_install_authorization(INFO) == expected


# -- a broken command defers by ``retry``, never rejects ---------------------------------


async def failed(
    h: CommandHandler, step: str = "download"
) -> tuple[Decision, MutableMapping[str, Any]]:
    """The decision for a command that failed, and the ERROR it logged."""
    with capture_logs() as logs:
        if step == "download":
            decision = await h.on_download_authorization(INFO)
        else:
            decision = await h.on_install_authorization(INFO)
    [error] = [e for e in logs if e["event"] == "authorization_command_failed"]
    assert error["log_level"] == "error" and error["step"] == step
    assert decision.until == at(120)
    assert decision.reason.startswith("authorization command failed: ")
    return decision, error


async def test_a_timed_out_command_defers_by_retry(tmp_path: Path) -> None:
    h = handler(script(tmp_path, "echo thinking; sleep 30; exit 0"), timeout=0.5, retry=120)
    decision, _ = await failed(h)
    assert decision.reason == "authorization command failed: timed out after 0.5 s"


async def test_a_missing_program_defers_by_retry(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-script")
    h = handler([missing], retry=120)
    decision, error = await failed(h, "install")
    assert decision.reason.startswith(f"authorization command failed: cannot run {missing!r}")
    assert "No such file" in error["error"]


async def test_a_program_that_is_not_executable_defers_by_retry(tmp_path: Path) -> None:
    argv = script(tmp_path, "exit 0")
    Path(argv[0]).chmod(0o644)
    decision, _ = await failed(handler(argv, retry=120))
    assert "Permission denied" in decision.reason


async def test_a_command_killed_by_a_signal_defers_by_retry(tmp_path: Path) -> None:
    h = handler(script(tmp_path, "echo FOTA_REASON=never; kill -9 $$"), retry=120)
    decision, _ = await failed(h)
    assert decision.reason == "authorization command failed: killed by signal 9"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("exec /nonexistent/authorize", 127),  # the shell: not found
        ("exit 126", 126),  # the shell: not executable
        ("sh -c 'kill -9 $$'", 137),  # a child killed by SIGKILL, as the shell reports it
        ("exit 255", 255),
    ],
)
async def test_a_shell_reporting_a_broken_script_defers_by_retry(
    tmp_path: Path, body: str, code: int
) -> None:
    decision, _ = await failed(handler(script(tmp_path, body), retry=120))
    assert decision.reason == (
        f"authorization command failed: exit status {code} (the script failed)"
    )


# -- the environment ---------------------------------------------------------------------


async def test_the_command_gets_every_variable(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    h = handler(script(tmp_path, f'env > "{out}"'))
    await h.on_download_authorization(INFO)
    assert read_env(out) == {
        "FOTA_STEP": "download",
        "FOTA_UPDATE_ID": "u-0123456789abcdef",
        "FOTA_VERSION": "2.0",
        "FOTA_INSTALLED_VERSION": "1.0",
        "FOTA_COMPONENT": "application",
        "FOTA_SEVERITY": "mandatory",
        "FOTA_UPDATE_REASON": "new_application",
        "FOTA_POLITE": "1",
        "FOTA_IMAGE_SIZE": "12345",
        "FOTA_DEADLINE": "2027-01-20T03:30:00Z",
        "FOTA_DEFERRED": "7200",
        "FOTA_DEFERRAL_LIMIT": "86400",
    }
    await h.on_install_authorization(BARE)
    assert read_env(out) == {
        "FOTA_STEP": "install",
        "FOTA_UPDATE_ID": "u-fedcba9876543210",
        "FOTA_VERSION": "1.0",
        "FOTA_INSTALLED_VERSION": "",
        "FOTA_COMPONENT": "firmware",
        "FOTA_SEVERITY": "optional",
        "FOTA_UPDATE_REASON": "other",
        "FOTA_POLITE": "0",
        "FOTA_IMAGE_SIZE": "4096",
        "FOTA_DEADLINE": "",
        "FOTA_DEFERRED": "0",
        "FOTA_DEFERRAL_LIMIT": "",
    }


async def test_stdin_is_dev_null_and_arguments_are_passed_as_they_are(tmp_path: Path) -> None:
    out = tmp_path / "args.txt"
    argv = ["sh", "-c", f'read line; echo "$? $1|$2" > "{out}"', "sh", "a b", "$HOME;"]
    assert await handler(argv).on_download_authorization(INFO) == Decision.authorize()
    assert out.read_text() == "1 a b|$HOME;\n"  # read hit end-of-file; nothing expanded


async def test_a_cancelled_authorization_kills_the_command(tmp_path: Path) -> None:
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    h = handler(script(tmp_path, f'echo $$ > "{fifo}"; exec sleep 30'))
    task = asyncio.create_task(h.on_download_authorization(INFO))
    # Reading the FIFO returns once the command wrote its pid: it is surely running.
    pid = int(await asyncio.wait_for(asyncio.to_thread(fifo.read_text), BOUND))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left behind


# -- events ------------------------------------------------------------------------------


async def test_on_complete_runs_the_event_command(tmp_path: Path) -> None:
    out = tmp_path / "event.txt"
    h = handler(script(tmp_path, "exit 0"), event_command=script(tmp_path, f'env > "{out}"', "ev"))
    await h.on_complete(INFO, ResultCode.REJECTED, "busy")
    env = read_env(out)
    assert env["FOTA_EVENT"] == "completed"
    assert env["FOTA_RESULT"] == "REJECTED"
    assert env["FOTA_RESULT_CODE"] == str(int(ResultCode.REJECTED))
    assert env["FOTA_DETAIL"] == "busy"
    assert env["FOTA_UPDATE_ID"] == INFO.update_id and env["FOTA_VERSION"] == "2.0"
    assert env["FOTA_DEADLINE"] == "2027-01-20T03:30:00Z"
    assert "FOTA_STEP" not in env


async def test_on_forced_runs_the_event_command(tmp_path: Path) -> None:
    out = tmp_path / "event.txt"
    h = handler(script(tmp_path, "exit 0"), event_command=["sh", "-c", f'env > "{out}"'])
    await h.on_forced(INFO, "install", "deadline")
    env = read_env(out)
    assert env["FOTA_EVENT"] == "forced"
    assert env["FOTA_FORCED_STEP"] == "install" and env["FOTA_FORCED_REASON"] == "deadline"
    assert env["FOTA_SEVERITY"] == "mandatory"


async def test_drain_waits_for_running_event_commands(tmp_path: Path) -> None:
    out = tmp_path / "event.txt"
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    # The command blocks until the test opens the FIFO: it is surely running when drain starts.
    body = f'read x < "{fifo}"; echo "$FOTA_EVENT" > "{out}"'
    h = handler(script(tmp_path, "exit 0"), event_command=script(tmp_path, body, "ev"))
    notify = asyncio.create_task(h.on_forced(INFO, "download", "deferral limit"))
    drained = asyncio.create_task(h.drain())
    await asyncio.sleep(0)  # both tasks start: the event command is now tracked
    assert not drained.done()
    fd = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)  # returns once the reader is there
    os.write(fd, b"go\n")
    os.close(fd)
    await asyncio.wait_for(drained, BOUND)
    assert out.read_text() == "forced\n"
    await notify
    await h.drain()  # nothing running: returns at once


async def test_event_command_failures_are_logged_not_raised(tmp_path: Path) -> None:
    auth = script(tmp_path, "exit 0")
    with capture_logs() as logs:
        await handler(auth, event_command=[str(tmp_path / "missing")]).on_complete(
            INFO, ResultCode.SUCCESS, ""
        )
        await handler(auth, event_command=["sh", "-c", "exit 4"]).on_forced(INFO, "install", "x")
        await handler(auth, event_command=["sleep", "30"], timeout=0.3).on_complete(
            INFO, ResultCode.SUCCESS, ""
        )
    errors = [e for e in logs if e["event"] == "event_command_failed"]
    assert [e["event"] for e in errors] == ["event_command_failed"] * 3
    assert all(e["log_level"] == "error" for e in errors)
    assert "cannot run" in errors[0]["error"]
    assert "exit status 4" in errors[1]["error"]
    assert "timed out" in errors[2]["error"]


async def test_without_an_event_command_notifications_do_nothing(tmp_path: Path) -> None:
    """No command runs (not the authorization command either), no task is left behind and
    nothing is logged; with an event command the same calls run it (the control case)."""
    marker = tmp_path / "ran"
    argv = script(tmp_path, f"echo ran >> {marker}")
    h = handler(argv)
    before = asyncio.all_tasks()
    with capture_logs() as logs:
        await h.on_complete(INFO, ResultCode.SUCCESS, "")
        await h.on_forced(INFO, "install", "deadline")
        await h.drain()
    assert not marker.exists()
    assert not h._events and asyncio.all_tasks() == before
    assert logs == []
    control = handler(["true"], event_command=argv)
    await control.on_complete(INFO, ResultCode.SUCCESS, "")
    await control.on_forced(INFO, "install", "deadline")
    await control.drain()
    assert marker.read_text() == "ran\nran\n"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "kw", "message"),
    [
        ([], {}, "empty"),
        ("sh -c true", {}, "argument lists"),
        (["true"], {"event_command": "logger done"}, "argument lists"),
        (["true"], {"timeout": 0}, "timeout"),
        (["true"], {"defer": -1}, "defer"),
        (["true"], {"retry": float("nan")}, "retry"),
        (["true"], {"defer": float("inf")}, "defer"),
    ],
)
def test_bad_arguments_are_refused(argv: Any, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CommandHandler(argv, **kw)


def test_parse_defer_until_reads_both_forms() -> None:
    noon = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
    assert parse_defer_until("2027-01-15T13:00:00+01:00") == noon
    assert parse_defer_until(" 1800000000 ") == datetime.fromtimestamp(1_800_000_000, UTC)
    eastern = parse_defer_until("2027-01-15T07:00:00-05:00")
    assert eastern == noon and eastern.tzinfo is UTC
    assert noon.astimezone(timezone(timedelta(hours=2))) == parse_defer_until(
        "2027-01-15T14:00:00+02:00"
    )
    for bad in ("-5", "1e9", "soon", "2027-01-15 12:00"):
        with pytest.raises(ValueError):
            parse_defer_until(bad)


# -- end to end: the real client and server ----------------------------------------------


def idle_with(version: str) -> Any:
    return lambda s: (
        s.installed_version == version and s.state is State.IDLE and s.reports_pending == 0
    )


def reports(server: UpdateServer, update_id: str) -> list[tuple[State, ResultCode, str]]:
    return [
        (State(r[3]), ResultCode(r[4]), r.get(8, ""))
        for r in server.reports
        if r.get(5) == update_id
    ]


def event_recorder(tmp_path: Path) -> tuple[list[str], Path]:
    """An event command that dumps its environment to ``events/<version>-<event>``."""
    folder = tmp_path / "events"
    folder.mkdir()
    body = f'env > "{folder}/$FOTA_VERSION-$FOTA_EVENT"'
    return script(tmp_path, body, "event.sh"), folder


async def test_end_to_end_a_deferral_then_authorization_installs_the_update(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    clock = ManualClock(START)
    calls = tmp_path / "calls"
    counter = tmp_path / "download-asks"
    # The first download ask answers "later", every later ask "now".
    body = f"""
echo "$FOTA_STEP $FOTA_VERSION $FOTA_DEFERRED" >> "{calls}"
if [ "$FOTA_STEP" = download ]; then
    n=$(cat "{counter}" 2>/dev/null || echo 0)
    echo $((n + 1)) > "{counter}"
    if [ "$n" -eq 0 ]; then
        echo "FOTA_REASON=operator on site"
        exit 21
    fi
fi
exit 0
"""
    events, folder = event_recorder(tmp_path)
    h = CommandHandler(
        script(tmp_path, body), defer=2 * HOUR, event_command=events, clock=clock, timeout=5
    )
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=h, clock=clock) as client:
        server.publish(os.urandom(4 * KiB), "1.0", device_class=DEVICE_CLASS, polite=True)
        await client.wait_for(idle_with("1.0"), BOUND)  # a first install: nobody asked
        image = os.urandom(16 * KiB)
        v2 = server.publish(image, "2.0", device_class=DEVICE_CLASS)
        status = await client.wait_for(
            lambda s: s.state is State.DOWNLOAD_DEFERRED and s.reports_pending == 0, BOUND
        )
        assert status.defer_until == START + 2 * HOUR
        assert status.defer_reason == "operator on site"
        assert not server.image_requests(v2.image_sha256)

        clock.advance(2 * HOUR)  # the deferral ends: asked again, answered 0
        await client.wait_for(idle_with("2.0"), BOUND)
        await h.drain()
    assert hashlib.sha256(config.target.read_bytes()).digest() == v2.image_sha256  # type: ignore[union-attr]
    assert calls.read_text().splitlines() == [
        "download 2.0 0",
        "download 2.0 7200",
        "install 2.0 7200",
    ]
    got = reports(server, v2.update_id)
    assert (State.DOWNLOAD_DEFERRED, ResultCode.DEFERRED, "operator on site") in got
    assert got[-1][:2] == (State.IDLE, ResultCode.SUCCESS)
    assert read_env(folder / "1.0-completed")["FOTA_RESULT"] == "SUCCESS"
    done = read_env(folder / "2.0-completed")
    assert done["FOTA_EVENT"] == "completed"
    assert done["FOTA_RESULT"] == "SUCCESS" and done["FOTA_RESULT_CODE"] == str(
        int(ResultCode.SUCCESS)
    )
    assert done["FOTA_UPDATE_ID"] == v2.update_id and done["FOTA_INSTALLED_VERSION"] == "1.0"
    assert sorted(p.name for p in folder.iterdir()) == ["1.0-completed", "2.0-completed"]


async def test_end_to_end_a_rejection_reaches_the_server_and_the_event_command(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    clock = ManualClock(START)
    events, folder = event_recorder(tmp_path)
    body = 'echo "FOTA_REASON=busy"; exit 3'
    h = CommandHandler(script(tmp_path, body), event_command=events, clock=clock, timeout=5)
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=h, clock=clock) as client:
        v1 = server.publish(os.urandom(4 * KiB), "1.0", device_class=DEVICE_CLASS, polite=True)
        await client.wait_for(idle_with("1.0"), BOUND)
        v2 = server.publish(os.urandom(16 * KiB), "2.0", device_class=DEVICE_CLASS)
        report = await server.wait_for_report(
            lambda r: r.get(5) == v2.update_id and r[4] == ResultCode.REJECTED, BOUND
        )
        assert report[8] == "busy"
        status = await client.wait_for(idle_with("1.0"), BOUND)
        assert status.update_id is None
        await h.drain()
    assert not server.image_requests(v2.image_sha256)
    assert hashlib.sha256(config.target.read_bytes()).digest() == v1.image_sha256  # type: ignore[union-attr]
    rejected = read_env(folder / "2.0-completed")
    assert rejected["FOTA_RESULT"] == "REJECTED" and rejected["FOTA_DETAIL"] == "busy"
    assert rejected["FOTA_RESULT_CODE"] == str(int(ResultCode.REJECTED))
