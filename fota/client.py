"""The public facade: start and stop the client, answer authorizations, read the status."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from fota.config import Config
from fota.core import events as ev
from fota.core import policy as pol
from fota.core.machine import Model
from fota.core.states import State
from fota.effects import Condition, SelfTest
from fota.engine import Engine
from fota.errors import ConfigError, InvalidTransition, PolicyError
from fota.handler import UpdateHandler
from fota.install import Context, FileInstaller, Installer, from_config
from fota.journal import FileOps, Journal
from fota.notices import Listener, Notice
from fota.statedir import StateLock, lock_state_dir, secure_state_dir
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
        defer_reason: the application's reason for the current deferral.
        deferred: seconds the pending update has been deferred so far (cumulative).
        deferral_limit: the most it may be deferred in total (None: unbounded).
        deadline: when it proceeds whatever the answers and holds (epoch seconds, UTC).
        forced: the rule that forced it past the application, or "".
        held: what holds it now (locks, maintenance window, quiet period, conditions).
        locks: inhibitor locks in force, as ``(name, expires_at)``.
        stale: no fresh announcement arrived for ``Config.freshness_window`` (the device may
            be frozen by the server or the path; docs/security.md).
        last_fresh: when the last fresh announcement arrived (epoch seconds, UTC); None:
            none since the start.
        recovered: what the last recovery of unreadable state did (a damaged journal, a
            lost manifest: docs/journal.md, "Recovery"), "" if none; kept until the next
            update commits.
        paused: why the download is paused and since when (the image answered 4.04, the
            disk is full), "" if it is not; it resumes by itself.
        last_refusal: the last manifest refused since the start, ``<update id>: <result>:
            <detail>``, naming the local setting when one caused it; "" if none.
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
    defer_reason: str = ""
    deferred: float = 0.0
    deferral_limit: float | None = None
    deadline: float | None = None
    forced: str = ""
    held: tuple[str, ...] = ()
    locks: tuple[tuple[str, float], ...] = ()
    stale: bool = False
    last_fresh: float | None = None
    recovered: str = ""
    paused: str = ""
    last_refusal: str = ""


def installer_for(config: Config) -> Installer:
    """The installer ``config`` describes: ``Config.installers``, else a file at ``target``.

    Raises:
        ConfigError: naming the setting at fault.
    """
    if config.installers:
        return from_config(config.installers, Context(config.state_dir, config.hook_timeout))
    if config.target is None:
        raise ConfigError("target: needed when neither installer nor installers is given")
    return FileInstaller(config.target)


def transport_for(config: Config) -> CoapTransport:
    """The CoAP transport ``config`` describes (what :class:`Client` makes when given none).

    Raises:
        ConfigError: an unusable ``oscore`` context.
    """
    return CoapTransport(
        config.server,
        config.device_id,
        ack_timeout=config.ack_timeout,
        max_retransmit=config.max_retransmit,
        poll_interval=config.poll_interval,
        observe_refresh=config.observe_refresh,
        backoff_base=config.observe_backoff_base,
        backoff_cap=config.observe_backoff_cap,
        poll_jitter=config.poll_jitter,
        oscore=config.oscore,
        retransmission=config.retransmission,
        congestion=config.congestion,
        min_rto=config.min_rto,
    )


def status_of(model: Model, now: float | None = None) -> Status:
    """Build a :class:`Status` from the machine's model (``now``: for expiring locks)."""
    pending, installed = model.pending, model.installed
    rec = model.record
    now = time.time() if now is None else now
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
        defer_reason=rec.defer_reason,
        deferred=pol.deferred_so_far(rec, now) if pending else 0.0,
        deferral_limit=pol.deferral_bound(pending, model.policy) if pending else None,
        deadline=pol.deadline_of(pending, rec, model.policy) if pending else None,
        forced=rec.forced,
        held=rec.held,
        locks=pol.active_locks(rec, now),
        recovered=rec.recovered,
        paused=_paused(model),
        last_refusal=model.last_refusal,
    )


