"""The one error tree of fota.

Every error fota raises on purpose derives from :class:`FotaError`. Each class says whether
retrying the same step can help (``retryable``) and which result code (see
``docs/protocol.md``) the client reports for it, so the engine never has to guess from a message.
Messages name the field and the limit that was broken.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fota.core imports this module and must not import pathlib
    from pathlib import Path


class ResultCode(IntEnum):
    """Result codes reported to the server.

    0-11 align with LwM2M object 5 resource 5; 100 and up are fota's.
    """

    INITIAL = 0
    SUCCESS = 1
    NOT_ENOUGH_SPACE = 2
    CONNECTION_LOST = 4
    INTEGRITY_FAILURE = 5
    UNSUPPORTED_PACKAGE = 6
    INVALID_URI = 7
    FAILED = 8
    CANCELLED = 10
    DEFERRED = 11
    BAD_SIGNATURE = 100
    UNKNOWN_KEY = 101
    ROLLBACK = 102
    WRONG_DEVICE_CLASS = 103
    OVERSIZE = 104
    MALFORMED = 105
    REJECTED = 106
    DATA_BUDGET_EXCEEDED = 107
    TIME_BUDGET_EXCEEDED = 108
    FORCED = 109
    SUPERSEDED = 110
    AUTHORIZED = 111
    ROLLED_BACK = 112
    ROLLBACK_FAILED = 113
    KEY_REVOKED = 114
    STATE_RECOVERED = 115


class FotaError(Exception):
    """Root of every error fota raises on purpose."""

    retryable: bool = False
    result: ResultCode = ResultCode.FAILED


class ManifestError(FotaError):
    """A manifest was refused.

    Attributes:
        kind: which check failed; its result code is in ``result``.
        field: the manifest field (or header) at fault, for operators.
    """

    _RESULTS = {
        "bad_signature": ResultCode.BAD_SIGNATURE,
        "unknown_key": ResultCode.UNKNOWN_KEY,
        "revoked_key": ResultCode.KEY_REVOKED,
        "invalid_uri": ResultCode.INVALID_URI,
        "rollback": ResultCode.ROLLBACK,
        "wrong_device_class": ResultCode.WRONG_DEVICE_CLASS,
        "oversize": ResultCode.OVERSIZE,
        "malformed": ResultCode.MALFORMED,
        "cancelled": ResultCode.CANCELLED,
    }

    def __init__(self, kind: str, field: str, message: str) -> None:
        if kind not in self._RESULTS:
            raise ValueError(f"unknown ManifestError kind {kind!r}")
        super().__init__(f"manifest {field}: {message}")
        self.kind = kind
        self.field = field
        self.result = self._RESULTS[kind]


class TransportError(FotaError):
    """The network failed in a way that a retry may fix (timeout, reset, 5.xx).

    The aiocoap error, when there is one, is the ``__cause__``.
    """

    retryable = True
    result = ResultCode.CONNECTION_LOST


class PermanentServerError(FotaError):
    """The server refused a request for good (fota.core.codes: 4.00-4.03, 4.05, ...): stop.

    A 4.04 is :class:`ResourceMissing`, a subclass retried for a while by downloads.
    """

    result = ResultCode.INVALID_URI

    def __init__(self, uri: str, code: str) -> None:
        super().__init__(f"{uri}: server answered {code}")
        self.uri = uri
        self.code = code


class ResourceMissing(PermanentServerError):
    """The server answered 4.04 for a resource addressed by its signed digest.

    Seldom really gone: a server restarting and refilling its files answers 4.04 for a
    moment. A download retries it with back-off for ``Config.not_found_budget`` seconds before
    the update fails (fota.core.codes has the table of codes).
    """


class ImageChanged(FotaError):
    """The image behind the URI changed (4.08 or another Size2): restart the download."""

    retryable = True
    result = ResultCode.INTEGRITY_FAILURE


class IntegrityError(FotaError):
    """Bytes did not match their signed digest."""

    retryable = True
    result = ResultCode.INTEGRITY_FAILURE


class JournalError(FotaError):
    """The journal could not be read or written."""


class StorageError(FotaError):
    """The candidate file could not be written or read (disk full, I/O error)."""


class DataBudgetExceeded(FotaError):
    """The download received more bytes than ``Config.max_download_bytes`` allows."""

    result = ResultCode.DATA_BUDGET_EXCEEDED


class NotEnoughSpace(StorageError):
    """The image does not fit in the free space of the candidate's file system.

    Checked before the first byte is fetched; not retried (the device reports it, and a new
    announcement, or a restart after space was freed, tries again).
    """

    result = ResultCode.NOT_ENOUGH_SPACE


class DiskFull(NotEnoughSpace):
    """The candidate's file system filled up during the download (ENOSPC, EDQUOT).

    Not a failure: the download pauses, polls for space with back-off, and resumes from its
    verified fragments once the write can succeed.
    """


class InstallError(FotaError):
    """The installer failed; the previous image is still in place."""

    result = ResultCode.FAILED


class TaskCrashed(FotaError):
    """An engine child task raised an exception nobody expected (a bug in fota or a plug-in).

    The engine's supervision turns it into the failure event of the command the task ran
    (a download fails, an install fails, ...), so the update ends with a report instead of
    waiting forever. Not retryable: the same step would most likely crash again.

    Attributes:
        task: the child task's name (``download``, ``verify``, ...).
    """

    def __init__(self, task: str, exc: BaseException) -> None:
        super().__init__(f"{task} task crashed: {type(exc).__name__}: {exc}")
        self.task = task


class PolicyError(FotaError):
    """A request broke a politeness rule (for example, deferring past a deadline)."""


class InvalidTransition(FotaError):
    """API misuse: an answer for another update, or in a state where it means nothing."""


class ConfigError(FotaError):
    """A setting is missing or out of range; the message names the setting."""


class StateDirError(ConfigError):
    """The state directory is not fota's own (fota.statedir).

    It, a directory above it or an entry in it is another user's or writable by another
    user, or it is not a directory.

    Attributes:
        path: the directory or entry at fault.
        owner: its owner's uid (None when it could not be read).
        mode: its permission bits (None when they could not be read).
    """

    def __init__(self, message: str, *, path: Path, owner: int | None, mode: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.owner = owner
        self.mode = mode


class StateDirLocked(FotaError):
    """Another fota process holds the state directory (one instance per state directory).

    Not a configuration error: the daemon exits with :data:`fota.statedir.LOCKED_EXIT` (75),
    which systemd's ``Restart=on-failure`` retries, and starts once the holder has exited.

    Attributes:
        path: the state directory (or, for ``fota fetch``, the output file) that is held.
        pid: the holder's process id as it wrote it in the lock file (None: not readable yet).
    """

    def __init__(self, message: str, *, path: Path, pid: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid


class ControlError(FotaError):
    """The daemon refused a control request, or the control connection failed.

    Attributes:
        code: the protocol's error code (``bad_request``, ``invalid_state``, ...; see
            docs/control.md), or ``unreachable`` / ``closed`` for the connection itself.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        # idle / timeout: closed for silence; the request was not run (docs/control.md).
        self.retryable = code in ("busy", "journal", "unreachable", "idle", "timeout")
        self.request_id: int | str | None = None
