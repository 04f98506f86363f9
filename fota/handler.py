"""The application contract (after the Izuma/Pelion FOTA client's ``fota_app_ifs.h``).

The client asks the application twice per polite update, before the download and before the
install. Each answer is a :class:`Decision`: authorize, reject, defer until a UTC time, or
*pending*, meaning the answer comes later through ``Client.authorize / reject / defer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Protocol

from fota.core.manifest import Component, Severity
from fota.errors import ResultCode


class UpdateReason(Enum):
    """Why the device is being updated (Electric Imp's SHUTDOWN_NEWFIRMWARE, NEWSQUIRREL, OTHER)."""

    NEW_FIRMWARE = "new_firmware"
    NEW_APPLICATION = "new_application"
    OTHER = "other"

    @classmethod
    def of(cls, component: Component) -> UpdateReason:
        """The reason an update of ``component`` gives."""
        return {
            Component.FIRMWARE: cls.NEW_FIRMWARE,
            Component.APPLICATION: cls.NEW_APPLICATION,
        }.get(component, cls.OTHER)


class DecisionKind(Enum):
    """What the application answered."""

    AUTHORIZE = "authorize"
    REJECT = "reject"
    DEFER = "defer"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class Decision:
    """An answer to an authorization request. Build one with the class methods."""

    kind: DecisionKind
    until: datetime | None = None
    reason: str = ""

    @classmethod
    def authorize(cls) -> Decision:
        """Go ahead now."""
        return cls(DecisionKind.AUTHORIZE)

    @classmethod
    def reject(cls, reason: str = "") -> Decision:
        """Drop this update; the same manifest is not offered again."""
        return cls(DecisionKind.REJECT, reason=reason)

    @classmethod
    def defer(cls, until: datetime, reason: str = "") -> Decision:
        """Ask again at ``until`` (timezone-aware, compared in UTC)."""
        if until.tzinfo is None:
            raise ValueError("Decision.defer: until must be timezone-aware (UTC wall-clock time)")
        return cls(DecisionKind.DEFER, until=until.astimezone(UTC), reason=reason)

    @classmethod
    def pending(cls) -> Decision:
        """The answer comes later, through the Client API."""
        return cls(DecisionKind.PENDING)


@dataclass(frozen=True, slots=True)
class UpdateInfo:
    """What the application is told about an update.

    Attributes:
        update_id: names the update in ``Client.authorize(update_id)`` and friends.
        version: the new image's version.
        sequence: the manifest's sequence number.
        component: firmware, application or other: the reason for the update.
        severity: optional, mandatory or critical.
        image_size: bytes to download.
        installed_version: the running image's version, None on an empty device.
        polite: True when the application's answer decides (the running image is polite);
            False when it is only informed.
        reason: new firmware, new application or other (from ``component``).
        deadline: when the update proceeds whatever the answer (UTC), if it has one.
        deferred: seconds this update has been deferred so far, across restarts.
        deferral_limit: the most it may be deferred in total, seconds (None: no bound).
        forced: the rule that forced it past the application ("deadline", "deferral limit",
            "unanswered"), or "".
    """

    update_id: str
    version: str
    sequence: int
    component: Component
    severity: Severity
    image_size: int
    installed_version: str | None
    polite: bool
    reason: UpdateReason = UpdateReason.OTHER
    deadline: datetime | None = None
    deferred: float = 0.0
    deferral_limit: float | None = None
    forced: str = ""


class UpdateHandler(Protocol):
    """Application hooks. Subclass :class:`BaseHandler` to implement only some of them."""

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        """May the update be downloaded now?"""
        ...

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        """May the downloaded, verified update be installed now?"""
        ...

    async def on_progress(self, update: UpdateInfo, done: int, total: int) -> None:
        """Download progress, about every ``Config.progress_step`` percent."""
        ...

    async def on_install_progress(self, update: UpdateInfo, percent: int) -> None:
        """Install progress in percent, as the installer reports it (every 10 % at most)."""
        ...

    async def on_complete(self, update: UpdateInfo, result: ResultCode, detail: str) -> None:
        """The update ended.

        ``result`` is SUCCESS, or why not: REJECTED, CANCELLED, SUPERSEDED, a download
        failure, ROLLED_BACK (it failed from the install on and the previous image runs
        again; ``detail`` says why) or ROLLBACK_FAILED (the device needs attention).
        """
        ...

    async def on_forced(self, update: UpdateInfo, step: str, reason: str) -> None:
        """``step`` (download or install) proceeds without the application's authorization.

        ``reason`` is the rule: ``deadline``, ``deferral limit`` or ``unanswered``. Use it to
        get ready (save state, tell users), as Electric Imp's shutdown handler does.
        """
        ...


class BaseHandler:
    """A handler that answers *pending* and ignores notifications; override what you need."""

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        """Answer later through the Client API."""
        return Decision.pending()

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        """Answer later through the Client API."""
        return Decision.pending()

    async def on_progress(self, update: UpdateInfo, done: int, total: int) -> None:
        """Ignore progress."""

    async def on_install_progress(self, update: UpdateInfo, percent: int) -> None:
        """Ignore install progress."""

    async def on_complete(self, update: UpdateInfo, result: ResultCode, detail: str) -> None:
        """Ignore completion."""

    async def on_forced(self, update: UpdateInfo, step: str, reason: str) -> None:
        """Ignore forcing."""


class AutoAuthorize(BaseHandler):
    """Opt-in handler that authorizes every download and install at once."""

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        """Authorize."""
        return Decision.authorize()

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        """Authorize."""
        return Decision.authorize()
