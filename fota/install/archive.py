"""The archive installer: a signed tar bundle with a recipe (the Upswift micro-update recipe).

The image is a tar archive (plain or gzip) that the engine verified against the signed
manifest (the manifest signs its SHA-256, so every byte of the bundle is signed). It holds a
recipe, ``fota-recipe.toml`` or ``fota-recipe.cbor``, at its top level, and payload files.
The installer places the recipe's files atomically per target directory, runs the recipe's
commands (only those local configuration allows) and its package steps, and can put every
directory back exactly as it was until the update is committed.

Recipe
------

TOML (``fota-recipe.toml``), or a CBOR map with the same string keys (``fota-recipe.cbor``)::

    format = 1                                  # required, the only format
    before = ["systemctl", "stop", "app"]       # optional: before the files are swapped in
    after = ["systemctl", "start", "app"]       # optional: after files and packages
    rollback = ["systemctl", "restart", "app"]  # optional: after the files were put back
    timeout = 120                               # optional: seconds per hook (capped locally)

    [[files]]
    source = "payload/app.py"                   # a regular file in the bundle
    target = "app/app.py"                       # relative to the configured root
    mode = 0o755                                # optional (default: the member's mode & 0o777)

    [[packages]]
    manager = "pip"                             # "apt" | "pip" | "npm"
    names = ["wheels/app_dep-1.0-py3-none-any.whl"]   # files of the bundle: .whl/.deb/.tgz

In CDDL::

    recipe = {
      format: 1,
      ? before: command, ? after: command, ? rollback: command,
      ? timeout: number .gt 0,
      ? files: [* { source: tstr, target: tstr, ? mode: 0..4095 }],
      ? packages: [* { manager: "apt" / "pip" / "npm", names: [+ tstr] }],
    }
    command = [+ tstr]                          ; an argument list, never a shell string

Every key and type is checked; an unknown key (at the top, in a file or a package table) is
refused with its name. Limits: at most :data:`MAX_FILES` files, :data:`MAX_MEMBERS` bundle
members, names of at most 255 bytes per component and 4096 bytes in all. Paths (members,
sources, targets) must be relative, without ``..``; targets must not be named twice nor be a
directory of another target. A package name must be a regular file of the bundle with the
manager's own suffix (:data:`SUFFIXES`: ``.whl``, ``.deb``, ``.tgz``), relative, without ``..``;
it is passed as that extracted file's absolute path. Anything else (a project directory, whose
``setup.py`` pip would run as root whatever ``--only-binary`` says; a registry name; ``file:``,
``owner/repo``, ``github:o/r``, a URL; an absolute path) is refused, named. A recipe file's
``mode`` with setuid or setgid bits is refused (:class:`SetuidRefused`) unless the installer
table says ``allow_setuid = true``.

The bundle is unpacked by hand, member by member: absolute names, ``..``, links (symbolic or
hard, inside or outside the bundle), device files, FIFOs and anything else that is not a
regular file or a directory are refused with the member's name. Only plain tar and gzip are
read (told by the first bytes; bzip2, xz, zstd and lzma are refused, named), and unpacking is
bounded while it streams, from each member's header before a byte of it is written
(:class:`Limits`, :class:`UnpackLimitError`): ``max_unpacked_size`` bytes in all,
``max_ratio`` times the bundle's own size (past :data:`RATIO_FLOOR`), and ``min_free_space``
left free.

Commands
--------

The recipe's hooks and package steps run through :func:`fota.hooks.run` (argument lists, stdin
``/dev/null``, an explicit environment, a session of their own killed as a group on timeout,
output logged). A hook runs only when an entry of ``allowed_commands`` is a prefix of its
argument list, compared element by element as written, and no argument after that prefix
starts with ``-`` (``["systemctl", "restart", "app"]`` allows exactly that command, never
``systemctl restart --root=... app`` nor ``systemctl enable --now ...``). An entry that is a
plain string, a program under root (the bundle could replace it), a relative path or a
configured package manager's program is refused at start (:class:`~fota.errors.ConfigError`).
A package step runs only when its manager is in ``allowed_managers``. Both are checked for the
whole recipe before anything changes. Package steps run offline and non-interactively::

    pip:  [*pip, "install", "--no-input", "--no-index", "--find-links", BUNDLE,
           "--only-binary=:all:", *paths]
    apt:  [*apt, "install", "-y", "-q", "--no-install-recommends", "--no-download", *paths]
    npm:  [*npm, "install", "--no-audit", "--no-fund", "--yes", "--ignore-scripts",
           "--offline", *paths]

each with cwd = root (npm installs into ``root/node_modules``) and, besides the table's
``env``, ``FOTA_UPDATE_ID``, ``FOTA_BUNDLE`` (and for pip ``PIP_DISABLE_PIP_VERSION_CHECK``)
in its environment.

Hooks run with cwd = root, the table's ``env`` and ``FOTA_STEP`` (before/after/rollback),
``FOTA_ROOT``, ``FOTA_UPDATE_ID``, ``FOTA_VERSION`` and, for before and after, ``FOTA_BUNDLE``
(the unpacked bundle) in their environment. Each hook may take the recipe's ``timeout`` capped
by the configured ``timeout``; package steps get the configured ``timeout``. Package steps cannot be
undone by the installer: a recipe that needs that does it in its ``rollback`` hook.

Atomicity
---------

The recipe's files are grouped into *units*: for a target directory that exists, the unit is
that directory; for one that does not, its shortest missing ancestor below root (created as a
whole); a unit inside another unit is merged into it (a file directly in root makes root
itself the unit). For each unit D the installer builds a staged copy ``.D.fota-<update id>``
beside it (same directory, so same filesystem): a copy of D's tree, the new files put in,
every file and directory fsynced. The copy (:class:`_Copy`) is made descriptor-relatively: the
directory ``.D.fota-<update id>`` is created ``0700`` under a descriptor of D's parent, every
entry of D is reached with ``openat``/``fstatat`` and ``O_NOFOLLOW``, owners and modes are set
with ``fchown``/``fchmod`` on the copy's descriptors (the copy's top gets D's mode last, so no
one but root can reach into it before it is complete); symlinks are copied as links, FIFOs are
made anew (never opened), sockets skipped (logged), device files refused, sparse files copied
sparsely, and the copies are bounded by ``max_copy_size`` and ``min_free_space``. The staged
tree's identity is taken from that descriptor: a user who renames it and plants another
directory at its name gets the install refused, never their directory swapped in.
Every directory from ``/`` to each target's deepest existing directory must be root's and
writable by no one else (:func:`fota.safefs.check_trusted_path`) unless the table says
``allow_writable_target = true``; even then the copy follows the rules above.

Then D and its copy are exchanged with one ``renameat2(RENAME_EXCHANGE)`` and the parent
directory is fsynced: at every instant D is the complete old tree or the complete new one.
Every rename of a unit is made under a descriptor of D's parent opened once per step without
following a user's link (:func:`fota.safefs.open_dir`), and a tree left beside D is removed
through such a descriptor only if it is the one recorded (:func:`_remove_side`): a user who
can write D's parent cannot redirect a rename through a link, block root on a FIFO, or have
root empty a directory they renamed there. ``root`` is resolved by the same checked walk
(:func:`fota.safefs.resolve_trusted_dir`), never by ``realpath``.
The old tree stays at the side path until commit. A unit that did not exist is created by one
``rename`` of its staged copy.

Units must be real directories on the filesystem of their parent: a symlink on the way from
root to a target directory, or a unit that is a mount point, is refused before anything changes.
Which tree a path holds is decided by its inode number, recorded in the transaction: a rename
keeps a directory's inode, so a re-run never has to trust a flag written after the fact. Both
trees are on one filesystem; the device number is not compared, because it is not stable
across a reboot (btrfs and overlayfs hand out anonymous ones, block devices get renumbered).

Without ``renameat2`` (ENOSYS, or EINVAL from a filesystem without RENAME_EXCHANGE) the
exchange is three renames in the same directory: ``D -> .D.fota-<id>.tmp``, ``side -> D``,
``.tmp -> side``. Recovery rule, applied to every unit before anything else on every re-run
(install, rollback, commit): if the ``.tmp`` path exists and D is missing, the crash came
between the first two renames, so ``.tmp`` is renamed back to D (the exchange did not happen);
if ``.tmp`` exists and D too, it came between the last two, so ``.tmp`` is renamed to the side
path (the exchange is finished). Either way the unit is then whole, old or new.

Several units are not swapped in one step. The transaction makes the sequence atomic as seen
once a call returns: install swaps them all (or, on any failure, swaps back those it swapped),
rollback swaps them all back; a re-run after a crash carries on in the same direction. So when
install or rollback has returned, every unit is new, or every unit is old.

Transaction and idempotence
---------------------------

``<state_dir>/archive/transaction.json`` (written atomically, fsynced) holds, for the update
id: the phase (``planned``, ``staged``, ``before_done``, ``swapped``, ``packages_done``,
``installed``, ``committing``, ``failed``, ``rolling_back``), the root, every unit (its path,
side and tmp paths, whether it was absent, the identities of its old and staged trees, whether
it is swapped), whether hooks have started, the recipe's rollback command and timeout, and, for
a failed install, the error. The bundle is unpacked afresh on every install run into
``<state_dir>/archive/bundle``.

* ``install`` run again: a finished install (``installed``) returns at once; a failed one
  (``failed``, ``rolling_back``) finishes putting things back and raises the same error;
  otherwise it continues: staging is redone from scratch until it is complete, a unit whose
  path already holds the staged tree is never swapped again, package steps already done are
  skipped. ``before`` runs again on a re-run unless the package steps are done (after a power
  cut the services it stopped have started again), ``after`` runs again unless the install
  finished: hooks may run twice and must be idempotent (stopping a stopped service is fine).
  A transaction of *another* update (never committed nor rolled back) is finished first: a
  commit in progress is completed, anything else is rolled back.
* ``install`` failing (a hook exits non-zero or times out, a package step fails, a swap fails):
  the phase becomes ``failed``, every swapped unit is swapped back, the staged copies are
  removed, the recipe's ``rollback`` runs (if ``before`` had started), the transaction is
  deleted and :class:`~fota.errors.InstallError` names the step and its last output line. A
  failure before any hook (unpacking, the recipe, a refused command, staging) changes nothing.
  The engine's rollback that follows is then a no-op.
* ``commit``: removes the old trees, the bundle, then the transaction; run again it removes
  what is left. A commit never fails on cleanup (it logs what it could not remove).
* ``rollback``: swaps back every unit still swapped (by identity), removes the units that were
  absent, the staged copies, runs the recipe's ``rollback`` hook (which may therefore run twice
  after a crash), then deletes the transaction. With no transaction for the update it is a
  no-op. After ``commit`` has started it refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gzip
import io
import os
import shutil
import stat
import tarfile
import tomllib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import structlog

from fota import crashpoints, hooks, safefs
from fota.core.manifest import Manifest
from fota.errors import ConfigError, InstallError
from fota.fileops import FileOps
from fota.install.base import DONE, Outcome, Progress, load_state, save_state
from fota.install.spec import Context, Spec

log = structlog.get_logger(__name__)

RECIPE_TOML = "fota-recipe.toml"
RECIPE_CBOR = "fota-recipe.cbor"
RECIPE_FORMAT = 1
MAX_FILES = 10_000
"""Files one recipe may place."""
MAX_MEMBERS = 20_000
"""Members (files and directories) one bundle may hold."""
MAX_PACKAGE_NAMES = 10_000
MAX_ARGS = 1_000
MAX_COMPONENT = 255
"""Bytes per path component."""
MAX_PATH = 4096
MAX_RECIPE_BYTES = 1 << 20
MANAGERS = ("apt", "pip", "npm")
SUFFIXES = {"pip": ".whl", "apt": ".deb", "npm": ".tgz"}
"""The only files each package manager is given: its own package format, from the bundle."""

WORK_NAME = "archive"
TXN_NAME = "transaction.json"
BUNDLE_NAME = "bundle"

# Phases of an install, in order; then the terminal ones.
_ORDER = ("planned", "staged", "before_done", "swapped", "packages_done", "installed")
_UNDOING = ("failed", "rolling_back")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# -- the recipe ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileStep:
    """One file of a recipe: bundle member ``source`` placed at ``root/target``."""

    source: str
    target: tuple[str, ...]
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class PackageStep:
    """One package step: ``manager`` installs ``names``."""

    manager: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Recipe:
    """A checked recipe (see the module docstring for the format)."""

    before: tuple[str, ...] | None = None
    after: tuple[str, ...] | None = None
    rollback: tuple[str, ...] | None = None
    timeout: float | None = None
    files: tuple[FileStep, ...] = ()
    packages: tuple[PackageStep, ...] = ()


def _bad(message: str) -> InstallError:
    return InstallError(f"archive installer: {message}")


def relative_parts(name: object, what: str) -> tuple[str, ...]:
    """Split a relative path into components; refuse absolute paths, ``..`` and long names.

    Empty and ``.`` components are dropped (``./a//b`` is ``a/b``).

    Raises:
        InstallError: naming ``what``.
    """
    if not isinstance(name, str) or not name:
        raise _bad(f"{what}: expected a non-empty path, got {name!r}")
    if "\0" in name:
        raise _bad(f"{what}: {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise _bad(f"{what}: {name!r} is an absolute path")
    if len(os.fsencode(name)) > MAX_PATH:
        raise _bad(f"{what}: {name[:60]!r}... is longer than {MAX_PATH} bytes")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    for part in parts:
        if part == "..":
            raise _bad(f"{what}: {name!r} goes up a directory (..)")
        if len(os.fsencode(part)) > MAX_COMPONENT:
            raise _bad(f"{what}: {name!r} has a component longer than {MAX_COMPONENT} bytes")
    if not parts:
        raise _bad(f"{what}: {name!r} names no file")
    return parts


def _check_keys(table: object, where: str, allowed: Sequence[str], required: Sequence[str]) -> Any:
    if not isinstance(table, Mapping):
        raise _bad(f"{where}: expected a table, got {type(table).__name__}")
    for key in table:
        if not isinstance(key, str):
            raise _bad(f"{where}: keys must be strings, got {key!r}")
        if key not in allowed:
            raise _bad(f"{where}: unknown key {key!r}")
    for key in required:
        if key not in table:
            raise _bad(f"{where}: missing key {key!r}")
    return table


def _command(value: object, where: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(a, str) and a and "\0" not in a for a in value)
    ):
        raise _bad(f"{where}: expected a non-empty list of strings (an argument list)")
    if len(value) > MAX_ARGS:
        raise _bad(f"{where}: {len(value)} arguments exceeds the limit of {MAX_ARGS}")
    return tuple(value)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_recipe(data: object, where: str = "recipe") -> Recipe:
    """Check a decoded recipe (TOML or CBOR) key by key.

    Raises:
        InstallError: naming the key at fault.
    """
    table = _check_keys(
        data,
        where,
        ("format", "before", "after", "rollback", "timeout", "files", "packages"),
        ("format",),
    )
    if not _int(table["format"]) or table["format"] != RECIPE_FORMAT:
        raise _bad(f"{where}.format: only format {RECIPE_FORMAT} is supported")
    hooks_ = {
        name: _command(table[name], f"{where}.{name}") if name in table else None
        for name in ("before", "after", "rollback")
    }
    timeout = table.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise _bad(f"{where}.timeout: expected a positive number of seconds, got {timeout!r}")
    raw_files = table.get("files", [])
    if not isinstance(raw_files, list):
        raise _bad(f"{where}.files: expected an array of tables")
    if len(raw_files) > MAX_FILES:
        raise _bad(f"{where}.files: {len(raw_files)} files exceeds the limit of {MAX_FILES}")
    files: list[FileStep] = []
    targets: set[tuple[str, ...]] = set()
    for i, raw in enumerate(raw_files):
        at = f"{where}.files[{i}]"
        entry = _check_keys(raw, at, ("source", "target", "mode"), ("source", "target"))
        source = "/".join(relative_parts(entry["source"], f"{at}.source"))
        target = relative_parts(entry["target"], f"{at}.target")
        mode = entry.get("mode")
        if mode is not None and (not _int(mode) or not 0 <= mode <= 0o7777):
            raise _bad(f"{at}.mode: expected permission bits 0..0o7777, got {mode!r}")
        if target in targets:
            raise _bad(f"{at}.target: {'/'.join(target)!r} is named twice")
        targets.add(target)
        files.append(FileStep(source, target, mode))
    for target in targets:
        for k in range(1, len(target)):
            if target[:k] in targets:
                raise _bad(
                    f"{where}.files: {'/'.join(target[:k])!r} is a file and the directory "
                    f"of {'/'.join(target)!r}"
                )
    raw_packages = table.get("packages", [])
    if not isinstance(raw_packages, list):
        raise _bad(f"{where}.packages: expected an array of tables")
    packages: list[PackageStep] = []
    count = 0
    for i, raw in enumerate(raw_packages):
        at = f"{where}.packages[{i}]"
        entry = _check_keys(raw, at, ("manager", "names"), ("manager", "names"))
        manager = entry["manager"]
        if manager not in MANAGERS:
            raise _bad(f"{at}.manager: {manager!r} is not one of {', '.join(MANAGERS)}")
        names = _command(entry["names"], f"{at}.names")
        suffix = SUFFIXES[manager]
        for j, name in enumerate(names):
            if name.startswith("-"):
                raise _bad(f"{at}.names[{j}]: {name!r} looks like an option, not a package")
            if "://" in name or "@" in name:
                # pip fetches "name @ https://..." despite --no-index; npm fetches URLs and
                # scoped git specs: a package step installs only what the bundle brings.
                raise _bad(f"{at}.names[{j}]: {name!r} names a download, not a package")
            if not name.endswith(suffix) or name.endswith("/" + suffix):
                # Anything else is a project directory (pip runs its setup.py whatever
                # --only-binary says), a registry name, a git spec (owner/repo, github:o/r) or
                # a path outside the bundle: none of them is what the bundle brings.
                raise _bad(
                    f"{at}.names[{j}]: {name!r} is not a {suffix} file of the bundle "
                    f"({manager} installs only {suffix} files the bundle brings)"
                )
            relative_parts(name, f"{at}.names[{j}]")  # no absolute path, no ..
        count += len(names)
        if count > MAX_PACKAGE_NAMES:
            raise _bad(f"{where}.packages: more than {MAX_PACKAGE_NAMES} names")
        packages.append(PackageStep(manager, names))
    return Recipe(
        before=hooks_["before"],
        after=hooks_["after"],
        rollback=hooks_["rollback"],
        timeout=float(timeout) if timeout is not None else None,
        files=tuple(files),
        packages=tuple(packages),
    )


# -- the bundle ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bundle:
    dir: Path
    files: dict[str, int]  # member name -> permission bits from the tar header
    recipe: Recipe


def _shown(name: str, limit: int = 200) -> str:
    """A member's name for a message: a name may be up to :data:`MAX_READ` bytes long."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def _refusal(member: tarfile.TarInfo) -> str | None:
    if member.isfile() or member.isdir():
        return None
    if member.issym() or member.islnk():
        target = member.linkname
        kind = "symbolic" if member.issym() else "hard"
        escapes = target.startswith("/") or ".." in target.split("/")
        where = "pointing outside the bundle" if escapes else "(links are not allowed)"
        return f"a {kind} link to {_shown(target)} {where}"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"an unsupported member type {member.type!r}"


@dataclass(frozen=True, slots=True)
class Limits:
    """What unpacking a bundle and staging a copy may cost (the installer table's keys).

    Attributes:
        max_unpacked_size: bytes the bundle's files may hold in all, unpacked.
        max_ratio: unpacked bytes per byte of the bundle as downloaded (a gzip bomb's
            ratio is about 1000); not applied below :data:`RATIO_FLOOR` bytes.
        max_copy_size: bytes (allocated, so a sparse file counts what it holds) the staged
            copies of the target directories may take in all.
        min_free_space: bytes that must stay free on the file system written to, checked
            before every file is unpacked or copied.
    """

    max_unpacked_size: int = 1 << 30
    max_ratio: float = 100.0
    max_copy_size: int = 4 << 30
    min_free_space: int = 16 << 20


RATIO_FLOOR = 16 << 20
"""Bytes a bundle may always unpack to, whatever its ratio (a small text bundle compresses well)."""

_MAGIC = (
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
)


class UnpackLimitError(InstallError):
    """Unpacking the bundle would pass a limit: named, with the member it was at.

    Attributes:
        limit: the installer table's key (``max_unpacked_size``, ``max_ratio``,
            ``min_free_space``, ``max_copy_size``).
    """

    def __init__(self, message: str, limit: str) -> None:
        self.limit = limit
        super().__init__(f"archive installer: {message}")


def _free(fd: int) -> int:
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def _extract(image: safefs.VerifiedImage, dest: Path, limits: Limits, where: str) -> dict[str, int]:
    """Unpack the verified bundle into ``dest`` (which must not exist), refusing unsafe members.

    Only plain tar and gzip are read (what the docs name); the compression is told by the
    bundle's first bytes, never by tarfile's guess, which would also take bzip2 and xz. The
    bytes are read from the descriptor their digest was checked over, never past the signed
    size.
    """
    raw = image.reader()
    head = raw.read(6)
    raw.seek(0)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            raise _bad(f"the bundle is {name}-compressed; only plain tar and gzip are accepted")
    stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") if head.startswith(b"\x1f\x8b") else raw
    # The expanded size is bounded while streaming: each member's size is known from its
    # header before a byte of it is written.
    allowed = min(limits.max_unpacked_size, max(RATIO_FLOOR, limits.max_ratio * image.size))
    os.makedirs(dest, 0o755)
    dest_fd = os.open(dest, _DIR_FLAGS)
    try:
        # tarfile reads a long-name or pax header whole, before we see its member: bounded
        # here, under it, so a header cannot make root hold gigabytes (a gzip of zeros).
        capped = _Capped(stream, int(allowed) + HEADER_BUDGET, where)
        with tarfile.open(fileobj=capped, mode="r:") as tar:
            return _extract_members(tar, dest, dest_fd, limits, allowed, image.size, where)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _bad(f"the image is not a readable tar archive: {exc}") from exc
    finally:
        os.close(dest_fd)


MAX_READ = 1 << 20
"""Bytes tarfile may ask for in one read: a header (long name, pax) larger than this is
refused before it is read; member data is read in pieces of this size."""
HEADER_BUDGET = 64 << 20
"""Decompressed bytes a bundle may hold besides its files' bytes (headers, padding)."""


class _Capped(io.RawIOBase):
    """The (decompressed) bundle as tarfile reads it: each read and all of them bounded."""

    def __init__(self, inner: Any, budget: int, where: str) -> None:
        self._inner = inner
        self._budget = budget
        self._where = where
        self._read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return int(self._inner.tell())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._inner.seek(offset, whence))

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_READ:
            raise UnpackLimitError(
                f"a bundle header (a long name or pax record) of {size} bytes is larger than "
                f"{MAX_READ} bytes",
                "max_unpacked_size",
            )
        data = bytes(self._inner.read(size))
        self._read += len(data)
        if self._read > self._budget:
            raise UnpackLimitError(
                f"the bundle unpacks to more than {self._budget} bytes with its headers "
                f"({self._where}.max_unpacked_size, max_ratio)",
                "max_unpacked_size",
            )
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _extract_members(
    tar: tarfile.TarFile,
    dest: Path,
    dest_fd: int,
    limits: Limits,
    allowed: float,
    compressed: int,
    where: str,
) -> dict[str, int]:
    files: dict[str, int] = {}
    dirs: set[str] = set()
    total = 0
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise _bad(f"the bundle has more than {MAX_MEMBERS} members")
        problem = _refusal(member)
        if problem:
            raise _bad(f"bundle member {_shown(member.name)}: {problem}")
        try:
            parts = relative_parts(member.name, "bundle member")
        except InstallError as exc:
            if member.name.strip("/.") == "" and member.isdir():
                continue  # "./", the archive's top directory
            raise _bad(f"bundle member {_shown(member.name)}: refused ({exc})") from None
        name = "/".join(parts)
        if name in files or (name in dirs and not member.isdir()):
            raise _bad(f"bundle member {_shown(member.name)}: appears twice")
        if member.isfile():
            total += member.size
            if total > limits.max_unpacked_size:
                raise UnpackLimitError(
                    f"bundle member {_shown(member.name)}: the bundle unpacks to more than "
                    f"{limits.max_unpacked_size} bytes ({where}.max_unpacked_size)",
                    "max_unpacked_size",
                )
            if total > allowed:
                raise UnpackLimitError(
                    f"bundle member {_shown(member.name)}: the bundle unpacks to more than "
                    f"{limits.max_ratio:g} times its {compressed} bytes ({where}.max_ratio)",
                    "max_ratio",
                )
            free = _free(dest_fd)
            if free - member.size < limits.min_free_space:
                raise UnpackLimitError(
                    f"bundle member {_shown(member.name)}: {member.size} bytes would leave "
                    f"less than {limits.min_free_space} bytes free ({free} free; "
                    f"{where}.min_free_space)",
                    "min_free_space",
                )
        for k in range(1, len(parts)):
            sub = "/".join(parts[:k])
            if sub in files:
                raise _bad(f"bundle member {_shown(member.name)}: {sub!r} is a file")
            if sub not in dirs:
                os.mkdir(dest.joinpath(*parts[:k]), 0o755)
                dirs.add(sub)
        path = dest.joinpath(*parts)
        if member.isdir():
            if name not in dirs:
                os.mkdir(path, 0o755)
                dirs.add(name)
            continue
        src = tar.extractfile(member)
        assert src is not None  # a regular file
        fd = os.open(path, _CREATE_FLAGS, 0o644)
        with src, open(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        files[name] = member.mode & 0o777
    return files


def _read_recipe(dest: Path, files: Mapping[str, int]) -> Recipe:
    found = [name for name in (RECIPE_TOML, RECIPE_CBOR) if name in files]
    if not found:
        raise _bad(f"the bundle has no {RECIPE_TOML} or {RECIPE_CBOR} at its top")
    if len(found) == 2:
        raise _bad(f"the bundle has both {RECIPE_TOML} and {RECIPE_CBOR}")
    path = dest / found[0]
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise _bad(f"{found[0]}: larger than {MAX_RECIPE_BYTES} bytes")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode()) if found[0] == RECIPE_TOML else cbor2.loads(raw)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, cbor2.CBORDecodeError) as exc:
        raise _bad(f"{found[0]}: cannot be read: {exc}") from exc
    recipe = parse_recipe(data, found[0])
    for i, f in enumerate(recipe.files):
        if f.source not in files:
            raise _bad(f"{found[0]}.files[{i}].source: {f.source!r} is not a file in the bundle")
    for i, pkg in enumerate(recipe.packages):
        for j, name in enumerate(pkg.names):
            at = f"{found[0]}.packages[{i}].names[{j}]"
            if "/".join(relative_parts(name, at)) not in files:
                raise _bad(f"{at}: {name!r} is not a file in the bundle")
    return recipe


