"""fota.app.systemd against real AF_UNIX datagram sockets, and the example unit file.

The unit is checked with ``systemd-analyze verify`` (Debian package ``systemd``), which works
without a running systemd (in a container too): it loads the unit file offline. A missing
systemd-analyze makes that test FAIL, not skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fota.app.systemd import Notifier, watchdog_loop

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples" / "fota.service"


class Receiver:
    """What systemd does: a bound SOCK_DGRAM socket that collects notifications."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what NOTIFY_SOCKET says

    def recv(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n"), data
        fields: dict[str, str] = {}
        for line in data.splitlines():
            key, sep, value = line.partition("=")
            assert sep, line
            fields[key] = value
        return fields

    def nothing(self, timeout: float = 0.2) -> None:
        """Nothing arrives within ``timeout`` (a bounded wait for an absence)."""
        self.sock.settimeout(timeout)
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"fota-test-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def test_ready_status_stopping_over_a_path_socket(receiver: Receiver) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    assert n.enabled
    n.ready("Idle; running 1.4.2")
    assert receiver.recv() == {"READY": "1", "STATUS": "Idle; running 1.4.2"}
    n.status("Downloading 1.5.0: 45%")
    assert receiver.recv() == {"STATUS": "Downloading 1.5.0: 45%"}
    n.watchdog()
    assert receiver.recv() == {"WATCHDOG": "1"}
    n.stopping()
    assert receiver.recv() == {"STOPPING": "1"}
    n.ready()
    assert receiver.recv() == {"READY": "1"}
    n.close()


def test_abstract_namespace_socket(abstract_receiver: Receiver) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_receiver.env_value})
    assert n.enabled
    n.send(READY="1", STATUS="up")
    assert abstract_receiver.recv() == {"READY": "1", "STATUS": "up"}


def test_newlines_in_values_cannot_inject_assignments(receiver: Receiver) -> None:
    n = Notifier(receiver.env_value)
    n.send(STATUS="one\nREADY=1\r\ntwo\rthree")
    assert receiver.recv() == {"STATUS": "one READY=1 two three"}


def test_status_is_sent_only_when_it_changes(receiver: Receiver) -> None:
    n = Notifier(receiver.env_value)
    n.ready("Idle")
    assert receiver.recv() == {"READY": "1", "STATUS": "Idle"}
    n.status("Idle")  # the same as ready's: not sent again
    n.status("Downloading")
    assert receiver.recv() == {"STATUS": "Downloading"}
    n.status("Downloading")
    n.status("Downloading")
    n.stopping("Stopping")
    # Datagrams keep their order: had a duplicate been sent it would come first.
    assert receiver.recv() == {"STOPPING": "1", "STATUS": "Stopping"}
    n.status("Downloading")  # a change back is a change
    assert receiver.recv() == {"STATUS": "Downloading"}
    receiver.nothing()


def test_from_env_unsets_the_variables_by_default() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    n = Notifier.from_env(env)
    assert env == {"PATH": "/usr/bin"}
    assert n.enabled
    assert n.watchdog_interval == 30.0


def test_from_env_can_keep_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "20000"}
    n = Notifier.from_env(env, unset=False)
    assert env == {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "20000"}
    assert n.watchdog_interval == 0.02  # WATCHDOG_PID unset: meant for us


def test_from_env_defaults_to_os_environ_and_children_do_not_inherit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@fota-test-unused")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env()
    assert n.enabled
    assert n.watchdog_interval == 1.0
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    # os.environ's pop unsets the process environment, which is what a child gets.
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if 'WATCHDOG' in k"
         " or k == 'NOTIFY_SOCKET'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_watchdog_pid_of_another_process_means_no_watchdog() -> None:
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(env).watchdog_interval is None


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"},
    ],
)
def test_no_or_malformed_watchdog_variables_mean_no_watchdog(env: dict[str, str]) -> None:
    assert Notifier.from_env(env).watchdog_interval is None


def test_without_notify_socket_it_is_disabled_and_silent(
    capfd: pytest.CaptureFixture[str],
) -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    n.ready("Idle")
    n.status("Downloading")
    n.watchdog()
    n.stopping("Stopping")
    n.send(FOO="bar")
    out, err = capfd.readouterr()
    assert out == err == ""


def test_unsupported_address_disables_it() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    n.ready("Idle")  # a no-op, no exception


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    n = Notifier(str(path))
    n.ready("Idle")  # delivered while the socket exists
    sock.close()
    path.unlink()
    n.status("Downloading")
    n.watchdog()
    n.stopping()
    # Never created at all, and an address too long for sockaddr_un.
    Notifier(str(tmp_path / "never")).ready()
    Notifier("/" + "x" * 200).ready()


