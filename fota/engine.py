"""The engine: the only caller of the state machine, and the supervisor of what it asks for.

    inbox -> Machine.handle -> journal (if the record changed) -> notices -> run commands
    child tasks (fota.effects: download, hooks, installer, checks, reports) -> events -> inbox
    announcements (fota.intake) -> events -> inbox; timers -> events -> inbox

Rules that keep it correct (design.md):

* One task consumes the inbox and awaits each event's handling to completion before the next
  (run-to-completion), so the AsyncMachine never sees two triggers at once (transitions #401:
  a trigger from another task would cancel the running transition).
* The record is journaled after the event and before any command runs: every state change
  is durable before its effects. If the journal cannot be written, ``Machine.undo`` puts the
  model back to what is on disk and no command runs.
* Long work is a child task (a body in :mod:`fota.effects`) that reports back only by the
  event it returns, which goes into the inbox; a crash becomes the command's failure event.
  Cancelling work is always an explicit command (``StopDownload``, ``CancelTimer``).
* After loading the journal, a ``Restarted`` event makes the machine re-issue the restored
  state's work explicitly (``on_enter`` does not run for an ``initial=`` state).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from fota import crashpoints
from fota.config import Config
from fota.core import commands as cmd
from fota.core import events as ev
from fota.core.machine import Handled, Machine, Model
from fota.core.manifest import Manifest
from fota.core.record import Report
from fota.core.text import show
from fota.core.uri import allowed, resolve
from fota.download import Downloader
from fota.effects import (
    Condition,
    Effects,
    SelfTest,
    ask,
    factory_manifest,
    inform,
    read_boot_id,
)
from fota.errors import (
    FotaError,
    InvalidTransition,
    JournalError,
    ManifestError,
    ResultCode,
)
from fota.handler import UpdateHandler, UpdateInfo
from fota.install import Installer
from fota.intake import Intake
from fota.journal import Journal
from fota.notices import Listener, Notice
from fota.supervision import Supervisor
from fota.transport import Transport
from fota.trust import Trust

log = structlog.get_logger(__name__)


TIMER_RECHECK = 30.0
"""Longest real sleep of the timer task: timers are wall-clock instants, and a suspended
device or a stepped clock must not make a deferral or a deadline late by more than this."""

_STOP = object()
GATES_CRASHED = "check_crashed"
"""The failing condition a crashed condition check reports (the reason is in the log)."""


class Engine:
    """Drives one device's updates. Use it through :class:`fota.Client`.

    Args:
        config: client settings.
        transport: the network.
        journal: the on-disk state.
        installer: puts verified images in place.
        handler: the application's hooks, or None (polite updates then wait for the API).
        clock: wall-clock time in seconds since the epoch (UTC); injectable for tests. A clock
            with a ``subscribe(callback)`` method (:class:`fota.testing.ManualClock`) wakes
            the timers when it changes.
        self_test: post-install health check; None commits at once.
        conditions: local conditions by name, checked before a held step proceeds (besides
            ``Config.condition_commands``).
    """

    def __init__(
        self,
        config: Config,
        *,
        transport: Transport,
        journal: Journal,
        installer: Installer,
        handler: UpdateHandler | None = None,
        clock: Callable[[], float] = time.time,
        self_test: SelfTest | None = None,
        conditions: Mapping[str, Condition] | None = None,
        free_space: Callable[[Path], int] | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.journal = journal
        self.installer = installer
        self.handler = handler
        self.clock = clock
        self.self_test = self_test
        self._inbox: asyncio.Queue[tuple[Any, asyncio.Future[None] | None]] = asyncio.Queue()
        # name -> (wall-clock instant, update id, monotonic instant or inf: StartTimer.within)
        self._timers: dict[str, tuple[float, str, float]] = {}
        # Timers that fired and wait in the inbox. A StartTimer or CancelTimer of the same
        # name handled before them makes them stale: they are dropped, not acted on.
        self._fired: dict[str, ev.TimerFired] = {}
        self._timer_wake = asyncio.Event()
        self.conditions: dict[str, Condition] = dict(conditions or {})
        self._changed = asyncio.Condition()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._random = random.Random()  # jitter for retry delays, passed into the core
        self.tasks = Supervisor(self.post, self._random)
        """The child tasks: one per name, crashes turned into their command's failure."""
        self._unsubscribe: Callable[[], None] | None = None
        self.handled = 0
        """Events handled so far (tests stop the engine after a given number)."""
        self.model: Model | None = None
        self.machine: Machine | None = None
        self._unsaved = False  # the model holds a change the journal could not take yet
        self._handling_since: float | None = None
        self._listeners: list[Listener] = []
        self._current: UpdateInfo | None = None
        self._previous: UpdateInfo | None = None
        self.trust = Trust(
            config.trust,
            config.trust_roots,
            config.state_dir,
            journal.ops,
            revoked=[bytes.fromhex(kid) for kid in config.revoked_keys],
        )
        self.effects = Effects(
            config,
            transport=transport,
            journal=journal,
            installer=installer,
            trust=self.trust,
            rng=self._random,
            self_test=self_test,
            conditions=self.conditions,
        )
        self.intake = Intake(
            config,
            transport=transport,
            trust=self.trust,
            effects=self.effects,
            clock=clock,
            post=self.post,
            tell=self._tell,
        )
        self.downloader = Downloader(
            transport.block_fetcher,
            journal.ops,
            journal.candidate_path,
            self.post,
            block_size=config.block_size,
            window=config.window,
            fsync_every=config.fsync_every,
            free_space=free_space,
            reserve=config.min_free_space,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the journal, build the machine, and start the engine and announcement watcher."""
        self.trust.load()  # before the journal: its manifests verify against the same keys
        loaded = self.journal.load()
        record, installed = loaded.record, loaded.installed
        if installed is None and record.installed is None and self.config.factory_manifest:
            # A provisioned device: the factory image's manifest decides politeness from the
            # first update on, as an installed one would.
            installed = factory_manifest(self.config.factory_manifest, self.config)
            record = record.evolve(installed=installed.digest)
            if not loaded.pending_lost:  # else the drop's save below writes it too
                self.journal.save(record, (loaded.pending, installed))
            log.info("factory_manifest_adopted", version=installed.body.version)
        policy = self.config.policy()
        # Condition callbacks registered in-process count as configured conditions too.
        policy = dataclasses.replace(policy, conditions=(*policy.conditions, *self.conditions))
        self.model = Model(
            policy,
            self.config.trust,
            record,
            pending=loaded.pending,
            installed=installed,
        )
        self.machine = Machine(self.model)
        log.info(
            "engine_started",
            state=record.state.name,
            update_id=self.model.update_id,
            installed=installed.body.version if installed else None,
        )
        self.model.handler_present = self.handler is not None
        self.model.boot_id = read_boot_id(self.config.boot_id_path)
        if loaded.pending_lost:
            # Before anything else sees the model: the journal names an update whose manifest
            # it could not load, and only the machine changes the update's state.
            # Its own task: the log context it binds stays out of the caller's.
            await asyncio.create_task(self._handle(ev.PendingLost(loaded.pending_lost), None))
        self._runner = asyncio.create_task(self._run(), name="fota-engine")
        self.post(ev.Restarted())
        if self.trust.version > record.keyset_version:
            # A keyset stored but not yet noted in the record (taken by a version before
            # this field, or a crash between the two writes): its effects are applied now.
            self.post(ev.KeysetApplied(self.trust.version, self.trust.floor_reset))
        # Long-lived tasks run again after a crash: without them the engine is deaf (no
        # announcements), timeless (no timer fires) or blind to a frozen server.
        self.tasks.keep("watch", self.intake.watch)
        self.tasks.keep("timers", self._run_timers)
        if self.config.freshness_window is not None:
            self.intake.fresh_since = time.monotonic()  # the window starts with the engine
            window = self.config.freshness_window
            self.tasks.keep("freshness", lambda: self.intake.watch_freshness(window))
        subscribe = getattr(self.clock, "subscribe", None)
        if callable(subscribe):
            self._unsubscribe = subscribe(self.check_timers)

    async def aclose(self) -> None:
        """Stop child tasks and the engine (after the event in progress), keep the journal as is.

        The runner stops first and no command starts work after that, so nothing is spawned
        while the children are cancelled; every child (cancelled earlier too) is awaited.
        """
        self._closing = True
        self.tasks.closing = True  # no command starts work from here on
        if self._runner is not None:
            self._inbox.put_nowait((_STOP, None))
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        self._timers.clear()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.tasks.close()

    def set_handler(self, handler: UpdateHandler | None) -> None:
        """Register (or remove) the application's handler.

        An update waiting for an answer asks it at once when no handler was registered before.
        """
        self.handler = handler
        if self._runner is not None:
            self.post(ev.HandlerChanged(handler is not None))

    @property
    def stale(self) -> bool:
        """No fresh announcement for ``Config.freshness_window`` (until the next fresh one)."""
        return self.intake.stale

    @property
    def last_fresh(self) -> float | None:
        """When the last fresh announcement arrived (wall clock), None: none since the start."""
        return self.intake.last_fresh

    @property
    def alive(self) -> bool:
        """The engine's task runs (False before start, after aclose, or if it died)."""
        return self._runner is not None and not self._runner.done()

    def healthy(self, stall: float) -> bool:
        """Alive, and not stuck in one event for ``stall`` seconds (the daemon's watchdog).

        Handling an event takes milliseconds (a transition and a journal write); one that
        takes longer is a wedged engine, which systemd should restart.
        """
        since = self._handling_since
        return self.alive and (since is None or time.monotonic() - since < stall)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Hear every :class:`~fota.notices.Notice` from now on; returns the call that stops it."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _tell(self, kind: str, update_id: str | None, **fields: Any) -> None:
        notice = Notice(kind, self.clock(), update_id, fields)
        for listener in list(self._listeners):
            try:
                listener(notice)
            except Exception:  # a listener's bug must not stop the engine
                log.exception("listener_failed", notice=kind)

    def authorization_notice(self) -> Notice | None:
        """The ``authorization_needed`` notice when an answer is awaited now, else None.

        The control socket sends it to a connection that subscribes while the client waits
        (the application missed the one told when the wait began).
        """
        now = self.clock()
        asking = self.model.authorization_needed(now) if self.model else None
        if asking is None:
            return None
        return Notice(asking.kind, now, asking.update_id, asking.fields)

    def _bind_log_context(self) -> None:
        # Every line the runner logs from here on, and every child task it spawns (they copy
        # the context when created), says which update, version and state it belongs to.
        model = self.model
        assert model is not None
        structlog.contextvars.bind_contextvars(
            update_id=model.update_id,
            version=model.pending.body.version if model.pending else None,
            state=model.state.name,
        )

    def timers(self) -> dict[str, float]:
        """The timers armed now: name -> wall-clock instant (for status displays and tests)."""
        return {name: at for name, (at, _, _) in self._timers.items()}

    def check_timers(self) -> None:
        """Look at the timers now (the wall clock may have jumped: resume from suspend)."""
        self._timer_wake.set()

    async def _run_timers(self) -> None:
        # Timers are wall-clock instants (a deferral until 02:00 UTC means that instant, even
        # across a suspend, when the monotonic clock of call_later stands still).
        # A back-off (StartTimer.within) also fires on the monotonic clock, whichever first.
        while True:
            now, mono = self.clock(), time.monotonic()
            for name, (at, uid, due) in sorted(self._timers.items(), key=lambda x: x[1][0]):
                if at <= now or due <= mono:
                    del self._timers[name]
                    fired = self._fired[name] = ev.TimerFired(name, uid)
                    self.post(fired)
            waits = [min(at - now, due - mono) for at, _, due in self._timers.values()]
            delay = min([TIMER_RECHECK, *waits])
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), max(0.0, delay))

    # -- the inbox ----------------------------------------------------------------------

    def post(self, event: ev.Event) -> None:
        """Put an event from a child task or timer into the inbox (fire and forget)."""
        self._inbox.put_nowait((event, None))

    async def submit(self, event: ev.Event) -> None:
        """Put an event in the inbox and wait until it was handled.

        Raises:
            InvalidTransition: the event means nothing in the current state (API events).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait((event, future))
        await future

    async def wait_for(
        self, predicate: Callable[[Model], bool], timeout: float | None = None
    ) -> None:
        """Wait until ``predicate(model)`` holds after some handled event."""

        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self.model is not None and predicate(self.model)
                )

        await asyncio.wait_for(_wait(), timeout)

    async def _run(self) -> None:
        while True:
            event, future = await self._inbox.get()
            if event is _STOP:
                return
            self._handling_since = time.monotonic()
            try:
                await self._handle(event, future)
            except Exception as exc:  # the engine must survive a bug in one event
                log.exception("event_crashed", fact=type(event).__name__)
                if future is not None and not future.done():
                    future.set_exception(exc)
            self._handling_since = None
            self.handled += 1
            async with self._changed:
                self._changed.notify_all()

    async def _handle(self, event: ev.Event, future: asyncio.Future[None] | None) -> None:
        model = self.model
        assert model is not None
        if isinstance(event, ev.TimerFired):
            if self._fired.get(event.name) is not event:
                log.debug("timer_stale", timer=event.name, state=model.state.name)
                if future is not None:
                    future.set_result(None)
                return
            del self._fired[event.name]
        assert self.machine is not None
        handled = await self.machine.handle(event, self.clock(), self._random.random())
        if not handled.accepted:
            if event.from_api:
                if future is not None:
                    future.set_exception(InvalidTransition(handled.refusal))
                return
            # Announcements repeat (re-registrations, polls): dropping one is the normal case.
            level = log.debug if isinstance(event, ev.AnnouncementReceived) else log.info
            level("event_dropped", fact=type(event).__name__, state=model.state.name)
        elif model.record != handled.before or self._unsaved:
            try:
                self.journal.save(model.record, (model.pending, model.installed))
            except (OSError, JournalError) as exc:
                if isinstance(event, ev.PendingLost):
                    # The update cannot come back (its manifest is gone): keep the drop in
                    # memory, as a recovery on a full disk does, and save it with the next
                    # event. Undone, the next events would meet a half-dropped update.
                    log.error("recovery_not_saved", error=str(exc))
                    self._unsaved = True
                else:
                    self._unsave(handled, event, future, exc)
                    return
            else:
                self._unsaved = False
                if not isinstance(event, ev.PendingLost):  # an install step's, not a drop
                    crashpoints.after_save(handled.before, model.record)
        if isinstance(event, ev.ManifestFetched) and model.refusal is not None:
            refusal = model.refusal
            log.warning(
                "manifest_refused", kind=refusal.kind, field=refusal.field, error=str(refusal)
            )
        error = getattr(event, "error", None)
        if isinstance(error, FotaError):
            # A step failed (download, install, commit, rollback): say why where it happens,
            # whether the machine retries it or ends the update (then update_failed follows).
            (log.info if error.retryable else log.warning)(
                "step_failed",
                fact=type(event).__name__,
                result=error.result.name,
                retryable=error.retryable,
                error=str(error),
                state=model.state.name,
            )
        for notice in handled.notices:
            if notice.kind == "update_available":
                # Kept for on_complete, which runs after the record has forgotten the update
                # (the previous one too: a superseded update is told after its successor).
                self._previous, self._current = self._current, self._info()
            self._tell(notice.kind, notice.update_id, **notice.fields)
        self._bind_log_context()
        if model.state is not handled.previous:
            log.info(
                "state_changed",
                old=handled.previous.name,
                new=model.state.name,
                update_id=model.update_id,
            )
        log.debug(
            "event_handled",
            fact=type(event).__name__,
            state=model.state.name,
            commands=[type(c).__name__ for c in handled.commands],
        )
        for command in handled.commands:
            self._execute(command)
        if future is not None and not future.done():
            future.set_result(None)

    def _unsave(
        self,
        handled: Handled,
        event: ev.Event,
        future: asyncio.Future[None] | None,
        exc: Exception,
    ) -> None:
        """The journal could not take ``event``'s record: undo it, and offer it again."""
        assert self.machine is not None
        self.machine.undo(handled)
        log.error("journal_write_failed", error=str(exc), fact=type(event).__name__)
        if future is not None:
            future.set_exception(JournalError(f"journal write failed: {exc}"))
        elif not self._closing:
            # The fact still holds (a finished download, a fired timer); dropping it
            # would strand the update. Offer it again once the disk may have room
            # (a timer's firing stays current until a newer timer of its name).
            if isinstance(event, ev.TimerFired) and event.name not in self._fired:
                self._fired[event.name] = event
            asyncio.get_running_loop().call_later(self.effects.journal_pause(), self.post, event)

    # -- commands -----------------------------------------------------------------------

    def _execute(self, c: cmd.Command) -> None:
        model = self.model
        assert model is not None
        match c:
            case cmd.FetchManifest(uri=uri, digest=digest):
                self.tasks.spawn(
                    "manifest", self._posting(lambda: self.effects.fetch_manifest(uri, digest))
                )
            case cmd.AskDownloadAuthorization(update_id=uid):
                self.tasks.spawn("ask", self._ask(uid, download=True))
            case cmd.AskInstallAuthorization(update_id=uid):
                self.tasks.spawn("ask", self._ask(uid, download=False))
            case cmd.StartDownload():
                assert model.pending is not None and model.record.manifest_uri is not None
                uri = resolve(model.record.manifest_uri, model.pending.body.image_uri)
                if not allowed(uri, self.config.origins()):
                    # Accepted under an older configuration (a resume after a restart): the
                    # origins allowed now decide, as for a new manifest.
                    error = ManifestError(
                        "invalid_uri", "image_uri", f"{show(uri, 120)} is not on an allowed origin"
                    )
                    self.post(ev.DownloadFailed(model.pending.update_id, error, 0))
                    return
                limit = self.config.max_download_bytes
                budget = None if limit is None else (model.record.fetched, limit)
                uid = model.pending.update_id
                self.tasks.spawn(
                    "download",
                    self.downloader.run(
                        model.pending,
                        uri,
                        model.record.verified,
                        partial=model.record.partial,  # pages of partial fragments on disk
                        budget=budget,
                    ),
                    lambda error: ev.DownloadFailed(uid, error, 0),
                )
            case cmd.StopDownload():
                self.tasks.cancel("download")
            case cmd.VerifyImage(update_id=uid):
                self.tasks.spawn(
                    "verify",
                    self._posting(lambda: self.effects.verify(self._pending(uid))),
                    lambda error: ev.ImageChecked(uid, False, error),
                )
            case cmd.RunSelfTest(update_id=uid):
                self.tasks.spawn(
                    "selftest",
                    self._posting(lambda: self.effects.self_test(self._pending(uid))),
                    lambda error: ev.SelfTestFinished(uid, False, str(error)),
                )
            # The install steps share one task name: one installer call at a time.
            case cmd.CheckBoot(update_id=uid):
                self.tasks.spawn(
                    "install",
                    self._posting(lambda: self.effects.check_boot(self._pending(uid))),
                    lambda error: ev.BootChecked(uid, False, str(error)),
                )
            case cmd.Commit(update_id=uid):
                self.tasks.spawn(
                    "install",
                    self._posting(lambda: self.effects.commit(self._pending(uid))),
                    lambda error: ev.CommitFinished(uid, error),
                )
            case cmd.Rollback(update_id=uid):
                self.tasks.spawn(
                    "install",
                    self._posting(lambda: self.effects.rollback(self._pending(uid))),
                    lambda error: ev.RollbackFinished(uid, error),
                )
            case cmd.Install(update_id=uid):
                manifest = self._pending(uid)
                self.tasks.spawn(
                    "install",
                    self._posting(
                        lambda: self.effects.install(manifest, self._install_progress(manifest))
                    ),
                    lambda error: ev.InstallFinished(uid, error),
                )
            case cmd.RequestRestart(update_id=uid):
                self.tasks.spawn("restart", self.effects.request_restart(self._pending(uid)))
            case cmd.CheckAnnouncement():
                self.transport.check_now()
            case cmd.DiscardCandidate():
                self.tasks.cancel("download")
                self.journal.ops.unlink(self.journal.candidate_path)
            case cmd.StartTimer(name=name, at=at, update_id=uid, within=within):
                if not self._closing:
                    due = math.inf if within is None else time.monotonic() + within
                    self._timers[name] = (at, uid, due)
                    self._fired.pop(name, None)
                    self._timer_wake.set()
            case cmd.CancelTimer(name=name):
                self._timers.pop(name, None)
                self._fired.pop(name, None)
            case cmd.CheckGates(update_id=uid, step=step):
                # A crashed check holds the update like a failing condition (checked again
                # at the next hold timer), never lets it through.
                self.tasks.spawn(
                    "gates",
                    self._posting(
                        lambda: self.effects.check_gates(uid, step, model.installed, model.policy)
                    ),
                    lambda error: ev.GatesChecked(uid, (GATES_CRASHED,)),
                )
            case cmd.Inform(update_id=uid, step=step):
                if self.handler is not None:
                    self.tasks.spawn(None, inform(self.handler, self._info(), step))
            case cmd.NotifyForced(update_id=uid, step=step, reason=reason):
                self._tell("forced", uid, step=step, reason=reason)
                log.warning("update_forced", step=step, reason=reason, update_id=uid)
                if self.handler is not None:
                    self.tasks.spawn(None, self.handler.on_forced(self._info(), step, reason))
            case cmd.SendReports():
                if not self.tasks.running("reports"):
                    self.tasks.keep("reports", self._deliver_reports)
            case cmd.NotifyProgress(done=done, total=total):
                self._tell("progress", model.update_id, done=done, total=total)
                if self.handler is not None:
                    self.tasks.spawn(None, self.handler.on_progress(self._info(), done, total))
            case cmd.NotifyComplete(update_id=uid, result=result, detail=detail):
                info = next(
                    (i for i in (self._current, self._previous) if i and i.update_id == uid), None
                )
                # Where it happens: the operator reads why in the log, not only in the report.
                (log.info if result is ResultCode.SUCCESS else log.error)(
                    "update_completed" if result is ResultCode.SUCCESS else "update_failed",
                    update_id=uid,
                    version=info.version if info else None,
                    result=result.name,
                    detail=detail,
                )
                self._tell(
                    "completed" if result is ResultCode.SUCCESS else "failed",
                    uid,
                    version=info.version if info else None,
                    result=result.name,
                    result_code=int(result),
                    detail=detail,
                )
                if self.handler is not None and info is not None:
                    self.tasks.spawn(None, self.handler.on_complete(info, result, detail))
            case _:
                raise AssertionError(f"unhandled command {c!r}")

    async def _posting(self, work: Callable[[], Awaitable[ev.Event | None]]) -> None:
        """Run one effect; the event it ends with goes into the inbox.

        A factory, not a coroutine: a command that is not run (the engine is closing) leaves
        no effect coroutine behind unawaited.
        """
        event = await work()
        if event is not None:
            self.post(event)

    def _pending(self, update_id: str) -> Manifest:
        """The pending update's manifest, which a command about ``update_id`` works on."""
        model = self.model
        assert model is not None and model.pending is not None
        assert model.pending.update_id == update_id
        return model.pending

    def _info(self) -> UpdateInfo:
        assert self.model is not None
        info = self.model.info(self.clock())
        assert info is not None
        return info

    # -- child tasks --------------------------------------------------------------------

    async def _ask(self, update_id: str, *, download: bool) -> None:
        step = "download" if download else "install"
        if self.handler is None:
            log.info("authorization_awaited", step=step, update_id=update_id)
            return
        event = await ask(self.handler, self._info(), step)
        if event is not None:
            try:
                await self.submit(event)
            except InvalidTransition as exc:
                log.info("answer_dropped", step=step, error=str(exc))
            except JournalError:
                # Not recorded: ask again later rather than lose the answer.
                await asyncio.sleep(self.effects.journal_pause())
                self.tasks.spawn("ask", self._ask(update_id, download=download))

    def _install_progress(self, manifest: Manifest) -> Callable[[int], None]:
        loop = asyncio.get_running_loop()
        last = -1

        def report(percent: int) -> None:
            nonlocal last
            percent = max(0, min(100, int(percent)))
            if percent // 10 > last // 10:  # every 10 %: an installer may call this per MiB
                last = percent
                log.info("install_progress", percent=percent, update_id=manifest.update_id)
                self._tell("install_progress", manifest.update_id, percent=percent)
                if self.handler is not None:
                    self.tasks.spawn(None, self.handler.on_install_progress(self._info(), percent))

        def progress(percent: int) -> None:
            # Installers call this from worker threads too (a slot written in to_thread).
            loop.call_soon_threadsafe(report, percent)

        return progress

    async def _deliver_reports(self) -> None:
        """Send the outbox, oldest first, until it is empty (run under ``_spawn_kept``)."""

        def oldest() -> Report | None:
            assert self.model is not None
            return self.model.record.outbox[0] if self.model.record.outbox else None

        await self.effects.deliver_reports(oldest, lambda seq: self.submit(ev.ReportDelivered(seq)))
