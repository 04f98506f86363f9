"""Issue 16 §1, the archive installer: a local user who owns the application's directory.

fota runs as root; the user (uid 65534 here, the application's service user in the field) owns
``root`` or a directory below it. These tests plant what such a user can plant (a FIFO, a
socket, a sparse file, symlinks swapped in while root copies their directory) and check that
root never follows, never blocks, never copies more than the bound and never changes a file the
user's links point to. The attacker's part runs as uid 65534 in a child process
(``setpriv``); the rest of each test runs as root, as fota does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fota.errors import ConfigError, InstallError, IntegrityError
from fota.install import Context, build
from fota.install.archive import ArchiveInstaller, SetuidRefused
from fota.safefs import UnsafePathError
from tests.integration.test_install_archive import make_bundle, make_manifest, recipe

USER = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as fota runs")

NEW = {"payload/main.py": b"print('new')\n"}
FILES = [{"source": "payload/main.py", "target": "app/main.py", "mode": 0o644}]


def installer(root: Path, state: Path, **table: Any) -> ArchiveInstaller:
    inst = build(
        "installers.app", {"kind": "archive", "root": str(root), **table}, Context(state, 30.0)
    )
    assert isinstance(inst, ArchiveInstaller)
    return inst


async def install(inst: ArchiveInstaller, candidate: Path, sequence: int = 1) -> None:
    m = make_manifest(candidate, sequence)
    # A guard, not a measurement: a copy that blocked on a FIFO would hang the test run.
    async with asyncio.timeout(120):
        await inst.install(candidate, m, lambda p: None)
    await inst.commit(m)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every uid can traverse (pytest's tmp_path is 0700 root's)."""
    base = Path(tempfile.mkdtemp(prefix="fota-local-", dir="/tmp"))
    base.chmod(0o755)
    (base / "state").mkdir(mode=0o700)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def user_tree(base: Path) -> Path:
    """``root/app`` owned by the user, as an application's directory is."""
    root = base / "root"
    (root / "app").mkdir(parents=True)
    os.chown(root, USER, USER)
    os.chown(root / "app", USER, USER)
    return root


def as_user(code: str, *args: str) -> None:
    """Run ``code`` (Python) as uid/gid 65534 with no supplementary groups."""
    subprocess.run(
        [
            "setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
            "/usr/bin/python3", "-c", code, *args,
        ],
        check=True,
        timeout=60,
    )  # fmt: skip


# -- what a user leaves in their directory ---------------------------------------------------


