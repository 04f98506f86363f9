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
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import pwd
import stat
from pathlib import Path

import structlog

from fota.errors import StateDirError

__all__ = ["secure_state_dir"]

log = structlog.get_logger(__name__)

MODE = 0o700
"""The state directory's mode."""


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
