"""FileOps.write_atomic: durable replacement, nothing left behind, names kept out of pathlib.

Why the names matter (issue 17, the 1 000 update soak): pathlib (CPython 3.11, at least)
interns every part of a path it parses. A name that is new at every save (a temporary file's
random part, a manifest's digest) then passes through the interpreter's table of interned
strings, leaves a deleted slot there when it is freed, and the table is reallocated every few
hundred updates: a step of about 1 MiB of RSS (docs/benchmarks.md). The check: while the name is
in use, no string equal to it is interned (``sys.intern`` of a fresh copy returns that copy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fota.core.record import Record
from fota.core.states import State
from fota.fileops import FileOps, StrPath, join
from fota.journal import Journal
from tests.integration.test_journal import make_manifest, trust


def _interned(name: str) -> bool:
    """Whether a string equal to ``name`` is in the interned table (checked on a fresh copy)."""
    fresh = (name + ".")[:-1]
    assert fresh is not name
    return sys.intern(fresh) is not fresh


class NameCheckingOps(FileOps):
    """Records the file names it is handed, and whether each was interned at that moment."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def _see(self, path: StrPath) -> None:
        name = os.path.basename(os.fspath(path))
        self.seen.append((name, _interned(name)))

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        self._see(path)
        return super().open(path, flags, mode)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        self._see(src)
        self._see(dst)
        super().replace(src, dst)

    def unlink(self, path: StrPath) -> None:
        self._see(path)
        super().unlink(path)


def test_the_probe_sees_what_pathlib_interns(tmp_path: Path) -> None:
    """The check itself: a name parsed by pathlib is interned while the path lives (3.11)."""
    name = f".probe.{os.urandom(16).hex()}.tmp"
    assert not _interned(name)
    path = tmp_path.with_name(name)
    if sys.version_info[:2] == (3, 11):  # later versions may parse lazily, or not intern
        assert _interned(name)
    del path


@pytest.mark.parametrize("kind", [Path, str])
def test_write_atomic_replaces_and_leaves_only_the_file(tmp_path: Path, kind: type) -> None:
    target = kind(tmp_path / "record.cbor")
    ops = FileOps()
    ops.write_atomic(target, b"first")
    ops.write_atomic(target, b"second")
    assert (tmp_path / "record.cbor").read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["record.cbor"]
    assert (tmp_path / "record.cbor").stat().st_mode & 0o777 == 0o600


def test_write_atomic_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare file name (no directory part) is written in, and fsynced as, the current directory."""
    monkeypatch.chdir(tmp_path)
    FileOps().write_atomic("state.json", b"{}")
    assert os.listdir(tmp_path) == ["state.json"]


def test_the_temporary_name_is_unpredictable_and_not_interned(tmp_path: Path) -> None:
    ops = NameCheckingOps()
    for _ in range(3):
        ops.write_atomic(tmp_path / "journal.cbor", b"x")
    temps = [name for name, _ in ops.seen if name.endswith(".tmp")]
    assert len(set(temps)) == 3, temps  # a new random name for every write
    assert all(name.startswith(".journal.cbor.") and len(name) == 50 for name in temps)
    assert [name for name, interned in ops.seen if interned and name.endswith(".tmp")] == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    class FailingFsync(FileOps):
        def fsync(self, fd: int) -> None:
            raise OSError("simulated fsync failure")

    (tmp_path / "journal.cbor").write_bytes(b"old")
    with pytest.raises(OSError, match="simulated"):
        FailingFsync().write_atomic(tmp_path / "journal.cbor", b"new")
    assert (tmp_path / "journal.cbor").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["journal.cbor"]


def test_write_atomic_never_opens_an_existing_name(tmp_path: Path) -> None:
    """O_EXCL: a name that exists (planted, left by a crash) is refused, never written through."""

    class FixedName(FileOps):
        def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
            return super().open(join(tmp_path, ".journal.cbor.planted.tmp"), flags, mode)

        def replace(self, src: StrPath, dst: StrPath) -> None:
            raise AssertionError("not reached")

    (tmp_path / ".journal.cbor.planted.tmp").write_bytes(b"planted")
    with pytest.raises(FileExistsError):
        FixedName().write_atomic(tmp_path / "journal.cbor", b"new")
    assert (tmp_path / ".journal.cbor.planted.tmp").read_bytes() == b"planted"
    assert not (tmp_path / "journal.cbor").exists()


def test_join_builds_a_plain_string(tmp_path: Path) -> None:
    name = f"manifest-{os.urandom(32).hex()}.cose"
    path = join(tmp_path, name)
    assert not _interned(name)
    assert type(path) is str and path == f"{tmp_path}/{name}"


def test_journal_saves_intern_no_per_update_name(tmp_path: Path) -> None:
    """A save names a new manifest file and two temporary files: none of them is interned."""
    ops = NameCheckingOps()
    journal = Journal(tmp_path / "state", trust(), ops)
    journal.load()
    for sequence in (1, 2):
        manifest = make_manifest(sequence)
        journal.save(Record(State.DOWNLOADING, pending=manifest.digest), (manifest, None))
        journal.save(Record(installed=manifest.digest), (None, manifest))
    names = {name for name, _ in ops.seen}
    assert any(name.startswith("manifest-") for name in names)
    assert any(name.startswith(".journal.prev.cbor.") for name in names)
    per_update = [
        name
        for name, interned in ops.seen
        if interned and (name.startswith("manifest-") or name.endswith(".tmp"))
    ]
    assert per_update == []
