"""The public facade: start and stop the client, answer authorizations, read the status."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from fota.config import Config
from fota.core import events as ev
from fota.core.machine import Model
from fota.core.states import State
from fota.engine import Engine, SelfTest
from fota.errors import ConfigError
from fota.handler import UpdateHandler
from fota.install import FileInstaller, Installer
from fota.journal import FileOps, Journal
from fota.transport import Transport
from fota.transport.coap import CoapTransport


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of the client.

    Attributes:
        state: the lifecycle state.
        update_id: the pending update, if any.
        version: the pending update's version.
        installed_version: the running image's version (None on an empty device).
        installed_sequence: the running image's manifest sequence number.
        verified_bytes: bytes of the pending image downloaded and verified.
        image_size: the pending image's size.
        defer_until: when the current deferral ends (epoch seconds, UTC).
        reports_pending: reports not yet acknowledged by the server.
    """

    state: State
    update_id: str | None
    version: str | None
    installed_version: str | None
    installed_sequence: int | None
    verified_bytes: int
    image_size: int | None
    defer_until: float | None
    reports_pending: int


def status_of(model: Model) -> Status:
    """Build a :class:`Status` from the machine's model."""
    pending, installed = model.pending, model.installed
    return Status(
        state=model.state,
        update_id=model.update_id,
        version=pending.body.version if pending else None,
        installed_version=installed.body.version if installed else None,
        installed_sequence=installed.body.sequence if installed else None,
        verified_bytes=model.verified_bytes(),
        image_size=pending.body.image_size if pending else None,
        defer_until=model.record.defer_until,
        reports_pending=len(model.record.outbox),
    )


class Client:
    """A FOTA client for one device.

    Use as ``async with Client(config, handler=...) as client:``. Without a handler, a polite
    update waits for :meth:`authorize`, :meth:`defer` or :meth:`reject`.

    Args:
        config: settings.
        handler: application hooks (see :class:`fota.UpdateHandler`), or None.
        transport: defaults to :class:`~fota.transport.coap.CoapTransport` for ``config.server``.
        installer: defaults to a :class:`~fota.install.FileInstaller` for ``config.target``.
        self_test: post-install health check; None commits at once.
        clock: wall-clock source (epoch seconds, UTC); injectable for tests.
        file_ops: file operations for the journal and candidate; injectable for tests.
    """

    def __init__(
        self,
        config: Config,
        *,
        handler: UpdateHandler | None = None,
        transport: Transport | None = None,
        installer: Installer | None = None,
        self_test: SelfTest | None = None,
        clock: Callable[[], float] = time.time,
        file_ops: FileOps | None = None,
    ) -> None:
        if installer is None:
            if config.target is None:
                raise ConfigError("target: needed when no installer is given")
            installer = FileInstaller(config.target)
        self._owns_transport = transport is None
        self.transport: Transport = transport or CoapTransport(
            config.server,
            config.device_id,
            ack_timeout=config.ack_timeout,
            max_retransmit=config.max_retransmit,
            poll_interval=config.poll_interval,
            observe_refresh=config.observe_refresh,
        )
        self.config = config
        self.engine = Engine(
            config,
            transport=self.transport,
            journal=Journal(config.state_dir, config.trust, file_ops),
            installer=installer,
            handler=handler,
            clock=clock,
            self_test=self_test,
        )

    async def start(self) -> None:
        """Load the journal and start working (resuming whatever was in progress)."""
        await self.engine.start()

    async def aclose(self) -> None:
        """Stop; the journal keeps everything needed to resume."""
        await self.engine.aclose()
        if self._owns_transport:
            await self.transport.aclose()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- answers ------------------------------------------------------------------------

    async def authorize(self, update_id: str) -> None:
        """Authorize the step the update waits for (download or install).

        Raises:
            InvalidTransition: ``update_id`` is not the current update, or nothing waits.
        """
        await self.engine.submit(ev.Authorized(update_id))

    async def reject(self, update_id: str, reason: str = "") -> None:
        """Reject the update; it is reported and not offered again.

        Raises:
            InvalidTransition: ``update_id`` is not the current update, or nothing waits.
        """
        await self.engine.submit(ev.Rejected(update_id, reason))

    async def defer(self, update_id: str, until: datetime, reason: str = "") -> None:
        """Defer the waiting step until ``until`` (timezone-aware); then the handler is asked again.

        Raises:
            InvalidTransition: ``update_id`` is not the current update, or nothing waits.
            ValueError: ``until`` is naive.
        """
        if until.tzinfo is None:
            raise ValueError("defer: until must be timezone-aware (UTC wall-clock time)")
        await self.engine.submit(ev.Deferred(update_id, until.timestamp(), reason))

    async def resume(self) -> None:
        """End a deferral now: the handler is asked again.

        Raises:
            InvalidTransition: nothing is deferred.
        """
        await self.engine.submit(ev.ResumeRequested())

    # -- status -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The lifecycle state."""
        return self.status().state

    def status(self) -> Status:
        """A snapshot of the client."""
        assert self.engine.model is not None, "Client.start() first"
        return status_of(self.engine.model)

    async def wait_for(
        self, predicate: Callable[[Status], bool], timeout: float | None = None
    ) -> Status:
        """Wait until ``predicate(status)`` holds (checked after every handled event)."""
        await self.engine.wait_for(lambda model: predicate(status_of(model)), timeout)
        return self.status()
