"""The installer contract, shared by every backend.

An installer receives only verified bytes: the engine calls :meth:`Installer.install` after the
whole candidate matched the signed manifest (checked again right before the call).

Every call must be idempotent, because the engine journals each step *before* it runs it and,
after a power cut, runs the journaled step again:

* ``install`` runs again in INSTALLING (the previous run may have stopped anywhere in it);
* ``booted`` runs after the restart that ``install`` asked for (AWAIT_RESTART);
* ``commit`` runs again in AWAIT_COMMIT once the self-test passed;
* ``rollback`` runs again in ROLLING_BACK; it restores the image that ran before ``install``
  and is a no-op when that image is already back.

A backend keeps whatever it needs for this (a copy of the previous file, the slot it wrote) in
durable files of its own, written atomically before the step that depends on them.

Every backend runs as root: the files it creates follow :mod:`fota.safefs` (created
``O_EXCL | O_NOFOLLOW`` under an unpredictable name relative to a directory descriptor opened
once, mode and owner set on the descriptor), and the image it installs is read from the
descriptor its digest was checked over, never past the signed size
(:func:`fota.safefs.open_verified`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fota import safefs
from fota.core.manifest import Manifest
from fota.errors import InstallError
from fota.fileops import FileOps

Progress = Callable[[int], None]
"""Called by an installer with its progress in percent (0-100); from any thread."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an install or a rollback left to do.

    Attributes:
        restart: the image it put in place runs only after the device restarts (an A/B
            switch through the bootloader, RAUC, SWUpdate). The engine then asks for a restart
            (``Config.restart_command``) and, after it, calls :meth:`Installer.booted`.
    """

    restart: bool = False


DONE = Outcome()
RESTART = Outcome(restart=True)


class Installer(Protocol):
    """What the engine needs to put an image in place, keep it, or take it back."""

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Install the verified candidate.

        ``candidate`` is a path in fota's state directory. A backend that reads it opens it with
        :func:`fota.safefs.open_verified` (``manifest.body.image_sha256``, ``image_size``):
        the digest is then checked over the descriptor the bytes are read from, and nothing
        past ``image_size`` is read, whatever happens at the path after the engine's check.

        Raises:
            InstallError: it could not; the engine rolls back.
        """
        ...

    async def booted(self, manifest: Manifest) -> bool:
        """After the restart ``install`` asked for: whether ``manifest``'s image is running."""
        ...

    async def commit(self, manifest: Manifest) -> None:
        """Make the installed image permanent (drop what rollback would need).

        Raises:
            InstallError: it could not; the engine rolls back.
        """
        ...

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Restore the image that ran before ``manifest``'s was installed.

        Raises:
            InstallError: it could not; the update ends as ROLLBACK_FAILED.
        """
        ...


T = TypeVar("T")


def load_state(path: Path, who: str, make: Callable[[dict[str, Any]], T]) -> T | None:
    """An installer's state file (JSON, written by :func:`save_state`); None if there is none.

    Raises:
        InstallError: the file is damaged (the installer cannot tell what it did).
    """
    try:
        return make(json.loads(read_state_bytes(path)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstallError(f"{who}: state {path} unreadable: {exc}") from exc


STATE_LIMIT = 1 << 20
"""Largest installer state file read (they hold a few paths and ids)."""


def read_state_bytes(path: Path, limit: int = STATE_LIMIT) -> bytes:
    """A state file's bytes, opened ``O_NOFOLLOW | O_NONBLOCK``: never a planted link or FIFO.

    Raises:
        FileNotFoundError: there is none.
        OSError: it is a symlink (``ELOOP``), not a regular file, or larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return os.pread(fd, limit + 1, 0)[:limit]
    finally:
        os.close(fd)


def save_state(path: Path, state: Any, *, make_dir: bool = False) -> None:
    """Write a dataclass as an installer's state file, atomically.

    ``make_dir``: create its directory first (an installer's own directory under the state
    directory; never the directory of a target, whose absence is an error).
    """
    if make_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
    FileOps().write_atomic(path, json.dumps(dataclasses.asdict(state)).encode())
    # A crash between creating a temporary file and renaming it leaves it behind, under a name
    # nothing reuses: sweep them here so they do not pile up over the device's life.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        safefs.sweep_temps(dir_fd, path.name)
    finally:
        os.close(dir_fd)
