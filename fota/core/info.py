"""What the application and the listeners are told about an update: pure data from the model.

:class:`UpdateInfo` is built here, in the core, from the model and the time passed in, so the
hooks' argument and the notices the machine emits describe an update the same way.
(``fota.handler`` re-exports both names: they are part of the application contract.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from fota.core.manifest import Component, Severity


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
