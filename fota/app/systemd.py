"""systemd integration without libsystemd: readiness, status lines and watchdog pings.

The notify protocol (``sd_notify(3)``) is small enough to speak directly: one datagram of
``KEY=value`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a file system
path, or ``@name`` for the abstract namespace). Without that variable (not started by
systemd, or not ``Type=notify``) every call is a silent no-op, so the daemon calls the
:class:`Notifier` unconditionally.

Nothing here raises: systemd integration is a courtesy to the service manager, and a
failure to deliver it must never stop an update. A failed send is logged once at WARNING
(further failures at DEBUG), because a missing ``READY=1`` makes systemd kill the unit after
``TimeoutStartSec`` and the log line is the only hint why.

Only ``AF_UNIX`` addresses are supported; ``vsock:`` addresses (systemd 253, for virtual
machines) disable the notifier with a warning.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger(__name__)

#: The environment variables of the protocol; removed by :meth:`Notifier.from_env` by default.
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """``sd_notify(3)`` over ``$NOTIFY_SOCKET``: ``AF_UNIX`` ``SOCK_DGRAM``, non-blocking.

    Never raises: a failed send is logged once at WARNING. Without a socket (``enabled`` is
    False) every method does nothing.

    Args:
        address: ``$NOTIFY_SOCKET`` as systemd sets it: an absolute path, or ``@name`` for
            the abstract namespace. None (or empty): disabled.
        watchdog_usec: ``$WATCHDOG_USEC``, the watchdog timeout in microseconds; None: no
            watchdog.
        watchdog_pid: ``$WATCHDOG_PID``, the process the watchdog is meant for; None: this one.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address: str | None = None
        if address:
            if address.startswith("/"):
                self._address = address
            elif address.startswith("@"):
                # Linux's abstract namespace: the leading NUL is how the kernel tells it from
                # a path; systemd spells it "@" because environment values cannot hold NUL.
                self._address = "\0" + address[1:]
            else:
                log.warning(
                    "systemd_notify_unsupported",
                    address=address,
                    why="only AF_UNIX socket paths and @abstract names are supported",
                )
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Args:
            environ: where to read them (default :data:`os.environ`).
            unset: remove the three variables from ``environ`` (as ``sd_notify``'s
                ``unset_environment``), so the commands fota runs (hooks, installers,
                self-tests) cannot speak for the daemon: a ``READY=1`` or ``WATCHDOG=1`` from
                a child would be taken as the daemon's with ``NotifyAccess=all``, and a
                child that reads ``WATCHDOG_PID`` would be confused.

        Returns:
            The notifier; disabled when ``NOTIFY_SOCKET`` is unset or empty. A malformed
            ``WATCHDOG_USEC`` or ``WATCHDOG_PID`` disables the watchdog (logged).
        """
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        usec = _parse_positive("WATCHDOG_USEC", env.get("WATCHDOG_USEC"))
        pid = _parse_positive("WATCHDOG_PID", env.get("WATCHDOG_PID"))
        if env.get("WATCHDOG_PID") and pid is None:
            # A PID we cannot read may be someone else's: no watchdog rather than pings for
            # a process that is not us (sd_watchdog_enabled returns an error here too).
            usec = None
        if unset:
            for name in ENV_VARS:
                env.pop(name, None)
        return cls(address, watchdog_usec=usec, watchdog_pid=pid)

    @property
    def enabled(self) -> bool:
        """A notify socket is configured."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when there is no watchdog for this process.

        ``WATCHDOG_USEC`` when it is set and ``WATCHDOG_PID`` is unset or this process's PID
        (systemd sets the PID so that a forked child does not ping for its parent).
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    def send(self, **fields: str) -> None:
        """Send one notification, for instance ``send(READY="1", STATUS="Idle")``.

        Each field becomes a ``KEY=value`` line; line breaks inside a value become spaces,
        since a newline would start a new (and unintended) assignment.
        """
        if "STATUS" in fields:
            self._last_status = fields["STATUS"]
        if self._address is None or not fields:
            return
        payload = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            # Non-blocking: a full receive queue (systemd busy) drops this message instead of
            # stalling the event loop; the next status or ping replaces it anyway.
            self._sock.sendto(payload.encode(), self._address)
        except OSError as exc:
            self._failed(exc, fields)

    def ready(self, status: str | None = None) -> None:
        """Tell systemd that start-up finished (``READY=1``), with a status line if given."""
        self.send(READY="1", **_status(status))

    def status(self, text: str) -> None:
        """Send ``STATUS=text`` unless it is the status sent last.

        The daemon calls this at every notice (each fragment, say); only changes reach
        systemd.
        """
        if text == self._last_status:
            return
        self.send(STATUS=text)

    def stopping(self, status: str | None = None) -> None:
        """Tell systemd that a stop began (``STOPPING=1``), with a status line if given."""
        self.send(STOPPING="1", **_status(status))

    def watchdog(self) -> None:
        """Ping the watchdog (``WATCHDOG=1``)."""
        self.send(WATCHDOG="1")

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _failed(self, exc: OSError, fields: dict[str, str]) -> None:
        address = self._address or ""
        shown = "@" + address[1:] if address.startswith("\0") else address
        if self._warned:
            log.debug("systemd_notify_failed", socket=shown, keys=sorted(fields), error=str(exc))
            return
        self._warned = True
        log.warning(
            "systemd_notify_failed",
            socket=shown,
            keys=sorted(fields),
            error=str(exc),
            why="systemd may time the unit out (READY) or restart it (WATCHDOG)",
        )


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool]) -> None:
    """Ping systemd's watchdog every half of ``WatchdogSec`` while ``healthy()`` is True.

    While ``healthy()`` is False (or raises) no ping is sent, so a wedged or crashed engine
    makes systemd restart the daemon, which resumes from the journal; pings resume if it
    becomes healthy again before that. Runs until cancelled.

    Args:
        notifier: where to ping; returns at once when its ``watchdog_interval`` is None.
        healthy: checked before every ping; must be fast and must not block.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late wake-up of a busy
    # gateway must not cost a restart.
    period = interval / 2
    was_healthy = True
    while True:
        try:
            ok = bool(healthy())
        except Exception:
            log.exception("watchdog_health_check_failed")
            ok = False
        if ok:
            notifier.watchdog()
            if not was_healthy:
                log.info("watchdog_resumed")
        elif was_healthy:
            log.error(
                "watchdog_withheld",
                why="the engine is not running; systemd restarts the daemon after WatchdogSec",
                watchdog_sec=interval,
            )
        was_healthy = ok
        await asyncio.sleep(period)


def _status(status: str | None) -> dict[str, str]:
    return {} if status is None else {"STATUS": status}


def _one_line(value: str) -> str:
    return value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _parse_positive(name: str, value: str | None) -> int | None:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        log.warning("systemd_env_invalid", variable=name, value=value)
        return None
    return number
