"""The update lifecycle's states; values are the state codes reported to the server."""

from __future__ import annotations

from enum import Enum


class State(Enum):
    """States of one update (codes as in ``docs/protocol.md``; 0-3 align with LwM2M object 5)."""

    IDLE = 0
    DOWNLOADING = 1
    VERIFYING = 2
    INSTALLING = 3
    AWAIT_DOWNLOAD_AUTH = 10
    DOWNLOAD_DEFERRED = 11
    AWAIT_INSTALL_AUTH = 12
    INSTALL_DEFERRED = 13
    AWAIT_COMMIT = 14
    FAILED = 15
    DOWNLOAD_HELD = 16
    """Authorized (or forced), waiting for local conditions before the download starts."""
    INSTALL_HELD = 17
    """Authorized (or forced), waiting for local conditions before the install starts."""
    AWAIT_RESTART = 18
    """Installed; the new image runs only after a restart (reboot) of the device."""
    ROLLING_BACK = 19
    """The install, its boot, self-test or commit failed: the previous image is put back."""
