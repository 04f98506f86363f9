"""Issue 16 §1: a local user never turns fota's root file operations into their own.

The attacker is uid/gid 65534 (``nobody``): every step they take (planting a symlink, a FIFO,
appending to a file, ``chmod``) runs in a child process started with ``setpriv --reuid=65534
--regid=65534 --clear-groups``, so the test shows what an unprivileged user can do, not what
root can. The installers run as root, in this process, as fota would.

The attacker's playground is a fresh directory under ``/tmp`` (root-owned, 0755, so the
unprivileged child can reach it; pytest's own ``tmp_path`` is 0700). The victim of each attack
is a root-owned file the attacker cannot write (think ``/etc/cron.d/x``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fota import safefs
from fota.errors import InstallError, IntegrityError
from fota.fileops import FileOps
from fota.install import build
from fota.install.ab import ABInstaller
from fota.install.base import DONE
from fota.install.file import FileInstaller
from fota.install.spec import Context
from fota.install.swupdate import SwupdateInstaller
from tests.installing import Progress, manifest_for, write_script

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
OLD, NEW = b"old image " * 1000, b"new image " * 3000
TAIL = b"\n* * * * * root /tmp/evil\n"
VICTIM = b"root's own file\n"


def as_nobody(code: str, *args: str | Path) -> None:
    """Run Python ``code`` as uid/gid 65534 with ``sys.argv[1:] = args`` (the attacker's part)."""
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-I",
            "-c",
            "import os, sys\n" + code,
            *map(str, args),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()


PLANT = "for name in sys.argv[2:]: os.symlink(sys.argv[1], name)"
"""Attacker: plant symlinks at argv[2:] pointing to argv[1]."""


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory the attacker can reach: root-owned 0755, under the sticky /tmp."""
    root = Path(tempfile.mkdtemp(prefix="fota-attack-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def user_dir(path: Path) -> Path:
    """A directory the attacker owns (an application's service user owning /opt/app)."""
    path.mkdir(parents=True)
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o755)
    return path


def root_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def victim(world: Path) -> Path:
    """A root-owned file the attacker cannot write, in a directory only root can write."""
    path = root_dir(world / "etc") / "cron-x"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def untouched(path: Path) -> bool:
    st = os.lstat(path)
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == 0
        and stat.S_IMODE(st.st_mode) == 0o644
        and path.read_bytes() == VICTIM
    )


def candidate(directory: Path, data: bytes = NEW) -> Path:
    path = directory / "candidate.bin"
    path.write_bytes(data)
    return path


async def attempt(step: Awaitable[object]) -> BaseException | None:
    """Run an installer step the attacker prepared; its error, if any, is checked after the
    damage is (so that on the old code the test fails on the damage, not on a message)."""
    try:
        await step
    except Exception as exc:
        return exc
    return None


def file_installer(target: Path, *, allow: bool = False) -> FileInstaller:
    table: dict[str, Any] = {"kind": "file", "target": str(target)}
    if allow:
        table["allow_writable_target"] = True
    inst = build("installers.firmware", table, Context(target.parent, 30.0))
    assert isinstance(inst, FileInstaller)
    return inst


# -- the file installer ------------------------------------------------------------------------


