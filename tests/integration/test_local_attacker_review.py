"""Issue 16 §1-§2 reviewed again as a local attacker: holes left by the first fix.

fota runs as root; the attacker is uid 65534, the application's service user in the field. Each
test's attacker part runs as that uid in a child process (``setpriv``), the rest as root, as
fota does. Every test here failed on the code before its fix (named in its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fota import hooks
from fota.errors import ConfigError, InstallError
from fota.install import Context, build
from fota.install.archive import ArchiveInstaller, UnpackLimitError
from fota.install.swupdate import SwupdateInstaller
from fota.safefs import UnsafePathError
from tests.integration.test_install_archive import make_bundle, make_manifest, recipe

USER = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as fota runs")

NEW = {"payload/main.py": b"print('new')\n"}
FILES = [{"source": "payload/main.py", "target": "app/main.py", "mode": 0o644}]


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every uid can traverse (pytest's tmp_path is 0700 root's)."""
    base = Path(tempfile.mkdtemp(prefix="fota-review-", dir="/tmp"))
    base.chmod(0o755)
    (base / "state").mkdir(mode=0o700)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def as_user(code: str, *args: str | Path) -> None:
    """Run ``code`` (Python) as uid/gid 65534 with no supplementary groups."""
    subprocess.run(
        [
            "setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
            "/usr/bin/python3", "-c", code, *map(str, args),
        ],
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )  # fmt: skip


def archive(root: Path, state: Path, **table: Any) -> ArchiveInstaller:
    inst = build(
        "installers.app", {"kind": "archive", "root": str(root), **table}, Context(state, 30.0)
    )
    assert isinstance(inst, ArchiveInstaller)
    return inst


def user_root(base: Path) -> Path:
    """``root`` and ``root/app`` owned by the user (their application's directory)."""
    root = base / "root"
    (root / "app").mkdir(parents=True)
    os.chown(root, USER, USER)
    os.chown(root / "app", USER, USER)
    return root


def side_of(root: Path) -> Path:
    [side] = [p for p in root.iterdir() if p.name.startswith(".app.fota-")]
    return side


# -- the old tree beside a target: removed by path at commit -------------------------------------

PUT_AT_SIDE = r"""
import os, sys
side, what, victim = sys.argv[1], sys.argv[2], sys.argv[3]
os.rename(side, side + ".away")  # the user owns root: they may rename root's old tree away
if what == "fifo":
    os.mkfifo(side, 0o600)
else:
    os.rename(victim, side)  # a root-owned directory of theirs they cannot change otherwise
"""


async def test_commit_never_empties_a_root_directory_renamed_to_the_old_trees_name(
    world: Path,
) -> None:
    """Before: commit ran ``shutil.rmtree`` on the side path, whatever was there now."""
    root = user_root(world)
    keys = root / "keys"  # root's, in the user's directory: they can rename it, not change it
    keys.mkdir(mode=0o700)
    (keys / "device.key").write_bytes(b"root's key\n")
    inst = archive(root, world / "state", allow_writable_target=True)
    candidate = make_bundle(world / "u.tar", recipe(files=FILES), NEW)
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    side = side_of(root)
    as_user(PUT_AT_SIDE, side, "dir", keys)
    with capture_logs() as logs:
        await inst.commit(m)
    assert (side / "device.key").read_bytes() == b"root's key\n"  # left alone
    assert [e["path"] for e in logs if e["event"] == "archive_cleanup_failed"] == [str(side)]
    assert (root / "app" / "main.py").read_bytes() == b"print('new')\n"


