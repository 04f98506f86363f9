"""The SWUpdate adapter against the real ``swupdate -i`` (Debian 12 build, signed images).

Every image is a CMS-signed ``.swu`` made in the test's directory whose ``rawfile`` handler
writes ``<tmp>/target/app.bin``. The output classification is unit-tested on the exact lines
that /tmp/tools/FINDINGS.md recorded. When the tools are missing the tests fail and name the
Debian packages.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from fota.errors import ConfigError, InstallError
from fota.install import DONE, RESTART, Context, build
from fota.install.swupdate import SwupdateInstaller, classify, error_text
from tests.installing import Progress, install_until_crash, manifest_for, write_script
from tests.swupdate_env import Keys, make_keys, make_swu, require_tools

pytestmark = pytest.mark.timeout(120)

OLD = b"old app " * 1000
NEW = os.urandom(64 * 1024)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    require_tools()
    return make_keys(tmp_path_factory.mktemp("swu-keys"))


def target(tmp_path: Path, old: bytes | None = OLD) -> Path:
    path = tmp_path / "target" / "app.bin"
    path.parent.mkdir(exist_ok=True)
    if old is not None:
        path.write_bytes(old)
        path.chmod(0o640)
    return path


def installer(tmp_path: Path, keys: Keys, tgt: Path, **kw: object) -> SwupdateInstaller:
    table = {"kind": "swupdate", "args": keys.args(), "backup": [str(tgt)], "timeout": 60, **kw}
    inst = build("installers.firmware", table, Context(tmp_path / "state", 30.0))
    assert isinstance(inst, SwupdateInstaller)
    return inst


def test_the_swupdate_tools_are_installed() -> None:
    require_tools()


# -- single copy: install, rollback, commit ----------------------------------------------------


async def test_install_writes_the_target_and_rollback_restores_the_previous_file(
    tmp_path: Path, keys: Keys
) -> None:
    tgt = target(tmp_path)
    inst = installer(tmp_path, keys, tgt)
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    m = manifest_for(swu.read_bytes(), "2.0")
    progress = Progress()
    assert await inst.install(swu, m, progress) == DONE
    assert tgt.read_bytes() == NEW and progress.values == [100]
    assert await inst.booted(m)
    assert (inst.backup_dir / "0").read_bytes() == OLD
    assert json.loads(inst.state_path.read_text())["installed"] is True

    # Run again (a crash before the engine journaled it): swupdate does not run again, and the
    # backup is still the previous file.
    tgt.write_bytes(b"changed by someone")
    assert await inst.install(swu, m, Progress()) == DONE
    assert tgt.read_bytes() == b"changed by someone"
    assert (inst.backup_dir / "0").read_bytes() == OLD

    assert await inst.rollback(m) == DONE
    assert tgt.read_bytes() == OLD and stat.S_IMODE(tgt.stat().st_mode) == 0o640
    assert not inst.state_path.exists() and not inst.backup_dir.exists()
    assert await inst.rollback(m) == DONE  # idempotent
    assert tgt.read_bytes() == OLD
    assert sorted(p.name for p in tgt.parent.iterdir()) == ["app.bin"]


async def test_a_crash_right_after_swupdate_runs_it_again_and_keeps_the_first_backup(
    tmp_path: Path, keys: Keys
) -> None:
    tgt = target(tmp_path)
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    m = manifest_for(swu.read_bytes(), "2.0")
    table = {"kind": "swupdate", "args": keys.args(), "backup": [str(tgt)], "timeout": 60}
    install_until_crash(table, tmp_path / "state", swu, m, "swupdate:installed")
    inst = installer(tmp_path, keys, tgt)
    assert tgt.read_bytes() == NEW
    assert json.loads(inst.state_path.read_text())["installed"] is False
    assert await inst.install(swu, m, Progress()) == DONE  # swupdate runs again
    assert tgt.read_bytes() == NEW and (inst.backup_dir / "0").read_bytes() == OLD
    assert json.loads(inst.state_path.read_text())["installed"] is True
    assert await inst.rollback(m) == DONE
    assert tgt.read_bytes() == OLD


async def test_rollback_of_a_first_install_removes_the_new_file(tmp_path: Path, keys: Keys) -> None:
    tgt = target(tmp_path, old=None)
    inst = installer(tmp_path, keys, tgt)
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    m = manifest_for(swu.read_bytes(), "1.0")
    assert await inst.install(swu, m, Progress()) == DONE
    assert tgt.read_bytes() == NEW and (inst.backup_dir / "0.absent").exists()
    assert stat.S_IMODE(tgt.stat().st_mode) == 0o600  # what rawfile creates
    assert await inst.rollback(m) == DONE
    assert not tgt.exists() and not inst.state_path.exists()
    assert await inst.rollback(m) == DONE


async def test_commit_runs_the_commit_command_and_drops_the_backups(
    tmp_path: Path, keys: Keys
) -> None:
    tgt = target(tmp_path)
    log = tmp_path / "commits"
    inst = installer(
        tmp_path, keys, tgt, commit_command=["sh", "-c", f'echo "$FOTA_VERSION" >> {log}']
    )
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    m = manifest_for(swu.read_bytes(), "2.0")
    await inst.install(swu, m, Progress())
    await inst.commit(m)
    await inst.commit(m)  # idempotent: done, nothing runs again
    assert log.read_text() == "2.0\n"
    assert tgt.read_bytes() == NEW and not inst.backup_dir.exists()
    assert not inst.state_path.exists()
    assert await inst.rollback(m) == DONE  # nothing left to undo
    assert tgt.read_bytes() == NEW


async def test_two_installs_in_a_row_and_two_at_once_work(tmp_path: Path, keys: Keys) -> None:
    tgt = target(tmp_path)
    inst = installer(tmp_path, keys, tgt)
    for n, version in enumerate(("2.0", "3.0"), start=3):
        payload = os.urandom(32 * 1024)
        swu = make_swu(tmp_path / f"{version}.swu", keys, payload, tgt, version=version)
        m = manifest_for(swu.read_bytes(), version, sequence=n)
        assert await inst.install(swu, m, Progress()) == DONE
        assert tgt.read_bytes() == payload
        await inst.commit(m)

    # Two runs at the same time (a shared TMPDIR corrupts both): each has its own TMPDIR.
    base = Path(tempfile.mkdtemp(prefix="swu-", dir="/tmp"))  # short: sockets go there
    runs = []
    for name in ("x", "y"):
        root = tmp_path / name
        root.mkdir()
        t = target(root)
        payload = os.urandom(2 << 20)
        swu = make_swu(root / "new.swu", keys, payload, t)
        inst = installer(root, keys, t, tmpdir=str(base))
        runs.append((inst, swu, manifest_for(swu.read_bytes(), "2.0"), t, payload))
    try:
        await asyncio.gather(*(i.install(s, m, Progress()) for i, s, m, _, _ in runs))
        for *_, t, payload in runs:
            assert t.read_bytes() == payload
        assert not list(base.iterdir())  # every private TMPDIR is gone
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- refused images ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "bad-sha",
            r"swupdate -i: exit status 1: HASH mismatch : 1{64} <--> [0-9a-f]{64} "
            r"\(Image invalid or corrupted\. Not installing \.\.\.\)",
        ),
        ("unsigned", r"exit status 1: Image invalid or corrupted\. Not installing \.\.\."),
        ("untrusted", r"exit status 1: Authentication of all signatures failed"),
        ("tampered", r"exit status 1: Signature verification failed"),
    ],
)
async def test_an_image_swupdate_refuses_is_an_install_error_and_the_target_is_untouched(
    tmp_path: Path, keys: Keys, kind: str, message: str
) -> None:
    tgt = target(tmp_path)
    inst = installer(tmp_path, keys, tgt)
    swu = make_swu(
        tmp_path / "bad.swu",
        keys,
        NEW,
        tgt,
        sha256="1" * 64 if kind == "bad-sha" else None,
        signed=kind != "unsigned",
        untrusted=kind == "untrusted",
        tamper=kind == "tampered",
    )
    m = manifest_for(swu.read_bytes(), "2.0")
    with pytest.raises(InstallError, match=message):
        await inst.install(swu, m, Progress())
    assert tgt.read_bytes() == OLD
    assert await inst.rollback(m) == DONE
    assert tgt.read_bytes() == OLD and not inst.state_path.exists()


async def test_without_a_public_key_the_debian_build_refuses_to_run(
    tmp_path: Path, keys: Keys
) -> None:
    tgt = target(tmp_path)
    inst = installer(tmp_path, keys, tgt, args=["-H", "testboard:1.0"])
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    with pytest.raises(InstallError, match=r"built for signed images, provide a public key file"):
        await inst.install(swu, manifest_for(swu.read_bytes(), "2.0"), Progress())
    assert tgt.read_bytes() == OLD


async def test_status_1_after_a_successful_run_counts_as_success(
    tmp_path: Path, keys: Keys
) -> None:
    # The exit race, made certain: the real swupdate runs, then its status 0 becomes 1.
    wrapper = write_script(
        tmp_path / "swupdate-rc1", 'rc=0; swupdate "$@" || rc=$?\n[ $rc = 0 ] && exit 1\nexit $rc\n'
    )
    tgt = target(tmp_path)
    inst = installer(tmp_path, keys, tgt, swupdate=[str(wrapper)])
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    assert await inst.install(swu, manifest_for(swu.read_bytes(), "2.0"), Progress()) == DONE
    assert tgt.read_bytes() == NEW
    bad = make_swu(tmp_path / "bad.swu", keys, NEW, tgt, sha256="1" * 64)
    with pytest.raises(InstallError, match="HASH mismatch"):
        await installer(tmp_path / "b", keys, tgt, swupdate=[str(wrapper)]).install(
            bad, manifest_for(bad.read_bytes(), "2.1"), Progress()
        )


# -- dual copy (restart = true) ----------------------------------------------------------------


async def test_dual_copy_asks_for_a_restart_and_rolls_back_through_the_commands(
    tmp_path: Path, keys: Keys
) -> None:
    runs_new = tmp_path / "new-runs"  # stands for "the bootloader booted the new copy"
    calls = tmp_path / "calls"
    tgt = target(tmp_path)
    inst = installer(
        tmp_path,
        keys,
        tgt,
        backup=[],
        restart=True,
        booted_command=["test", "-e", str(runs_new)],
        rollback_command=["sh", "-c", f'echo "rollback $FOTA_VERSION" >> {calls}'],
    )
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    m = manifest_for(swu.read_bytes(), "2.0")
    assert await inst.install(swu, m, Progress()) == RESTART
    assert tgt.read_bytes() == NEW
    assert not await inst.booted(m)
    assert await inst.install(swu, m, Progress()) == RESTART  # again: swupdate does not run
    runs_new.touch()  # restart into the new copy
    assert await inst.booted(m)
    assert await inst.install(swu, m, Progress()) == DONE  # again after the restart
    assert await inst.rollback(m) == RESTART  # the new copy still runs
    assert await inst.rollback(m) == RESTART
    runs_new.unlink()  # restart into the previous copy
    assert await inst.rollback(m) == DONE
    assert calls.read_text() == "rollback 2.0\n" * 3
    assert not inst.state_path.exists()


async def test_dual_copy_without_a_rollback_command_cannot_leave_the_new_copy(
    tmp_path: Path, keys: Keys
) -> None:
    tgt = target(tmp_path)
    inst = installer(tmp_path, keys, tgt, backup=[], restart=True, booted_command=["true"])
    swu = make_swu(tmp_path / "new.swu", keys, NEW, tgt)
    m = manifest_for(swu.read_bytes(), "2.0")
    assert await inst.install(swu, m, Progress()) == RESTART
    # booted_command "true": after the restart the new copy runs
    with pytest.raises(InstallError, match="no rollback_command is configured"):
        await inst.rollback(m)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"restart": True}, r"booted_command is needed with restart = true"),
        ({"backup": ["relative/app.bin"]}, r"installers.x.backup: expected absolute paths"),
        ({"backup": ["/a", "/a"]}, r"a path is named twice"),
        ({"args": "-k key.pem"}, r"installers.x.args: expected a list of strings"),
        ({"tmpdir": "/" + "t" * 100}, r"too long for swupdate's IPC socket paths"),
        ({"retries": 3}, r"installers.x: unknown key 'retries'"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("installers.x", {"kind": "swupdate", **extra}, Context(tmp_path, 30.0))


# -- output classification (the exact lines of FINDINGS) ---------------------------------------

BANNER = [
    "SWUpdate v",
    "",
    "Licensed under GPLv2. See source distribution for detailed copyright notices.",
    "",
]
SUCCESS = [
    *BANNER,
    "[INFO ] : SWUPDATE started :  Software Update started !",
    "[INFO ] : SWUPDATE running :  Installation in progress",
    "[INFO ] : SWUPDATE successful ! SWUPDATE successful !",
    "[INFO ] : No SWUPDATE running :  Waiting for requests...",
]
HASH = (
    "HASH mismatch : 1111111111111111111111111111111111111111111111111111111111111111 <--> "
    "15dd5e38a9d9ddbb3b3b1b1eb1a3a0e4c9b1a5dbf1d1d3a77c4a2cb1b2c3d4e5"
)
BAD_SHA = [
    *BANNER,
    "[INFO ] : SWUPDATE started :  Software Update started !",
    f"[ERROR] : SWUPDATE failed [0] ERROR : {HASH}",
    "[ERROR] : SWUPDATE failed [1] Image invalid or corrupted. Not installing ...",
    "[INFO ] : No SWUPDATE running :  Waiting for requests...",
]  # the final "[ERROR] : SWUPDATE failed [0] ERROR : SWUpdate *failed* !" is sometimes missing


def test_classification_of_swupdate_output() -> None:
    assert classify(0, SUCCESS).ok and not classify(0, SUCCESS).quirk
    race = classify(1, SUCCESS)  # the exit race: status 1, the run succeeded
    assert race.ok and race.quirk
    verbose = [*SUCCESS, "[TRACE] : SWUPDATE running :  [endupdate] : SWUpdate was successful !"]
    assert classify(1, verbose).ok

    failed = classify(1, BAD_SHA)
    assert not failed.ok
    assert failed.message == (
        f"exit status 1: {HASH} (Image invalid or corrupted. Not installing ...)"
    )
    with_final = [*BAD_SHA, "[ERROR] : SWUPDATE failed [0] ERROR : SWUpdate *failed* !"]
    assert classify(1, with_final).message == failed.message
    # success and error lines together: not trusted
    assert not classify(1, [*SUCCESS, "[ERROR] : SWUPDATE failed [0] ERROR : x"]).ok
    # status 1, neither line (the output was not flushed): a failure
    assert not classify(1, [*BANNER, "[INFO ] : SWUPDATE started :  Software Update started !"]).ok
    no_key = ["Error: SWUpdate is built for signed images, provide a public key file."]
    assert classify(1, no_key).message == f"exit status 1: {no_key[0]}"
    assert classify(-9, SUCCESS).message.startswith("killed by signal 9")
    # the timeout fired while a leftover child held the output; swupdate itself had exited
    assert classify(1, SUCCESS, timed_out=True).ok
    assert not classify(-9, SUCCESS, timed_out=True).ok

    assert error_text("[ERROR] : SWUPDATE failed [0] ERROR : Signature verification failed") == (
        "Signature verification failed"
    )
    assert error_text("[INFO ] : SWUPDATE started :  Software Update started !") is None
