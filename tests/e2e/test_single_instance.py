"""Issue 17 §1: one instance per state directory, held by a kernel lock.

Before the change, two daemons (or ``fota run``s) on one ``state_dir`` both ran and wrote the
same candidate and journal. Now the second is refused before it reads anything, naming the
directory and the holder's PID; a holder killed with SIGKILL leaves nothing stale behind (the
kernel drops a ``flock`` with its last descriptor). Each test fails on the old code.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from fota import Client, StateDirLocked
from fota.errors import StateDirError
from fota.fetch import LOCK_SUFFIX, fetch
from fota.keys import save_keypair
from fota.statedir import LOCK_NAME, LOCKED_EXIT, lock_file
from fota.testing import UpdateServer
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config
from tests.e2e.test_daemon import Daemon, daemon, rundir  # noqa: F401

pytestmark = pytest.mark.timeout(120)

BOUND = 30.0


# -- in process --------------------------------------------------------------------------------


async def test_a_second_client_on_one_state_dir_is_refused_naming_dir_and_pid(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=RecordingHandler()):
        second = Client(config, handler=RecordingHandler())
        with pytest.raises(StateDirLocked) as caught:
            await second.start()
        await second.aclose()
        assert caught.value.pid == os.getpid()
        assert caught.value.path == config.state_dir
        assert str(config.state_dir) in str(caught.value) and str(os.getpid()) in str(caught.value)
        assert (config.state_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
    # Released on close: the next one starts.
    async with Client(config, handler=RecordingHandler()) as third:
        assert third.status().state.name == "IDLE"


async def test_fetch_refuses_an_output_another_fetch_holds(tmp_path: Path) -> None:
    out = tmp_path / "image.bin"
    held = lock_file(tmp_path, out.name + LOCK_SUFFIX, out)
    try:
        # Refused before any request: the URI's port has nobody listening.
        with pytest.raises(StateDirLocked, match=str(out)):
            await fetch("coap://127.0.0.1:9/none", out, ack_timeout=0.05, max_retransmit=0)
        assert not (tmp_path / "image.bin.part").exists()
    finally:
        held.release()


def test_a_lock_file_planted_as_a_symlink_is_refused_not_followed(
    rundir: Path,  # noqa: F811
) -> None:
    """An unprivileged user plants ``FILE.fota-fetch.lock`` in a shared directory."""
    shared = rundir / "shared"  # rundir: world-traversable, under /tmp
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = rundir / "victim"
    victim.write_bytes(b"precious")
    planted = shared / ("image.bin" + LOCK_SUFFIX)
    pid = os.fork()
    if pid == 0:  # the attacker, as nobody
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.symlink(victim, planted)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert planted.is_symlink()
    with pytest.raises(StateDirError):
        lock_file(shared, planted.name, shared / "image.bin")
    assert victim.read_bytes() == b"precious"


# -- real processes ------------------------------------------------------------------------------


async def _run(state_dir: Path, server: UpdateServer, trust_pem: Path, target: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fota",
        "run",
        "--server",
        server.uri,
        "--state-dir",
        str(state_dir),
        "--trust",
        str(trust_pem),
        "--target",
        str(target),
        "--device-class",
        DEVICE_CLASS,
        "--device-id",
        "gw-single",
        "--ack-timeout",
        "0.25",
    ]


async def _started(proc: asyncio.subprocess.Process) -> None:
    """Read the first process's log until its engine runs (it holds the lock by then)."""
    assert proc.stderr is not None

    async def find() -> None:
        while True:
            line = await proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "fota run exited before its engine started"
            if b"engine_started" in line:
                return

    await asyncio.wait_for(find(), BOUND)


@pytest.mark.e2e
async def test_a_second_fota_run_is_refused_and_starts_after_kill_9_of_the_first(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    trust_pem = save_keypair(signing.key, tmp_path / "signing.key")
    state_dir = tmp_path / "state"
    argv = await _run(state_dir, server, trust_pem, tmp_path / "firmware.bin")
    first = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await _started(first)
        second = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), BOUND)
        assert second.returncode == LOCKED_EXIT, err.decode()
        message = err.decode()
        assert str(state_dir) in message and f"process {first.pid}" in message

        first.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock
        await first.wait()
        third = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            await _started(third)
            assert (state_dir / LOCK_NAME).read_text().strip() == str(third.pid)
        finally:
            third.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(third.wait(), BOUND) == 0
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()


@pytest.mark.e2e
async def test_a_second_daemon_exits_before_binding_its_socket(
    daemon: Daemon,  # noqa: F811
) -> None:
    await daemon.start()  # READY=1
    assert daemon.proc is not None
    other_socket = daemon.socket.with_name("other.sock")
    config = daemon.config.with_name("second.toml")
    config.write_text(daemon.config.read_text().replace(str(daemon.socket), str(other_socket)))
    second = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        "daemon",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=daemon.dir,
    )
    out, err = await asyncio.wait_for(second.communicate(), BOUND)
    assert second.returncode == LOCKED_EXIT  # not 2: systemd may try again later
    lines = [json.loads(line) for line in (out + err).decode().splitlines() if line.strip()]
    refused = [entry for entry in lines if entry.get("event") == "daemon_already_running"]
    assert refused and refused[0]["pid"] == daemon.proc.pid
    assert refused[0]["state_dir"] == str(daemon.dir / "state")
    assert not other_socket.exists()
    assert not any(entry.get("event") == "engine_started" for entry in lines)

    daemon.proc.kill()
    await daemon.proc.wait()
    daemon.proc = None
    await daemon.start()  # the kernel released the lock with the killed process
    assert await daemon.stop() == 0
