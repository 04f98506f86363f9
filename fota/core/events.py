"""Events: past-tense facts fed to the state machine, one trigger each.

Every event carries the ``update_id`` it is about where it has one, so an answer or a result for
an update that is no longer current can be recognised and dropped (or refused, for API calls).
Time is not read here: the engine passes ``now`` beside every event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fota.errors import FotaError


@dataclass(frozen=True, slots=True)
class Event:
    """Base of all events; ``trigger`` names the machine trigger it fires."""

    trigger: ClassVar[str] = ""
    from_api: ClassVar[bool] = False
    """True for events an application sends; an invalid one raises InvalidTransition."""


@dataclass(frozen=True, slots=True)
class AnnouncementReceived(Event):
    """The server announced a manifest (observe notification or poll)."""

    trigger: ClassVar[str] = "announcement_received"
    sequence: int
    manifest_digest: bytes | None
    manifest_uri: str | None
    cancel: bytes | None = None
    """Digest of a manifest the server withdraws."""


@dataclass(frozen=True, slots=True)
class ManifestFetched(Event):
    """The announced manifest's bytes arrived.

    ``raw`` matched the announced digest (the manifest's identity, or the SHA-256 of the
    bytes), or was cut off past the size limit (then ``digest`` is the announced one and the
    core refuses it as oversize without hashing what it never fully read). ``digest`` is
    :func:`fota.core.manifest.fetched_key`: the manifest's identity when a trusted key
    signed it, else the SHA-256 of the bytes; known, refused and cancelled lists use it.
    """

    trigger: ClassVar[str] = "manifest_fetched"
    raw: bytes
    uri: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Authorized(Event):
    """The application authorized the current step (download or install)."""

    trigger: ClassVar[str] = "authorized"
    from_api: ClassVar[bool] = True
    update_id: str


@dataclass(frozen=True, slots=True)
class Deferred(Event):
    """The application deferred the current step until ``until`` (UTC epoch seconds)."""

    trigger: ClassVar[str] = "deferred"
    from_api: ClassVar[bool] = True
    update_id: str
    until: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Rejected(Event):
    """The application rejected the update."""

    trigger: ClassVar[str] = "rejected"
    from_api: ClassVar[bool] = True
    update_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ResumeRequested(Event):
    """The application asked to be asked again now about a deferred step."""

    trigger: ClassVar[str] = "resume_requested"
    from_api: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class TimerFired(Event):
    """A timer the machine started has expired."""

    trigger: ClassVar[str] = "timer_fired"
    name: str
    update_id: str


@dataclass(frozen=True, slots=True)
class FragmentVerified(Event):
    """A fragment's bytes are on disk, fsynced, and match their signed digest."""

    trigger: ClassVar[str] = "fragment_verified"
    update_id: str
    index: int
    fetched: int = 0
    """Bytes received since the previous event of this download (counts toward the data
    budget, duplicates and corrupt blocks included)."""
    partial: bytes = b""
    """Pages of the fragments still incomplete that the same fsync made durable: a CBOR
    list of ``[offset, length]`` runs (``fota.download.encode_runs``, at most 64), journaled
    as ``Record.partial`` so a restart fetches only the rest (issue 17 §6)."""
    also: tuple[int, ...] = ()
    """Other fragments the same fsync covered, verified before ``index``: one event, so one
    journal write, per fsync (a journal write costs a 4 KiB block however small the record)."""

    @property
    def indexes(self) -> tuple[int, ...]:
        """Every fragment this event vouches for, in the order they were verified."""
        return (*self.also, self.index)


@dataclass(frozen=True, slots=True)
class FragmentsInvalid(Event):
    """Fragments the journal vouched for no longer verify on disk (checked before reuse)."""

    trigger: ClassVar[str] = "fragments_invalid"
    update_id: str
    indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DownloadFailed(Event):
    """The download task stopped with an error."""

    trigger: ClassVar[str] = "download_failed"
    update_id: str
    error: FotaError
    fetched: int = 0


