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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

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


def copy_durable(src: Path, dst: Path, mode: int | None = None) -> None:
    """Write ``src``'s bytes to ``dst`` in place, fsynced (for a path nothing is running)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        if mode is not None:
            os.fchmod(fout.fileno(), mode)
        os.fsync(fout.fileno())


T = TypeVar("T")


def load_state(path: Path, who: str, make: Callable[[dict[str, Any]], T]) -> T | None:
    """An installer's state file (JSON, written by :func:`save_state`); None if there is none.

    Raises:
        InstallError: the file is damaged (the installer cannot tell what it did).
    """
    try:
        return make(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstallError(f"{who}: state {path} unreadable: {exc}") from exc


def save_state(path: Path, state: Any, *, make_dir: bool = False) -> None:
    """Write a dataclass as an installer's state file, atomically.

    ``make_dir``: create its directory first (an installer's own directory under the state
    directory; never the directory of a target, whose absence is an error).
    """
    if make_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
    FileOps().write_atomic(path, json.dumps(dataclasses.asdict(state)).encode())
