"""Issue 17's seeded chaos test: the real daemon through a few dozen faulty update cycles.

Every cycle publishes a new update and mixes, drawn from one seed, ``kill -9`` of the daemon
at random moments (mid-download, mid-install, mid-commit, idle), server restarts that forget
observers, 4.04 windows on the image, loss bursts, a full disk, wall-clock steps, a second
instance on the same state directory and a truncated journal between a kill and the restart.
After each cycle the rig checks that the daemon runs again without help, that no unverified
byte was handed to the installer or installed, that no update was installed twice, that
exactly one final report per update reached the server, and that the update completed once the
faults stopped (``tests/chaos_rig.py`` says how). ``bench/chaos.py`` runs hundreds of cycles.

A failure prints the seed, the cycle and its faults; ``python bench/chaos.py --seed SEED
--cycles N`` runs the same draws again (the timing of a run is not replayed exactly).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fota import ResultCode, State
from fota.core.manifest import TrustStore, kid_for, verify
from fota.core.policy import Policy, blockers, next_check
from fota.core.record import Record
from fota.keys import generate
from fota.testing import UpdateServer
from tests.chaos_rig import (
    KINDS,
    ChaosRig,
    draw_faults,
    final_violations,
    find_libfaketime,
    install_violations,
    is_final,
    signal_tree,
)

SEED = 20261206
CYCLES = 40


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_the_updater_survives_seeded_chaos(tmp_path: Path) -> None:
    # No skip: without root (the tmpfs) or libfaketime the rig raises, and the test fails.
    async with ChaosRig(tmp_path / "rig", SEED) as rig:
        # A line per cycle (pytest shows them with a failure or a timeout: which cycle, what).
        results = await rig.run(
            CYCLES,
            lambda r: print(
                f"cycle {r.cycle} {'FAIL' if r.violations else 'ok'} {r.seconds:.1f} s: "
                + "; ".join(r.faults),
                flush=True,
            ),
        )
        failures = [rig.replay_hint(r) for r in results if r.violations]
        assert not failures, "\n".join(failures)
        # It passed for the right reason: every fault kind happened, and kills landed.
        missing = [kind for kind in KINDS if not rig.fault_counts[kind]]
        assert not missing, f"seed {SEED} drew no {missing} in {CYCLES} cycles"
        assert sum(r.restarts for r in results) >= CYCLES // 2
        assert len(rig.final_reports()) == CYCLES + 1


# -- the rig's own parts ----------------------------------------------------------------------


def test_the_draws_repeat_with_the_seed() -> None:
    first = [draw_faults(random.Random(7), 200) for _ in range(3)]
    again = [draw_faults(random.Random(7), 200) for _ in range(3)]
    assert first == again
    other = draw_faults(random.Random(8), 200)
    assert other != first[0]
    drawn = [f for seed in range(200) for f in draw_faults(random.Random(seed), 200)]
    assert {f.kind for f in drawn} == set(KINDS)
    assert {f.moment for f in drawn} == {"publish", "requests", "hook", "after"}
    assert all(0 <= f.n < 200 for f in drawn)


def test_libfaketime_is_installed() -> None:
    """scripts/test installs it; a machine without it fails here (and in the chaos test)."""
    assert Path(find_libfaketime()).is_file()


def _install(uid: str, daemon: int, sha: str = "aa", size: int = 10) -> dict[str, Any]:
    return {
        "action": "install",
        "step": "begin",
        "update_id": uid,
        "daemon": daemon,
        "sha256": sha,
        "size": size,
    }


def test_the_install_invariants_catch_what_they_claim() -> None:
    images = {"u1": ("aa", 10), "u2": ("bb", 20)}
    versions = {"u1": "2.1.0", "u2": "2.2.0"}
    fine = [_install("u1", 100), _install("u1", 101), _install("u2", 101, "bb", 20)]
    assert install_violations(fine, images, {100}, {"u1": 2}, versions) == []
    # The installer was handed bytes that are not the signed image.
    wrong = install_violations([_install("u2", 101, "cc", 20)], images, set(), {}, versions)
    assert [v.split(":")[0] for v in wrong] == ["verified"]
    assert install_violations([_install("u9", 101)], images, set(), {}, versions)
    # Installed twice by one daemon, or by two when the first was not killed.
    twice = [_install("u1", 100), _install("u1", 100)]
    assert install_violations(twice, images, {100}, {}, versions)
    assert install_violations(fine[:2], images, set(), {}, versions)
    # Installed again after the update's final report.
    late = install_violations(fine[:2], images, {100}, {"u1": 1}, versions)
    assert late == ["one_install: 2.1.0 installed again after its final report"]


def test_the_final_report_invariant_counts_only_final_reports() -> None:
    def report(result: ResultCode, state: State = State.IDLE, uid: str = "u1") -> dict[int, Any]:
        return {2: 1, 3: state, 4: result, 5: uid}

    assert is_final(report(ResultCode.SUCCESS))
    assert is_final(report(ResultCode.INVALID_URI, State.FAILED))
    assert not is_final(report(ResultCode.INITIAL, State.DOWNLOADING))
    assert not is_final(report(ResultCode.STATE_RECOVERED))
    assert not is_final(report(ResultCode.FAILED, State.ROLLING_BACK))
    assert not is_final({2: 1, 3: State.IDLE, 4: ResultCode.SUCCESS})  # no update id
    versions = {"u1": "2.1.0"}
    one = {"u1": [report(ResultCode.SUCCESS)]}
    assert final_violations(one, versions) == []
    assert final_violations({}, versions) == ["one_final: 2.1.0 has 0 final reports []"]
    two = {"u1": [report(ResultCode.SUCCESS), report(ResultCode.SUCCESS)]}
    assert final_violations(two, versions) == [
        "one_final: 2.1.0 has 2 final reports ['SUCCESS', 'SUCCESS']"
    ]
    # A failed attempt revived (report key 10): one final report per attempt.
    revived = {**report(ResultCode.SUCCESS), 10: 1}
    failed = report(ResultCode.NOT_ENOUGH_SPACE, State.FAILED)
    assert final_violations({"u1": [failed, revived]}, versions) == []
    assert final_violations({"u1": [failed, revived, revived]}, versions) == [
        "one_final: 2.1.0 attempt 1 has 2 final reports ['SUCCESS', 'SUCCESS']"
    ]


def test_a_kill_takes_the_whole_process_tree() -> None:
    # A parent whose child ignores SIGTERM and sleeps: both must die (systemd's cgroup kill).
    code = (
        "import subprocess, sys;"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(c.pid, flush=True); c.wait()"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    tree = signal_tree(parent.pid, signal.SIGKILL)
    assert set(tree) == {parent.pid, child}
    assert parent.wait(timeout=10) == -signal.SIGKILL
    assert _ended(child, timeout=10)


def _ended(pid: int, timeout: float) -> bool:
    """Whether ``pid`` (not our child) has ended, waiting on its pidfd for at most ``timeout``.

    A SIGKILL is delivered at once but the process takes a moment to exit (a loaded
    machine): the pidfd turns readable when it has (a zombie or reaped).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# -- what the chaos run found -----------------------------------------------------------------