async def test_commit_never_blocks_on_a_fifo_planted_at_the_old_trees_name(world: Path) -> None:
    """Before: ``shutil.rmtree`` (Python 3.11) opened the FIFO ``O_RDONLY`` and blocked forever."""
    root = user_root(world)
    inst = archive(root, world / "state", allow_writable_target=True)
    candidate = make_bundle(world / "u.tar", recipe(files=FILES), NEW)
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    side = side_of(root)
    as_user(PUT_AT_SIDE, side, "fifo", "-")
    commit = asyncio.ensure_future(inst.commit(m))
    try:
        # A guard, not a measurement: on the old code the commit never returns.
        await asyncio.wait_for(asyncio.shield(commit), 60)
    except TimeoutError:
        os.close(os.open(side, os.O_WRONLY | os.O_NONBLOCK))  # free the blocked reader
        await commit
        pytest.fail("commit blocked opening a FIFO the user planted at the old tree's name")
    assert stat.S_ISFIFO(os.lstat(side).st_mode)  # left alone, not opened


# -- the archive root: resolved by realpath, past a user's symlink -------------------------------


async def test_a_users_symlink_on_the_way_to_root_cannot_choose_where_root_installs(
    world: Path,
) -> None:
    """Before: ``realpath(root)`` followed the user's link; only its target's path was checked."""
    home = world / "home"  # the service user's home: root = home/current, a release link
    home.mkdir()
    os.chown(home, USER, USER)
    victim = world / "victim"  # stands for /etc: root's, writable by root only
    (victim / "app").mkdir(parents=True)
    as_user("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", victim, home / "current")
    inst = archive(home / "current", world / "state")
    candidate = make_bundle(world / "u.tar", recipe(files=FILES), NEW)
    with pytest.raises(UnsafePathError) as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert str(home) in str(info.value) and f"uid {USER}" in str(info.value)
    assert list((victim / "app").iterdir()) == []  # nothing of the bundle reached it
    # Even with writable targets allowed, a link the user owns is never followed.
    allowed = archive(home / "current", world / "state", allow_writable_target=True)
    with pytest.raises(UnsafePathError, match="a symbolic link not owned by root"):
        await allowed.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert list((victim / "app").iterdir()) == []


# -- PATH: where a program named without a slash is looked up --------------------------------------

TOOL = "fota-review-tool"
PLANT_TOOL = r"""
import os, sys
path = os.path.join(sys.argv[1], sys.argv[2])
with open(path, "w") as f:
    f.write("#!/bin/sh\nid -u > " + sys.argv[3] + "\n")
os.chmod(path, 0o755)
"""