async def test_a_fifo_in_the_users_directory_is_made_anew_never_opened(world: Path) -> None:
    root = user_tree(world)
    as_user("import os, sys; os.mkfifo(sys.argv[1], 0o640)", str(root / "app" / "pipe"))
    inst = installer(root, world / "state", allow_writable_target=True)
    await install(inst, make_bundle(world / "u.tar", recipe(files=FILES), NEW))
    st = os.lstat(root / "app" / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (USER, USER)
    assert (root / "app" / "main.py").read_bytes() == b"print('new')\n"


async def test_a_socket_in_the_users_directory_is_skipped_and_named(world: Path) -> None:
    root = user_tree(world)
    as_user(
        "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])",
        str(root / "app" / "app.sock"),
    )
    assert stat.S_ISSOCK(os.lstat(root / "app" / "app.sock").st_mode)
    inst = installer(root, world / "state", allow_writable_target=True)
    with capture_logs() as logs:
        await install(inst, make_bundle(world / "u.tar", recipe(files=FILES), NEW))
    assert not os.path.lexists(root / "app" / "app.sock")  # its server makes it again
    skipped = [e for e in logs if e["event"] == "archive_copy_socket_skipped"]
    assert [e["path"] for e in skipped] == [str(root / "app" / "app.sock")]


async def test_a_device_file_in_a_target_directory_is_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    os.mknod(root / "app" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (tmp_path / "state").mkdir()
    inst = installer(root, tmp_path / "state")
    candidate = make_bundle(tmp_path / "u.tar", recipe(files=FILES), NEW)
    with pytest.raises(InstallError, match=r"app/null: a character device in a target directory"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert sorted(p.name for p in (root / "app").iterdir()) == ["null"]  # nothing changed


async def test_a_sparse_file_is_copied_sparsely(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    size = 256 << 20
    with open(root / "app" / "disk.img", "wb") as f:
        f.truncate(size)
        f.seek(100 << 20)
        f.write(b"data" * 1024)
    (tmp_path / "state").mkdir()
    inst = installer(root, tmp_path / "state")
    await install(inst, make_bundle(tmp_path / "u.tar", recipe(files=FILES), NEW))
    st = os.stat(root / "app" / "disk.img")  # the staged copy, swapped in
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20  # its 4 KiB of data, not 256 MiB of zeros
    with open(root / "app" / "disk.img", "rb") as f:
        f.seek(100 << 20)
        assert f.read(8) == b"datadata"


async def test_the_staged_copies_are_bounded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (root / "app" / "big.db").write_bytes(os.urandom(1 << 20))
    (tmp_path / "state").mkdir()
    inst = installer(root, tmp_path / "state", max_copy_size=512 * 1024)
    candidate = make_bundle(tmp_path / "u.tar", recipe(files=FILES), NEW)
    with pytest.raises(
        InstallError,  # staging runs in the transaction: the undo reports it
        match=r"big\.db: copying the target directories takes "
        r"more than 524288 bytes \(installers\.app\.max_copy_size\)",
    ):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert sorted(p.name for p in (root / "app").iterdir()) == ["big.db"]
    assert [p.name for p in root.iterdir()] == ["app"]  # no staged copy left behind


# -- the swap: symlinks planted while root copies --------------------------------------------

ATTACKER = r"""
import os, sys
root, victim, names = sys.argv[1], sys.argv[2], sys.argv[3:]
side = next(os.path.join(root, n) for n in os.listdir(root) if n.startswith(".app.fota-"))
os.rename(side, side + ".away")  # the user owns root: they may rename root's copy away
os.mkdir(side)
for name in names:
    os.symlink(victim, os.path.join(side, name))
"""

_armed: list[tuple[str, str, list[str]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # The attacker acts the moment root opens the user's trigger.bin to copy it: a
    # deterministic point inside the copy, whatever copies (a path open or an openat).
    if event != "open" or not _armed or not isinstance(args[0], str | bytes):
        return
    if not os.fsdecode(args[0]).endswith("trigger.bin"):
        return
    root, victim, names = _armed.pop()
    as_user(ATTACKER, root, victim, *names)


sys.addaudithook(_audit)


async def test_symlinks_swapped_in_during_the_copy_change_nothing_of_roots(world: Path) -> None:
    root = user_tree(world)
    victim = world / "victim"  # stands for /etc/shadow, /usr/bin/passwd
    victim.write_bytes(b"root's own\n")
    victim.chmod(0o644)
    app = root / "app"
    names = ["a.bin", "trigger.bin", "z.bin", "main.py"]
    for name in names[:3]:
        (app / name).write_bytes(b"#!/bin/sh\necho user\n")
        os.chown(app / name, USER, USER)
        (app / name).chmod(0o6755)  # the user's own file, setuid to themselves: allowed
    inst = installer(root, world / "state", allow_writable_target=True)
    candidate = make_bundle(world / "u.tar", recipe(files=FILES), NEW)
    _armed.append((str(root), str(victim), names))
    error: InstallError | None = None
    try:
        await install(inst, candidate)
    except InstallError as exc:
        error = exc
    finally:
        armed_left = bool(_armed)
        _armed.clear()
    assert not armed_left  # the attacker did act
    st = os.stat(victim)
    assert victim.read_bytes() == b"root's own\n"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    # Root's copy went on in the directory it made, now renamed; the swap is refused.
    assert error is not None and "staged copy" in str(error) and "is missing" in str(error)
    # The user's directory is as it was: nothing was swapped in.
    assert sorted(p.name for p in app.iterdir()) == ["a.bin", "trigger.bin", "z.bin"]


# -- recipe modes and the target's owner -------------------------------------------------------


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6711])
async def test_setuid_from_a_recipe_is_refused_unless_allowed(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    files = [{"source": "payload/main.py", "target": "app/tool", "mode": mode}]
    candidate = make_bundle(tmp_path / "u.tar", recipe(files=files), NEW)
    inst = installer(root, tmp_path / "state")
    with pytest.raises(SetuidRefused) as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert f"'app/tool' with mode {mode:#o}" in str(info.value)
    assert "installers.app.allow_setuid = true" in str(info.value)
    assert (info.value.target, info.value.mode) == ("app/tool", mode)
    assert list((root / "app").iterdir()) == []
    allowed = installer(root, tmp_path / "state", allow_setuid=True)
    await install(allowed, candidate)
    st = os.stat(root / "app" / "tool")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode)


async def test_a_root_a_user_can_write_is_refused_unless_allowed(world: Path) -> None:
    root = user_tree(world)
    candidate = make_bundle(world / "u.tar", recipe(files=FILES), NEW)
    inst = installer(root, world / "state")
    with pytest.raises(UnsafePathError) as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert str(root) in str(info.value) and f"uid {USER}" in str(info.value)
    assert "mode 0o755" in str(info.value)
    assert list((root / "app").iterdir()) == []
    assert not (world / "state" / "archive" / "bundle").exists()
    await install(installer(root, world / "state", allow_writable_target=True), candidate)
    assert (root / "app" / "main.py").read_bytes() == b"print('new')\n"


def test_the_new_keys_are_checked(tmp_path: Path) -> None:
    for key, value in [
        ("allow_setuid", "yes"),
        ("allow_writable_target", 1),
        ("max_ratio", 0),
        ("max_copy_size", 1.5),
        ("min_free_space", -1),
    ]:
        with pytest.raises(ConfigError, match=rf"installers\.app\.{key}: expected"):
            installer(tmp_path, tmp_path, **{key: value})


async def test_only_the_verified_bundle_is_unpacked(tmp_path: Path) -> None:
    # A writer of the candidate's directory replaces the verified bundle (or appends to it)
    # between the engine's check and the install: the installer hashes what it reads.
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    candidate = make_bundle(tmp_path / "u.tar", recipe(files=FILES), NEW)
    m = make_manifest(candidate, 1)
    evil = {"payload/main.py": b"print('not signed')\n"}
    make_bundle(tmp_path / "u.tar", recipe(files=FILES), evil)
    inst = installer(root, tmp_path / "state")
    with pytest.raises(IntegrityError, match="does not match the signed image_sha256"):
        await inst.install(candidate, m, lambda p: None)
    assert list((root / "app").iterdir()) == []
