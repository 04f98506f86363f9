"""Install, restart, self-test, commit and rollback (issue 5), end to end in one process.

The real :class:`fota.Client` against the real :class:`fota.testing.UpdateServer` on
``127.0.0.1:0``, with real installers on disk, real self-test and restart commands
(subprocesses), and a simulated bootloader (``tests.installing.Bootloader``) whose "reboot"
is a client restart with a new boot id. Self-test retries run on a
:class:`fota.testing.ManualClock`. The server de-duplicates reports on (device, sequence);
every update that starts installing ends with exactly one final report.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fota import Client, Config, Decision, ResultCode, State, Status, UpdateInfo
from fota.testing import ManualClock, Published, UpdateServer
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config
from tests.installing import Bootloader, write_script

pytestmark = pytest.mark.timeout(60)

BOUND = 15.0
KiB = 1024
START = datetime(2027, 1, 15, 10, 0, tzinfo=UTC).timestamp()
FINAL = {ResultCode.SUCCESS, ResultCode.ROLLED_BACK, ResultCode.ROLLBACK_FAILED}


@dataclass
class Handler(RecordingHandler):
    """Authorizes everything; records install progress."""

    install_progress: list[int] = field(default_factory=list)

    async def on_install_progress(self, update: UpdateInfo, percent: int) -> None:
        self.install_progress.append(percent)


def reports(server: UpdateServer, update_id: str) -> list[tuple[State, ResultCode, str]]:
    return [
        (State(r[3]), ResultCode(r[4]), r.get(8, ""))
        for r in server.reports
        if r.get(5) == update_id
    ]


def finals(server: UpdateServer, update_id: str) -> list[tuple[State, ResultCode, str]]:
    return [r for r in reports(server, update_id) if r[1] in FINAL]


async def final_report(server: UpdateServer, update_id: str) -> dict[int, Any]:
    return await server.wait_for_report(
        lambda r: r.get(5) == update_id and r[4] in {int(c) for c in FINAL}, BOUND
    )


def settled(state: State, version: str | None = None) -> Callable[[Status], bool]:
    def check(s: Status) -> bool:
        return (
            s.state is state
            and (version is None or s.installed_version == version)
            and s.reports_pending == 0
        )

    return check


def in_state(state: State) -> Callable[[Status], bool]:
    return lambda s: s.state is state


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def retry_armed(client: Client, runs: Path, attempts: int) -> Callable[[Status], bool]:
    """The self-test ran ``attempts`` times and the engine armed the next attempt."""
    return lambda _: lines(runs) >= attempts and "selftest" in client._engine.timers()


def publish(server: UpdateServer, image: bytes, version: str) -> Published:
    return server.publish(image, version, device_class=DEVICE_CLASS)


def factory(tmp_path: Path, server: UpdateServer, image: bytes) -> Path:
    """The signed manifest of the image the device was provisioned with (not announced)."""
    path = tmp_path / "factory.cose"
    path.write_bytes(server.make_manifest(image, "1.0", device_class=DEVICE_CLASS).raw)
    return path


OLD, NEW = os.urandom(20 * KiB), os.urandom(40 * KiB)


# -- self-test -------------------------------------------------------------------------------


def health_check(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """A self-test command: passes while ``healthy`` exists; every run adds a line to ``runs``."""
    healthy, runs = tmp_path / "healthy", tmp_path / "runs"
    script = write_script(
        tmp_path / "health", f'echo "$FOTA_VERSION" >> {runs}\ntest -e {healthy}\n'
    )
    return [str(script)], healthy, runs


async def test_a_failing_self_test_is_retried_until_its_deadline_then_rolled_back(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    clock = ManualClock(START)
    check, healthy, runs = health_check(tmp_path)
    config = make_config(
        tmp_path,
        server,
        signing,
        self_test_command=check,
        self_test_deadline=30,
        self_test_interval=10,
    )
    assert config.target is not None
    handler = Handler()
    healthy.touch()
    async with Client(config, handler=handler, clock=clock) as client:
        v1 = publish(server, OLD, "1.0")
        await client.wait_for(settled(State.IDLE, "1.0"), BOUND)
        assert lines(runs) == 1
        healthy.unlink()  # 2.0 will not come up healthy
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(retry_armed(client, runs, 2), BOUND)
        assert client.state is State.AWAIT_COMMIT
        assert config.target.read_bytes() == NEW  # installed, not yet committed
        assert client._engine.timers()["selftest"] == START + 10
        for attempt in (3, 4):  # at +10 s and +20 s
            clock.advance(10)
            await client.wait_for(retry_armed(client, runs, attempt), BOUND)
        clock.advance(10)  # the last attempt, at the deadline (+30 s)
        report = await final_report(server, v2.update_id)
        await client.wait_for(settled(State.FAILED), BOUND)
    assert lines(runs) == 5
    assert config.target.read_bytes() == OLD
    assert report[4] == ResultCode.ROLLED_BACK and report[3] == State.FAILED.value
    assert report[8].startswith("rolled back to version 1.0: self-test failed: self-test: exit")
    assert [r[:2] for r in reports(server, v2.update_id)][-3:] == [
        (State.AWAIT_COMMIT, ResultCode.INITIAL),
        (State.ROLLING_BACK, ResultCode.FAILED),
        (State.FAILED, ResultCode.ROLLED_BACK),
    ]
    assert finals(server, v1.update_id) == [(State.IDLE, ResultCode.SUCCESS, "")]
    done = [(u.version, r) for u, r, _ in _drain(handler.completions)]
    assert done == [("1.0", ResultCode.SUCCESS), ("2.0", ResultCode.ROLLED_BACK)]


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_a_self_test_that_passes_on_a_later_attempt_commits(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    clock = ManualClock(START)
    check, healthy, runs = health_check(tmp_path)
    config = make_config(tmp_path, server, signing, self_test_command=check)
    assert config.target is not None
    healthy.touch()
    async with Client(config, handler=Handler(), clock=clock) as client:
        publish(server, OLD, "1.0")
        await client.wait_for(settled(State.IDLE, "1.0"), BOUND)
        healthy.unlink()
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(retry_armed(client, runs, 2), BOUND)
        healthy.touch()  # the service came up
        clock.advance(10)
        await client.wait_for(settled(State.IDLE, "2.0"), BOUND)
    assert lines(runs) == 3
    assert config.target.read_bytes() == NEW
    assert not config.target.with_name("firmware.bin.previous").exists()
    assert finals(server, v2.update_id) == [(State.IDLE, ResultCode.SUCCESS, "")]


async def test_a_hanging_self_test_times_out_and_the_update_is_rolled_back(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    clock = ManualClock(START)
    gate = tmp_path / "hang"
    script = write_script(tmp_path / "health", f"if [ -e {gate} ]; then sleep 60; fi\n")
    config = make_config(
        tmp_path,
        server,
        signing,
        self_test_command=[str(script)],
        self_test_deadline=5,
        hook_timeout=0.5,
    )
    assert config.target is not None
    async with Client(config, handler=Handler(), clock=clock) as client:
        publish(server, OLD, "1.0")
        await client.wait_for(settled(State.IDLE, "1.0"), BOUND)
        gate.touch()
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(in_state(State.AWAIT_COMMIT), BOUND)
        clock.advance(5)  # past the deadline: the attempt running then is the last
        report = await final_report(server, v2.update_id)
    assert report[4] == ResultCode.ROLLED_BACK
    assert "self-test: timed out after 0.5 s" in report[8]
    assert config.target.read_bytes() == OLD


# -- restart: A/B slots through a (simulated) bootloader --------------------------------------


def ab_config(
    tmp_path: Path, server: UpdateServer, signing: Signing, boot: Bootloader, **kw: Any
) -> Config:
    slots = {"a": tmp_path / "slot-a", "b": tmp_path / "slot-b"}
    if not slots["a"].exists():
        slots["a"].write_bytes(OLD)
    return make_config(
        tmp_path,
        server,
        signing,
        installers={
            "default": {
                "kind": "ab",
                "slots": {name: str(path) for name, path in slots.items()},
                "switch_command": boot.switch_command(),
                "booted_command": boot.booted_command(),
            }
        },
        boot_id_path=boot.boot_id_path,
        factory_manifest=factory(tmp_path, server, OLD),
        **kw,
    )


async def test_an_ab_update_restarts_into_the_new_slot_and_commits(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    boot = Bootloader(tmp_path / "boot")
    restarted = tmp_path / "restart-asked"
    restart = write_script(tmp_path / "reboot", f'echo "$FOTA_VERSION" > {restarted}\n')
    config = ab_config(tmp_path, server, signing, boot, restart_command=[str(restart)])
    handler = Handler()
    async with Client(config, handler=handler) as client:
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(in_state(State.AWAIT_RESTART), BOUND)
        await client.wait_for(lambda _: restarted.exists(), BOUND)
    assert restarted.read_text().strip() == "2.0"
    assert boot.next == "b" and (tmp_path / "slot-b").read_bytes() == NEW
    assert (State.AWAIT_RESTART, ResultCode.INITIAL, "restart required") in reports(
        server, v2.update_id
    )

    # fota restarted without a reboot (a service restart): it still waits, and asks again.
    restarted.unlink()
    async with Client(config, handler=handler) as client:
        await client.wait_for(lambda _: restarted.exists(), BOUND)
        assert client.state is State.AWAIT_RESTART

    boot.reboot()
    async with Client(config, handler=handler) as client:
        await client.wait_for(settled(State.IDLE, "2.0"), BOUND)
    assert boot.booted == "b" and boot.calls == ["b"]
    assert finals(server, v2.update_id) == [(State.IDLE, ResultCode.SUCCESS, "")]


async def test_a_new_slot_that_does_not_boot_is_rolled_back(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    boot = Bootloader(tmp_path / "boot")
    config = ab_config(tmp_path, server, signing, boot)
    async with Client(config, handler=Handler()) as client:
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(in_state(State.AWAIT_RESTART), BOUND)
    boot.reboot(boots=False)  # the bootloader fell back to slot a
    async with Client(config, handler=Handler()) as client:
        report = await final_report(server, v2.update_id)
        await client.wait_for(settled(State.FAILED, "1.0"), BOUND)
    assert report[4] == ResultCode.ROLLED_BACK
    assert "the new image did not start: the device runs the previous image" in report[8]
    assert boot.next == "a" and boot.booted == "a"


async def test_a_self_test_failing_on_the_new_slot_restarts_into_the_old_one(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    boot = Bootloader(tmp_path / "boot")
    check, _, runs = health_check(tmp_path)  # never healthy
    config = ab_config(
        tmp_path, server, signing, boot, self_test_command=check, self_test_deadline=0.01
    )
    async with Client(config, handler=Handler()) as client:
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(in_state(State.AWAIT_RESTART), BOUND)
    boot.reboot()
    async with Client(config, handler=Handler()) as client:
        # The new slot booted; its self-test fails past the deadline: switched back to a,
        # which runs after the next restart.
        await client.wait_for(
            lambda s: s.state is State.ROLLING_BACK and boot.next == "a" and lines(runs) >= 1,
            BOUND,
        )
        assert finals(server, v2.update_id) == []
    boot.reboot()
    async with Client(config, handler=Handler()) as client:
        report = await final_report(server, v2.update_id)
        await client.wait_for(settled(State.FAILED, "1.0"), BOUND)
    assert report[4] == ResultCode.ROLLED_BACK and "self-test failed" in report[8]
    # The rollback ran again after the restart: it switches to a again (idempotent), then
    # sees a running.
    assert boot.booted == "a" and boot.calls == ["b", "a", "a"]
    assert len(finals(server, v2.update_id)) == 1


async def test_a_reboot_loop_in_the_new_image_ends_in_a_rollback(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """The new image keeps crashing the device before its self-test ends (a watchdog reboot)."""
    boot = Bootloader(tmp_path / "boot")
    script = write_script(tmp_path / "health", "sleep 60\n")
    config = ab_config(
        tmp_path, server, signing, boot, self_test_command=[str(script)], restart_limit=2
    )
    async with Client(config, handler=Handler()) as client:
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(in_state(State.AWAIT_RESTART), BOUND)
    for _ in range(2):  # restart 1 (the one asked for) and 2: still within the limit
        boot.reboot()
        async with Client(config, handler=Handler()) as client:
            await client.wait_for(in_state(State.AWAIT_COMMIT), BOUND)
    boot.reboot()  # restart 3: past the limit of 2
    async with Client(config, handler=Handler()) as client:
        await client.wait_for(lambda _: boot.next == "a", BOUND)
        assert client.state is State.ROLLING_BACK
    boot.reboot()
    async with Client(config, handler=Handler()) as client:
        report = await final_report(server, v2.update_id)
    assert report[4] == ResultCode.ROLLED_BACK
    assert "restart limit 2 reached in AWAIT_COMMIT" in report[8]
    assert boot.booted == "a"


# -- abort and progress -----------------------------------------------------------------------


async def test_a_server_cancel_before_the_install_leaves_the_old_image_untouched(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """Upswift-style abort: the install is held by a lock when the server cancels it."""
    boot = Bootloader(tmp_path / "boot")
    config = ab_config(tmp_path, server, signing, boot)
    slot_b = tmp_path / "slot-b"
    async with Client(config, handler=Handler()) as client:
        await client.inhibit("backup", 3600)
        v2 = publish(server, NEW, "2.0")
        await client.wait_for(in_state(State.INSTALL_HELD), BOUND)
        server.cancel(v2.digest)
        await server.wait_for_report(
            lambda r: r.get(5) == v2.update_id and r[4] == ResultCode.CANCELLED, BOUND
        )
        await client.wait_for(settled(State.IDLE, "1.0"), BOUND)
        assert not client._engine.journal.candidate_path.exists()
    assert not slot_b.exists() and (tmp_path / "slot-a").read_bytes() == OLD
    assert boot.calls == [] and boot.next == "a"


async def test_install_progress_from_a_command_installer_reaches_the_handler(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    target = tmp_path / "flashed"
    program = write_script(
        tmp_path / "flash",
        'if [ "$1" = install ]; then\n'
        f'  for p in 10 35 60 85; do echo "progress $p"; done\n  cp "$FOTA_CANDIDATE" {target}\n'
        "fi\n",
    )
    config = make_config(
        tmp_path,
        server,
        signing,
        installers={"default": {"kind": "command", "command": [str(program)]}},
    )
    handler = Handler()
    async with Client(config, handler=handler) as client:
        publish(server, NEW, "1.0")
        await client.wait_for(settled(State.IDLE, "1.0"), BOUND)
    assert target.read_bytes() == NEW
    assert handler.install_progress == [10, 35, 60, 85]


async def test_a_tail_appended_after_verification_never_reaches_a_command_installer(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """Issue 16 §1: bytes past the signed size are cut before an installer gets the path."""
    target = tmp_path / "flashed"
    program = write_script(
        tmp_path / "flash", f'if [ "$1" = install ]; then cp "$FOTA_CANDIDATE" {target}; fi\n'
    )
    config = make_config(
        tmp_path,
        server,
        signing,
        installers={"default": {"kind": "command", "command": [str(program)]}},
        # A polite running image: the device asks before installing, after verification.
        factory_manifest=factory(tmp_path, server, OLD),
    )
    appended = asyncio.Event()

    @dataclass
    class Appending(Handler):
        candidate: Path | None = None

        async def on_install_authorization(self, update: UpdateInfo) -> Decision:
            # Verified by now: whatever writes into the state directory adds a tail.
            assert self.candidate is not None
            with open(self.candidate, "ab") as f:
                f.write(b"#!/bin/sh\necho unsigned\n")
            appended.set()
            return await super().on_install_authorization(update)

    handler = Appending()
    async with Client(config, handler=handler) as client:
        handler.candidate = client._engine.journal.candidate_path
        publish(server, NEW, "2.0")
        await client.wait_for(settled(State.IDLE, "2.0"), BOUND)
    assert appended.is_set()
    assert target.read_bytes() == NEW