def test_a_failed_send_warns_once(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    n = Notifier(str(tmp_path / "never"))
    with capture_logs() as logs:
        n.ready()
        n.watchdog()
        n.watchdog()
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["systemd_notify_failed"]
    assert warnings[0]["keys"] == ["READY"]


# In the event loop's tests the socket is read in a thread, so the loop under test keeps running.
async def _recv(receiver: Receiver, timeout: float = 5.0) -> dict[str, str]:
    return await asyncio.to_thread(receiver.recv, timeout)


async def _nothing(receiver: Receiver, timeout: float) -> None:
    await asyncio.to_thread(receiver.nothing, timeout)


async def test_watchdog_loop_pings_while_healthy_and_stops_when_not(
    receiver: Receiver,
) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "20000"})
    assert n.watchdog_interval == 0.02
    healthy = True
    checks = 0
    unhealthy_seen = asyncio.Event()

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        if not healthy:
            unhealthy_seen.set()
        return healthy

    task = asyncio.create_task(watchdog_loop(n, is_healthy))
    try:
        for _ in range(3):
            assert await _recv(receiver) == {"WATCHDOG": "1"}
        healthy = False
        await asyncio.wait_for(unhealthy_seen.wait(), 5)
        # Pings sent before the loop saw the change may still be queued: drain them.
        receiver.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                receiver.sock.recv(4096)
        # Several periods (10 ms each) go by with the loop still checking, and no ping.
        seen = checks
        await _nothing(receiver, 0.2)
        assert checks > seen, "the loop stopped checking"
        assert not task.done()
        healthy = True
        assert await _recv(receiver) == {"WATCHDOG": "1"}  # resumes
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_treats_a_raising_check_as_unhealthy(receiver: Receiver) -> None:
    n = Notifier(receiver.env_value, watchdog_usec=20000)
    raised = asyncio.Event()

    def broken() -> bool:
        raised.set()
        raise RuntimeError("boom")

    task = asyncio.create_task(watchdog_loop(n, broken))
    try:
        await asyncio.wait_for(raised.wait(), 5)
        await _nothing(receiver, 0.1)
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_returns_at_once_without_a_watchdog(receiver: Receiver) -> None:
    n = Notifier(receiver.env_value)  # enabled, but no WATCHDOG_USEC
    await asyncio.wait_for(watchdog_loop(n, lambda: True), 1)
    other = Notifier(receiver.env_value, watchdog_usec=20000, watchdog_pid=os.getpid() + 1)
    await asyncio.wait_for(watchdog_loop(other, lambda: True), 1)
    receiver.nothing(0.05)  # nothing runs any more: blocking here is fine


# -- examples/fota.service ------------------------------------------------------------------


def _unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}}; keys may repeat (After=), unlike INI."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"key outside a section: {line}"
        assert not line.endswith("\\"), "continuation lines are not used in the example"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_file_has_the_settings_the_daemon_relies_on() -> None:
    unit = _unit_keys(UNIT.read_text())
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/usr/bin/fota daemon --config /etc/fota/fota.toml"
    assert service["WatchdogSec"] == "30"
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "fota"  # /run/fota/control.sock
    assert service["StateDirectory"] == "fota"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert service["TimeoutStopSec"]
    # Installers need root and privileges: nothing may take them away.
    for key in ("User", "DynamicUser", "NoNewPrivileges", "ProtectSystem", "PrivateDevices"):
        assert key not in service, key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _seconds(value: str) -> float:
    """A systemd time span of the forms the example uses (``30``, ``30s``, ``5min``)."""
    m = re.fullmatch(r"(\d+)\s*(s|sec|min|)", value)
    assert m, f"time span {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_unit_file_restarts_forever_but_not_after_a_configuration_error() -> None:
    # Issue 17: exit 75 (another instance holds the state directory's lock) or any other
    # failure repeated quickly must never leave the unit failed for good. Before: 5 starts in
    # 10 minutes (StartLimitBurst=5), then the unit stayed down until a person reset it.
    from fota.statedir import LOCKED_EXIT

    unit = _unit_keys(UNIT.read_text())
    start = {k: v[-1] for k, v in unit["Unit"].items()}
    service = {k: v[-1] for k, v in unit["Service"].items()}
    # No start rate limit at all (absent would mean systemd's default: 5 starts in 10 s).
    assert start.get("StartLimitIntervalSec") == "0", start
    assert "StartLimitAction" not in start and "FailureAction" not in service
    for key in ("StartLimitIntervalSec", "StartLimitBurst"):
        assert key not in service, f"{key} belongs in [Unit]"
    # Every failure but a configuration error (2) is restarted: 75 and 1 are failures.
    assert service["Restart"] == "on-failure"
    assert unit["Service"]["RestartPreventExitStatus"] == ["2"]
    assert LOCKED_EXIT == 75
    assert "SuccessExitStatus" not in service, "a success is never restarted"
    assert "RestartForceExitStatus" not in service
    # Paced: a daemon failing at every start does not spin (and systemd 252 has no growing
    # delay: RestartSteps= and RestartMaxDelaySec= are 254+, unknown keys here).
    assert 10 <= _seconds(service["RestartSec"]) <= 120
    assert "RestartSteps" not in service and "RestartMaxDelaySec" not in service


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install the Debian package systemd")
    fota = Path(sys.executable).with_name("fota")
    assert fota.exists(), f"{fota}: the venv's console script (pip install -e .)"
    # verify checks that ExecStart's program exists and is executable: point it at the venv's.
    text = UNIT.read_text().replace("ExecStart=/usr/bin/fota ", f"ExecStart={fota} ")
    assert str(fota) in text
    unit = tmp_path / "fota.service"
    unit.write_text(text)

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [analyze, "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
        )

    out = verify(unit)
    # Unknown or misplaced keys are only warnings (exit status 0): any line about our unit
    # is a failure.
    ours = [line for line in out.stderr.splitlines() if "fota.service" in line]
    assert out.returncode == 0 and not ours, out.stderr

    # The check is real here: a typo in a key is reported.
    bad = tmp_path / "bad" / "fota.service"
    bad.parent.mkdir()
    bad.write_text(text.replace("WatchdogSec=30", "WatchdogSecs=30"))
    assert "WatchdogSecs" in verify(bad).stderr