def _paused(model: Model) -> str:
    if model.stall is None or model.state is not State.DOWNLOADING:
        return ""
    kind, since = model.stall
    why = "the image is not on the server (4.04)" if kind == "missing" else "the disk is full"
    return f"{why}, since {datetime.fromtimestamp(since, UTC).strftime('%Y-%m-%d %H:%M:%SZ')}"


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
        clock: wall-clock source (epoch seconds, UTC); injectable for tests
            (:class:`fota.testing.ManualClock`).
        file_ops: file operations for the journal and candidate; injectable for tests.
        conditions: local conditions by name (async callables returning True when an update
            may proceed: on mains power, battery above 30 %, not on a metered link). They are
            checked before a held install (and download, with ``Config.gates_download``).
        free_space: bytes free in the file system holding a path; None: ``os.statvfs``
            (``f_bavail``). A download is not started when the image would not leave
            ``Config.min_free_space`` free.
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
        conditions: Mapping[str, Condition] | None = None,
        free_space: Callable[[Path], int] | None = None,
    ) -> None:
        if installer is None:
            installer = installer_for(config)
        self._owns_transport = transport is None
        self.transport: Transport = transport or transport_for(config)
        self.config = config
        self._engine = Engine(
            config,
            transport=self.transport,
            journal=Journal(config.state_dir, config.trust, file_ops),
            installer=installer,
            handler=handler,
            clock=clock,
            self_test=self_test,
            conditions=conditions,
            free_space=free_space,
        )
        self._clock = clock
        self._lock: StateLock | None = None

    async def start(self) -> None:
        """Load the journal and start working (resuming whatever was in progress).

        Raises:
            StateDirError: ``Config.state_dir`` is not fota's own (another user owns it, or
                can write it or a directory above it); see :mod:`fota.statedir`. Checked
                before anything in it is read: every entry point starts here.
            StateDirLocked: another fota instance (a daemon, ``fota run``, another
                :class:`Client`, in this process or not) holds ``Config.state_dir``; the
                message names the directory and its PID. Taken before anything is read.
        """
        secure_state_dir(self.config.state_dir)
        if self._lock is None:
            self._lock = lock_state_dir(self.config.state_dir)
        try:
            await self._engine.start()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def aclose(self) -> None:
        """Stop; the journal keeps everything needed to resume."""
        try:
            await self._engine.aclose()
            if self._owns_transport:
                await self.transport.aclose()
        finally:
            self._release()  # after the engine's last journal write

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
        await self._engine.submit(ev.Authorized(update_id))

    async def reject(self, update_id: str, reason: str = "") -> None:
        """Reject the update; it is reported and not offered again.

        Raises:
            InvalidTransition: ``update_id`` is not the current update, or nothing waits.
        """
        await self._engine.submit(ev.Rejected(update_id, reason))

    async def defer(self, update_id: str, until: datetime, reason: str = "") -> datetime | None:
        """Defer the waiting step until ``until`` (timezone-aware); then the handler is asked again.

        The deferral persists across restarts and is reported with ``reason`` and its end. It
        counts toward the update's cumulative deferral, which the severity and the manifest
        bound; a deadline bounds it too.

        Returns:
            When the deferral ends: ``until``, or earlier when cut to the bound or deadline.
            None when no deferral was granted: the step proceeds now, forced (the handler's
            ``on_forced`` is told).

        Raises:
            InvalidTransition: ``update_id`` is not the current update, or nothing waits.
            ValueError: ``until`` is naive.
        """
        if until.tzinfo is None:
            raise ValueError("defer: until must be timezone-aware (UTC wall-clock time)")
        await self._engine.submit(ev.Deferred(update_id, until.timestamp(), reason))
        end = self.status().defer_until
        if self.state not in (State.DOWNLOAD_DEFERRED, State.INSTALL_DEFERRED) or end is None:
            return None
        return datetime.fromtimestamp(end, UTC)

    async def resume(self) -> None:
        """End a deferral now: the handler is asked again.

        Raises:
            InvalidTransition: nothing is deferred.
        """
        await self._engine.submit(ev.ResumeRequested())

    # -- local holds, handler, wake-up -------------------------------------------------

    async def inhibit(self, name: str, ttl: float) -> datetime:
        """Take (or renew) the inhibitor lock ``name`` for ``ttl`` seconds.

        While any lock is held, installs (and, with ``Config.gates_download``, downloads) wait,
        until the deadline forces them. Locks are journaled; the time to live is capped by
        ``Config.max_lock_ttl`` so a crashed holder cannot block updates forever. Renew a lock
        before it expires to keep holding it.

        Returns:
            When the lock expires (UTC).

        Raises:
            PolicyError: a bad name or time to live, or ``Config.max_locks`` locks are held.
        """
        if not name or len(name.encode()) > 64 or not name.isprintable():
            raise PolicyError(f"inhibit: name {name!r} must be 1..64 printable bytes")
        if not 0 < ttl <= self.config.max_lock_ttl:
            raise PolicyError(
                f"inhibit: ttl {ttl} must be in (0, {self.config.max_lock_ttl:g}] seconds"
                " (Config.max_lock_ttl)"
            )
        try:
            await self._engine.submit(ev.LockTaken(name, ttl))
        except InvalidTransition:
            raise PolicyError(
                f"inhibit: {self.config.max_locks} locks are held (Config.max_locks)"
            ) from None
        expires = dict(self.status().locks)[name]
        return datetime.fromtimestamp(expires, UTC)

    async def release(self, name: str) -> None:
        """Release the inhibitor lock ``name`` (an unknown or expired name is not an error)."""
        await self._engine.submit(ev.LockReleased(name))

    def set_handler(self, handler: UpdateHandler | None) -> None:
        """Register the application's handler (or remove it with None).

        An update waiting for an answer asks it at once when no handler was registered
        before (a replaced handler is not asked again). Register as early as possible: with
        ``Config.unanswered = "proceed"``, a polite update proceeds when nobody registered
        within the grace period.
        """
        self._engine.set_handler(handler)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Hear every :class:`~fota.notices.Notice` (state changes, progress, completion...).

        Unlike the handler, a listener never answers and its presence changes nothing: the
        daemon forwards notices to control-socket subscribers this way. ``listener`` runs in
        the engine's task and must return at once (put the notice in a queue).

        Returns:
            The call that stops listening.
        """
        return self._engine.add_listener(listener)

    def check_now(self) -> None:
        """The application just woke up: look for an update and at due timers now.

        For sleepy devices (``Config.poll_interval``): fetches the announcement at once instead
        of at the next poll, and fires any deferral or hold whose time passed while asleep.
        """
        self.transport.check_now()
        self._engine.check_timers()

    # -- status -------------------------------------------------------------------------

    def now(self) -> float:
        """The client's wall clock (epoch seconds, UTC): the one its deadlines and notices use."""
        return self._clock()

    def healthy(self, stall: float) -> bool:
        """Running, and not stuck in one event for ``stall`` seconds (the daemon's watchdog)."""
        return self._engine.healthy(stall)

    def authorization_notice(self) -> Notice | None:
        """The ``authorization_needed`` notice while an answer is awaited, else None.

        The control socket sends it to a connection that subscribes while the client waits.
        """
        return self._engine.authorization_notice()

    @property
    def reports_created(self) -> int:
        """Reports this device has queued since it was provisioned (the next report's number)."""
        model = self._engine.model
        return 0 if model is None else model.record.report_seq

    @property
    def state(self) -> State:
        """The lifecycle state."""
        return self.status().state

    def status(self) -> Status:
        """A snapshot of the client."""
        assert self._engine.model is not None, "Client.start() first"
        return self._status(self._engine.model)

    def _status(self, model: Model) -> Status:
        # Freshness is the engine's (not journaled, not the machine's).
        status = status_of(model, self._clock())
        return dataclasses.replace(
            status, stale=self._engine.stale, last_fresh=self._engine.last_fresh
        )

    async def wait_for(
        self, predicate: Callable[[Status], bool], timeout: float | None = None
    ) -> Status:
        """Wait until ``predicate(status)`` holds (checked after every handled event)."""
        await self._engine.wait_for(lambda model: predicate(self._status(model)), timeout)
        return self.status()