# -- the transaction ----------------------------------------------------------------------


@dataclass(slots=True)
class _Unit:
    path: str  # the directory swapped as a whole
    side: str  # staged copy before the swap, old tree after it
    tmp: str  # only during the three-rename fallback
    absent: bool  # the directory did not exist before the install
    old: list[int] | None  # [st_ino] of the tree that was there
    new: list[int] | None = None  # of the staged tree, once staged
    swapped: bool = False  # informational; the identities decide


@dataclass(slots=True)
class _Txn:
    update_id: str
    phase: str
    root: str
    units: list[_Unit]
    rollback: list[str] | None
    hook_timeout: float
    hooks_started: bool = False
    error: str | None = None
    version: int = 1

    def after(self, phase: str) -> bool:
        """Whether this install got at least to ``phase``."""
        return self.phase in _ORDER and _ORDER.index(self.phase) >= _ORDER.index(phase)


def _ident(path: str | Path) -> list[int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [st.st_ino]


def _ident_at(dir_fd: int, name: str) -> list[int] | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return [st.st_ino]


def _lexists_at(dir_fd: int, name: str) -> bool:
    return _ident_at(dir_fd, name) is not None


def _load_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class _NoExchange(Exception):
    pass


def exchange(a: Path | str, b: Path | str, dir_fd: int = _AT_FDCWD) -> None:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``.

    Args:
        a: a path, or a name in ``dir_fd``.
        b: the other one.
        dir_fd: a directory descriptor both are relative to.

    Raises:
        OSError: the call failed (ENOSYS or EINVAL: not supported here).
    """
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library")
    if _renameat2(dir_fd, os.fsencode(a), dir_fd, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


MAX_DEPTH = 256
"""Directory levels a staged copy may have."""
MAX_COPY_ENTRIES = 200_000
"""Entries (files, directories, links) the staged copies of one install may have in all."""


class _Copy:
    """Copies a directory tree descriptor-relatively, bounded; see :meth:`tree`.

    Every entry is reached with ``openat``/``fstatat`` relative to a directory descriptor
    opened with ``O_NOFOLLOW``; owner and mode are set with ``fchown``/``fchmod`` on the
    descriptor of the copy, whose ``fstat`` is what was copied. The copy's directories are
    created ``0700`` and get their own mode only once their entries are in, and the top one
    last of all: until the copy is finished, no one but root can reach into it.
    """

    def __init__(self, limits: Limits, where: str) -> None:
        self.limits = limits
        self.where = where
        self.used = 0
        self.entries = 0
        self.as_root = os.geteuid() == 0

    def _limit(self, message: str, key: str) -> UnpackLimitError:
        return UnpackLimitError(f"{message} ({self.where}.{key})", key)

    def finish(self, src_fd: int, dst_fd: int, st: os.stat_result) -> None:
        """Give the copy ``dst_fd`` the owner, mode and extended attributes of ``src_fd``."""
        if self.as_root:
            os.fchown(dst_fd, st.st_uid, st.st_gid)
        # After fchown, which clears set-id bits. The owner is the original's, so a user's
        # own setuid bit stays theirs: nothing here makes a file setuid-root that was not.
        os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
        if self.as_root:
            with contextlib.suppress(OSError):  # chown clears file capabilities too
                for attr in os.listxattr(src_fd):
                    os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))

    def tree(self, src_fd: int, dst_fd: int, shown: str, dev: int, depth: int = 0) -> None:
        """Copy the entries of the directory ``src_fd`` into the empty directory ``dst_fd``.

        Symlinks are copied as links, never followed; a FIFO is created anew (never opened, so
        it cannot block); a socket is skipped (it cannot be copied: its server makes it again);
        a device file is refused. Regular files are copied sparsely.

        Raises:
            InstallError: a device file, a mount point, an entry that changed type while it
                was copied, or a limit (:class:`UnpackLimitError`), each named.
        """
        if depth > MAX_DEPTH:
            raise _bad(f"{shown}: more than {MAX_DEPTH} directory levels")
        with os.scandir(src_fd) as it:
            names = []
            for entry in it:
                self.entries += 1
                if self.entries > MAX_COPY_ENTRIES:
                    raise _bad(f"{shown}: more than {MAX_COPY_ENTRIES} entries to copy")
                names.append(entry.name)
        for name in names:
            here = f"{shown}/{name}"
            try:
                st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile: it is not in the copy either
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                self._dir(src_fd, dst_fd, name, here, dev, depth)
            elif stat.S_ISREG(mode):
                self._file(src_fd, dst_fd, name, here)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
                if self.as_root:  # on the link itself, in a directory only root can reach
                    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(name, 0o600, dir_fd=dst_fd)
                if self.as_root:
                    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
                # By name, in a directory only root can reach: nothing can be planted there.
                os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_fd)
                log.info("archive_copy_fifo_made_anew", path=here)
            elif stat.S_ISSOCK(mode):
                log.warning("archive_copy_socket_skipped", path=here)
            else:
                raise _bad(f"{here}: a {safefs.file_type(st)} in a target directory is not copied")

    def _dir(self, src_fd: int, dst_fd: int, name: str, here: str, dev: int, depth: int) -> None:
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _bad(
                    f"{here}: changed while it was copied (not a directory any more)"
                ) from exc
            raise
        try:
            st = os.fstat(sub)
            if st.st_dev != dev:
                raise _bad(f"{here} is a mount point inside a target directory")
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            copy = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
            try:
                self.tree(sub, copy, here, dev, depth + 1)
                self.finish(sub, copy, st)
                os.fsync(copy)
            finally:
                os.close(copy)
        finally:
            os.close(sub)

    def _file(self, src_fd: int, dst_fd: int, name: str, here: str) -> None:
        src = safefs.open_regular(src_fd, name, what="staging copy")  # O_NOFOLLOW|O_NONBLOCK
        try:
            st = os.fstat(src)
            cost = min(st.st_size, st.st_blocks * 512)  # what it holds: holes cost nothing
            left = self.limits.max_copy_size - self.used
            if cost > left:
                raise self._limit(
                    f"{here}: copying the target directories takes more than "
                    f"{self.limits.max_copy_size} bytes",
                    "max_copy_size",
                )
            free = _free(dst_fd)
            if free - cost < self.limits.min_free_space:
                raise self._limit(
                    f"{here}: copying {cost} bytes would leave less than "
                    f"{self.limits.min_free_space} bytes free ({free} free)",
                    "min_free_space",
                )
            out = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dst_fd)
            try:
                # At most what is left of the budget: a file that grows meanwhile cannot
                # keep root copying; holes are skipped, so a sparse file stays sparse.
                safefs.copy_fd(src, out, max(st.st_size, left), what=here)
                self.used += os.fstat(out).st_blocks * 512
                if self.used > self.limits.max_copy_size:
                    raise self._limit(
                        f"{here}: copying the target directories takes more than "
                        f"{self.limits.max_copy_size} bytes",
                        "max_copy_size",
                    )
                self.finish(src, out, st)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(src)


def _open_or_make_dir(dir_fd: int, name: str, shown: str) -> int:
    """Open the directory ``name`` in ``dir_fd`` (made ``0755`` if missing), never a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _bad(f"{shown}: {name!r} is a symbolic link") from exc
        if exc.errno == errno.ENOTDIR:
            raise _bad(f"{shown}: {name!r} is not a directory") from exc
        raise
    os.mkdir(name, 0o700, dir_fd=dir_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    os.fchmod(fd, 0o755)  # whatever fota's umask: new directories are 0755
    return fd


def _place(bundle_file: Path, dir_fd: int, name: str, mode: int, shown: str) -> None:
    """Write the bundle's file as the new file ``name`` in ``dir_fd``, fsynced.

    A file it replaces keeps its owner; whatever is at the name (a file, a symlink) is
    unlinked, never followed, and the new file is created ``O_EXCL | O_NOFOLLOW``.
    """
    owner: tuple[int, int] | None = None
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise _bad(f"{shown} is a directory; a file of the recipe cannot replace it")
        if stat.S_ISREG(st.st_mode):
            owner = (st.st_uid, st.st_gid)
        os.unlink(name, dir_fd=dir_fd)
    src = os.open(bundle_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        out = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            safefs.copy_fd(src, out, os.fstat(src).st_size, what=shown)
            if owner is not None and os.geteuid() == 0:
                os.fchown(out, *owner)  # a replaced file keeps its owner
            os.fchmod(out, mode)  # after fchown, which clears set-id bits
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(src)


def _package_path(bundle: _Bundle, name: str, where: str) -> str:
    """The absolute path of the bundle's file ``name``, which must stay inside the bundle."""
    key = "/".join(relative_parts(name, where))
    path = os.path.realpath(bundle.dir.joinpath(*key.split("/")))
    top = os.path.realpath(bundle.dir)
    if (
        key not in bundle.files
        or os.path.commonpath([path, top]) != top
        or not stat.S_ISREG(os.lstat(path).st_mode)
    ):
        raise _bad(f"{where}: {name!r} is not a file in the bundle")
    return path


def _remove_tree(path: str | Path) -> None:
    """Remove a path in fota's own state directory (only root can write there)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.lexists(path):
        shutil.rmtree(path)


def _empty_dir(fd: int, shown: str, depth: int = 0) -> None:
    """Remove every entry of the open directory ``fd``, descriptor-relatively.

    Nothing but a directory is ever opened (``O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK``): a
    symlink, a FIFO or a device is unlinked by name, never followed and never blocked on.
    """
    if depth > MAX_DEPTH:
        raise _bad(f"{shown}: more than {MAX_DEPTH} directory levels to remove")
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        if is_dir:
            try:
                sub = os.open(name, _DIR_FLAGS | os.O_NONBLOCK, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                os.unlink(name, dir_fd=fd)  # swapped for a link or a file meanwhile
                continue
            try:
                _empty_dir(sub, f"{shown}/{name}", depth + 1)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)


def _remove_side(path: str | Path, expect: list[int] | None) -> None:
    """Remove the tree fota left at ``path`` (a staged copy or an old tree) beside a target.

    The parent may be a directory a user can write (``allow_writable_target``, or a sticky
    one above root): they can rename what is at ``path`` or plant something there. So the
    name is opened ``O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK`` under a descriptor of the parent
    (a FIFO cannot block it, a link is not followed), the tree is judged by that descriptor
    (its inode is ``expect``; with no record, root owns it, as every copy fota makes) and
    emptied through it (:func:`_empty_dir`). ``shutil.rmtree`` would open a FIFO planted at
    the name and block forever, and would empty any directory renamed there, a root-owned
    one the user cannot otherwise change included.

    Raises:
        InstallError: something else is at ``path``; it is left alone, named.
    """
    path = Path(path)
    try:
        parent = safefs.open_dir(path.parent)
    except FileNotFoundError:
        return
    try:
        try:
            fd = os.open(path.name, _DIR_FLAGS | os.O_NONBLOCK, dir_fd=parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
            raise _bad(
                f"{path} is a {safefs.file_type(st)}, not the tree fota left there; left alone"
            ) from exc
        try:
            st = os.fstat(fd)
            if [st.st_ino] != expect if expect is not None else st.st_uid != os.geteuid():
                raise _bad(
                    f"{path} is not the tree fota left there (inode {st.st_ino}, owner "
                    f"{st.st_uid}); left alone"
                )
            _empty_dir(fd, str(path))
            with contextlib.suppress(FileNotFoundError):
                here = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
                if here.st_ino == st.st_ino:  # still the one emptied (renamed: left, empty)
                    os.rmdir(path.name, dir_fd=parent)
        finally:
            os.close(fd)
        safefs.fsync_dir(parent)
    finally:
        os.close(parent)


# -- the installer ------------------------------------------------------------------------


class SetuidRefused(InstallError):
    """A recipe asks for a setuid or setgid file, and the installer table does not allow it.

    Attributes:
        target: the file (relative to root).
        mode: the mode the recipe asks for.
    """

    def __init__(self, where: str, target: str, mode: int, setting: str) -> None:
        self.target = target
        self.mode = mode
        super().__init__(
            f"archive installer: {where}: {target!r} with mode {mode:#o} would be setuid or "
            f"setgid; refused unless {setting}.allow_setuid = true"
        )


def _allow_list(
    entries: object, where: str, root: Path, managers: Mapping[str, Sequence[str]]
) -> frozenset[tuple[str, ...]]:
    """Check ``allowed_commands``: argument-list prefixes, none that the bundle can replace.

    Raises:
        ConfigError: naming the entry at fault and what to write instead.
    """
    if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
        raise ConfigError(f"{where}.allowed_commands: expected a list of argument lists")
    # By base name: "/usr/bin/pip" is the configured "pip" (or the other way round).
    programs = {os.path.basename(argv[0]) for argv in managers.values() if argv}
    tops = {os.path.normpath(root), os.path.realpath(root)}
    out: set[tuple[str, ...]] = set()
    for i, entry in enumerate(entries):
        at = f"{where}.allowed_commands[{i}]"
        if isinstance(entry, str):
            raise ConfigError(
                f"{at}: {entry!r} is a program name; an entry is now the argument list a "
                f'command must start with, such as [{entry!r}, "restart", "app"] '
                "(a program name alone let a recipe run it with any arguments)"
            )
        if (
            not isinstance(entry, Sequence)
            or not entry
            or not all(isinstance(a, str) and a and "\0" not in a for a in entry)
        ):
            raise ConfigError(f"{at}: expected a non-empty list of strings, got {entry!r}")
        program = entry[0]
        if "/" in program and not program.startswith("/"):
            raise ConfigError(f"{at}: {program!r} is relative to root, which the bundle changes")
        if program.startswith("/") and any(
            p.startswith(t + os.sep) for t in tops for p in (os.path.normpath(program),)
        ):
            raise ConfigError(
                f"{at}: {program!r} is under root {root}, where the bundle can replace it"
            )
        if os.path.basename(program) in programs:
            raise ConfigError(
                f"{at}: {program!r} is a package manager; allow package steps with "
                f"{where}.allowed_managers, not as a hook (a hook could install anything)"
            )
        out.add(tuple(entry))
    return frozenset(out)


class ArchiveInstaller:
    """Install a tar bundle by its recipe: files swapped in per directory, hooks, packages.

    Args:
        root: the directory recipe targets are relative to (must exist).
        state_dir: fota's state directory (the installer works in ``state_dir/archive``).
        allowed_commands: argument-list prefixes a recipe hook must start with (each a list,
            its program a name or an absolute path outside root); the hook's arguments after
            the prefix may not start with ``-``.
        allowed_managers: the package managers (``apt``, ``pip``, ``npm``) recipes may use.
        pip, apt, npm: the package managers' argument lists.
        timeout: seconds a command may take (a recipe's ``timeout`` is capped by it).
        where: the settings table's name, for messages (``installers.app``).
        use_exchange: swap with ``renameat2(RENAME_EXCHANGE)``; False forces the three-rename
            fallback (for tests and for filesystems known not to support it).
        env: variables added to the environment of hooks and package steps.
        allow_setuid: let a recipe give a file setuid or setgid bits.
        allow_writable_target: install even when a non-root user can write a directory on
            the way to a target (warned, not refused).
        limits: unpacking and staging bounds.

    Raises:
        ConfigError: a bad ``allowed_commands`` entry, an unknown manager.
    """

    def __init__(
        self,
        root: Path,
        state_dir: Path,
        *,
        allowed_commands: Sequence[Sequence[str]] = (),
        allowed_managers: Sequence[str] = (),
        pip: Sequence[str] = ("pip",),
        apt: Sequence[str] = ("apt-get",),
        npm: Sequence[str] = ("npm",),
        timeout: float = 30.0,
        where: str = "installers.archive",
        use_exchange: bool = True,
        env: Mapping[str, str] | None = None,
        allow_setuid: bool = False,
        allow_writable_target: bool = False,
        limits: Limits = Limits(),  # frozen: sharing the default is safe
    ) -> None:
        self.root = Path(root)
        self.managers = {"pip": list(pip), "apt": list(apt), "npm": list(npm)}
        self.allowed = _allow_list(allowed_commands, where, self.root, self.managers)
        for manager in allowed_managers:
            if manager not in MANAGERS:
                raise ConfigError(
                    f"{where}.allowed_managers: {manager!r} is not one of {', '.join(MANAGERS)}"
                )
        self.allowed_managers = frozenset(allowed_managers)
        self.timeout = timeout
        self.where = where
        self.use_exchange = use_exchange
        self.env = dict(env or {})
        self.allow_setuid = allow_setuid
        self.allow_writable_target = allow_writable_target
        self.limits = limits
        self.work = Path(state_dir) / WORK_NAME
        self.txn_path = self.work / TXN_NAME
        self.bundle_dir = self.work / BUNDLE_NAME
        self._ops = FileOps()

    # -- transaction file ---------------------------------------------------------------

    def _load(self) -> _Txn | None:
        def make(data: dict[str, Any]) -> _Txn:
            units = [_Unit(**u) for u in data.pop("units")]
            return _Txn(units=units, **data)

        return load_state(self.txn_path, "archive installer", make)

    def _save(self, txn: _Txn) -> None:
        save_state(self.txn_path, txn)

    def _drop(self) -> None:
        _remove_tree(self.bundle_dir)
        self._ops.unlink(self.txn_path)
        self._ops.fsync_dir(self.work)

    # -- checks -------------------------------------------------------------------------

    def _check_allowed(self, argv: Sequence[str], what: str) -> None:
        for entry in self.allowed:
            n = len(entry)
            # The whole prefix, then no options: "systemctl restart app" must not become
            # "systemctl restart --root=/opt/app app", nor apt-get "-o ...Pre-Invoke=...".
            if tuple(argv[:n]) == entry and not any(a.startswith("-") for a in argv[n:]):
                return
        raise _bad(
            f"{what}: command {list(argv)!r} is not allowed by {self.where}.allowed_commands "
            "(no entry is a prefix of it, or an argument after the prefix is an option)"
        )

    def _check_recipe(self, recipe: Recipe) -> None:
        for name in ("before", "after", "rollback"):
            argv = getattr(recipe, name)
            if argv is not None:
                self._check_allowed(argv, f"recipe {name}")
        for i, pkg in enumerate(recipe.packages):
            if pkg.manager not in self.allowed_managers:
                raise _bad(
                    f"recipe packages[{i}]: the package manager {pkg.manager!r} is not allowed "
                    f"by {self.where}.allowed_managers"
                )
        for i, f in enumerate(recipe.files):
            if f.mode is not None and f.mode & (stat.S_ISUID | stat.S_ISGID):
                if not self.allow_setuid:
                    raise SetuidRefused(
                        f"recipe files[{i}].mode", "/".join(f.target), f.mode, self.where
                    )
                log.warning("archive_setuid_allowed", target="/".join(f.target), mode=f.mode)

    def _unpack(self, candidate: Path, manifest: Manifest) -> _Bundle:
        self.work.mkdir(parents=True, exist_ok=True)
        _remove_tree(self.bundle_dir)  # unpacked afresh on every run: nothing half-written
        body = manifest.body
        try:
            # Hashed over the descriptor that is then read: the bytes unpacked are the signed
            # ones, whatever is swapped in at the candidate's name or appended to it.
            with safefs.open_verified(
                candidate, body.image_sha256, body.image_size, what="bundle"
            ) as image:
                files = _extract(image, self.bundle_dir, self.limits, self.where)
            recipe = _read_recipe(self.bundle_dir, files)
        except OSError as exc:
            raise _bad(f"unpacking the bundle: {exc}") from exc
        return _Bundle(self.bundle_dir, files, recipe)

    # -- planning and staging -----------------------------------------------------------

    def _plan(self, manifest: Manifest, recipe: Recipe) -> _Txn:
        # Resolved by a checked walk, not realpath: a user's symlink on the way (or a
        # directory they can write before one) must not choose where root installs.
        try:
            root = safefs.resolve_trusted_dir(
                self.root, allow_writable=self.allow_writable_target, what=self.where
            )
        except (NotADirectoryError, FileNotFoundError) as exc:
            raise _bad(f"root {self.root} is not a directory") from exc
        chosen: set[tuple[str, ...]] = set()
        checked: set[Path] = set()
        for f in recipe.files:
            where = f.target[:-1]
            unit = where
            for k in range(1, len(where) + 1):
                path = root.joinpath(*where[:k])
                if os.path.islink(path):
                    raise _bad(f"target directory {path} is a symbolic link")
                if not os.path.lexists(path):
                    unit = where[:k]  # the shortest missing ancestor is created as a whole
                    break
                if not path.is_dir():
                    raise _bad(f"target directory {path} exists and is not a directory")
            chosen.add(unit)
            # Every directory from / to the deepest one that exists on the way to the target:
            # a user who can write one of them can redirect what root writes below it.
            deepest = root.joinpath(*where)
            while not os.path.lexists(deepest):
                deepest = deepest.parent
            if deepest not in checked:
                checked.add(deepest)
                safefs.check_trusted_path(
                    deepest, allow_writable=self.allow_writable_target, what=self.where
                )
        units: list[_Unit] = []
        for unit in sorted(chosen, key=lambda u: (len(u), u)):
            if any(unit[: len(other)] == other for other in chosen if len(other) < len(unit)):
                continue  # inside another unit: staged with it
            path = root.joinpath(*unit)
            if path.parent == path:
                raise _bad(f"root {root} has no parent directory to stage beside")
            ident = _ident(path)
            if ident is not None and os.lstat(path).st_dev != os.lstat(path.parent).st_dev:
                raise _bad(f"target directory {path} is a mount point; target files below it")
            side = path.with_name(f".{path.name}.fota-{manifest.update_id}")
            tmp = side.with_name(side.name + ".tmp")
            for p in (side, tmp):
                if os.path.lexists(p):
                    raise _bad(f"{p} exists and is not fota's: remove it")
            units.append(_Unit(str(path), str(side), str(tmp), ident is None, ident))
        txn = _Txn(
            update_id=manifest.update_id,
            phase="planned",
            root=str(root),
            units=units,
            rollback=list(recipe.rollback) if recipe.rollback else None,
            hook_timeout=self._hook_timeout(recipe),
        )
        self._save(txn)
        log.info("archive_planned", units=[u.path for u in units], update_id=txn.update_id)
        return txn

    def _hook_timeout(self, recipe: Recipe) -> float:
        return min(recipe.timeout, self.timeout) if recipe.timeout else self.timeout

    def _stage(self, txn: _Txn, bundle: _Bundle) -> None:
        root = Path(txn.root)
        placed = 0
        copy = _Copy(self.limits, self.where)
        for unit in txn.units:
            path, side = Path(unit.path), Path(unit.side)
            _remove_side(side, unit.new)  # an earlier run's unfinished copy, by its identity
            parent = safefs.open_dir(path.parent)
            try:
                placed += self._stage_unit(unit, parent, root, bundle, copy, txn)
            finally:
                os.close(parent)
        if placed != len(bundle.recipe.files):
            raise _bad("the recipe's targets do not match the planned directories")

    def _stage_unit(
        self, unit: _Unit, parent: int, root: Path, bundle: _Bundle, copy: _Copy, txn: _Txn
    ) -> int:
        """Build the staged copy of one unit in ``parent``; return how many files it placed."""
        path, side = Path(unit.path), Path(unit.side)
        src: int | None = None
        if unit.absent:
            if os.path.lexists(path):
                raise _bad(f"{path} appeared while the update was staged")
        else:
            src = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        try:
            top = os.fstat(src) if src is not None else None
            if top is not None and [top.st_ino] != unit.old:
                raise _bad(f"{path} changed while the update was staged")
            os.mkdir(side.name, 0o700, dir_fd=parent)
            dst = os.open(side.name, _DIR_FLAGS, dir_fd=parent)
            try:
                made = os.fstat(dst)
                if made.st_uid != os.geteuid() or os.listdir(dst):
                    raise _bad(f"{side} changed while the update was staged")
                # Journaled before anything goes in: whoever removes it later (a re-run, the
                # undo) removes this directory, not one a user renamed to its name.
                unit.new = [made.st_ino]
                self._save(txn)
                if src is not None and top is not None:
                    copy.tree(src, dst, str(path), top.st_dev)
                placed = self._place_files(unit, dst, root, bundle)
                if src is not None and top is not None:
                    copy.finish(src, dst, top)
                else:
                    os.fchmod(dst, 0o755)  # whatever fota's umask: new directories are 0755
                os.fsync(dst)
                os.fsync(parent)
            finally:
                os.close(dst)
        finally:
            if src is not None:
                os.close(src)
        return placed

    def _place_files(self, unit: _Unit, dst: int, root: Path, bundle: _Bundle) -> int:
        prefix = Path(unit.path).relative_to(root).parts
        placed = 0
        for f in bundle.recipe.files:
            if f.target[: len(prefix)] != prefix:
                continue
            placed += 1
            rel = f.target[len(prefix) :]
            shown = f"target {'/'.join(f.target)!r}"
            fds: list[int] = []
            try:
                here = dst
                for part in rel[:-1]:
                    here = _open_or_make_dir(here, part, shown)
                    fds.append(here)
                mode = f.mode if f.mode is not None else bundle.files[f.source]
                _place(bundle.dir / f.source, here, rel[-1], mode, shown)
                for fd in reversed(fds):
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
        return placed

    # -- swapping -----------------------------------------------------------------------

    # The unit's parent may be a directory a user can write (allow_writable_target): every
    # rename happens under a descriptor of it, opened once per step without following a
    # user's link, so replacing a directory above it with a link to another one (/etc)
    # cannot move that one's entries.

    def _settle(self, unit: _Unit) -> bool:
        """Finish an interrupted three-rename exchange; return whether the unit is swapped."""
        path, side, tmp = Path(unit.path), Path(unit.side), Path(unit.tmp)
        parent = safefs.open_dir(path.parent)
        try:
            if _lexists_at(parent, tmp.name):
                if not _lexists_at(parent, path.name):
                    # Between the first two renames: the exchange did not happen.
                    os.rename(tmp.name, path.name, src_dir_fd=parent, dst_dir_fd=parent)
                elif not _lexists_at(parent, side.name):
                    # Between the last two: the exchange is finished.
                    os.rename(tmp.name, side.name, src_dir_fd=parent, dst_dir_fd=parent)
                else:
                    raise _bad(f"{tmp}: left over beside {path} and {side}")
                safefs.fsync_dir(parent)
            ident = _ident_at(parent, path.name)
        finally:
            os.close(parent)
        if ident is None and unit.absent:
            return False
        if ident is not None and ident == unit.new:
            return True
        if ident is not None and ident == unit.old:
            return False
        raise _bad(f"{path} is neither the old nor the new tree (changed outside fota?)")

    def _exchange(self, unit: _Unit, parent: int) -> None:
        path, side, tmp = Path(unit.path).name, Path(unit.side).name, Path(unit.tmp).name
        if self.use_exchange:
            try:
                exchange(path, side, parent)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning("archive_no_exchange", path=unit.path, error=str(exc))
                self.use_exchange = False
        os.rename(path, tmp, src_dir_fd=parent, dst_dir_fd=parent)
        os.rename(side, path, src_dir_fd=parent, dst_dir_fd=parent)
        os.rename(tmp, side, src_dir_fd=parent, dst_dir_fd=parent)

    def _swap(self, unit: _Unit, forward: bool) -> None:
        path, side = Path(unit.path), Path(unit.side)
        parent = safefs.open_dir(path.parent)
        try:
            if unit.absent and forward:
                os.rename(side.name, path.name, src_dir_fd=parent, dst_dir_fd=parent)
            elif unit.absent:
                if _lexists_at(parent, side.name):
                    raise _bad(f"{side} exists; cannot move {path} back out of the way")
                # Then removed with the staged copies.
                os.rename(path.name, side.name, src_dir_fd=parent, dst_dir_fd=parent)
            else:
                self._exchange(unit, parent)
            safefs.fsync_dir(parent)
        finally:
            os.close(parent)
        unit.swapped = forward
        log.info("archive_swapped", path=str(path), new=forward)

    def _swap_all(self, txn: _Txn) -> None:
        for i, unit in enumerate(txn.units):
            if self._settle(unit):
                continue  # swapped by an earlier run: never twice
            if _ident(unit.side) != unit.new:
                raise _bad(f"the staged copy {unit.side} is missing")
            self._swap(unit, forward=True)
            self._save(txn)
            if i == 0 and len(txn.units) > 1:
                crashpoints.point("archive:swapped_one")

    def _restore_all(self, txn: _Txn) -> None:
        restored = 0
        for unit in reversed(txn.units):
            if not self._settle(unit):
                continue
            self._swap(unit, forward=False)
            self._save(txn)
            restored += 1
            if restored == 1 and len(txn.units) > 1:
                crashpoints.point("archive:restored_one")
        for unit in txn.units:  # the staged copies (and the new trees of absent units)
            try:
                _remove_side(unit.side, unit.new)
            except InstallError as exc:  # the files are back; what is left there is not ours
                log.warning("archive_cleanup_refused", path=unit.side, error=str(exc))

    # -- commands -----------------------------------------------------------------------

    async def _run(
        self, argv: Sequence[str], step: str, timeout: float, env: Mapping[str, str], cwd: Path
    ) -> None:
        try:
            done = await hooks.run(argv, name=f"archive {step}", timeout=timeout, env=env, cwd=cwd)
        except hooks.CommandNotFound as exc:
            raise _bad(f"{step} failed: {exc}") from exc
        if not done.ok:
            raise _bad(hooks.describe(f"{step} failed", done, timeout))

    def _env(self, txn: _Txn, manifest: Manifest, step: str) -> dict[str, str]:
        env = {
            **self.env,
            "FOTA_STEP": step,
            "FOTA_ROOT": txn.root,
            "FOTA_UPDATE_ID": txn.update_id,
            "FOTA_VERSION": manifest.body.version,
        }
        if step != "rollback":
            env["FOTA_BUNDLE"] = str(self.bundle_dir)
        return env

    async def _hook(self, txn: _Txn, manifest: Manifest, step: str, argv: Sequence[str]) -> None:
        env = self._env(txn, manifest, step)
        await self._run(argv, f"{step} hook", txn.hook_timeout, env, Path(txn.root))

    async def _packages(self, txn: _Txn, bundle: _Bundle) -> None:
        for i, pkg in enumerate(bundle.recipe.packages):
            # Absolute paths of the bundle's own files (checked again here: never a name the
            # package manager would look up elsewhere, never a directory it would build).
            names = [
                _package_path(bundle, n, f"recipe packages[{i}].names[{j}]")
                for j, n in enumerate(pkg.names)
            ]
            base = self.managers[pkg.manager]
            env = {
                **self.env,
                "FOTA_UPDATE_ID": txn.update_id,
                "FOTA_BUNDLE": str(bundle.dir),
            }
            if pkg.manager == "pip":
                offline = ["--no-input", "--no-index", "--find-links", str(bundle.dir)]
                # Wheels only: an sdist would run its setup.py, code no command check covers.
                argv = [*base, "install", *offline, "--only-binary=:all:", *names]
                env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # offline: no index to ask
            elif pkg.manager == "apt":
                # --no-download: what the bundle brings and what is installed, nothing else.
                quiet = ["-y", "-q", "--no-install-recommends", "--no-download"]
                argv = [*base, "install", *quiet, *names]
            else:
                # No lifecycle scripts: they are shell strings from the bundle. --offline:
                # dependencies come from the tarballs or the cache, never the registry.
                quiet = ["--no-audit", "--no-fund", "--yes", "--ignore-scripts", "--offline"]
                argv = [*base, "install", *quiet, *names]
            await self._run(argv, f"{pkg.manager} step", self.timeout, env, Path(txn.root))

    # -- undo -----------------------------------------------------------------------------

    async def _undo(self, txn: _Txn, manifest: Manifest | None) -> str | None:
        """Put every unit back, run the recipe's rollback; return that hook's failure, if any."""
        if txn.phase not in _UNDOING:
            txn.phase = "rolling_back"
            await asyncio.to_thread(self._save, txn)
        try:
            await asyncio.to_thread(self._restore_all, txn)
        except OSError as exc:
            raise _bad(f"putting the previous files back: {exc}") from exc
        problem = None
        if txn.hooks_started and txn.rollback:
            try:
                self._check_allowed(txn.rollback, "recipe rollback")
                env = {
                    **self.env,
                    "FOTA_STEP": "rollback",
                    "FOTA_ROOT": txn.root,
                    "FOTA_UPDATE_ID": txn.update_id,
                    "FOTA_VERSION": manifest.body.version if manifest else "",
                }
                await self._run(
                    txn.rollback, "rollback hook", txn.hook_timeout, env, Path(txn.root)
                )
            except InstallError as exc:
                problem = str(exc).removeprefix("archive installer: ")
                log.error("archive_rollback_hook_failed", error=problem)
        crashpoints.point("archive:rolled_back")
        await asyncio.to_thread(self._drop)
        log.info("archive_rolled_back", update_id=txn.update_id)
        return problem

    async def _fail(self, txn: _Txn, manifest: Manifest, message: str) -> InstallError:
        if txn.phase not in _UNDOING:
            txn.phase, txn.error = "failed", message
            await asyncio.to_thread(self._save, txn)
        log.error("archive_install_failed", error=message, update_id=txn.update_id)
        problem = await self._undo(txn, manifest)
        text = f"{message}; the previous files are back"
        if problem:
            text += f", but the recipe's rollback failed: {problem}"
        return InstallError(text)

    async def _finish_stale(self, txn: _Txn) -> None:
        log.warning("archive_stale_transaction", update_id=txn.update_id, phase=txn.phase)
        if txn.phase == "committing":
            await self._commit(txn)
        else:
            await self._undo(txn, None)

    # -- the contract -------------------------------------------------------------------

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Unpack, stage, run ``before``, swap every directory, packages, ``after``."""
        txn = await asyncio.to_thread(self._load)
        if txn is not None and txn.update_id != manifest.update_id:
            await self._finish_stale(txn)
            txn = None
        if txn is not None and txn.phase in ("installed", "committing"):
            progress(100)
            return DONE  # finished by an earlier run
        if txn is not None and txn.phase in _UNDOING:
            raise await self._fail(txn, manifest, txn.error or "archive installer: rolled back")
        try:
            bundle = await asyncio.to_thread(self._unpack, candidate, manifest)
            self._check_recipe(bundle.recipe)
            if txn is None:
                txn = await asyncio.to_thread(self._plan, manifest, bundle.recipe)
        except Exception as exc:
            if txn is not None:  # an earlier run changed things: undo them
                raise await self._fail(txn, manifest, str(exc)) from exc
            await asyncio.to_thread(_remove_tree, self.bundle_dir)
            raise
        progress(10)
        try:
            await self._forward(txn, manifest, bundle, progress)
        except asyncio.CancelledError:
            raise  # the transaction stays: the next run carries on
        except Exception as exc:
            message = str(exc) if isinstance(exc, InstallError) else f"archive installer: {exc}"
            raise await self._fail(txn, manifest, message) from exc
        await asyncio.to_thread(_remove_tree, self.bundle_dir)
        progress(100)
        log.info("archive_installed", update_id=txn.update_id, version=manifest.body.version)
        return DONE

    async def _forward(
        self, txn: _Txn, manifest: Manifest, bundle: _Bundle, progress: Progress
    ) -> None:
        recipe = bundle.recipe
        if not txn.after("staged"):
            await asyncio.to_thread(self._stage, txn, bundle)
            txn.phase = "staged"
            await asyncio.to_thread(self._save, txn)
            crashpoints.point("archive:staged")
        progress(30)
        if not txn.after("packages_done"):
            if not txn.hooks_started:
                txn.hooks_started = True
                await asyncio.to_thread(self._save, txn)
            if recipe.before:
                await self._hook(txn, manifest, "before", recipe.before)
            if txn.phase == "staged":
                txn.phase = "before_done"
                await asyncio.to_thread(self._save, txn)
            crashpoints.point("archive:before_done")
        progress(45)
        if not txn.after("swapped"):
            await asyncio.to_thread(self._swap_all, txn)
            txn.phase = "swapped"
            await asyncio.to_thread(self._save, txn)
            crashpoints.point("archive:swapped")
        progress(65)
        if not txn.after("packages_done"):
            await self._packages(txn, bundle)
            txn.phase = "packages_done"
            await asyncio.to_thread(self._save, txn)
            crashpoints.point("archive:packages_done")
        progress(85)
        if recipe.after:
            await self._hook(txn, manifest, "after", recipe.after)
        txn.phase = "installed"
        await asyncio.to_thread(self._save, txn)
        crashpoints.point("archive:after_done")

    async def booted(self, manifest: Manifest) -> bool:
        """The files are in place as soon as they are installed (no restart is asked for)."""
        return True

    def _commit_files(self, txn: _Txn) -> None:
        for unit in txn.units:
            try:
                self._settle(unit)  # a fallback exchange cut short by a crash
                # The old tree, judged by its identity (an absent unit left none: [])
                _remove_side(unit.side, [] if unit.absent else unit.old)
            except (OSError, InstallError) as exc:
                log.warning("archive_cleanup_failed", path=unit.side, error=str(exc))

    async def _commit(self, txn: _Txn) -> None:
        if txn.phase != "committing":
            txn.phase = "committing"
            await asyncio.to_thread(self._save, txn)
        await asyncio.to_thread(self._commit_files, txn)
        crashpoints.point("archive:committed")
        await asyncio.to_thread(self._drop)
        log.info("archive_committed", update_id=txn.update_id)

    async def commit(self, manifest: Manifest) -> None:
        """Keep the new files: remove the old trees and the transaction."""
        txn = await asyncio.to_thread(self._load)
        if txn is None or txn.update_id != manifest.update_id:
            return  # already committed
        if txn.phase not in ("installed", "committing"):
            raise _bad(f"commit: the install of {txn.update_id} did not finish ({txn.phase})")
        await self._commit(txn)

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Put every directory back as it was, run the recipe's rollback hook."""
        txn = await asyncio.to_thread(self._load)
        if txn is None or txn.update_id != manifest.update_id:
            return DONE  # nothing was changed for this update, or it is already undone
        if txn.phase == "committing":
            raise _bad(f"rollback: update {txn.update_id} is already being committed")
        problem = await self._undo(txn, manifest)
        if problem:
            raise _bad(f"the previous files are back, but the recipe's rollback failed: {problem}")
        return DONE


def from_spec(spec: Spec, context: Context) -> ArchiveInstaller:
    """Make an archive installer from its settings table (``kind = "archive"``).

    Keys: ``root`` (absolute directory), ``allowed_commands`` (a list of argument-list
    prefixes), ``allowed_managers`` (``apt``, ``pip``, ``npm``), ``pip``, ``apt``, ``npm``
    (argument lists), ``timeout`` (seconds, default ``context.timeout``), ``env`` (a table of
    variables for hooks and package steps), ``allow_setuid``, ``allow_writable_target``,
    ``max_unpacked_size``, ``max_ratio``, ``max_copy_size``, ``min_free_space`` (:class:`Limits`).

    Raises:
        ConfigError: naming the key at fault.
    """
    where = spec.where
    env = spec.mapping("env", {})
    for name, value in env.items():
        if (
            not isinstance(name, str)
            or not name
            or "=" in name
            or "\0" in name
            or not isinstance(value, str)
            or "\0" in value
        ):
            raise ConfigError(f"{where}.env: {name!r} = {value!r} is not a variable and a string")
    defaults = Limits()

    def size(key: str, default: int) -> int:
        value = spec.number(key, default, positive=key != "min_free_space")
        if value < 0 or value != int(value):
            raise ConfigError(f"{where}.{key}: expected a whole number of bytes, got {value!r}")
        return int(value)

    limits = Limits(
        max_unpacked_size=size("max_unpacked_size", defaults.max_unpacked_size),
        max_ratio=spec.number("max_ratio", defaults.max_ratio),
        max_copy_size=size("max_copy_size", defaults.max_copy_size),
        min_free_space=size("min_free_space", defaults.min_free_space),
    )
    # A list of lists, checked by ArchiveInstaller (Spec.strings would take the old form).
    allowed = spec._get("allowed_commands", [])
    return ArchiveInstaller(
        spec.path("root"),
        context.state_dir,
        allowed_commands=allowed,
        allowed_managers=spec.strings("allowed_managers", []),
        pip=spec.argv("pip", ["pip"]),
        apt=spec.argv("apt", ["apt-get"]),
        npm=spec.argv("npm", ["npm"]),
        timeout=spec.number("timeout", context.timeout),
        where=where,
        env=dict(env),
        allow_setuid=spec.flag("allow_setuid", False),
        allow_writable_target=spec.flag("allow_writable_target", False),
        limits=limits,
    )
