"""The local control socket: the daemon's API for applications in other processes.

:class:`ControlClient` is the Python client; the protocol itself (JSON lines over a Unix
socket) is in docs/control.md, so applications in any language (or ``socat``) can use it.
"""

from fota.app.control.client import DEFAULT_SOCKET, SOCKET_ENV, ControlClient, default_socket
from fota.app.control.protocol import ERROR_CODES, PROTOCOL
from fota.errors import ControlError

__all__ = [
    "DEFAULT_SOCKET",
    "ERROR_CODES",
    "PROTOCOL",
    "SOCKET_ENV",
    "ControlClient",
    "ControlError",
    "default_socket",
]
