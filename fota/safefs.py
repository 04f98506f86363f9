"""File operations for code that runs as root next to directories other users may write.

Theory of operation
-------------------

fota runs as root. A directory a non-root user can write (an application's own directory, a
sticky ``/tmp``, a misconfigured state directory) lets that user plant a name before root uses
it: a symlink at a predictable temporary name turns "root writes the update to
``/opt/app/.app.bin.tmp``" into "root writes the update to ``/etc/cron.d/x``", and a file they
swap in between a check and a use turns "root checked this file" into "root installed that
one". Every function here follows the same rules (docs/installers.md, "Root file
operations"; OpenSSH's ``safe_path``, RAUC and systemd's tmpfiles are the models):

* a directory is opened once, walking every component from ``/`` with ``O_NOFOLLOW``
  (:func:`open_dir`), and everything after that is relative to its descriptor;
* a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under an unpredictable name
  (:func:`create_temp`), its mode and owner are set with ``fchmod``/``fchown`` on the
  descriptor, and it reaches its final name by ``renameat`` (:func:`write_atomic`);
* an existing file is opened ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` on that
  descriptor (:func:`open_regular`): a symlink, a FIFO (which would block ``open``), a device
  or a socket is refused, named;
* a copy reads at most a bound, skips holes when the destination can keep them (a sparse file
  stays sparse) and never reads past the size it saw at the start (:func:`copy_fd`);
* a verified image is hashed over the descriptor that is handed on, and only its first
  ``image_size`` bytes are ever read from it (:func:`open_verified`, :class:`VerifiedImage`);
* a directory any non-root user can write, on the way to a target, is refused by default,
  naming it with its owner and mode (:func:`check_trusted_path`).

Symbolic links on the way
-------------------------

A symlink among the *directories* of a path is followed only if root owns it (a user-owned
link could point anywhere; it is refused even with ``allow_writable``), at most
:data:`MAX_LINKS` times; it is resolved component by
component with the same rules, so its target's directories are checked too. This keeps real
layouts working (``/lib -> usr/lib`` on merged-``/usr`` systems, ``/var/run -> /run``). A
root-owned link in a directory only root can write cannot be replaced by anyone else. The
*last* component of a target file is never followed (:func:`open_regular`, :func:`write_atomic`
replace the name itself), except where the caller asks for it explicitly (:func:`open_parent`
with ``follow=True``, for A/B slots named by ``/dev/disk/by-partlabel/...`` links).

Which directories are trusted
-----------------------------

A directory is trusted when root owns it and no one else can write it. Two exceptions, both
decided here once:

* group write by group 0 (``root``) is accepted: membership in group 0 is administrative by
  convention, as on every distribution we target;
* a root-owned directory with the sticky bit (``/tmp``, ``/var/tmp``) is accepted *on the way*
  to a target, not as the target's own directory: in it, only root can rename or remove the
  root-owned entries below it, so the next component, which is checked in turn, cannot be
  swapped; but any user can plant new names in it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import structlog

from fota.errors import InstallError, IntegrityError

log = structlog.get_logger(__name__)

MAX_LINKS = 40
"""Most symbolic links followed while walking one path (the kernel's own limit)."""
CHUNK = 1 << 20
"""Bytes read and written per system call when copying or hashing."""
TEMP_ATTEMPTS = 100
"""Random names :func:`create_temp` tries before it gives up."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

Progress = Callable[[int], None]
"""Called with the bytes copied so far."""


class UnsafePathError(InstallError):
    """A path fota would write as root is not safe: a non-root user can write or redirect it.

    Attributes:
        path: the directory or link at fault.
        reason: what is wrong with it, naming its owner and mode.
    """

    def __init__(self, what: str, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{what}: {path}: {reason}")


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _describe(st: os.stat_result) -> str:
    return f"owner {_owner(st.st_uid)}, group {st.st_gid}, mode {stat.S_IMODE(st.st_mode):#o}"


def untrusted_reason(st: os.stat_result, *, final: bool) -> str | None:
    """Why a non-root user could change what a directory holds, or None if no one but root can.

    Args:
        st: the directory's ``fstat``.
        final: it is the directory files are created in (a sticky bit does not help there).
    """
    mode = st.st_mode
    if st.st_uid != 0:
        return f"not owned by root ({_describe(st)})"
    writable = mode & stat.S_IWOTH or (mode & stat.S_IWGRP and st.st_gid != 0)
    if writable and (final or not mode & stat.S_ISVTX):
        who = "anyone" if mode & stat.S_IWOTH else f"group {st.st_gid}"
        return f"writable by {who} ({_describe(st)})"
    return None


class _Walk:
    """One walk of a path from ``/``: the open directories, checked as they are opened."""

    def __init__(self, what: str, *, check: bool, allow_writable: bool) -> None:
        self.what = what
        self.check = check
        self.allow_writable = allow_writable
        self.file_last = False  # the last component may be a file, or missing (open_parent)
        self.stack: list[tuple[str, int]] = []

    def shown(self, name: str | None = None) -> str:
        parts = [n for n, _ in self.stack[1:]] + ([name] if name is not None else [])
        return "/" + "/".join(parts)

    def finding(self, where: str, reason: str) -> None:
        """A directory a non-root user can write: refused, or a warning if that is allowed."""
        if self.allow_writable:
            log.warning("unsafe_path_allowed", what=self.what, path=where, reason=reason)
            return
        raise UnsafePathError(self.what, where, reason)

    def judge(self, fd: int, *, final: bool) -> None:
        if not self.check:
            return
        reason = untrusted_reason(os.fstat(fd), final=final)
        if reason is not None:
            self.finding(self.shown(), reason)

    def push(self, name: str, fd: int) -> None:
        self.stack.append((name, fd))
        self.judge(fd, final=False)

    def reset(self) -> None:
        while len(self.stack) > 1:
            os.close(self.stack.pop()[1])

    def close(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[1])

    def link(self, name: str) -> str:
        """The target of the symlink ``name`` in the current directory, if it may be followed.

        The link is opened ``O_PATH | O_NOFOLLOW`` and both its owner and its target are read
        through that descriptor, so the link judged is the link followed. A link root does not
        own is refused even with ``allow_writable``: it could point at any file root may write.
        """
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.stack[-1][1])
        try:
            st = os.fstat(fd)
            if st.st_uid != 0:
                raise UnsafePathError(
                    self.what,
                    self.shown(name),
                    f"a symbolic link not owned by root ({_describe(st)}), not followed",
                )
            return os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)

    def run(self, path: Path, *, follow_last: bool) -> str | None:
        """Open every directory of ``path``; return its last component if it is not a directory.

        With ``follow_last`` false the last component is not opened at all (it is a file name).
        """
        text = os.fspath(path)
        if not os.path.isabs(text):
            raise UnsafePathError(self.what, text, "not an absolute path")
        self.push("", os.open("/", _DIR_FLAGS))
        pending = [p for p in text.split("/") if p]
        pending.reverse()  # a stack: the next component is last
        links = 0
        last: str | None = None
        if not follow_last and pending:
            last = pending.pop(0)
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[1])
                continue
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=self.stack[-1][1])
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    raise
                try:
                    st = os.stat(name, dir_fd=self.stack[-1][1], follow_symlinks=False)
                except FileNotFoundError:
                    if not pending and follow_last and self.file_last:
                        return name  # a file still to be created
                    raise
                if not stat.S_ISLNK(st.st_mode):
                    if not pending and follow_last:
                        return name  # the last component: a file, the caller opens it
                    raise NotADirectoryError(
                        errno.ENOTDIR, "not a directory", self.shown(name)
                    ) from exc
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many symbolic links", text) from exc
                target = self.link(name)
                more = [p for p in target.split("/") if p]
                more.reverse()
                pending.extend(more)
                if target.startswith("/"):
                    self.reset()
                continue
            self.stack.append((name, fd))
            if pending or last is not None:
                self.judge(fd, final=False)
        return last

    def finish(self) -> int:
        """Check the directory the walk ended in as the one files are created in; return it."""
        fd = self.stack[-1][1]
        self.judge(fd, final=True)
        self.stack.pop()
        self.close()
        return fd


def _open(path: Path, what: str, *, check: bool, allow_writable: bool) -> int:
    walk = _Walk(what, check=check, allow_writable=allow_writable)
    try:
        walk.run(path, follow_last=True)
        return walk.finish()
    except BaseException:
        walk.close()
        raise


def open_dir(path: Path | str) -> int:
    """Open a directory without following any symlink a non-root user owns.

    Every component is opened with ``openat(..., O_DIRECTORY | O_NOFOLLOW)`` relative to the one
    before, from ``/``; a symlink among them is followed only if root owns it (module
    docstring). The directories' owners and modes are not checked: see
    :func:`open_trusted_dir`.

    Args:
        path: an absolute path.

    Returns:
        A descriptor (``O_RDONLY | O_DIRECTORY | O_CLOEXEC``); the caller closes it.

    Raises:
        UnsafePathError: a relative path, or a symlink on the way that root does not own.
        OSError: a component is missing or not a directory.
    """
    return _open(Path(path), "open", check=False, allow_writable=False)


def open_trusted_dir(path: Path | str, *, allow_writable: bool, what: str) -> int:
    """:func:`open_dir`, checking every directory from ``/`` to ``path`` as it is opened.

    The directories are checked through the descriptors that are then used, so no one can swap
    one between the check and the use.

    Args:
        path: the directory files will be created in.
        allow_writable: log a warning instead of refusing (the integrator accepted the risk).
        what: who asks, for messages (``installers.firmware``).

    Returns:
        A descriptor of ``path``; the caller closes it.

    Raises:
        UnsafePathError: a directory a non-root user can write (module docstring: which ones),
            or a symlink root does not own, naming it with its owner and mode.
        OSError: a component is missing or not a directory.
    """
    return _open(Path(path), what, check=True, allow_writable=allow_writable)


def check_trusted_path(path: Path | str, *, allow_writable: bool, what: str) -> None:
    """Refuse a directory that a non-root user can write, or one on the way to it.

    The rule (OpenSSH's ``safe_path``, module docstring for the details): every directory from
    ``/`` to ``path`` is owned by root and writable by no one else; a root-owned sticky
    directory (``/tmp``) is accepted on the way but not as ``path`` itself.

    Args:
        path: a directory (for a file, pass the directory it is in).
        allow_writable: log a warning for each finding instead of refusing.
        what: who asks, for messages.

    Raises:
        UnsafePathError: naming the directory, its owner and its mode.
        OSError: a component is missing or not a directory.
    """
    os.close(open_trusted_dir(path, allow_writable=allow_writable, what=what))


def resolve_trusted_dir(path: Path | str, *, allow_writable: bool, what: str) -> Path:
    """The symlink-free path of a directory, as one checked walk from ``/`` resolves it.

    ``os.path.realpath`` follows every link, a user's included, and then only the directories
    of the path it ends at are checked: ``root = /home/app/current`` with ``current`` the
    user's link to ``/etc`` would be ``/etc``, and ``/home/app`` never looked at. Here links
    are followed by the rules of :func:`open_dir` (root's only), and every directory visited,
    before and after a link, is checked as on the way to a target (a root-owned sticky
    ``/tmp`` passes, as for :func:`check_trusted_path`'s ancestors).

    Raises:
        UnsafePathError: a directory a non-root user can write (unless ``allow_writable``), a
            symlink root does not own, or a relative path, named.
        OSError: a component is missing or not a directory.
    """
    walk = _Walk(what, check=True, allow_writable=allow_writable)
    try:
        if walk.run(Path(path), follow_last=True) is not None:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fspath(path))
        walk.judge(walk.stack[-1][1], final=False)
        return Path(walk.shown())
    finally:
        walk.close()


def open_parent(
    path: Path | str,
    *,
    what: str,
    check: bool = True,
    allow_writable: bool = False,
    follow: bool = False,
) -> tuple[int, str]:
    """Open the directory a file is in; return its descriptor and the file's name in it.

    Args:
        path: the file's absolute path.
        what: who asks, for messages.
        check: check the directories as :func:`open_trusted_dir` does.
        allow_writable: with ``check``: warn instead of refusing.
        follow: a root-owned symlink at the last component is followed too (an A/B slot named
            ``/dev/disk/by-partlabel/a``); the name returned is then the link's final target.

    Raises:
        UnsafePathError, OSError: as :func:`open_trusted_dir`.
    """
    walk = _Walk(what, check=check, allow_writable=allow_writable)
    walk.file_last = True
    text = os.fspath(path)
    try:
        name = walk.run(Path(text), follow_last=follow)
        if not name or name in (".", ".."):
            raise IsADirectoryError(errno.EISDIR, "names a directory, not a file", text)
        return walk.finish(), name
    except BaseException:
        walk.close()
        raise


# -- files --------------------------------------------------------------------------------


def temp_name(prefix: str) -> str:
    """A hidden name no one can guess: ``.<prefix>.<32 hex digits>.tmp``."""
    return f".{prefix}.{secrets.token_hex(16)}.tmp"


def sweep_temps(dir_fd: int, *names: str) -> int:
    """Remove what a crash left of :func:`write_atomic` for ``names`` in ``dir_fd``; how many.

    Only entries named exactly as :func:`temp_name` names them for one of ``names`` are removed
    (``unlink`` never follows a link, and never removes a directory).
    """
    wanted = re.compile(
        r"^\.(?:" + "|".join(re.escape(n) for n in names) + r")\.[0-9a-f]{32}\.tmp$"
    )
    removed = 0
    with os.scandir(dir_fd) as entries:
        found = [e.name for e in entries if wanted.match(e.name)]
    for name in found:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(name, dir_fd=dir_fd)
            removed += 1
    if removed:
        log.info("temporary_files_removed", count=removed, names=list(names))
    return removed


def create_temp(dir_fd: int, prefix: str, mode: int = 0o600) -> tuple[int, str]:
    """Create a new, empty file under an unpredictable name in the directory ``dir_fd``.

    ``O_CREAT | O_EXCL | O_NOFOLLOW``: nothing planted at the name (a file, a symlink) is ever
    opened; the name is hidden and ends in ``.tmp`` so a cleanup can find leftovers.

    Returns:
        The descriptor (write-only, close-on-exec) and the name.
    """
    for _ in range(TEMP_ATTEMPTS):
        name = temp_name(prefix)
        try:
            fd = os.open(name, _CREATE_FLAGS, mode & 0o777, dir_fd=dir_fd)
        except FileExistsError:  # taken (nobody guesses 128 bits by chance): another name
            continue
        # The umask may have taken bits away; the caller's mode is meant as given.
        os.fchmod(fd, mode & 0o777)
        return fd, name
    raise InstallError(f"create_temp: {TEMP_ATTEMPTS} random names for {prefix!r} were all taken")


def open_regular(dir_fd: int, name: str, *, what: str = "file", write: bool = False) -> int:
    """Open an existing regular file ``name`` in ``dir_fd`` without following a symlink.

    ``O_NONBLOCK`` keeps a FIFO planted at the name from blocking ``open``; the type is then
    checked on the descriptor, and ``O_NONBLOCK`` cleared.

    Raises:
        InstallError: it is a symlink, a FIFO, a device, a socket or a directory (named).
        FileNotFoundError: it does not exist.
    """
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InstallError(f"{what}: {name} is a symbolic link, not followed") from exc
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without a writer, a directory
            raise InstallError(f"{what}: {name} is not a regular file") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InstallError(f"{what}: {name} is not a regular file ({file_type(st)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_type(st: os.stat_result) -> str:
    """The type of a file in words (for messages)."""
    mode = st.st_mode
    for test, word in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISCHR, "character device"),
    ):
        if test(mode):
            return word
    return "unknown type"


def safe_mode(st: os.stat_result) -> int:
    """Permission bits to give a file fota creates from ``st``, a file it replaces or copies.

    Setuid, setgid and sticky bits are kept only from a file root owns: a user can ``chmod`` a
    file of their own to 0o6777, and root must not turn that into a setuid-root file. Nor from a
    file with more than one link: where ``fs.protected_hardlinks`` is off, a user can plant a
    hard link to a setuid-root program at a target's name.
    """
    mode = stat.S_IMODE(st.st_mode)
    return mode if st.st_uid == 0 and st.st_nlink == 1 else mode & ~_SPECIAL_BITS


def read_small(dir_fd: int, name: str, limit: int, *, what: str = "file") -> bytes:
    """The whole content of a regular file (``O_NOFOLLOW``), at most ``limit`` bytes.

    Raises:
        InstallError: not a regular file, or larger than ``limit``.
        FileNotFoundError: it does not exist.
    """
    fd = open_regular(dir_fd, name, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InstallError(f"{what}: {name} has {size} bytes, more than {limit}")
        return os.pread(fd, limit + 1, 0)[:limit]
    finally:
        os.close(fd)


def fsync_dir(dir_fd: int) -> None:
    """Make a rename or unlink in the directory durable."""
    os.fsync(dir_fd)


def unlink(dir_fd: int, name: str) -> bool:
    """Remove ``name`` (never a directory) if it exists; whether it did."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _segments(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_data) ranges of the first ``size`` bytes: holes where the kernel says."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data after pos; others: no hole support
                yield pos, size, True
                return
            data = size
        data = min(data, size)
        if data > pos:
            yield pos, data, False
        if data >= size:
            return
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        yield data, hole, True
        pos = hole


def copy_fd(
    src_fd: int,
    dst_fd: int,
    limit: int,
    *,
    exact: bool = False,
    hasher: hashlib._Hash | None = None,
    progress: Progress | None = None,
    what: str = "copy",
) -> int:
    """Copy a regular file's bytes from offset 0 into ``dst_fd``; return how many.

    The size is taken once, from ``fstat`` at the start: a file that grows while it is copied
    does not make the copy grow (a writer cannot keep root copying forever). Holes are skipped
    when ``dst_fd`` is an empty regular file (the copy stays sparse: a 1 TiB sparse file costs
    no space and no time); otherwise (a block device) they are written as zeros.

    Args:
        src_fd: a regular file (or, for reading back a slot, a block device).
        dst_fd: where to write, from offset 0.
        limit: the most bytes to copy; with ``exact``, the bytes to copy.
        exact: copy exactly ``limit`` bytes (an image bounded by its signed size); the bytes past
            it are never read.
        hasher: fed every byte copied, holes as zeros, in order.
        progress: called with the bytes copied so far, about every :data:`CHUNK`.
        what: for messages.

    Raises:
        InstallError: the source is not a regular file or block device, is larger than
            ``limit`` (not ``exact``), or shorter than ``limit`` (``exact``), or shrank while
            it was copied.
    """
    st = os.fstat(src_fd)
    if stat.S_ISBLK(st.st_mode):
        size = os.lseek(src_fd, 0, os.SEEK_END)
    elif stat.S_ISREG(st.st_mode):
        size = st.st_size
    else:
        raise InstallError(f"{what}: source is a {file_type(st)}, not a regular file")
    if exact:
        if size < limit:
            raise InstallError(f"{what}: source has {size} bytes, fewer than {limit}")
        size = limit
    elif size > limit:
        raise InstallError(f"{what}: source has {size} bytes, more than the limit {limit}")
    dst = os.fstat(dst_fd)
    sparse = stat.S_ISREG(dst.st_mode) and dst.st_size == 0 and stat.S_ISREG(st.st_mode)
    zeros = bytes(CHUNK)
    segments = _segments(src_fd, size) if sparse else iter([(0, size, True)])
    for start, end, is_data in segments:
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            if is_data:
                chunk = os.pread(src_fd, n, pos)
                if not chunk:
                    raise InstallError(f"{what}: source shrank to {pos} bytes while copied")
                _write_all(dst_fd, chunk, pos)
            elif hasher is not None:
                chunk = zeros[:n]  # a hole reads as zeros: hash it so, write nothing
            else:
                pos = end
                break
            if hasher is not None:
                hasher.update(chunk)
            pos += len(chunk)
            if progress is not None:
                progress(pos)
    if sparse:
        os.ftruncate(dst_fd, size)  # a trailing hole
    return size


def write_atomic(
    dir_fd: int,
    name: str,
    data: bytes | int | Callable[[int], None],
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    *,
    limit: int | None = None,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Replace ``name`` in the directory ``dir_fd`` atomically and durably.

    A temporary file from :func:`create_temp` gets the content, then ``fchmod``/``fchown`` on
    its descriptor, ``fsync``, ``renameat`` over ``name`` (which replaces whatever was there,
    a symlink included, without following it) and an ``fsync`` of the directory. On an error
    the temporary file is removed.

    Args:
        dir_fd: the directory, opened once by the caller (:func:`open_trusted_dir`).
        name: the final name (one component).
        data: the bytes; or a descriptor of a regular file to copy (at most ``limit`` bytes,
            :func:`copy_fd`); or a function that writes the temporary file's descriptor.
        mode: permission bits (set with ``fchmod``, so the umask does not change them).
        owner: (uid, gid) to ``fchown`` to; None keeps fota's own (so does a fota that is not
            root and may not give the file away).
        limit: with a descriptor: the most bytes to copy.
        before_replace: called after the fsync, before the rename (a crash point).

    Raises:
        InstallError: a bad source (:func:`copy_fd`), or a name that is not one component.
        OSError: from the system calls.
    """
    if not name or "/" in name or name in (".", ".."):
        raise InstallError(f"write_atomic: {name!r} is not a file name")
    fd, tmp = create_temp(dir_fd, name, 0o600)
    try:
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                _write_all(fd, data, 0)
            elif isinstance(data, int):
                if limit is None:
                    raise ValueError("write_atomic: limit is required to copy a descriptor")
                copy_fd(data, fd, limit, what=f"write {name}")
            else:
                data(fd)
            if owner is not None:
                try:
                    os.fchown(fd, *owner)
                except PermissionError:
                    if os.geteuid() == 0:
                        raise
                    # Not root (a development setup): the file keeps fota's own owner.
            # After fchown: chown clears setuid/setgid bits, so the mode comes last.
            os.fchmod(fd, mode & 0o7777)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    fsync_dir(dir_fd)


# -- verified images ---------------------------------------------------------------------


class VerifiedImage:
    """An open image whose first ``size`` bytes matched a signed digest.

    Only those bytes are ever read through it (:meth:`copy_to`, :meth:`reader`): what a writer
    appends to the file is never installed. :meth:`copy_to` hashes again what it copies, so
    bytes changed in place after the check fail the copy instead of being installed.

    Attributes:
        fd: the descriptor (``O_RDONLY | O_NOFOLLOW``); closed by :meth:`close`.
        size: the signed image size.
        sha256: the signed digest.
        name: for messages.
    """

    def __init__(self, fd: int, size: int, sha256: bytes, name: str) -> None:
        self.fd = fd
        self.size = size
        self.sha256 = sha256
        self.name = name

    def __enter__(self) -> VerifiedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor (again: no-op)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def copy_to(self, dst_fd: int, progress: Progress | None = None) -> None:
        """Write exactly the verified bytes to ``dst_fd`` from offset 0, hashing them again.

        Raises:
            IntegrityError: the bytes read now differ from the ones verified (changed in place).
            InstallError: the file shrank.
        """
        hasher = hashlib.sha256()
        copy_fd(
            self.fd,
            dst_fd,
            self.size,
            exact=True,
            hasher=hasher,
            progress=progress,
            what=f"image {self.name}",
        )
        if hasher.digest() != self.sha256:
            raise IntegrityError(f"image {self.name}: changed after it was verified")

    def reader(self) -> BinaryIO:
        """A buffered, seekable reader of the verified bytes only (for ``tarfile``, ``cpio``).

        It reads the file with ``pread`` on this descriptor; end of file is at ``size``.
        It does not hash again: a reader that needs that compares its own digest.
        """
        return io.BufferedReader(_Bounded(self.fd, self.size), CHUNK)


class _Bounded(io.RawIOBase):
    """A raw, read-only view of the first ``size`` bytes of ``fd`` (the fd is not closed)."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        chunk = os.pread(self._fd, n, self._pos)
        view[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def open_verified(
    path: Path | str | tuple[int, str], sha256: bytes, size: int, *, what: str = "image"
) -> VerifiedImage:
    """Open an image without following a symlink, and check its first ``size`` bytes.

    The digest is computed over the descriptor that is returned, so the file checked is the file
    handed on; a file swapped at the name afterwards changes nothing. Bytes past ``size`` are
    not read, now or later.

    Args:
        path: the image's path, or (directory descriptor, name).
        sha256: the signed digest of the first ``size`` bytes.
        size: the signed image size.
        what: for messages.

    Returns:
        A :class:`VerifiedImage` (a context manager) that owns the descriptor.

    Raises:
        IntegrityError: the file is shorter than ``size`` or its digest differs.
        InstallError: it is a symlink, a FIFO or anything but a regular file.
        FileNotFoundError: it does not exist.
    """
    if isinstance(path, tuple):
        dir_fd, name = path
        fd = open_regular(dir_fd, name, what=what)
    else:
        # The candidate's directory is fota's own state directory; its final name is the one
        # thing a writer there could swap, and O_NOFOLLOW with fstat covers it.
        name = os.fspath(path)
        parent_fd, base = open_parent(name, what=what, check=False)
        try:
            fd = open_regular(parent_fd, base, what=what)
        finally:
            os.close(parent_fd)
    try:
        have = os.fstat(fd).st_size
        if have < size:
            raise IntegrityError(f"{what} {name}: has {have} bytes, fewer than the signed {size}")
        hasher = hashlib.sha256()
        pos = 0
        while pos < size:
            chunk = os.pread(fd, min(CHUNK, size - pos), pos)
            if not chunk:
                raise IntegrityError(f"{what} {name}: shrank to {pos} bytes, signed {size}")
            hasher.update(chunk)
            pos += len(chunk)
        if hasher.digest() != sha256:
            raise IntegrityError(f"{what} {name}: does not match the signed image_sha256")
    except BaseException:
        os.close(fd)
        raise
    return VerifiedImage(fd, size, sha256, name)


__all__ = [
    "CHUNK",
    "MAX_LINKS",
    "UnsafePathError",
    "VerifiedImage",
    "check_trusted_path",
    "copy_fd",
    "create_temp",
    "file_type",
    "fsync_dir",
    "open_dir",
    "open_parent",
    "open_regular",
    "open_trusted_dir",
    "open_verified",
    "read_small",
    "resolve_trusted_dir",
    "safe_mode",
    "sweep_temps",
    "temp_name",
    "unlink",
    "untrusted_reason",
    "write_atomic",
]