async def test_a_user_writable_directory_on_path_never_supplies_a_program_root_runs(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``PATH`` was passed as the daemon had it; the user's ``systemctl`` ran as root."""
    bin_ = world / "bin"  # e.g. a group-writable /usr/local/bin, or a user's ~/bin
    bin_.mkdir()
    os.chown(bin_, USER, USER)
    out = world / "ran"
    out.touch()
    os.chown(out, USER, USER)
    as_user(PLANT_TOOL, bin_, TOOL, out)
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    with capture_logs() as logs, pytest.raises(hooks.CommandNotFound):
        await hooks.run([TOOL, "restart", "app"], name="hook after", timeout=30)
    assert out.read_text() == ""  # the user's program never ran (as root it wrote "0")
    dropped = [e for e in logs if e["event"] == "path_entry_dropped"]
    assert [e["entry"] for e in dropped] == [str(bin_)] and f"uid {USER}" in dropped[0]["reason"]
    assert hooks.environment()["PATH"] == "/usr/bin:/bin"


async def test_a_relative_path_entry_never_finds_the_bundles_program_under_root(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a ``.`` (or empty) entry found ``root/<program>``, which the bundle places.

    ``allowed_commands`` refuses a program under root; a relative ``PATH`` entry got around it.
    """
    root = world / "root"
    (root / "app").mkdir(parents=True)
    out = world / "ran"
    files = [*FILES, {"source": "payload/tool", "target": TOOL, "mode": 0o755}]
    payload = {**NEW, "payload/tool": f"#!/bin/sh\nid -u > {out}\n".encode()}
    rec = recipe(files=files, after=[TOOL, "restart", "app"])
    candidate = make_bundle(world / "u.tar", rec, payload)
    monkeypatch.setenv("PATH", ".:/usr/bin:/bin")
    inst = archive(root, world / "state", allowed_commands=[[TOOL, "restart", "app"]])
    with pytest.raises(InstallError, match=f"after hook failed: .*cannot run '{TOOL}'"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert not out.exists()
    assert not (root / TOOL).exists()  # the install was undone


# -- tar headers: read whole by tarfile, before a member is seen -----------------------------------


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu-L", "pax"])
async def test_a_huge_long_name_header_is_refused_before_it_is_read(
    tmp_path: Path, fmt: int
) -> None:
    """Before: tarfile read a 64 MiB name header into memory (from a 64 KiB gzip) before
    the member's name was checked; a larger one takes all of a gateway's memory."""
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    candidate = tmp_path / "u.tar.gz"
    with tarfile.open(candidate, "w:gz", format=fmt) as tar:
        info = tarfile.TarInfo("a" * (64 << 20))
        tar.addfile(info, io.BytesIO(b""))
    assert candidate.stat().st_size < 1 << 20
    m = make_manifest(candidate, 1)
    inst = archive(root, tmp_path / "state")
    tracemalloc.start()
    try:
        with pytest.raises(UnpackLimitError, match=r"header .* is larger than 1048576 bytes"):
            await inst.install(candidate, m, lambda p: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # not the 64 MiB header, nor its decoded copies
    assert list((root / "app").iterdir()) == []


async def test_a_long_member_name_under_the_read_bound_is_named_shortly(tmp_path: Path) -> None:
    """Before: the refusal quoted the whole name (here 512 KiB) into the error and its report."""
    (tmp_path / "root").mkdir()
    (tmp_path / "state").mkdir()
    candidate = tmp_path / "u.tar"
    with tarfile.open(candidate, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("b" * (512 << 10)), io.BytesIO(b""))
    inst = archive(tmp_path / "root", tmp_path / "state")
    with pytest.raises(InstallError, match=r"\(524288 characters\)") as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert len(str(info.value)) < 1000


# -- allow-lists ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "pip"),
    [(["/usr/bin/pip", "install"], ["pip"]), (["pip", "install"], ["/usr/bin/pip"])],
)
def test_a_package_manager_named_by_another_path_is_no_hook(
    tmp_path: Path, entry: list[str], pip: list[str]
) -> None:
    """Before: only the exact string was compared; "/usr/bin/pip" passed when pip = ["pip"]."""
    with pytest.raises(ConfigError, match="is a package manager"):
        archive(tmp_path, tmp_path, allowed_commands=[entry], pip=pip)


# -- SWUpdate's private TMPDIR ---------------------------------------------------------------


async def test_swupdate_never_makes_its_private_directory_where_a_user_can_rename_it(
    world: Path, tmp_path: Path
) -> None:
    """Before: ``tmpdir`` (or the daemon's ``TMPDIR``) was used unchecked. In a directory the
    user can write, they rename fota's fresh ``fota-swu-*`` and put theirs at its name: the
    image swupdate reads by path and swupdate's IPC sockets are then theirs."""
    utmp = world / "utmp"
    utmp.mkdir()
    os.chown(utmp, USER, USER)
    tools = tmp_path / "tools"
    tools.mkdir()
    ran = tools / "ran"
    swu = tools / "swupdate"
    swu.write_text(f'#!/bin/sh\necho "$TMPDIR" > {ran}\necho "[INFO ] : SWUPDATE successful !"\n')
    swu.chmod(0o755)
    inst = build(
        "installers.firmware",
        {"kind": "swupdate", "timeout": 60, "swupdate": [str(swu)], "tmpdir": str(utmp)},
        Context(tmp_path / "fota", 30.0),
    )
    assert isinstance(inst, SwupdateInstaller)
    image = tmp_path / "candidate"
    image.write_bytes(b"swu image")
    m = make_manifest(image, 1)
    with pytest.raises(UnsafePathError) as info:
        await inst.install(image, m, lambda p: None)
    assert str(utmp) in str(info.value) and f"uid {USER}" in str(info.value)
    assert not ran.exists()  # swupdate never ran
    assert list(utmp.iterdir()) == []


# -- the swap: renames by path through a directory the user can replace ------------------------

LINK_PARENT = r"""
import os, sys
parent, victim = sys.argv[1], sys.argv[2]
os.rename(parent, parent + ".real")  # the user owns root: they may rename their app directory
os.symlink(victim, parent)  # and put a link to a directory of root's in its place
"""
UNLINK_PARENT = r"""
import os, sys
parent = sys.argv[1]  # (argv[2]: unused)
os.unlink(parent)
os.rename(parent + ".real", parent)
"""

_renames: list[tuple[str, str]] = []  # the attacker's steps: (code, root/app), in order


def _on_rename(event: str, args: tuple[Any, ...]) -> None:
    # Before each of root's renames of the fallback exchange, the attacker takes a step: the
    # link goes in before the first and out again before the second.
    if event == "os.rename" and _renames:
        code, parent = _renames.pop(0)
        as_user(code, parent, str(Path(parent).parent.parent / "victim"))


sys.addaudithook(_on_rename)


async def test_the_swap_never_renames_through_a_link_the_user_put_above_the_unit(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the exchange (and its three-rename fallback) ran by path from the process's
    working directory: with ``root/app`` swapped for a link to root's ``victim``, root renamed
    ``victim/sub`` away, and it stayed away."""
    root = user_root(world)
    sub = root / "app" / "sub"  # root's, in the user's directory: the unit
    sub.mkdir()
    (sub / "old.txt").write_bytes(b"old\n")
    victim = world / "victim"  # stands for /etc: root's, writable by root only
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "precious").write_bytes(b"root's\n")
    files = [{"source": "payload/main.py", "target": "app/sub/main.py", "mode": 0o644}]
    candidate = make_bundle(world / "u.tar", recipe(files=files), NEW)
    inst = archive(root, world / "state", allow_writable_target=True)
    inst.use_exchange = False  # a filesystem without RENAME_EXCHANGE: three renames
    swap_all = inst._swap_all
    parent = str(root / "app")

    def armed(txn: Any) -> None:  # the staged copy is checked: the renames come next
        _renames.extend([(LINK_PARENT, parent), (UNLINK_PARENT, parent)])
        swap_all(txn)

    monkeypatch.setattr(inst, "_swap_all", armed)
    m = make_manifest(candidate, 1)
    try:
        with contextlib.suppress(InstallError):
            await inst.install(candidate, m, lambda p: None)
        acted = not _renames
    finally:
        _renames.clear()
    assert acted
    assert (victim / "sub" / "precious").read_bytes() == b"root's\n"
    assert sorted(p.name for p in victim.iterdir()) == ["sub"]


async def test_the_undo_of_a_failed_staging_never_empties_a_directory_renamed_to_the_copys_name(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the undo ran ``shutil.rmtree`` on the staged copy's path, whatever was there; the
    copy's identity is now journaled as soon as it is made, before anything goes in."""
    root = user_root(world)
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    (keys / "device.key").write_bytes(b"root's key\n")
    big = root / "app" / "big.db"
    big.write_bytes(os.urandom(1 << 20))
    os.chown(big, USER, USER)
    inst = archive(root, world / "state", allow_writable_target=True, max_copy_size=512 * 1024)
    restore_all = inst._restore_all
    sides: list[Path] = []

    def attacked(txn: Any) -> None:  # the copy failed; the undo removes it next
        sides.append(side_of(root))
        as_user(PUT_AT_SIDE, sides[0], "dir", keys)
        restore_all(txn)

    monkeypatch.setattr(inst, "_restore_all", attacked)
    candidate = make_bundle(world / "u.tar", recipe(files=FILES), NEW)
    with pytest.raises(InstallError, match="max_copy_size"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert (sides[0] / "device.key").read_bytes() == b"root's key\n"  # left alone