def test_a_wall_clock_stepped_back_before_the_first_start_holds_no_install(tmp_path: Path) -> None:
    """Found by chaos (seed 1, cycle 15): after the daemon's wall clock was stepped back past
    its first start, every install was "held by quiet period" with ``quiet_period = 0``, and
    would have stayed held for as long as the step (days for a step of days)."""
    key = generate()
    kid = kid_for(key.public_key())
    server = UpdateServer(tmp_path / "srv", key, kid)
    published = server.make_manifest(b"x" * 100, "1.0", device_class="gw")
    installed = verify(published.raw, TrustStore({kid: key.public_key()}))
    first_start = 1_800_000_000.0
    record = Record(provisioned_at=first_start)
    for quiet in (0.0, 600.0):
        policy = Policy(device_class="gw", quiet_period=quiet)
        for step_back in (5.0, 90.0, 3 * 86400.0):
            now = first_start - step_back
            assert blockers(now, "install", record, installed, policy) == ()
            assert next_check(now, record, policy, (), None) is None
    # The quiet period itself still holds, and says when it ends.
    policy = Policy(device_class="gw", quiet_period=600.0)
    now = first_start + 10
    assert blockers(now, "install", record, installed, policy) == ("quiet period",)
    assert next_check(now, record, policy, (), None) == first_start + 600.0
    assert blockers(first_start + 600.0, "install", record, installed, policy) == ()
