"""``fota daemon``: the client as a systemd service beside the gateway's applications.

One process: the :class:`~fota.client.Client`, the control socket for applications in other
processes, systemd readiness, status and watchdog, and a graceful stop. SIGTERM or SIGINT
stops it: a download pauses (every verified fragment is in the journal already, which is
written atomically at each step), an install in progress is let finish, the control socket is
removed, exit status 0. A second SIGINT during that stop exits at once with 130; the journal
is consistent at every instant, so the next start resumes from it either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable

import structlog

from fota import hooks
from fota.app.control.server import ControlServer, status_line
from fota.app.settings import Settings
from fota.app.systemd import Notifier, watchdog_loop
from fota.client import Client
from fota.core.states import State
from fota.handler import AutoAuthorize, BaseHandler, UpdateHandler
from fota.notices import Notice

log = structlog.get_logger(__name__)

STALL_MIN = 10.0
"""Shortest time one event may take before the watchdog counts the engine as wedged."""

FORCED_EXIT = 130
"""Exit status after a second SIGINT (128 + SIGINT, as a shell reports it)."""


def build_handler(settings: Settings) -> UpdateHandler | None:
    """The handler ``[authorization] mode`` names (None for ``control``: see :func:`serve`)."""
    auth = settings.authorization
    if auth.mode == "auto":
        return AutoAuthorize()
    if auth.mode == "command":
        from fota.app.command_handler import CommandHandler

        return CommandHandler(
            auth.command,
            timeout=auth.timeout,
            defer=auth.defer,
            retry=auth.retry,
            event_command=auth.event_command,
        )
    return None


class _Signals:
    """SIGTERM and SIGINT request a stop; a second SIGINT forces the exit."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.reason = ""

    def install(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on, "SIGINT")

        def remove() -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

        return remove

    def _on(self, name: str) -> None:
        if self.stop.is_set():
            if name == "SIGINT":
                # An installer or hook left running would go on changing the device while
                # the next start runs the same step again: kill them first. The journal is
                # consistent at every instant; the step is recovered as after a power cut.
                killed = hooks.kill_all()
                log.warning("daemon_forced_exit", signal=name, commands_killed=killed)
                os._exit(FORCED_EXIT)
            return
        log.info("daemon_stopping", signal=name)
        self.reason = name
        self.stop.set()


_INSTALLER_RUNS = (State.INSTALLING, State.ROLLING_BACK)


async def _let_installer_finish(client: Client, notifier: Notifier) -> None:
    """Wait while an installer runs: a download pauses at once, an install does not.

    An installer stopped half-way leaves a rollback to do (or an unfinished one). systemd's
    TimeoutStopSec bounds the wait; a second SIGINT ends it now (installs are crash-safe,
    docs/installers.md).
    """
    if client.state not in _INSTALLER_RUNS:
        return
    log.info("stop_waits_for_install", update_id=client.status().update_id)
    notifier.status(f"Stopping once {status_line(client.status())} ends (SIGINT again: stop now)")
    await client.wait_for(lambda s: s.state not in _INSTALLER_RUNS)


async def serve(settings: Settings, *, notifier: Notifier | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status.

    Raises:
        ConfigError: a setting that only shows when used (the control socket's path, an
            installer's table), before anything was changed on disk.
    """
    notifier = notifier or Notifier.from_env()
    client = Client(settings.config, handler=build_handler(settings))
    signals = _Signals()
    remove_signals = signals.install()
    control: ControlServer | None = None
    watchdog: asyncio.Task[None] | None = None
    try:
        await client.start()
        if settings.control.enabled:
            # In control mode an application that subscribes with answers: true is the
            # handler: while none is connected, Config.unanswered decides (by default a
            # polite update waits); one that connects while an answer is awaited hears
            # authorization_needed at once.
            answering = settings.authorization.mode == "control"

            def on_answerers(count: int) -> None:
                if answering:
                    client.set_handler(BaseHandler() if count else None)

            control = ControlServer(
                client,
                settings.control.socket,
                mode=settings.control.mode,
                group=settings.control.group,
                max_clients=settings.control.max_clients,
                max_message=settings.control.max_message,
                request_timeout=settings.control.request_timeout,
                idle_timeout=settings.control.idle_timeout,
                on_answerers=on_answerers,
            )
            await control.start()

        def on_notice(notice: Notice) -> None:
            notifier.status(status_line(client.status()))

        client.listen(on_notice)
        notifier.ready(status_line(client.status()))
        log.info(
            "daemon_ready",
            device_id=settings.config.device_id,
            server=settings.config.server,
            control=str(settings.control.socket) if control else None,
            authorization=settings.authorization.mode,
        )
        # A blocked event loop stops the pings by itself; an engine stuck in one event or
        # dead stops them through this check. Either way systemd restarts the daemon.
        stall = max(notifier.watchdog_interval or 0.0, STALL_MIN)
        watchdog = asyncio.create_task(
            watchdog_loop(notifier, lambda: client.healthy(stall)), name="fota-watchdog"
        )
        await signals.stop.wait()
        notifier.stopping(f"Stopping ({signals.reason}): {status_line(client.status())}")
        await _let_installer_finish(client, notifier)
    finally:
        if control is not None:
            await control.aclose()
            if signals.stop.is_set():
                await _let_installer_finish(client, notifier)  # one began meanwhile
        if watchdog is not None:  # pinging through every wait above, as the engine runs
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await client.aclose()
        remove_signals()
    log.info("daemon_stopped", state=client.state.name)
    return 0
