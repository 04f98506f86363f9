"""The fleet simulation: 20 devices through the real command, and its clean shutdown.

The large run (200 devices) is a benchmark (bench/fleet.py, docs/benchmarks.md), not a test.
Nothing here asserts on a duration: a loaded CI machine makes every round slower, not wrong.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from fota.testing.fleet import (
    AUTHORIZE_ALL,
    Mix,
    cpu_seconds,
    device_names,
    percentile,
    plan_for,
    udp_rcvbuf_errors,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DEVICES = 20
SEED = 1
"""With the default mix this seed gives rejections at both steps and deferrals (checked below)."""
SIZE = 16 * 1024


def fleet_argv(tmp_path: Path, *extra: str, devices: int = DEVICES) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fota",  # the one command: fota fleet
        "fleet",
        "--devices",
        str(devices),
        "--size",
        str(SIZE),
        "--seed",
        str(SEED),
        "--workers",
        "2",
        "--work-dir",
        str(tmp_path / "fleet"),
        *extra,
    ]


# -- the plan, without processes ----------------------------------------------------------


def test_plans_depend_only_on_seed_device_and_version() -> None:
    mix = Mix()
    assert plan_for(SEED, "dev0001", "2.0", mix) == plan_for(SEED, "dev0001", "2.0", mix)
    plans = [plan_for(SEED, d, "2.0", mix) for d in device_names(200)]
    assert plans != [plan_for(SEED + 1, d, "2.0", mix) for d in device_names(200)]
    for plan in plans:
        for step in (plan.download, plan.install):
            assert len(step.defers) <= mix.max_defers
            assert all(mix.defer_min <= d <= mix.defer_max for d in step.defers)
    # The mix shows in a large fleet: about 5 % reject per step, about 30 % defer per draw.
    assert 0 < sum(p.download.reject for p in plans) < 40
    assert 20 < sum(bool(p.download.defers) for p in plans) < 120


def test_authorize_all_never_defers_or_rejects() -> None:
    for device in device_names(50):
        plan = plan_for(SEED, device, "1.0", AUTHORIZE_ALL)
        assert plan.downloads and not plan.rejects and plan.deferrals == 0


@pytest.mark.parametrize(
    "kw", [{"defer": 0.9, "reject": 0.2}, {"reject": -0.1}, {"defer_min": 3.0}, {"max_defers": -1}]
)
def test_a_bad_mix_is_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="mix"):
        Mix(**kw)


def test_percentile_is_nearest_rank_and_cpu_is_read_from_proc() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([1.0, 9.0], 1.0) == 9.0
    sum(i * i for i in range(200_000))  # some CPU of our own to see
    assert cpu_seconds(os.getpid()) > 0
    drops = udp_rcvbuf_errors()
    assert drops is None or drops >= 0


# -- 20 devices through the command ------------------------------------------------------


def test_fleet_of_20_devices(tmp_path: Path) -> None:
    proc = subprocess.run(
        fleet_argv(tmp_path, "--json"), capture_output=True, text=True, check=False, timeout=280
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    devices = device_names(DEVICES)
    plans = {d: plan_for(SEED, d, "2.0", Mix()) for d in devices}
    rejecting = {d for d, p in plans.items() if p.rejects}
    # The seed exercises every kind of answer (else this test would prove less than it says).
    assert any(p.download.reject for p in plans.values())
    assert any(p.install.reject and p.downloads for p in plans.values())
    assert any(p.deferrals for p in plans.values())

    first, polite = out["rounds"]
    assert (first["name"], polite["name"]) == ("first install", "polite")
    assert out["devices"] == DEVICES == first["devices"]
    assert out["completed"] + out["rejected"] + out["errors"] == DEVICES
    assert out["errors"] == 0, out["error_devices"]

    # First install: an empty device installs at once; nobody is asked.
    assert first["completed"] == DEVICES and first["rejected"] == 0
    assert first["asks"] == {"download": 0, "install": 0}
    assert first["deferrals"] == 0

    # Polite round: exactly the planned devices rejected, and reported REJECTED (the judge
    # counts a device as rejected only when its final report was REJECTED and its target still
    # holds 1.0); every other one reported SUCCESS and holds 2.0's digest.
    outcomes = out["outcomes"]
    assert {d for d, o in outcomes.items() if o == "rejected"} == rejecting
    assert {d for d, o in outcomes.items() if o == "completed"} == set(devices) - rejecting
    assert out["rejected"] == len(rejecting)
    assert out["digests_verified"] == DEVICES
    assert out["error_reports"] == 0

    # The handlers were asked as planned, and every deferral was reported.
    assert out["asks"]["download"] == sum(len(p.download.defers) + 1 for p in plans.values())
    assert out["asks"]["install"] == sum(
        len(p.install.defers) + 1 for p in plans.values() if p.downloads
    )
    assert out["deferrals"] == sum(p.deferrals for p in plans.values())
    assert out["deferred_devices"] == sum(1 for p in plans.values() if p.deferrals)

    # Reports: each counted once; what the devices created is what the server recorded, and a
    # duplicate can only come from a delivery the device saw fail.
    for r in (first, polite):
        assert r["reports_consistent"], r
        assert r["reports_received"] == r["reports_sent"] > 0
        assert r["duplicate_reports"] <= r["report_failures"]
        assert r["report_posts"] == r["reports_received"] + r["duplicate_reports"]

    # Requests: at least one per block per downloading device; retries are the rest.
    blocks = polite["image_blocks"]
    assert blocks == SIZE // 1024
    assert out["downloads_expected"] == sum(1 for p in plans.values() if p.downloads)
    assert out["image_requests"] == blocks * out["downloads_expected"] + out["image_retries"]
    assert out["retries"]["image_requests"] == out["image_retries"]
    assert out["retries"]["duplicate_reports"] == out["duplicate_reports"]
    assert out["download_attempts"] >= out["downloads_expected"]
    assert first["image_requests"] >= blocks * DEVICES

    # Times and CPU: present and positive (never compared with a bound).
    assert out["server_cpu"] > 0 and out["devices_cpu"] > 0
    assert out["total_server_cpu"] >= out["server_cpu"] + first["server_cpu"] - 0.05
    assert 0 < out["completion_p50"] <= out["completion_p95"] <= out["completion_max"]
    assert out["completion_max"] <= out["wall"]


def test_the_table_names_every_round(tmp_path: Path) -> None:
    proc = subprocess.run(
        fleet_argv(tmp_path, "--defer", "0", "--reject", "0", devices=4),
        capture_output=True,
        text=True,
        check=False,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "first install" in proc.stdout and "polite" in proc.stdout
    assert "digests verified" in proc.stdout and "4/4" in proc.stdout
    assert "server CPU" in proc.stdout


def test_a_used_work_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "devices").mkdir()  # a previous run's devices would resume
    proc = subprocess.run(
        fleet_argv(tmp_path, devices=2), capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr


# -- clean shutdown -----------------------------------------------------------------------


@contextmanager
def running_fleet(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    """The fleet command in a session of its own, once its polite round was published.

    Yields the process and its children's pids (from its progress lines on stderr).
    """
    proc = subprocess.Popen(
        fleet_argv(tmp_path, "--json", devices=6),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        children = read_until(proc.stderr, "polite: published")
        yield proc, children
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_until(stream: IO[str], marker: str) -> dict[str, int]:
    children: dict[str, int] = {}
    for line in stream:
        words = line.split()
        if len(words) >= 4 and words[2] == "pid":  # "fleet: worker0 pid 1234 ..."
            children[words[1]] = int(words[3])
        if marker in line:
            return children
    raise AssertionError(f"the fleet ended before {marker!r}")


def pidfds(pids: dict[str, int]) -> dict[str, int]:
    return {name: os.pidfd_open(pid) for name, pid in pids.items()}


def assert_all_exit(fds: dict[str, int], bound: float = 60.0) -> None:
    """Each child ends (its pidfd becomes readable), within a generous bound."""
    try:
        left = dict(fds)
        while left:
            ready, _, _ = select.select(list(left.values()), [], [], bound)
            assert ready, f"still running: {sorted(left)}"
            left = {name: fd for name, fd in left.items() if fd not in ready}
    finally:
        for fd in fds.values():
            os.close(fd)


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as (proc, children):
        assert set(children) == {"server", "worker0", "worker1"}
        fds = pidfds(children)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the foreground group
        assert proc.wait(timeout=120) == 130
        assert_all_exit(fds, bound=0.5)  # the coordinator waited for them before exiting


def test_children_end_when_the_coordinator_is_killed(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as (proc, children):
        fds = pidfds(children)
        proc.kill()
        proc.wait()
        assert_all_exit(fds)


def test_a_dead_worker_fails_the_run_and_stops_the_rest(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as (proc, children):
        fds = pidfds(children)
        os.kill(children["worker1"], signal.SIGKILL)
        assert proc.wait(timeout=120) == 2
        assert proc.stderr is not None
        assert "worker1 exited" in proc.stderr.read()
        assert_all_exit(fds, bound=0.5)
