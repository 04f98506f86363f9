"""Commands: imperative requests the machine appends to its outbox; the engine runs them.

Commands carry only what the engine cannot read from the model at the time it runs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fota.errors import ResultCode


@dataclass(frozen=True, slots=True)
class Command:
    """Base of all commands."""


@dataclass(frozen=True, slots=True)
class FetchManifest(Command):
    """Fetch the manifest at ``uri``; its SHA-256 must equal ``digest``."""

    uri: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class AskDownloadAuthorization(Command):
    """Ask the application whether to download the pending update."""

    update_id: str


@dataclass(frozen=True, slots=True)
class AskInstallAuthorization(Command):
    """Ask the application whether to install the verified update."""

    update_id: str


@dataclass(frozen=True, slots=True)
class StartDownload(Command):
    """Start (or resume) fetching the fragments the journal does not vouch for."""

    update_id: str


@dataclass(frozen=True, slots=True)
class StopDownload(Command):
    """Cancel a running download task."""


@dataclass(frozen=True, slots=True)
class VerifyImage(Command):
    """Hash the whole candidate and compare it with the manifest."""

    update_id: str


@dataclass(frozen=True, slots=True)
class Install(Command):
    """Run the installer on the verified candidate (idempotent: may run again after a crash)."""

    update_id: str


@dataclass(frozen=True, slots=True)
class RunSelfTest(Command):
    """Run the post-install health check once and post ``SelfTestFinished``."""

    update_id: str


@dataclass(frozen=True, slots=True)
class RequestRestart(Command):
    """The device must restart for the installed (or restored) image to run.

    The engine runs ``Config.restart_command`` if one is set; else it waits for someone to
    restart the device.
    """

    update_id: str


@dataclass(frozen=True, slots=True)
class CheckBoot(Command):
    """Ask the installer whether the new image is the one running; post ``BootChecked``."""

    update_id: str


@dataclass(frozen=True, slots=True)
class Commit(Command):
    """Make the installed image permanent; post ``CommitFinished`` (idempotent)."""

    update_id: str


@dataclass(frozen=True, slots=True)
class Rollback(Command):
    """Put the previous image back; post ``RollbackFinished`` (idempotent)."""

    update_id: str


@dataclass(frozen=True, slots=True)
class CheckAnnouncement(Command):
    """Fetch the announcement now (one may have come while an install was under way)."""


@dataclass(frozen=True, slots=True)
class DiscardCandidate(Command):
    """Delete the partially or fully downloaded candidate."""


@dataclass(frozen=True, slots=True)
class StartTimer(Command):
    """Fire ``TimerFired(name, update_id)`` at wall-clock ``at``; replaces a timer of that name.

    ``within``: a back-off, not an instant. The timer also fires once this many seconds have
    passed on the monotonic clock, whichever comes first: a wall clock stepped back (an RTC
    corrected by NTP) must not stretch a retry by the size of the step (found by chaos,
    issue 17). None: an instant only (a deferral until 02:00 UTC means that instant).
    """

    name: str
    at: float
    update_id: str
    within: float | None = None


@dataclass(frozen=True, slots=True)
class CancelTimer(Command):
    """Cancel the timer called ``name`` if it runs."""

    name: str


@dataclass(frozen=True, slots=True)
class SendReports(Command):
    """Deliver the journal's outbox of reports (at least once)."""


@dataclass(frozen=True, slots=True)
class NotifyProgress(Command):
    """Tell the application how far the download is."""

    update_id: str
    done: int
    total: int


@dataclass(frozen=True, slots=True)
class NotifyComplete(Command):
    """Tell the application the update ended, and how."""

    update_id: str
    result: ResultCode
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CheckGates(Command):
    """Evaluate the configured conditions for ``step`` and post ``GatesChecked``."""

    update_id: str
    step: str


@dataclass(frozen=True, slots=True)
class Inform(Command):
    """Call the application's authorization hook for ``step`` for information only.

    The running image is not polite: the update proceeds whatever the answer.
    """

    update_id: str
    step: str


@dataclass(frozen=True, slots=True)
class NotifyForced(Command):
    """Tell the application that ``step`` proceeds without its authorization, and why."""

    update_id: str
    step: str
    reason: str


@dataclass(frozen=True, slots=True)
class Tell(Command):
    """Tell the listeners a fact (a :class:`fota.notices.Notice` of ``kind``).

    The machine emits these beside its commands (``Handled.notices``), from what the event
    changed: the engine stamps them with its clock and hands them to every listener.
    """

    kind: str
    update_id: str | None
    fields: Mapping[str, Any] = field(default_factory=dict)
