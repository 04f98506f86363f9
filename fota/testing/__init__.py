"""Testing helpers that ship with fota: a real CoAP update server, and a hand-moved clock."""

from fota.testing.clock import ManualClock
from fota.testing.server import (
    DeviceSeen,
    FaultPlan,
    Published,
    RequestLog,
    UpdateServer,
    bound_port,
)

__all__ = [
    "DeviceSeen",
    "FaultPlan",
    "ManualClock",
    "Published",
    "RequestLog",
    "UpdateServer",
    "bound_port",
]