async def test_file_symlinks_planted_at_temporary_names_are_never_written_through(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The red team's attack: ``.app.bin.previous.tmp -> /etc/cron.d/x`` in the app's directory.

    The old code copied the running file to that predictable name with ``open(dst, "wb")``,
    writing the user's bytes into root's file. Now every temporary name is random and created
    ``O_EXCL | O_NOFOLLOW``; to show that even a guessed name is not followed, the first name
    each write tries is one the attacker planted.
    """
    target_file = victim(world)
    app = user_dir(world / "app")
    target = app / "app.bin"
    target.write_bytes(OLD)
    os.chown(target, NOBODY, NOBODY)
    old_names = [".app.bin.previous.tmp", ".app.bin.tmp", ".app.bin.fota.tmp"]
    guessed = [".app.bin.guessed.tmp", ".app.bin.previous.guessed.tmp"]
    as_nobody(PLANT, target_file, *(app / n for n in old_names + guessed))

    real = safefs.temp_name
    offered: list[str] = []

    def guessing(prefix: str) -> str:
        name = f".{prefix}.guessed.tmp"
        if name in guessed and name not in offered:
            offered.append(name)
            return name
        return real(prefix)

    monkeypatch.setattr(safefs, "temp_name", guessing)
    inst = file_installer(target, allow=True)
    m = manifest_for(NEW, "2.0")
    assert await attempt(inst.install(candidate(tmp_path), m, Progress())) is None
    assert untouched(target_file)
    assert sorted(offered) == sorted(guessed)  # both guessed names were tried, and refused
    assert target.read_bytes() == NEW and not target.is_symlink()
    assert inst.previous.read_bytes() == OLD and not inst.previous.is_symlink()
    for name in old_names + guessed:
        assert os.readlink(app / name) == str(target_file)  # never followed, never removed
    assert await inst.rollback(m) == DONE
    assert target.read_bytes() == OLD and untouched(target_file)


async def test_file_a_user_writable_target_directory_is_refused_naming_path_owner_and_mode(
    world: Path, tmp_path: Path
) -> None:
    app = user_dir(world / "app")
    target = app / "app.bin"
    target.write_bytes(OLD)
    m = manifest_for(NEW, "2.0")
    with pytest.raises(safefs.UnsafePathError) as refused:
        await file_installer(target).install(candidate(tmp_path), m, Progress())
    message = str(refused.value)
    assert f"{app}: not owned by root" in message
    assert "owner uid 65534" in message and "mode 0o755" in message
    assert target.read_bytes() == OLD and sorted(p.name for p in app.iterdir()) == ["app.bin"]

    # A directory above the target counts too: whoever owns it can rename the target's away.
    home = user_dir(world / "home")
    inner = root_dir(home / "opt")
    with pytest.raises(safefs.UnsafePathError, match=f"{home}: not owned by root"):
        await file_installer(inner / "app.bin").install(candidate(tmp_path), m, Progress())
    assert not any(inner.iterdir())

    # Group- and world-writable directories (not sticky) are refused the same way.
    shared = root_dir(world / "shared", 0o775)
    os.chown(shared, 0, 100)
    with pytest.raises(safefs.UnsafePathError, match=r"writable by group 100 .*mode 0o775"):
        await file_installer(shared / "app.bin").install(candidate(tmp_path), m, Progress())

    # The integrator's explicit setting: installed, with a warning naming the directory.
    with capture_logs() as logs:
        await file_installer(target, allow=True).install(candidate(tmp_path), m, Progress())
    assert target.read_bytes() == NEW
    warned = [e for e in logs if e["event"] == "unsafe_path_allowed"]
    assert warned and warned[0]["path"] == str(app) and "uid 65534" in warned[0]["reason"]


async def test_file_mode_bits_a_user_controls_never_make_a_setuid_root_file(
    world: Path, tmp_path: Path
) -> None:
    """A user-owned target chmod 6777 (old: the new root-owned file was 6777 too)."""
    opt = root_dir(world / "opt")
    target = opt / "app.bin"
    target.write_bytes(OLD)
    os.chown(target, NOBODY, NOBODY)
    as_nobody("os.chmod(sys.argv[1], 0o6777)", target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o6777
    inst = file_installer(target)
    m = manifest_for(NEW, "2.0")
    await inst.install(candidate(tmp_path), m, Progress())
    st = target.stat()
    assert st.st_uid == 0 and target.read_bytes() == NEW
    assert stat.S_IMODE(st.st_mode) == 0o777  # the permission bits stay, setuid/setgid go
    previous = inst.previous.stat()
    assert previous.st_uid == NOBODY and stat.S_IMODE(previous.st_mode) == 0o777

    # A root-owned setuid file keeps its bits (root set them).
    os.chown(target, 0, 0)
    target.chmod(0o4755)  # after chown, which clears it
    await inst.commit(m)
    m3 = manifest_for(OLD, "3.0", sequence=3)
    await inst.install(candidate(tmp_path, OLD), m3, Progress())
    assert stat.S_IMODE(target.stat().st_mode) == 0o4755


async def test_file_a_symlink_at_the_target_lends_it_no_mode_and_is_not_replaced(
    world: Path, tmp_path: Path
) -> None:
    """Old: the mode came from ``os.stat`` through the link: a setuid-root file's 04755."""
    tools = root_dir(world / "bin")
    setuid_tool = tools / "tool"
    setuid_tool.write_bytes(b"root's setuid tool")
    setuid_tool.chmod(0o4755)
    app = user_dir(world / "app")
    target = app / "app.bin"
    as_nobody(PLANT, setuid_tool, target)
    error = await attempt(
        file_installer(target, allow=True).install(
            candidate(tmp_path), manifest_for(NEW, "2.0"), Progress()
        )
    )
    assert target.is_symlink() and os.readlink(target) == str(setuid_tool)
    assert isinstance(error, InstallError)
    assert "app.bin is a symbolic link, not followed" in str(error)
    assert setuid_tool.read_bytes() == b"root's setuid tool"
    assert not any(p.name.endswith(".tmp") for p in app.iterdir())


async def test_file_a_fifo_at_the_target_is_refused_without_blocking(
    world: Path, tmp_path: Path
) -> None:
    """Old: ``open(fifo, "rb")`` to copy the running file blocked the install forever."""
    app = user_dir(world / "app")
    target = app / "app.bin"
    as_nobody("os.mkfifo(sys.argv[1])", target)
    with pytest.raises(InstallError, match=r"app.bin is not a regular file"):
        await file_installer(target, allow=True).install(
            candidate(tmp_path), manifest_for(NEW, "2.0"), Progress()
        )
    assert stat.S_ISFIFO(os.lstat(target).st_mode)


async def test_file_a_huge_sparse_running_file_is_kept_sparse(world: Path, tmp_path: Path) -> None:
    """Old: the copy for rollback wrote every zero of a user's 4 GiB sparse file."""
    opt = root_dir(world / "opt")
    target = opt / "app.bin"
    target.touch()
    os.chown(target, NOBODY, NOBODY)
    as_nobody(
        "f = open(sys.argv[1], 'r+b'); f.seek(1 << 20); f.write(b'data'); f.truncate(4 << 30)",
        target,
    )
    inst = file_installer(target)
    m = manifest_for(NEW, "2.0")
    await inst.install(candidate(tmp_path), m, Progress())
    previous = inst.previous.stat()
    assert previous.st_size == 4 << 30
    assert previous.st_blocks * 512 <= 1 << 20  # a few blocks, not 4 GiB
    with open(inst.previous, "rb") as f:
        f.seek(1 << 20)
        assert f.read(4) == b"data"
    await inst.rollback(m)
    assert target.stat().st_size == 4 << 30 and target.stat().st_blocks * 512 <= 1 << 20


async def test_file_only_the_signed_bytes_are_installed_when_a_tail_is_appended(
    world: Path,
) -> None:
    """A state-directory writer appends to the verified candidate: the tail is never installed."""
    state = user_dir(world / "state")
    cand = candidate(state)
    os.chown(cand, NOBODY, NOBODY)
    m = manifest_for(NEW, "2.0")  # signed for NEW: image_size and image_sha256
    as_nobody("open(sys.argv[1], 'ab').write(sys.argv[2].encode())", cand, TAIL.decode())
    assert cand.read_bytes() == NEW + TAIL
    target = root_dir(world / "opt") / "app.bin"
    await file_installer(target).install(cand, m, Progress())
    assert target.read_bytes() == NEW


async def test_a_candidate_swapped_for_a_symlink_is_refused(world: Path, tmp_path: Path) -> None:
    state = user_dir(world / "state")
    cand = state / "candidate.bin"
    signed = candidate(tmp_path)
    m = manifest_for(NEW, "2.0")
    as_nobody(PLANT, signed, cand)  # the same bytes, but through a link: not opened
    target = root_dir(world / "opt") / "app.bin"
    with pytest.raises(InstallError, match=r"candidate\.bin is a symbolic link"):
        await file_installer(target).install(cand, m, Progress())
    assert not target.exists()


# -- the shared pieces -------------------------------------------------------------------------


def test_fileops_write_atomic_never_writes_through_the_old_temporary_name(world: Path) -> None:
    """The journal, the trust store and every installer's state go through it."""
    target_file = victim(world)
    state = user_dir(world / "state")
    as_nobody(PLANT, target_file, state / ".record.cbor.tmp")
    FileOps().write_atomic(state / "record.cbor", b"record")
    assert (state / "record.cbor").read_bytes() == b"record" and untouched(target_file)
    leftovers = [p.name for p in state.iterdir() if p.name not in ("record.cbor",)]
    assert leftovers == [".record.cbor.tmp"]  # the attacker's link, untouched


def test_trust_rules_for_directories_on_the_way(world: Path) -> None:
    ok = root_dir(world / "sticky", 0o1777)  # like /tmp: fine above a target, not as one
    inner = root_dir(ok / "inner")
    safefs.check_trusted_path(inner, allow_writable=False, what="t")
    with pytest.raises(safefs.UnsafePathError, match=r"writable by anyone .*mode 0o1777"):
        safefs.check_trusted_path(ok, allow_writable=False, what="t")
    group_root = root_dir(world / "g0", 0o775)  # group 0 is root's own
    safefs.check_trusted_path(group_root, allow_writable=False, what="t")

    # A root-owned symlink on the way is followed (merged /usr: /lib -> usr/lib), and the
    # directories it leads to are checked in turn.
    real = root_dir(world / "usr" / "lib")
    (world / "lib").symlink_to("usr/lib")
    fd, name = safefs.open_parent(world / "lib" / "x.bin", what="t")
    try:
        assert os.fstat(fd).st_ino == real.stat().st_ino and name == "x.bin"
    finally:
        os.close(fd)
    # A user's symlink is never followed, not even where writable directories are allowed.
    home = user_dir(world / "home")
    as_nobody(PLANT, real, home / "lib")
    with pytest.raises(safefs.UnsafePathError, match=f"{home}: not owned by root"):
        safefs.open_parent(home / "lib" / "x.bin", what="t")
    with pytest.raises(safefs.UnsafePathError, match="lib: a symbolic link not owned by root"):
        safefs.open_parent(home / "lib" / "x.bin", what="t", allow_writable=True)


def test_a_verified_image_exposes_only_the_verified_bytes(world: Path, tmp_path: Path) -> None:
    cand = candidate(tmp_path, NEW + TAIL)
    digest = hashlib.sha256(NEW).digest()
    with safefs.open_verified(cand, digest, len(NEW)) as image:
        assert image.reader().read() == NEW
        out = tmp_path / "out"
        with open(out, "wb") as f:
            image.copy_to(f.fileno())
        assert out.read_bytes() == NEW
        # Changed in place after the check (through another descriptor): the copy fails.
        with open(cand, "r+b") as f:
            f.write(b"X")
        with open(out, "wb") as f, pytest.raises(IntegrityError, match="changed after"):
            image.copy_to(f.fileno())
    with pytest.raises(IntegrityError, match="fewer than the signed"):
        safefs.open_verified(candidate(tmp_path, NEW[:-1]), digest, len(NEW))
    fifo = world / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InstallError, match=r"not a regular file"):
        safefs.open_verified(fifo, digest, len(NEW))


