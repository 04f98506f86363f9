"""The state directory is fota's own: created 0700, tightened to 0700, or refused by name.

Everything fota trusts across restarts lives in ``state_dir``: the journal, the running
image's manifest (it decides politeness and anti-rollback), the keyset and revocations, the
candidate image. Whoever can write there can roll all of that back, so before anything is
read, :func:`secure_state_dir` makes sure that nobody but fota's own uid can (the rule OpenSSH
applies to key files and the directories above them, ``misc.c`` ``safe_path``):

* missing: created with mode 0700 (its missing parents with the umask's mode);
* owned by fota's uid with group or other bits set: tightened to 0700 with ``fchmod`` on a
  descriptor opened ``O_NOFOLLOW`` (fota owns it; a looser mode is an installation slip), and
  a warning is logged. An entry in it that another user owns (planted while it was open) is
  refused, naming it;
* owned by another user, not a directory, or below a directory that another user owns or
  can write (without the sticky bit): refused with :class:`~fota.errors.StateDirError`,
  which names the path, its owner and its mode. It is a configuration error: the daemon and
  ``fota run`` exit 2, and systemd's ``RestartPreventExitStatus=2`` keeps it from looping.

:class:`fota.Client` calls it in :meth:`~fota.Client.start`, so every entry point (the
daemon, ``fota run``, the demo, an application embedding the library) passes through it.

One instance per state directory (issue 17 §1): right after the check, and before anything in
the directory is read, :func:`lock_state_dir` takes an exclusive ``flock`` on ``lock`` in it.
Two updaters on one directory would download into the same candidate and overwrite each
other's journal. The kernel releases the lock when the holder dies (``kill -9`` included), so
a stale lock never needs a person. A second instance gets
:class:`~fota.errors.StateDirLocked`, naming the directory and the holder's PID (written into
the lock file after locking); the daemon and ``fota run`` exit with :data:`LOCKED_EXIT`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import pwd
import stat
from pathlib import Path

import structlog

from fota.errors import StateDirError, StateDirLocked

__all__ = [
    "LOCKED_EXIT",
    "LOCK_NAME",
    "StateLock",
    "lock_file",
    "lock_state_dir",
    "secure_state_dir",
]

log = structlog.get_logger(__name__)

MODE = 0o700
"""The state directory's mode."""

LOCK_NAME = "lock"
"""The lock file in the state directory (it holds the holder's PID, for the message)."""

LOCKED_EXIT = 75
"""Exit status of ``fota daemon`` and ``fota run`` when another process holds the state
directory (``EX_TEMPFAIL``): not 2, so systemd's ``RestartPreventExitStatus=2`` does not keep
the unit down once the holder has gone; ``Restart=on-failure`` tries again."""


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _refuse(path: Path, st: os.stat_result, why: str) -> StateDirError:
    mode = stat.S_IMODE(st.st_mode)
    return StateDirError(
        f"state_dir: {path} ({_owner(st.st_uid)}, mode {mode:04o}) {why}; fota keeps its"
        f" state in a directory that only its own uid ({os.geteuid()}) owns and can write",
        path=path,
        owner=st.st_uid,
        mode=mode,
    )


def _check_ancestors(path: Path, uid: int) -> None:
    """Refuse a directory above ``path`` (as written and resolved) that others control.

    Each must be owned by root or ``uid`` and writable by nobody else, unless it is sticky
    (``/tmp``) and the entry below it is root's or ``uid``'s.
    """
    chains = [Path(os.path.abspath(path)), Path(os.path.realpath(path))]
    for chain in chains:
        steps = [*reversed(chain.parents), chain]
        for parent, child in itertools.pairwise(steps):
            st = os.stat(parent)
            if st.st_uid not in (0, uid):
                raise _refuse(parent, st, f"holds it and is owned by another user ({child})")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                if not st.st_mode & stat.S_ISVTX:
                    raise _refuse(
                        parent, st, f"holds it and another user can write there ({child})"
                    )
                # Sticky (/tmp): only the entry's owner can rename or replace it.
                entry = os.lstat(child)
                if entry.st_uid not in (0, uid):
                    raise _refuse(child, entry, "is another user's, in a shared directory")


