"""Installer backends on real files, real symlinks and real subprocesses (no engine).

Each backend installs, commits and rolls back a real file or slot on disk; every call is run a
second time to show it is idempotent (the engine re-runs the journaled step after a crash).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from fota import hooks
from fota.core.manifest import Component
from fota.errors import ConfigError, InstallError
from fota.install import DONE, RESTART, ByComponent, Context, FileInstaller, build, from_config
from fota.install.ab import PLAN_NAME, ABInstaller
from fota.install.command import CommandInstaller, parse_progress
from tests.installing import (
    Bootloader,
    Progress,
    ends_within,
    manifest_for,
    proc_gone,
    write_script,
)

pytestmark = pytest.mark.timeout(60)

OLD, NEW = b"old image " * 1000, b"new image " * 3000


def candidate(tmp_path: Path, data: bytes = NEW) -> Path:
    path = tmp_path / "candidate.bin"
    path.write_bytes(data)
    return path


# -- the command runner ------------------------------------------------------------------------


async def test_a_hanging_command_is_killed_with_its_children_at_the_timeout(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "child.pid"
    argv = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    done = await hooks.run(argv, name="hook hang", timeout=0.5)
    assert done.timed_out and not done.ok
    assert ends_within(int(pidfile.read_text()), 10)
    assert "timed out after 0.5 s" in hooks.describe("hook hang", done, 0.5)


async def test_a_cancelled_command_is_killed_with_its_children(tmp_path: Path) -> None:
    """fota stopping (SIGTERM) cancels a running hook: nothing of it is left behind."""
    pidfile = tmp_path / "child.pid"
    argv = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo ready; wait"]
    ready = asyncio.Event()
    task = asyncio.create_task(
        hooks.run(argv, name="long hook", timeout=60, on_line=lambda _: ready.set())
    )
    await asyncio.wait_for(ready.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ends_within(int(pidfile.read_text()), 10)


async def test_a_command_that_exits_just_before_its_timeout_succeeds_though_a_child_holds_output(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "daemon.pid"
    argv = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; sleep 0.5"]
    done = await hooks.run(argv, name="late exit", timeout=1.0)
    try:
        assert done.ok and not done.timed_out
    finally:
        os.kill(int(pidfile.read_text()), 9)


async def test_a_command_that_prompts_reads_end_of_file_and_does_not_hang(tmp_path: Path) -> None:
    done = await hooks.run(
        ["sh", "-c", 'read answer; test "$answer" = yes'], name="prompt", timeout=30
    )
    assert not done.timed_out and done.code == 1


async def test_commands_run_with_the_non_interactive_environment_and_their_lines_are_seen(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    script = 'echo "$DEBIAN_FRONTEND $CI $PIP_NO_INPUT $EXTRA"; echo last'
    done = await hooks.run(
        ["sh", "-c", script], name="env", timeout=10, env={"EXTRA": "x"}, on_line=lines.append
    )
    assert done.ok
    assert lines == ["noninteractive 1 1 x", "last"]
    assert done.tail.splitlines()[-1] == "last"


async def test_a_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(hooks.CommandNotFound, match="cannot run '/nonexistent/prog'"):
        await hooks.run(["/nonexistent/prog"], name="missing", timeout=5)


# -- file --------------------------------------------------------------------------------------


async def test_file_install_commit_and_rollback(tmp_path: Path) -> None:
    target = tmp_path / "fw.bin"
    target.write_bytes(OLD)
    inst = FileInstaller(target)
    m = manifest_for(NEW, "2.0")
    progress = Progress()
    assert await inst.install(candidate(tmp_path), m, progress) == DONE
    assert target.read_bytes() == NEW and progress.values == [100]
    assert inst.previous.read_bytes() == OLD
    # Run again (a crash after the replace): the previous copy is still the old image.
    await inst.install(candidate(tmp_path), m, progress)
    assert inst.previous.read_bytes() == OLD
    assert await inst.rollback(m) == DONE
    assert target.read_bytes() == OLD and not inst.previous.exists()
    assert await inst.rollback(m) == DONE  # idempotent
    assert target.read_bytes() == OLD

    await inst.install(candidate(tmp_path), m, progress)
    await inst.commit(m)
    await inst.commit(m)  # idempotent
    assert target.read_bytes() == NEW and not inst.previous.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["candidate.bin", "fw.bin"]


async def test_file_rollback_of_a_first_install_removes_the_new_file(tmp_path: Path) -> None:
    target = tmp_path / "fw.bin"
    inst = FileInstaller(target)
    m = manifest_for(NEW, "1.0")
    await inst.install(candidate(tmp_path), m, Progress())
    assert target.read_bytes() == NEW and inst.state_path.exists()
    await inst.rollback(m)
    assert not target.exists() and not inst.state_path.exists()
    await inst.rollback(m)
    assert not target.exists()


async def test_file_install_into_a_missing_directory_is_an_install_error(tmp_path: Path) -> None:
    inst = FileInstaller(tmp_path / "no" / "such" / "fw.bin")
    with pytest.raises(InstallError, match="file installer"):
        await inst.install(candidate(tmp_path), manifest_for(NEW, "2.0"), Progress())


# -- A/B, link mode ----------------------------------------------------------------------------


def link_ab(tmp_path: Path) -> tuple[ABInstaller, Path, dict[str, Path]]:
    slots = {"a": tmp_path / "slot-a", "b": tmp_path / "slot-b"}
    link = tmp_path / "current"
    state = tmp_path / "state"
    state.mkdir()
    return ABInstaller(slots, state, link=link), link, slots


async def test_ab_link_writes_the_inactive_slot_flips_the_link_and_flips_back(
    tmp_path: Path,
) -> None:
    inst, link, slots = link_ab(tmp_path)
    slots["a"].write_bytes(OLD)
    link.symlink_to(slots["a"])
    m = manifest_for(NEW, "2.0")
    progress = Progress()
    assert await inst.install(candidate(tmp_path), m, progress) == DONE
    assert os.readlink(link) == str(slots["b"]) and link.read_bytes() == NEW
    assert slots["a"].read_bytes() == OLD and progress.values[-1] == 100
    assert await inst.booted(m)

    # Run again after a crash past the switch: the plan says b; b already holds the image and
    # is not written again (it may be in use).
    written = slots["b"].stat().st_mtime_ns
    await inst.install(candidate(tmp_path), m, progress)
    assert slots["b"].stat().st_mtime_ns == written and os.readlink(link) == str(slots["b"])

    assert await inst.rollback(m) == DONE
    assert os.readlink(link) == str(slots["a"]) and link.read_bytes() == OLD
    assert not (tmp_path / "state" / PLAN_NAME).exists()
    assert await inst.rollback(m) == DONE  # nothing left to undo
    assert os.readlink(link) == str(slots["a"])


async def test_ab_link_commit_keeps_the_new_slot_and_the_next_update_uses_the_other(
    tmp_path: Path,
) -> None:
    inst, link, slots = link_ab(tmp_path)
    m1, m2 = manifest_for(OLD, "1.0"), manifest_for(NEW, "2.0", sequence=3)
    await inst.install(candidate(tmp_path, OLD), m1, Progress())  # a new device: slot a
    assert os.readlink(link) == str(slots["a"])
    await inst.commit(m1)
    await inst.install(candidate(tmp_path, NEW), m2, Progress())
    assert os.readlink(link) == str(slots["b"])
    await inst.commit(m2)
    await inst.commit(m2)
    assert not (tmp_path / "state" / PLAN_NAME).exists()
    assert link.read_bytes() == NEW and slots["a"].read_bytes() == OLD


async def test_ab_link_rollback_of_a_first_install_removes_the_link(tmp_path: Path) -> None:
    inst, link, _ = link_ab(tmp_path)
    m = manifest_for(NEW, "1.0")
    await inst.install(candidate(tmp_path), m, Progress())
    assert link.is_symlink()
    await inst.rollback(m)
    assert not link.is_symlink() and not link.exists()


async def test_ab_a_slot_that_cannot_be_written_fails_before_the_switch(tmp_path: Path) -> None:
    link = tmp_path / "current"
    state = tmp_path / "state"
    state.mkdir()
    slot_a = tmp_path / "slot-a"
    slot_a.write_bytes(OLD)
    link.symlink_to(slot_a)
    inst = ABInstaller({"a": slot_a, "b": Path("/dev/full")}, state, link=link)
    with pytest.raises(InstallError, match="writing slot b"):
        await inst.install(candidate(tmp_path), manifest_for(NEW, "2.0"), Progress())
    assert os.readlink(link) == str(slot_a)


# -- A/B, bootloader mode ----------------------------------------------------------------------


def boot_ab(tmp_path: Path, boot: Bootloader, **kw: Any) -> tuple[ABInstaller, dict[str, Path]]:
    slots = {"a": tmp_path / "slot-a", "b": tmp_path / "slot-b"}
    slots["a"].write_bytes(OLD)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    inst = ABInstaller(
        slots,
        state,
        switch_command=boot.switch_command(),
        booted_command=boot.booted_command(),
        **kw,
    )
    return inst, slots


async def test_ab_bootloader_install_needs_a_restart_then_boots_the_new_slot(
    tmp_path: Path,
) -> None:
    boot = Bootloader(tmp_path / "boot")
    marker = tmp_path / "committed"
    inst, slots = boot_ab(
        tmp_path, boot, commit_command=["sh", "-c", f"echo $0 > {marker}", "{slot}"]
    )
    m = manifest_for(NEW, "2.0")
    assert await inst.install(candidate(tmp_path), m, Progress()) == RESTART
    assert boot.next == "b" and slots["b"].read_bytes() == NEW
    assert not await inst.booted(m)  # not restarted yet
    boot.reboot()
    assert await inst.booted(m)
    await inst.commit(m)
    assert marker.read_text().strip() == "b"


async def test_ab_bootloader_fallback_is_seen_and_rollback_needs_no_restart(
    tmp_path: Path,
) -> None:
    boot = Bootloader(tmp_path / "boot")
    inst, _ = boot_ab(tmp_path, boot)
    m = manifest_for(NEW, "2.0")
    await inst.install(candidate(tmp_path), m, Progress())
    boot.reboot(boots=False)  # the new slot did not start: the bootloader fell back to a
    assert not await inst.booted(m)
    assert await inst.rollback(m) == DONE
    assert boot.next == "a" and boot.calls == ["b", "a"]


async def test_ab_bootloader_rollback_from_the_new_slot_restarts_into_the_old(
    tmp_path: Path,
) -> None:
    boot = Bootloader(tmp_path / "boot")
    inst, _ = boot_ab(tmp_path, boot)
    m = manifest_for(NEW, "2.0")
    await inst.install(candidate(tmp_path), m, Progress())
    boot.reboot()
    assert await inst.booted(m)
    # The self-test failed on the new slot: switch back; it runs after a restart.
    assert await inst.rollback(m) == RESTART
    assert boot.next == "a"
    assert await inst.rollback(m) == RESTART  # run again before the restart: the same
    boot.reboot()
    assert await inst.rollback(m) == DONE
    assert boot.booted == "a" and not (tmp_path / "state" / PLAN_NAME).exists()


async def test_ab_bootloader_a_failing_switch_command_is_an_install_error(tmp_path: Path) -> None:
    boot = Bootloader(tmp_path / "boot")
    state = tmp_path / "state"
    state.mkdir()
    inst = ABInstaller(
        {"a": tmp_path / "slot-a", "b": tmp_path / "slot-b"},
        state,
        switch_command=["sh", "-c", "echo 'env is locked' >&2; exit 3"],
        booted_command=boot.booted_command(),
    )
    with pytest.raises(InstallError, match=r"switch command: exit status 3 \(env is locked\)"):
        await inst.install(candidate(tmp_path), manifest_for(NEW, "2.0"), Progress())


# -- command -----------------------------------------------------------------------------------


def recording_installer(tmp_path: Path, codes: dict[str, int] | None = None) -> Path:
    """A program that records its action and environment and exits as ``codes`` says."""
    codes = codes or {}
    cases = "".join(f"  {action}) exit {code} ;;\n" for action, code in codes.items())
    return write_script(
        tmp_path / "installer",
        f'echo "$1 $FOTA_VERSION $FOTA_COMPONENT $FOTA_IMAGE_SIZE" >> {tmp_path}/actions\n'
        'if [ "$1" = install ]; then cp "$FOTA_CANDIDATE" '
        f"{tmp_path}/installed; fi\n"
        f'test -s "$FOTA_MANIFEST"\n'
        'echo "progress 40"\necho "working..."\necho "90%"\n'
        f'case "$1" in\n{cases}  *) exit 0 ;;\nesac\n',
    )


async def test_command_installer_passes_the_candidate_and_manifest_and_maps_progress(
    tmp_path: Path,
) -> None:
    program = recording_installer(tmp_path, {"booted": 1})
    inst = CommandInstaller([str(program)], tmp_path)
    m = manifest_for(NEW, "2.0", component=Component.APPLICATION)
    progress = Progress()
    assert await inst.install(candidate(tmp_path), m, progress) == DONE
    assert progress.values == [40, 90]
    assert (tmp_path / "installed").read_bytes() == NEW
    assert not await inst.booted(m)
    await inst.commit(m)
    assert await inst.rollback(m) == DONE
    actions = (tmp_path / "actions").read_text().splitlines()
    size = len(NEW)
    assert actions == [
        f"{a} 2.0 application {size}" for a in ("install", "booted", "commit", "rollback")
    ]


async def test_command_installer_exit_10_asks_for_a_restart(tmp_path: Path) -> None:
    program = recording_installer(tmp_path, {"install": 10, "rollback": 10})
    inst = CommandInstaller([str(program)], tmp_path)
    m = manifest_for(NEW, "2.0")
    assert await inst.install(candidate(tmp_path), m, Progress()) == RESTART
    assert await inst.rollback(m) == RESTART


@pytest.mark.parametrize("action", ["install", "commit", "rollback"])
async def test_command_installer_failures_name_the_action_and_the_last_line(
    tmp_path: Path, action: str
) -> None:
    program = write_script(tmp_path / "bad", 'echo "starting"\necho "disk full" >&2\nexit 4\n')
    inst = CommandInstaller([str(program)], tmp_path)
    m = manifest_for(NEW, "2.0")
    with pytest.raises(InstallError, match=rf"{action} command: exit status 4 \(disk full\)"):
        if action == "install":
            await inst.install(candidate(tmp_path), m, Progress())
        elif action == "commit":
            await inst.commit(m)
        else:
            await inst.rollback(m)


async def test_command_installer_times_out(tmp_path: Path) -> None:
    inst = CommandInstaller(["sh", "-c", "sleep 60", "sh"], tmp_path, timeout=0.5)
    with pytest.raises(InstallError, match=r"timed out after 0\.5 s"):
        await inst.install(candidate(tmp_path), manifest_for(NEW, "2.0"), Progress())


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("progress 40", 40),
        ("Progress: 7", 7),
        ("  55%", 55),
        ("100 %", 100),
        ("progress 101", None),
        ("42", None),
        ("at 40%", None),
        ("", None),
    ],
)
def test_progress_lines(line: str, value: int | None) -> None:
    assert parse_progress(line) == value


# -- settings ----------------------------------------------------------------------------------


def ctx(tmp_path: Path) -> Context:
    return Context(tmp_path, 30.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"kind": "floppy"}, r"installers.x.kind: 'floppy' is not one of file, ab"),
        ({"kind": "file"}, r"installers.x.target: missing"),
        (
            {"kind": "file", "target": "relative/fw.bin"},
            r"installers.x.target: expected an absolute",
        ),
        ({"kind": "file", "target": "/fw.bin", "owner": 1}, r"installers.x: unknown key 'owner'"),
        (
            {"kind": "command", "command": "flash.sh --all"},
            r"installers.x.command: expected a non-empty list",
        ),
        ({"kind": "ab", "slots": {"a": "/a"}, "link": "/l"}, r"needs exactly 2 slots"),
        (
            {"kind": "ab", "slots": {"a": "/a", "b": "/b"}},
            r"exactly one of link and switch_command",
        ),
        (
            {"kind": "ab", "slots": {"a": "/a", "b": "/b"}, "switch_command": ["fw_setenv"]},
            r"booted_command is needed",
        ),
        (
            {"kind": "command", "command": ["x"], "timeout": -1},
            r"timeout: expected a positive number",
        ),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("installers.x", table, ctx(tmp_path))


async def test_installers_by_component(tmp_path: Path) -> None:
    fw, app = tmp_path / "fw.bin", tmp_path / "app.bin"
    inst = from_config(
        {
            "firmware": {"kind": "file", "target": str(fw)},
            "application": {"kind": "file", "target": str(app)},
        },
        ctx(tmp_path),
    )
    await inst.install(candidate(tmp_path, OLD), manifest_for(OLD, "1.0"), Progress())
    app_m = manifest_for(NEW, "7.0", component=Component.APPLICATION)
    await inst.install(candidate(tmp_path, NEW), app_m, Progress())
    assert fw.read_bytes() == OLD and app.read_bytes() == NEW
    other = manifest_for(NEW, "1.0", component=Component.OTHER)
    with pytest.raises(InstallError, match="no installer is configured for component 'other'"):
        await inst.install(candidate(tmp_path), other, Progress())
    assert await inst.rollback(other) == DONE  # nothing was installed: nothing to undo


def test_an_unknown_component_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown component 'kernel'"):
        ByComponent({"kernel": FileInstaller(tmp_path / "k")})


async def test_a_child_left_holding_the_output_open_does_not_hold_the_command(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "daemon.pid"
    # The command exits at once; the "daemon" it started keeps stdout open for a minute.
    argv = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started"]
    done = await hooks.run(argv, name="start daemon", timeout=30)
    try:
        assert done.ok and not done.timed_out and done.tail == "started"
        assert not proc_gone(int(pidfile.read_text()))  # a started daemon is left running
    finally:
        os.kill(int(pidfile.read_text()), 9)


async def test_ab_a_booted_command_that_prints_the_next_slot_is_caught_at_install(
    tmp_path: Path,
) -> None:
    """fw_printenv of the boot variable says what boots next, not what booted."""
    boot = Bootloader(tmp_path / "boot")
    next_slot = write_script(tmp_path / "next-slot", f"cat {boot.root}/next\n")
    slots = {"a": tmp_path / "slot-a", "b": tmp_path / "slot-b"}
    slots["a"].write_bytes(OLD)
    state = tmp_path / "state"
    state.mkdir()
    inst = ABInstaller(
        slots, state, switch_command=boot.switch_command(), booted_command=[str(next_slot)]
    )
    m = manifest_for(NEW, "2.0")
    with pytest.raises(InstallError, match="must print the slot that booted"):
        await inst.install(candidate(tmp_path), m, Progress())
    assert await inst.rollback(m) == DONE
    assert boot.next == "a"


async def test_ab_install_run_again_on_the_booted_new_slot_does_not_write_it(
    tmp_path: Path,
) -> None:
    """A power cut after the switch: the device booted the new slot, the journal says INSTALLING."""
    boot = Bootloader(tmp_path / "boot")
    inst, slots = boot_ab(tmp_path, boot)
    m = manifest_for(NEW, "2.0")
    assert await inst.install(candidate(tmp_path), m, Progress()) == RESTART
    boot.reboot()
    with open(slots["b"], "r+b") as f:  # mounted read-write, its file system changed a block
        f.write(b"superblock")
    assert await inst.install(candidate(tmp_path), m, Progress()) == DONE
    assert slots["b"].read_bytes().startswith(b"superblock")
    assert boot.calls == ["b"]


async def test_ab_a_link_that_names_no_slot_is_never_taken_away(tmp_path: Path) -> None:
    inst, link, _ = link_ab(tmp_path)
    elsewhere = tmp_path / "hand-installed"
    elsewhere.write_bytes(OLD)
    link.symlink_to(elsewhere)
    m = manifest_for(NEW, "2.0")
    with pytest.raises(InstallError, match="names no slot"):
        await inst.install(candidate(tmp_path), m, Progress())
    assert await inst.rollback(m) == DONE  # nothing was planned: nothing to undo
    assert os.readlink(link) == str(elsewhere)


async def test_file_install_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "app"
    target.write_bytes(OLD)
    target.chmod(0o750)
    inst = FileInstaller(target)
    m = manifest_for(NEW, "2.0")
    await inst.install(candidate(tmp_path), m, Progress())
    assert target.stat().st_mode & 0o7777 == 0o750
    await inst.rollback(m)
    assert target.read_bytes() == OLD and target.stat().st_mode & 0o7777 == 0o750


async def test_file_rollback_after_the_commit_started_fails_instead_of_claiming_the_old_file(
    tmp_path: Path,
) -> None:
    """The commit removed the copy, then failed: the old file cannot come back."""
    target = tmp_path / "fw.bin"
    target.write_bytes(OLD)
    inst = FileInstaller(target)
    m = manifest_for(NEW, "2.0")
    await inst.install(candidate(tmp_path), m, Progress())
    real = inst._fsync_dir

    def failing(dir_fd: int) -> None:
        raise OSError(5, "Input/output error")

    inst._fsync_dir = failing  # type: ignore[method-assign]
    with pytest.raises(InstallError, match="commit"):
        await inst.commit(m)
    inst._fsync_dir = real  # type: ignore[method-assign]
    with pytest.raises(InstallError, match=r"the commit of \w+ already started"):
        await inst.rollback(m)
    assert target.read_bytes() == NEW


async def test_file_leftovers_of_an_earlier_update_are_not_used_by_the_next(tmp_path: Path) -> None:
    """1.5 ended without its rollback (restart limit): 2.0's rollback goes back to what ran."""
    target = tmp_path / "fw.bin"
    target.write_bytes(OLD)
    inst = FileInstaller(target)
    middle = b"1.5 " * 100
    await inst.install(candidate(tmp_path, middle), manifest_for(middle, "1.5"), Progress())
    m2 = manifest_for(NEW, "2.0", sequence=3)
    await inst.install(candidate(tmp_path), m2, Progress())
    await inst.rollback(m2)
    assert target.read_bytes() == middle