# -- A/B -----------------------------------------------------------------------------------


def link_ab(world: Path, slots_dir: Path, *, allow: bool) -> tuple[ABInstaller, Path]:
    state = root_dir(world / "fota-state", 0o700)
    link = root_dir(world / "run") / "current"
    table: dict[str, Any] = {
        "kind": "ab",
        "slots": {"a": str(slots_dir / "slot-a"), "b": str(slots_dir / "slot-b")},
        "link": str(link),
    }
    if allow:
        table["allow_writable_target"] = True
    inst = build("installers.firmware", table, Context(state, 30.0))
    assert isinstance(inst, ABInstaller)
    return inst, link


async def test_ab_a_symlink_planted_at_the_inactive_slot_is_never_written_through(
    world: Path, tmp_path: Path
) -> None:
    """Old: ``open(slot, "wb")`` wrote the image into whatever the user's link named."""
    target_file = victim(world)
    slots = user_dir(world / "slots")
    (slots / "slot-a").write_bytes(OLD)
    m = manifest_for(NEW, "2.0")
    inst, link = link_ab(world, slots, allow=True)
    link.symlink_to(slots / "slot-a")
    as_nobody(PLANT, target_file, slots / "slot-b")
    error = await attempt(inst.install(candidate(tmp_path), m, Progress()))
    assert untouched(target_file) and os.readlink(link) == str(slots / "slot-a")
    assert isinstance(error, safefs.UnsafePathError)
    assert "slot-b: a symbolic link not owned by root" in str(error)
    inst, link = link_ab(world, slots, allow=False)  # the default refuses the directory
    with pytest.raises(safefs.UnsafePathError, match=rf"{slots}: not owned by root"):
        await inst.install(candidate(tmp_path), m, Progress())
    assert untouched(target_file)


