"""File operations whose order matters, behind one class that tests can record.

Kept free of heavy imports: the journal, the downloader and ``fota fetch`` all use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FileOps:
    """Thin wrappers over the OS calls whose order matters; tests subclass it to record them."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
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

    def replace(self, src: Path, dst: Path) -> None:
        """``os.replace``."""
        os.replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        """Fsync a directory so a rename in it is durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: Path) -> None:
        """Remove a file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def write_atomic(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data`` atomically and durably.

        The temporary file has an unpredictable name (``.NAME.<32 hex>.tmp``, which
        :meth:`fota.journal.Journal.load` sweeps after a crash) and is created with
        ``O_EXCL | O_NOFOLLOW``: nothing planted in the directory, a symlink at a guessed name
        included, is ever opened or written through (``fota.safefs`` for the rules).
        """
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(16)}.tmp")
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
        self.fsync_dir(path.parent)


def sha256_prefix(path: Path, size: int) -> bytes:
    """SHA-256 of the first ``size`` bytes of a file, read in 1 MiB pieces (fewer if shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining:
            chunk = f.read(min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.digest()
