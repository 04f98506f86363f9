"""What the client tells listeners besides the application's handler (the control socket, logs).

A handler answers; a listener only hears. Listeners get a :class:`Notice` for every fact an
out-of-process application may want: the daemon forwards them over the control socket as
events (docs/control.md), and turns them into systemd ``STATUS=`` lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "state",
    "update_available",
    "authorization_needed",
    "progress",
    "install_progress",
    "deferred",
    "held",
    "forced",
    "completed",
    "failed",
    "stale",
    "fresh",
)
"""Every notice kind, in the order they are documented."""


@dataclass(frozen=True, slots=True)
class Notice:
    """One fact about the current update.

    Attributes:
        kind: one of :data:`KINDS`.
        at: when it happened (the client's clock, epoch seconds UTC).
        update_id: the update it is about (None: no update, e.g. a state change to IDLE).
        fields: the kind's details, JSON-ready (str, int, float, bool, None, lists).
    """

    kind: str
    at: float
    update_id: str | None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The notice as one JSON object (a control socket event)."""
        return {"event": self.kind, "at": self.at, "update_id": self.update_id, **self.fields}


Listener = Callable[[Notice], None]
"""Called in the engine's task for every notice: must be quick and must not block (queue it)."""