async def test_ab_only_the_signed_bytes_reach_the_slot(world: Path) -> None:
    """Old: the slot got the tail too, and the read-back of the first image_size bytes passed."""
    state = user_dir(world / "state")
    cand = candidate(state)
    os.chown(cand, NOBODY, NOBODY)
    m = manifest_for(NEW, "2.0")
    as_nobody("open(sys.argv[1], 'ab').write(sys.argv[2].encode())", cand, TAIL.decode())
    slots = root_dir(world / "slots")
    (slots / "slot-a").write_bytes(OLD)
    inst, link = link_ab(world, slots, allow=False)
    link.symlink_to(slots / "slot-a")
    assert await inst.install(cand, m, Progress()) == DONE
    assert (slots / "slot-b").read_bytes() == NEW and os.readlink(link) == str(slots / "slot-b")
    assert not any(p.name.endswith(".tmp") for p in slots.iterdir())


# -- SWUpdate ----------------------------------------------------------------------------------


def fake_swupdate(directory: Path) -> Path:
    """A stand-in for ``swupdate -i FILE``: it keeps a copy of what it was given, succeeds."""
    return write_script(
        directory / "swupdate",
        f'cp "$2" {directory}/given\necho "$2" > {directory}/given-path\n'
        'echo "[INFO ] : SWUPDATE successful !"\n',
    )


