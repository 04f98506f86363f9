"""The RAUC adapter against the real ``rauc`` 1.8: a private bus, ``rauc service``, file slots.

Each test gets its own system (two raw file slots, a custom bootloader backend, a private
D-Bus, ``rauc service --override-boot-slot=A``); keys and bundles are made once per module.
"Rebooting" restarts the service with the slot the bootloader would boot (tests/rauc_env.py).
When the tools are missing the tests fail and name the Debian packages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fota.errors import InstallError
from fota.install import DONE, RESTART, Context, build
from fota.install.rauc import RaucInstaller, last_error, parse_progress, parse_status
from tests.installing import Progress, install_until_crash, manifest_for, write_script
from tests.rauc_env import (
    Keys,
    RaucSystem,
    make_bundle,
    make_keys,
    require_tools,
)

pytestmark = pytest.mark.timeout(120)

OLD = os.urandom(200 * 1024)
NEW = os.urandom(300 * 1024)


@dataclass(frozen=True)
class Bundles:
    keys: Keys
    new: Path
    wrong_compatible: Path
    tampered: Path
    rogue: Path
    verity: Path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    require_tools()
    root = tmp_path_factory.mktemp("rauc-bundles")
    keys = make_keys(root / "keys")
    new = make_bundle(root, keys, "new", NEW, "2.0")
    tampered = root / "tampered.raucb"
    data = bytearray(new.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF  # inside the squashfs image: the CMS digest no longer matches
    tampered.write_bytes(bytes(data))
    return Bundles(
        keys,
        new,
        make_bundle(root, keys, "wrongcompat", NEW, "2.0", compatible="other-board"),
        tampered,
        make_bundle(root, keys, "rogue", NEW, "2.0", rogue=True),
        make_bundle(root, keys, "verity", NEW, "2.0", fmt="verity"),
    )


@pytest.fixture
def system(tmp_path: Path, bundles: Bundles) -> Iterator[RaucSystem]:
    rauc = RaucSystem(tmp_path / "sys", bundles.keys, OLD)
    rauc.start()
    try:
        yield rauc
    finally:
        rauc.stop()


def installer_table(system: RaucSystem, **kw: object) -> dict[str, object]:
    return {"kind": "rauc", "env": dict(system.env), "timeout": 60, **kw}


def installer(tmp_path: Path, system: RaucSystem, **kw: object) -> RaucInstaller:
    table = installer_table(system, **kw)
    inst = build("installers.firmware", table, Context(tmp_path / "state", 30.0))
    assert isinstance(inst, RaucInstaller)
    return inst


def candidate(tmp_path: Path, bundle: Path) -> Path:
    """The verified candidate as the engine keeps it: no ``.raucb`` suffix."""
    path = tmp_path / "candidate"
    path.write_bytes(bundle.read_bytes())
    return path


def state(inst: RaucInstaller) -> dict[str, object] | None:
    return json.loads(inst.state_path.read_text()) if inst.state_path.exists() else None


def test_the_rauc_tools_are_installed() -> None:
    require_tools()


# -- install, boot, commit ---------------------------------------------------------------------


async def test_install_writes_the_other_slot_boots_it_and_commits(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    progress = Progress()
    assert await inst.install(cand, m, progress) == RESTART
    assert system.slot("B")[: len(NEW)] == NEW
    assert system.slot("A")[: len(OLD)] == OLD
    values = progress.values
    assert values == sorted(set(values)) and values[-1] == 100 and len(values) > 3
    assert state(inst) == {
        "update_id": m.update_id,
        "version": "2.0",
        "source": "rootfs.0",
        "source_boot": "A",
        "target": "rootfs.1",
        "target_boot": "B",
    }
    status = system.status()
    assert status["boot_primary"] == "rootfs.1" and system.primary == "B"
    assert status["slots"]["rootfs.1"]["slot_status"]["installed"]["count"] == 1
    assert not await inst.booted(m)  # not restarted yet

    # Run again (a crash before the engine journaled the restart): nothing is installed again.
    again = Progress()
    assert await inst.install(cand, m, again) == RESTART and again.values == [100]
    assert system.status()["slots"]["rootfs.1"]["slot_status"]["installed"]["count"] == 1

    system.reboot()
    assert system.booted == "B"
    assert await inst.booted(m)
    # Run again after the restart: the new slot runs; installing again would overwrite A.
    assert await inst.install(cand, m, Progress()) == DONE
    assert system.slot("A")[: len(OLD)] == OLD

    await inst.commit(m)
    status = system.status()
    assert status["booted"] == "B" and status["boot_primary"] == "rootfs.1"
    assert status["slots"]["rootfs.1"]["boot_status"] == "good"
    assert system.boot_state("B") == "good"
    assert state(inst) is None
    await inst.commit(m)  # idempotent
    assert "set-state B good" in (system.boot_dir / "calls").read_text()


@pytest.mark.parametrize("restarted", [False, True])
async def test_a_crash_right_after_rauc_install(
    tmp_path: Path, system: RaucSystem, bundles: Bundles, restarted: bool
) -> None:
    table = installer_table(system)
    state_dir = tmp_path / "state"
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    install_until_crash(table, state_dir, cand, m, "rauc:installed")
    inst = installer(tmp_path, system)
    assert (state(inst) or {}).get("target") is None  # killed before the target was recorded
    assert system.primary == "B"
    if restarted:  # the power cut restarted the device into the new slot
        system.reboot()
        assert await inst.install(cand, m, Progress()) == DONE
        assert system.slot("A")[: len(OLD)] == OLD  # A was not written again
    else:  # fota restarted alone: installing B again is harmless
        assert await inst.install(cand, m, Progress()) == RESTART
        count = system.status()["slots"]["rootfs.1"]["slot_status"]["installed"]["count"]
        assert count == 2
    assert (state(inst) or {})["target_boot"] == "B"
    assert await inst.booted(m) == restarted


async def test_a_crash_during_rauc_install_installs_again(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    inst.dir.mkdir(parents=True)
    inst.state_path.write_text(
        json.dumps(
            {"update_id": m.update_id, "version": "2.0", "source": "rootfs.0", "source_boot": "A"}
        )
    )
    assert await inst.install(cand, m, Progress()) == RESTART
    assert system.slot("B")[: len(NEW)] == NEW and system.primary == "B"


# -- rollback ----------------------------------------------------------------------------------


async def test_rollback_before_the_restart_makes_the_old_slot_primary_again(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    await inst.install(cand, m, Progress())
    assert system.primary == "B"
    assert await inst.rollback(m) == DONE
    assert system.status()["boot_primary"] == "rootfs.0" and system.primary == "A"
    assert state(inst) is None
    assert await inst.rollback(m) == DONE  # idempotent
    system.reboot()
    assert system.booted == "A" and system.slot("A")[: len(OLD)] == OLD


async def test_rollback_after_a_fallback_of_the_bootloader_needs_no_restart(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    await inst.install(cand, m, Progress())
    system.reboot(boots=False)  # B did not start: the bootloader fell back to A
    assert not await inst.booted(m)
    assert await inst.rollback(m) == DONE
    assert system.primary == "A" and state(inst) is None


async def test_rollback_from_the_new_slot_restarts_into_the_old_one(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    await inst.install(cand, m, Progress())
    system.reboot()
    assert await inst.booted(m)
    # The self-test failed on B: mark it bad, make A primary; A runs after a restart.
    assert await inst.rollback(m) == RESTART
    status = system.status()
    assert status["boot_primary"] == "rootfs.0"
    assert status["slots"]["rootfs.1"]["boot_status"] == "bad" and system.boot_state("B") == "bad"
    assert await inst.rollback(m) == RESTART  # run again before the restart: the same
    system.reboot()
    assert system.booted == "A" and system.slot("A")[: len(OLD)] == OLD
    assert not await inst.booted(m)
    assert await inst.rollback(m) == DONE
    assert state(inst) is None and system.primary == "A"


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("tampered", r"rauc install: exit status 1: signature verification failed: .*CMS"),
        ("rogue", r"rauc install: exit status 1: signature verification failed: Verify error"),
        (
            "wrong_compatible",
            r"exit status 1: Installation error: Compatible mismatch: "
            r"Expected 'test-board' but bundle manifest has 'other-board'",
        ),
    ],
)
async def test_a_bundle_that_rauc_refuses_is_an_install_error_with_its_last_error(
    tmp_path: Path, system: RaucSystem, bundles: Bundles, which: str, message: str
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, getattr(bundles, which))
    m = manifest_for(cand.read_bytes(), "2.0")
    with pytest.raises(InstallError, match=message):
        await inst.install(cand, m, Progress())
    assert system.slot("B") == b"\0" * system.slot_size and system.primary == "A"
    assert await inst.rollback(m) == DONE
    assert system.primary == "A" and state(inst) is None


async def test_a_verity_bundle_needs_device_mapper(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system)
    cand = candidate(tmp_path, bundles.verity)
    m = manifest_for(cand.read_bytes(), "2.0")
    if Path("/dev/mapper/control").exists():  # a kernel with device-mapper: it just works
        assert await inst.install(cand, m, Progress()) == RESTART
        return
    with pytest.raises(
        InstallError, match=r"Failed mounting bundle: Failed to open /dev/mapper/control"
    ):
        await inst.install(cand, m, Progress())
    assert system.primary == "A"


async def test_without_the_rauc_service_nothing_is_recorded(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    inst = installer(tmp_path, system, env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"})
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    with pytest.raises(InstallError, match=r"rauc status: exit status 1 \(.*Could not connect"):
        await inst.install(cand, m, Progress())
    assert state(inst) is None
    assert await inst.rollback(m) == DONE


async def test_a_busy_service_is_waited_for(
    tmp_path: Path, system: RaucSystem, bundles: Bundles
) -> None:
    # The first call answers as rauc does while another install runs, then the real rauc does.
    flag = tmp_path / "busy-once"
    wrapper = write_script(
        tmp_path / "rauc-busy",
        f'if [ ! -e {flag} ]; then touch {flag}; echo "Failed GDBus.Error:org.gtk.GDBus.'
        "UnmappedGError.Quark._g_2dio_2derror_2dquark.Code30: Already processing a different "
        'method" >&2; exit 2; fi\nexec rauc "$@"\n',
    )
    inst = installer(tmp_path, system, rauc=[str(wrapper)])
    cand = candidate(tmp_path, bundles.new)
    m = manifest_for(cand.read_bytes(), "2.0")
    assert await inst.install(cand, m, Progress()) == RESTART
    assert flag.exists() and system.primary == "B"


# -- output parsing (the exact lines FINDINGS recorded) ----------------------------------------


def test_progress_and_last_error_lines() -> None:
    assert parse_progress("  0% Installing") == 0
    assert parse_progress(" 40% Verifying signature done.") == 40
    assert parse_progress("100% Installing done.") == 100
    assert parse_progress("installing") is None
    assert parse_progress("Installing `/x.raucb` succeeded") is None
    lines = [
        "100% Installing failed.",
        "LastError: Bootname or device of booted slot not found",
        "idle",
        "Installing `/tmp/b.raucb` failed",
    ]
    assert last_error(lines) == "Bootname or device of booted slot not found"
    assert last_error(["Installing `/tmp/b.raucb` failed"]) is None


def test_status_json_is_read_with_noise_around_it() -> None:
    compact = (
        '{"compatible":"test-board","variant":"","booted":"A","boot_primary":"rootfs.1",'
        '"slots":[{"rootfs.1":{"class":"rootfs","device":"/x/slotB.img","type":"raw",'
        '"bootname":"B","state":"inactive","parent":null,"mountpoint":null,"boot_status":"good",'
        '"slot_status":{"bundle":{"compatible":"test-board","version":"1.2.3"}}}},'
        '{"rootfs.0":{"class":"rootfs","device":"/x/slotA.img","type":"raw","bootname":"A",'
        '"state":"booted","parent":null,"mountpoint":null,"boot_status":"good",'
        '"slot_status":{"bundle":{"compatible":null}}}}]}'
    )
    pretty = json.dumps(json.loads(compact), indent=2).splitlines()
    noise = ["rauc-WARNING **: 20:25:15.123: Failed getting primary slot: ..."]
    for lines in ([compact], noise + pretty + ["rauc-Message: done"]):
        status = parse_status(lines)
        assert status.booted == "A" and status.primary == "rootfs.1"
        assert [s.name for s in status.slots] == ["rootfs.1", "rootfs.0"]
        booted = status.booted_slot()
        assert booted is not None and booted.name == "rootfs.0"
        assert status.slots[0].version == "1.2.3" and status.slots[1].version is None
    with pytest.raises(ValueError):
        parse_status(["Error retrieving slot status via D-Bus: ..."])