def secure_state_dir(path: Path) -> None:
    """Create ``path`` mode 0700, or check it is fota's own and tighten it to 0700.

    Args:
        path: the state directory (``Config.state_dir``).

    Raises:
        StateDirError: ``path`` (or a directory above it, or an entry in it) is owned or
            writable by another user, or is not a directory; the message names the path, its
            owner and its mode.
    """
    path = Path(path)
    uid = os.geteuid()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, MODE)  # the umask can only take bits away from 0700
    _check_ancestors(path, uid)
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _refuse(path, os.lstat(real), "is not a directory") from None
        raise StateDirError(
            f"state_dir: {path}: {exc.strerror or exc}", path=path, owner=None, mode=None
        ) from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise _refuse(path, st, "is owned by another user")
        if stat.S_IMODE(st.st_mode) != MODE:
            # Ours, but others could enter or write it: close it (on the descriptor that was
            # checked, not by path), then look for what they may have left in it.
            os.fchmod(fd, MODE)
            log.warning(
                "state_dir_tightened",
                path=str(path),
                mode=f"{stat.S_IMODE(st.st_mode):04o}",
                now=f"{MODE:04o}",
            )
        with os.scandir(fd) as entries:
            for entry in entries:
                est = entry.stat(follow_symlinks=False)
                if est.st_uid != uid:
                    raise _refuse(
                        path / entry.name,
                        est,
                        f"is in the state directory {path} and owned by another user (remove it)",
                    )
    finally:
        os.close(fd)


class StateLock:
    """An exclusive ``flock`` on a lock file; the kernel releases it when the process dies.

    ``flock`` locks belong to the open file description, not to the process: a second
    :class:`fota.Client` in the same process, which opens the file again, is refused as well
    (POSIX ``fcntl`` record locks would let it through).
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        """Unlock and close (idempotent). The file stays: removing it would race a new holder."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor of the description drops the lock


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_file(directory: Path, name: str, what: Path) -> StateLock:
    """Take the exclusive lock ``directory/name`` at once, or refuse naming the holder.

    The file is created ``O_NOFOLLOW`` mode 0600 relative to a descriptor of ``directory``
    (a symbolic link planted at the name is refused, never followed), must be a regular file
    of fota's own uid, and gets the holder's PID after the lock is taken.

    Args:
        directory: where the lock file lives.
        name: its name.
        what: what the lock protects, for the message (the state directory, or ``fota
            fetch``'s output file).

    Raises:
        StateDirLocked: another open description holds the lock; names ``what`` and the PID.
        StateDirError: the lock file is not a regular file of fota's uid, or cannot be opened.
    """
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                0o600,
                dir_fd=dfd,
            )
        except OSError as exc:
            raise StateDirError(
                f"lock file {directory / name}: {exc.strerror or exc}",
                path=directory / name,
                owner=None,
                mode=None,
            ) from exc
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise _refuse(directory / name, st, "is not a regular file of fota's own (the lock)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            who = f"process {pid}" if pid is not None else "another process (PID not written yet)"
            raise StateDirLocked(
                f"{what} is in use by {who}: one fota instance per state directory"
                f" (lock {directory / name})",
                path=what,
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return StateLock(fd, directory / name)


def lock_state_dir(path: Path) -> StateLock:
    """Hold ``path`` (a state directory :func:`secure_state_dir` checked) for this instance.

    Returns:
        The lock; release it when the instance stops (the kernel does when it dies).

    Raises:
        StateDirLocked: another fota instance (daemon, ``fota run``, a :class:`fota.Client`)
            holds it; the message names the directory and that process's PID.
    """
    path = Path(path)
    return lock_file(path, LOCK_NAME, path)