def swupdate_installer(state: Path, **kw: Any) -> SwupdateInstaller:
    table = {"kind": "swupdate", "timeout": 60, **kw}
    inst = build("installers.firmware", table, Context(state, 30.0))
    assert isinstance(inst, SwupdateInstaller)
    return inst


async def test_swupdate_gets_exactly_the_signed_bytes_when_a_tail_is_appended(
    world: Path, tmp_path: Path
) -> None:
    state = user_dir(world / "state")
    cand = candidate(state)
    os.chown(cand, NOBODY, NOBODY)
    m = manifest_for(NEW, "2.0")
    as_nobody("open(sys.argv[1], 'ab').write(sys.argv[2].encode())", cand, TAIL.decode())
    tools = root_dir(tmp_path / "tools")
    inst = swupdate_installer(tmp_path / "fota", swupdate=[str(fake_swupdate(tools))])
    assert await inst.install(cand, m, Progress()) == DONE
    assert (tools / "given").read_bytes() == NEW
    given = Path((tools / "given-path").read_text().strip())
    assert given != cand and not given.exists()  # a private copy, removed after the run


async def test_swupdate_restore_never_follows_a_planted_symlink(
    world: Path, tmp_path: Path
) -> None:
    """Old: the restore wrote ``.app.bin.fota-restore`` with ``open(..., "wb")``, then
    ``os.chown``-ed it by path: root's file got the user's bytes and the user's ownership."""
    target_file = victim(world)
    app = user_dir(world / "app")
    target = app / "app.bin"
    target.write_bytes(OLD)
    os.chown(target, NOBODY, NOBODY)
    target.chmod(0o640)
    tools = root_dir(tmp_path / "tools")
    program = write_script(
        tools / "swupdate", f'printf new > {target}\necho "[INFO ] : SWUPDATE successful !"\n'
    )
    m = manifest_for(NEW, "2.0")
    inst = swupdate_installer(
        tmp_path / "fota",
        swupdate=[str(program)],
        backup=[str(target)],
        allow_writable_target=True,
    )
    assert await inst.install(candidate(tmp_path), m, Progress()) == DONE
    assert target.read_bytes() == b"new"
    as_nobody(PLANT, target_file, app / ".app.bin.fota-restore")
    assert await attempt(inst.rollback(m)) is None
    assert untouched(target_file)
    st = target.stat()
    assert target.read_bytes() == OLD and not target.is_symlink()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)

    # Without the setting, a user's directory is refused before swupdate runs.
    refusing = swupdate_installer(tmp_path / "fota2", swupdate=[str(program)], backup=[str(target)])
    with pytest.raises(safefs.UnsafePathError, match=rf"{app}: not owned by root"):
        await refusing.install(candidate(tmp_path), m, Progress())
    assert target.read_bytes() == OLD


async def test_swupdate_backup_refuses_a_fifo_or_symlink_without_blocking(
    world: Path, tmp_path: Path
) -> None:
    app = user_dir(world / "app")
    tools = root_dir(tmp_path / "tools")
    program = fake_swupdate(tools)
    m = manifest_for(NEW, "2.0")
    as_nobody("os.mkfifo(sys.argv[1])", app / "fifo")
    as_nobody(PLANT, victim(world), app / "link")
    # (The old code refused both too, by an lstat before an open by path; now the type is
    # judged on the descriptor that is read.)
    for name, what in (("fifo", "not a regular file"), ("link", "not a regular file|symbolic")):
        inst = swupdate_installer(
            tmp_path / f"fota-{name}",
            swupdate=[str(program)],
            backup=[str(app / name)],
            allow_writable_target=True,
        )
        with pytest.raises(InstallError, match=what):
            await inst.install(candidate(tmp_path), m, Progress())
        assert not (tools / "given").exists()  # swupdate never ran


def test_setuid_is_never_kept_from_a_file_with_another_link(tmp_path: Path) -> None:
    # Where fs.protected_hardlinks is off, a user can hard-link a setuid-root program to a
    # target's name; its bits must not pass to the file fota writes there.
    program = tmp_path / "program"
    program.write_bytes(b"x")
    os.chmod(program, 0o4755)
    assert safefs.safe_mode(os.stat(program)) == 0o4755
    os.link(program, tmp_path / "planted")
    assert safefs.safe_mode(os.stat(program)) == 0o755
