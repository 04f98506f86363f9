"""File operations whose order matters, behind one class that tests can record.

Kept free of heavy imports: the journal, the downloader and ``fota fetch`` all use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import TypeAlias

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

StrPath: TypeAlias = str | os.PathLike[str]
"""A path as :class:`FileOps` takes it: a :class:`~pathlib.Path` or a plain ``str``."""


def join(directory: StrPath, name: str) -> str:
    """``directory/name`` as a plain ``str``, for a name that changes with every update.

    Why not ``Path(directory) / name``: pathlib (CPython 3.11, at least) passes every part of a
    path it parses through ``sys.intern``. A name that is new at each save (a temporary file's
    random part, a manifest's digest) then enters the interpreter's table of interned
    strings, and when it is freed leaves a deleted slot there; the table fills with those
    and is reallocated every few hundred updates (a step of about 1 MiB of RSS in a 1 000
    update soak, docs/benchmarks.md). ``os.path.join`` builds an ordinary string.
    """
    return os.path.join(directory, name)


class FileOps:
    """Thin wrappers over the OS calls whose order matters; tests subclass it to record them."""

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        """``os.open``."""
        return os.open(path, flags, mode)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def fsync(self, fd: int) -> None:
        """``os.fsync``."""
        os.fsync(fd)

    def close(self, fd: int) -> None:
        """``os.close``."""
        os.close(fd)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        """``os.replace``."""
        os.replace(src, dst)

    def fsync_dir(self, path: StrPath) -> None:
        """Fsync a directory so a rename in it is durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: StrPath) -> None:
        """Remove a file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def write_atomic(self, path: StrPath, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically and durably.

        The temporary file has an unpredictable name (``.NAME.<32 hex>.tmp``, which
        :meth:`fota.journal.Journal.load` sweeps after a crash) and is created with
        ``O_EXCL | O_NOFOLLOW``: nothing planted in the directory, a symlink at a guessed name
        included, is ever opened or written through (``fota.safefs`` for the rules). The
        temporary name is a plain ``str`` (:func:`join`: not interned by pathlib).
        """
        parent, name = os.path.split(os.fspath(path))
        if not name:
            raise ValueError(f"{path!r} names no file")
        tmp = join(parent, f".{name}.{secrets.token_hex(16)}.tmp")
        fd = self.open(tmp, _CREATE)
        try:
            try:
                self.pwrite(fd, data, 0)
                self.fsync(fd)
            finally:
                self.close(fd)
            self.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fsync_dir(parent or ".")


def sha256_prefix(path: Path, size: int) -> bytes:
    """SHA-256 of the first ``size`` bytes of a file, read in 1 MiB pieces (fewer if shorter).

    Opened ``O_NOFOLLOW | O_NONBLOCK``: a symbolic link is refused (``ELOOP``) and a FIFO left at
    the path does not block; anything but a regular file raises :class:`OSError`.
    """
    fd = _open_regular(path, os.O_RDONLY)
    try:
        return _hash_fd(fd, size)
    finally:
        os.close(fd)


def seal_candidate(path: Path, size: int) -> bytes:
    """Cut a candidate image to its signed size, then hash exactly those bytes.

    Why: an installer that is handed a path (RAUC, an integrator's command) reads the whole
    file, so bytes past ``image_size`` (appended after verification by anything that could write
    there) would be installed unsigned. Cutting the tail on the same descriptor that is hashed
    leaves at the path exactly the bytes the returned digest covers.

    Args:
        path: The candidate; a symbolic link, FIFO or anything but a regular file is refused.
        size: The signed image size.

    Returns:
        The SHA-256 of the first ``size`` bytes (of fewer if the file is shorter).

    Raises:
        OSError: The candidate cannot be opened as a regular file, cut or read.
    """
    fd = _open_regular(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
            os.fsync(fd)
        return _hash_fd(fd, size)
    finally:
        os.close(fd)


def _open_regular(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file (mode {oct(mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hash_fd(fd: int, size: int) -> bytes:
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return digest.digest()
