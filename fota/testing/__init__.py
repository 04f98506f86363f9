"""Testing helpers that ship with fota: a real CoAP update server with fault injection."""

from fota.testing.server import FaultPlan, Published, RequestLog, UpdateServer, bound_port

__all__ = ["FaultPlan", "Published", "RequestLog", "UpdateServer", "bound_port"]
