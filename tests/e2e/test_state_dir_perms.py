"""Issue 16 §6: the state directory is fota's own (0700, its uid) or fota does not start.

Real directories, a real Client, ``fota run`` and ``fota daemon`` as real subprocesses; the
other user's part (owning the directory, planting an entry) is uid 65534 (nobody), done by
``os.chown`` or by a child that runs as nobody. Tests run as root (the daemon does).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fota import Client, State, keys
from fota.errors import ConfigError, StateDirError
from fota.statedir import secure_state_dir
from fota.testing import UpdateServer
from tests.conftest import DEVICE_CLASS, Signing, make_config
from tests.control_rig import short_dir

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="another user's directory needs root"),
]

NOBODY = 65534
BOUND = 20.0


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def as_nobody(*argv: str) -> None:
    """Run ``argv`` as the unprivileged user nobody (the attacker's part)."""
    subprocess.run(argv, user=NOBODY, group=NOBODY, extra_groups=[], check=True, timeout=BOUND)


async def test_a_missing_state_dir_is_created_0700(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    config = make_config(tmp_path, server, signing)
    assert not config.state_dir.exists()
    async with Client(config) as client:
        assert client.state is State.IDLE
    assert mode_of(config.state_dir) == 0o700 and config.state_dir.stat().st_uid == 0


@pytest.mark.parametrize("loose", [0o755, 0o770, 0o777, 0o1777])
async def test_a_loose_state_dir_of_ours_is_tightened_to_0700(
    tmp_path: Path, server: UpdateServer, signing: Signing, loose: int
) -> None:
    config = make_config(tmp_path, server, signing)
    config.state_dir.mkdir(parents=True)
    config.state_dir.chmod(loose)
    (config.state_dir / "keep.txt").write_text("root's own file stays")
    async with Client(config) as client:
        assert client.state is State.IDLE
    assert mode_of(config.state_dir) == 0o700  # old code: left as it was
    assert (config.state_dir / "keep.txt").read_text() == "root's own file stays"


async def test_after_tightening_another_user_cannot_write_there(tmp_path: Path) -> None:
    with short_dir("fstate-") as top:
        state = top / "state"
        state.mkdir(mode=0o777)
        state.chmod(0o777)
        as_nobody("touch", str(state / "before"))  # open to everyone: nobody can write
        (state / "before").unlink()
        secure_state_dir(state)
        assert mode_of(state) == 0o700
        with pytest.raises(subprocess.CalledProcessError):
            as_nobody("touch", str(state / "after"))
        assert not (state / "after").exists()


async def test_a_state_dir_another_user_owns_is_refused_by_name(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    config = make_config(tmp_path, server, signing)
    config.state_dir.mkdir(parents=True, mode=0o700)
    os.chown(config.state_dir, NOBODY, NOBODY)
    client = Client(config)
    with pytest.raises(StateDirError) as caught:
        await client.start()  # old code: starts and keeps its journal there
    error = caught.value
    assert isinstance(error, ConfigError)  # a configuration error: exit 2
    assert (error.path, error.owner, error.mode) == (config.state_dir, NOBODY, 0o700)
    message = str(error)
    assert str(config.state_dir) in message and "uid 65534" in message and "0700" in message
    assert "owned by another user" in message
    assert list(config.state_dir.iterdir()) == []  # nothing was read or written there
    assert config.state_dir.stat().st_uid == NOBODY  # and it was not taken over


async def test_an_entry_another_user_planted_is_refused_by_name(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    with short_dir("fstate-") as top:
        config = make_config(top, server, signing)
        config.state_dir.mkdir(parents=True)
        config.state_dir.chmod(0o777)  # open for a while: an installation slip
        planted = config.state_dir / "candidate.bin"
        as_nobody("ln", "-s", "/etc/shadow", str(planted))
        with pytest.raises(StateDirError) as caught:
            await Client(config).start()
        assert caught.value.path == planted and caught.value.owner == NOBODY
        assert str(planted) in str(caught.value) and "remove it" in str(caught.value)
        assert mode_of(config.state_dir) == 0o700  # closed first, then found
        planted.unlink()
        async with Client(config) as client:  # removed: fota starts
            assert client.state is State.IDLE


@pytest.mark.parametrize(
    ("owner", "mode", "refused"),
    [
        (NOBODY, 0o755, "owned by another user"),  # the user can rename the state dir away
        (0, 0o777, "another user can write there"),
        (0, 0o775, "another user can write there"),
        (0, 0o1777, None),  # sticky, like /tmp: only the entry's owner can move it
        (0, 0o755, None),
    ],
)
async def test_a_directory_above_it_decides_too(owner: int, mode: int, refused: str | None) -> None:
    with short_dir("fstate-") as top:
        above = top / "above"
        above.mkdir()
        state = above / "state"
        state.mkdir(mode=0o700)
        os.chown(above, owner, owner)
        above.chmod(mode)
        if refused is None:
            secure_state_dir(state)
            assert mode_of(state) == 0o700
            return
        with pytest.raises(StateDirError) as caught:
            secure_state_dir(state)
        assert caught.value.path == above and refused in str(caught.value)
        assert f"{mode & 0o7777:04o}" in str(caught.value)


async def test_in_a_sticky_directory_another_users_entry_is_refused() -> None:
    with short_dir("fstate-") as top:
        top.chmod(0o1777)
        state = top / "state"
        as_nobody("mkdir", "-m", "0700", str(state))  # nobody got there first
        with pytest.raises(StateDirError) as caught:
            secure_state_dir(state)
        assert caught.value.path == state and caught.value.owner == NOBODY


async def test_a_symlinked_state_dir_is_followed_and_checked() -> None:
    with short_dir("fstate-") as top:
        real = top / "data"
        real.mkdir(mode=0o755)
        real.chmod(0o755)
        link = top / "state"
        link.symlink_to(real)
        secure_state_dir(link)
        assert mode_of(real) == 0o700
        os.chown(real, NOBODY, NOBODY)
        with pytest.raises(StateDirError, match="owned by another user"):
            secure_state_dir(link)


async def test_a_file_is_no_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("not a directory")
    with pytest.raises(StateDirError, match="is not a directory") as caught:
        secure_state_dir(path)
    assert caught.value.path == path


# -- the entry points: exit 2, the path named -------------------------------------------------


def nobodys_state_dir(top: Path) -> Path:
    state = top / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    return state


def test_fota_run_exits_2_naming_the_state_dir(tmp_path: Path) -> None:
    state = nobodys_state_dir(tmp_path)
    pub = keys.save_keypair(keys.generate(), tmp_path / "k")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fota",
            "run",
            "--server",
            "coap://127.0.0.1:9",
            "--device-class",
            DEVICE_CLASS,
            "--state-dir",
            str(state),
            "--trust",
            str(pub),
            "--target",
            str(tmp_path / "fw.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=BOUND,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "StateDirError" in proc.stderr and str(state) in proc.stderr
    assert "uid 65534" in proc.stderr


def test_the_daemon_exits_2_naming_the_state_dir(tmp_path: Path) -> None:
    state = nobodys_state_dir(tmp_path)
    pub = keys.save_keypair(keys.generate(), tmp_path / "k")
    with short_dir("fstate-") as run:
        config = tmp_path / "fota.toml"
        config.write_text(
            f'server = "coap://127.0.0.1:9"\ndevice_class = "{DEVICE_CLASS}"\n'
            f'state_dir = "{state}"\ntrust = ["{pub}"]\ntarget = "fw.bin"\n'
            f'[control]\nsocket = "{run / "ctl.sock"}"\n[log]\nformat = "json"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "fota", "daemon", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=BOUND,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert not (run / "ctl.sock").exists()  # it stopped before serving anyone
    assert proc.returncode == 2, proc.stderr
    assert "daemon_failed" in proc.stderr and str(state) in proc.stderr
    assert "uid 65534" in proc.stderr