@dataclass(frozen=True, slots=True)
class ImageChecked(Event):
    """The whole image was hashed; ``ok`` says whether it matched the manifest.

    ``error``: the image could not be checked at all (the candidate unreadable, the verify
    task crashed): not a digest mismatch, and reported with its own result and detail.
    """

    trigger: ClassVar[str] = "image_checked"
    update_id: str
    ok: bool
    error: FotaError | None = None


@dataclass(frozen=True, slots=True)
class InstallFinished(Event):
    """The installer returned; ``error`` is None on success.

    ``restart``: the new image runs only after a restart of the device (A/B slots, RAUC).
    """

    trigger: ClassVar[str] = "install_finished"
    update_id: str
    error: FotaError | None = None
    restart: bool = False


@dataclass(frozen=True, slots=True)
class BootChecked(Event):
    """After the restart an install asked for: whether the new image is the one running."""

    trigger: ClassVar[str] = "boot_checked"
    update_id: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CommitFinished(Event):
    """The installer made the new image permanent (``error`` None) or could not."""

    trigger: ClassVar[str] = "commit_finished"
    update_id: str
    error: FotaError | None = None


@dataclass(frozen=True, slots=True)
class RollbackFinished(Event):
    """The installer put the previous image back (``error`` None) or could not.

    ``restart``: the previous image runs again only after a restart of the device.
    """

    trigger: ClassVar[str] = "rollback_finished"
    update_id: str
    error: FotaError | None = None
    restart: bool = False


@dataclass(frozen=True, slots=True)
class SelfTestFinished(Event):
    """The post-install health check returned."""

    trigger: ClassVar[str] = "self_test_finished"
    update_id: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ReportDelivered(Event):
    """The server acknowledged the report with this sequence number."""

    trigger: ClassVar[str] = "report_delivered"
    sequence: int


@dataclass(frozen=True, slots=True)
class KeysetApplied(Event):
    """A root keyset was applied (``fota.trust``), or found stored at start.

    ``floor`` is its ``floor-reset``: the anti-rollback floor from now on, None if it sets none.
    """

    trigger: ClassVar[str] = "keyset_applied"
    version: int
    floor: int | None = None


@dataclass(frozen=True, slots=True)
class AnnouncementsStale(Event):
    """No fresh announcement arrived for ``window`` seconds (``Config.freshness_window``).

    ``last_fresh`` is when the last one did (epoch seconds), None if none did since the start.
    """

    trigger: ClassVar[str] = "announcements_stale"
    window: float
    last_fresh: float | None = None


@dataclass(frozen=True, slots=True)
class DownloadFinished(Event):
    """The download task fetched every fragment it was asked for."""

    trigger: ClassVar[str] = "download_finished"
    update_id: str
    fetched: int = 0


@dataclass(frozen=True, slots=True)
class PendingLost(Event):
    """The journal could not load the pending update's manifest (``detail`` says why).

    It no longer verifies, or its file is gone: nothing that was not checked is trusted, so
    the update is dropped. The journal moved the file aside and queued the recovery report;
    the engine hands this to the machine first thing after a start.
    """

    trigger: ClassVar[str] = "pending_lost"
    detail: str


@dataclass(frozen=True, slots=True)
class Restarted(Event):
    """The engine loaded the journal; re-issue the restored state's work."""

    trigger: ClassVar[str] = "restarted"


@dataclass(frozen=True, slots=True)
class GatesChecked(Event):
    """The engine evaluated the configured conditions for a held update.

    ``failing`` names the conditions (callbacks or commands) that said "not now".
    """

    trigger: ClassVar[str] = "gates_checked"
    update_id: str
    failing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LockTaken(Event):
    """A local holder took (or renewed) the inhibitor lock ``name`` for ``ttl`` seconds."""

    trigger: ClassVar[str] = "lock_taken"
    from_api: ClassVar[bool] = True
    name: str
    ttl: float


@dataclass(frozen=True, slots=True)
class LockReleased(Event):
    """A local holder released the inhibitor lock ``name`` (releasing an unknown lock is fine)."""

    trigger: ClassVar[str] = "lock_released"
    from_api: ClassVar[bool] = True
    name: str


@dataclass(frozen=True, slots=True)
class HandlerChanged(Event):
    """An application registered (``present``) or removed its handler."""

    trigger: ClassVar[str] = "handler_changed"
    present: bool
