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

from fota.core.info import UpdateInfo as UpdateInfo  # re-exported: the hooks' argument
from fota.core.info import UpdateReason as UpdateReason
from fota.errors import ResultCode


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
