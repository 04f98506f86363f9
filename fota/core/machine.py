"""The update lifecycle as data: a transition table, and the model whose callbacks emit commands.

Theory of operation (the rules that keep this correct; see docs/state-machine.md):

1. ``TRANSITIONS`` below is the whole lifecycle. :class:`Machine` builds a ``transitions``
   AsyncMachine from it with a :class:`Model` as the model; ``Machine.handle(event, now,
   draw)`` is the only way in: it drops illegal pairs, runs the row, undoes a callback that
   raised, and returns the commands and notices. The engine is its only caller.
2. Conditions are pure functions of the model and the event. Callbacks are plain ``def``, fast,
   and only change the model's :class:`~fota.core.record.Record` and append
   :mod:`~fota.core.commands` to ``Model.outbox``. Nothing here waits, reads a clock or touches
   a file: the time is passed in as ``now`` beside the event, the state before it as
   ``source``. A row's callbacks run one after the other, in the row's order.
3. The engine persists the record after every event that changed it and *before* it runs the
   commands, so every state change is journaled before its effects (``Machine.undo`` when
   the journal cannot be written).
4. For one trigger, the first transition whose conditions hold wins; the order in the table is
   part of the logic (e.g. "refused" is checked before "accepted").
5. Events for an update that is no longer current fail the ``is_current`` condition. The engine
   drops those from the network and timers, and raises ``InvalidTransition`` for API calls
   (``Handled.refusal`` says why).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from transitions.core import MachineError
from transitions.extensions.asyncio import AsyncMachine

from fota.core import commands as cmd
from fota.core import events as ev
from fota.core import policy as pol
from fota.core.info import UpdateInfo, UpdateReason
from fota.core.manifest import Manifest, TrustStore, accept, envelope_id, update_id_of
from fota.core.policy import Policy, must_ask, retry_delay
from fota.core.record import (
    Record,
    Report,
    bitmap_count,
    bitmap_get,
    bitmap_new,
    bitmap_set,
    queue_report,
    remember,
    take_report_seq,
)
from fota.core.states import State
from fota.core.text import show
from fota.core.uri import allowed, resolve
from fota.errors import (
    DiskFull,
    FotaError,
    ImageChanged,
    ManifestError,
    NotEnoughSpace,
    ResourceMissing,
    ResultCode,
)

S = State
ASK_DOWNLOAD = (S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED)
ASK_INSTALL = (S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED)
WAITING = (*ASK_DOWNLOAD, *ASK_INSTALL)
HELD = (S.DOWNLOAD_HELD, S.INSTALL_HELD)
INSTALL_STEPS = (S.INSTALLING, S.AWAIT_RESTART, S.AWAIT_COMMIT, S.ROLLING_BACK)
"""From the install on: too late to cancel or supersede; the update ends in IDLE or FAILED."""
ACTIVE = (S.DOWNLOADING, S.VERIFYING, *INSTALL_STEPS)
"""States whose work a reboot loop could repeat forever; restarts in them are counted."""
CANCELLABLE = (*WAITING, *HELD, S.DOWNLOADING, S.VERIFYING)
"""A server cancel or a newer manifest ends the update here, but not once it is installing."""
ADOPTING = (S.IDLE, S.FAILED, *CANCELLABLE)
"""States in which a new manifest is taken up (replacing a pending one)."""
ALL = tuple(S)


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the table: on ``trigger`` from ``source`` to ``dest`` (None: stay, internal)."""

    trigger: str
    source: tuple[State, ...]
    dest: State | None
    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    prepare: tuple[str, ...] = field(default=())


T = Transition


def _proceed(
    trigger: str,
    source: tuple[State, ...],
    step: str,
    conditions: tuple[str, ...],
    first: tuple[str, ...],
    unless: tuple[str, ...] = (),
) -> tuple[Transition, Transition]:
    """Two rows: the step's work at once, or its HELD state.

    The work starts at once when nothing can hold it; else the update waits in the HELD state,
    where the engine checks the conditions. ``first`` runs before either; then the entry into
    the work or HELD state is reported (``report_entry``).
    """
    if step == "download":
        work, held, start = S.DOWNLOADING, S.DOWNLOAD_HELD, "start_download"
        enter: tuple[str, ...] = ("report_entry",)
    else:
        work, held, start = S.INSTALLING, S.INSTALL_HELD, "install"
        enter = ()  # install reports its entry itself: it is only ever entered
    return (
        T(trigger, source, work, (*conditions, f"{step}_clear"), unless, (*first, *enter, start)),
        T(trigger, source, held, conditions, unless, (*first, "report_entry", "check_gates")),
    )


TRANSITIONS: tuple[Transition, ...] = (
    # -- The server: cancel, announce, supersede ------------------------------------------
    T("announcement_received", CANCELLABLE, S.IDLE, ("is_cancel",), after=("cancel_update",)),
    T(
        "announcement_received",
        INSTALL_STEPS,
        None,
        ("is_cancel",),
        after=("refuse_cancel",),
    ),
    T(
        "announcement_received",
        ADOPTING,
        None,
        ("is_new_announcement",),
        after=("fetch_manifest",),
    ),
    T("announcement_received", ADOPTING, None, ("names_cancel",), after=("note_cancel",)),
    # The failed update announced again (issue 17 §3): try it once more, from its verified
    # fragments. Only an update that failed before its install; retries back off (revive).
    *_proceed("announcement_received", (S.FAILED,), "download", ("is_failed_again",), ("revive",)),
    # A fetched manifest: refuse it, ask, or proceed at once (first install, impolite
    # running image, deadline already passed). A pending update it replaces is superseded.
    T(
        "manifest_fetched",
        ADOPTING,
        None,
        ("manifest_refused",),
        after=("refuse_manifest",),
        prepare=("check_manifest",),
    ),
    # A manifest we already know (two announcements raced its fetch): the pending update's
    # own (re-adopting it would supersede the update by itself and drop its fragments), one
    # refused or rejected (rejected is for good: a bounded list, never pushed out by
    # refusals), or the running image's. Nothing to do.
    T("manifest_fetched", ADOPTING, None, ("is_known_manifest",)),
    T(
        "manifest_fetched",
        ADOPTING,
        S.AWAIT_DOWNLOAD_AUTH,
        ("candidate_must_ask",),
        after=("adopt_manifest", "ask_download"),
    ),
    *_proceed("manifest_fetched", ADOPTING, "download", (), ("adopt_manifest", "proceed")),
    # -- The application answers ----------------------------------------------------------
    *_proceed(
        "authorized", ASK_DOWNLOAD, "download", ("is_current",), ("end_deferral", "authorize")
    ),
    *_proceed("authorized", ASK_INSTALL, "install", ("is_current",), ("end_deferral", "authorize")),
    T("deferred", ASK_DOWNLOAD, S.DOWNLOAD_DEFERRED, ("is_current", "may_defer"), after=("defer",)),
    T("deferred", ASK_INSTALL, S.INSTALL_DEFERRED, ("is_current", "may_defer"), after=("defer",)),
    # A deferral past the bound or the deadline is not granted: the step proceeds, forced.
    *_proceed("deferred", ASK_DOWNLOAD, "download", ("is_current",), ("end_deferral", "proceed")),
    *_proceed("deferred", ASK_INSTALL, "install", ("is_current",), ("end_deferral", "proceed")),
    # Only the application of a polite running image decides; past a forcing rule it cannot.
    T(
        "rejected",
        (*WAITING, *HELD),
        S.IDLE,
        ("is_current", "must_ask"),
        ("is_forced",),
        after=("reject",),
    ),
    T(
        "resume_requested",
        (S.DOWNLOAD_DEFERRED,),
        S.AWAIT_DOWNLOAD_AUTH,
        unless=("is_forced",),
        after=("end_deferral", "ask_download"),
    ),
    T(
        "resume_requested",
        (S.INSTALL_DEFERRED,),
        S.AWAIT_INSTALL_AUTH,
        unless=("is_forced",),
        after=("end_deferral", "ask_install"),
    ),
    # Resumed past the deadline or the bound (a device that slept through its timer): forced.
    *_proceed(
        "resume_requested",
        (S.DOWNLOAD_DEFERRED,),
        "download",
        ("is_forced",),
        ("end_deferral", "proceed"),
    ),
    *_proceed(
        "resume_requested",
        (S.INSTALL_DEFERRED,),
        "install",
        ("is_forced",),
        ("end_deferral", "proceed"),
    ),
    T(
        "handler_changed",
        (S.AWAIT_DOWNLOAD_AUTH,),
        None,
        ("handler_arrived",),
        after=("note_handler", "ask_download"),
    ),
    T(
        "handler_changed",
        (S.AWAIT_INSTALL_AUTH,),
        None,
        ("handler_arrived",),
        after=("note_handler", "ask_install"),
    ),
    T("handler_changed", ALL, None, after=("note_handler",)),
    # -- Timers ---------------------------------------------------------------------------
    # A deferral that ends within its bound: ask again.
    T(
        "timer_fired",
        (S.DOWNLOAD_DEFERRED,),
        S.AWAIT_DOWNLOAD_AUTH,
        ("is_current", "is_defer_timer"),
        ("is_forced",),
        after=("end_deferral", "ask_download"),
    ),
    T(
        "timer_fired",
        (S.INSTALL_DEFERRED,),
        S.AWAIT_INSTALL_AUTH,
        ("is_current", "is_defer_timer"),
        ("is_forced",),
        after=("end_deferral", "ask_install"),
    ),
    # Deadline, exhausted deferral bound, or nobody registered within the grace period.
    *_proceed(
        "timer_fired",
        ASK_DOWNLOAD,
        "download",
        ("is_current", "timer_forces"),
        ("end_deferral", "proceed"),
    ),
    *_proceed(
        "timer_fired",
        ASK_INSTALL,
        "install",
        ("is_current", "timer_forces"),
        ("end_deferral", "proceed"),
    ),
    T("timer_fired", HELD, None, ("is_current", "is_hold_timer"), after=("check_gates",)),
    T(
        "timer_fired",
        (S.DOWNLOADING,),
        None,
        ("is_current", "is_retry_timer"),
        after=("start_download",),
    ),
    T(
        "timer_fired",
        (S.DOWNLOADING,),
        S.FAILED,
        ("is_current", "is_budget_timer"),
        after=("fail",),
    ),
    # -- Local holds: conditions, inhibitor locks ------------------------------------------
    T(
        "gates_checked",
        (S.DOWNLOAD_HELD,),
        S.DOWNLOADING,
        ("is_current", "gates_open"),
        after=("release_hold", "report_entry", "start_download"),
    ),
    T(
        "gates_checked",
        (S.INSTALL_HELD,),
        S.INSTALLING,
        ("is_current", "gates_open"),
        after=("release_hold", "install"),
    ),
    T("gates_checked", HELD, None, ("is_current",), after=("hold",)),
    T("lock_taken", HELD, None, ("lock_room",), after=("take_lock", "check_gates")),
    T("lock_taken", ALL, None, ("lock_room",), after=("take_lock",)),
    T("lock_released", HELD, None, after=("release_lock", "check_gates")),
    T("lock_released", ALL, None, after=("release_lock",)),
    # -- Download. Every event of the download task carries the bytes it received. ---------
    T(
        "fragment_verified",
        (S.DOWNLOADING,),
        S.FAILED,
        ("is_current", "over_data_budget"),
        after=("count_fetched", "fail"),
    ),
    T(
        "fragment_verified",
        (S.DOWNLOADING,),
        None,
        ("is_current",),
        after=("count_fetched", "mark_fragment"),
    ),
    T("fragments_invalid", (S.DOWNLOADING,), None, ("is_current",), after=("clear_fragments",)),
    T(
        "download_finished",
        (S.DOWNLOADING,),
        S.VERIFYING,
        ("is_current", "all_fragments_verified"),
        after=("count_fetched", "verify_image"),
    ),
    # The transfer ended with fragments missing: an attempt like any failed one.
    T(
        "download_finished",
        (S.DOWNLOADING,),
        None,
        ("is_current", "may_retry"),
        after=("count_fetched", "schedule_retry"),
    ),
    T(
        "download_finished",
        (S.DOWNLOADING,),
        S.FAILED,
        ("is_current",),
        after=("count_fetched", "fail"),
    ),
    # A stall is waited out, not counted as a failed attempt: the digest-addressed image
    # answered 4.04 (for up to not_found_budget), or the disk is full (until there is room).
    T(
        "download_failed",
        (S.DOWNLOADING,),
        None,
        ("is_current", "stalled"),
        after=("count_fetched", "pause_download"),
    ),
    # 4.08 or another Size2: the image behind the URI changed; start again from zero at once.
    T(
        "download_failed",
        (S.DOWNLOADING,),
        None,
        ("is_current", "image_changed", "may_retry"),
        after=("count_fetched", "restart_from_zero"),
    ),
    T(
        "download_failed",
        (S.DOWNLOADING,),
        None,
        ("is_current", "may_retry"),
        after=("count_fetched", "schedule_retry"),
    ),
    T(
        "download_failed",
        (S.DOWNLOADING,),
        S.FAILED,
        ("is_current",),
        after=("count_fetched", "fail"),
    ),
    # -- Verification of the whole image ----------------------------------------------------
    T(
        "image_checked",
        (S.VERIFYING,),
        S.AWAIT_INSTALL_AUTH,
        ("is_current", "image_ok", "must_ask"),
        ("is_forced",),
        after=("ask_install",),
    ),
    *_proceed("image_checked", (S.VERIFYING,), "install", ("is_current", "image_ok"), ("proceed",)),
    T(
        "image_checked",
        (S.VERIFYING,),
        S.DOWNLOADING,
        ("is_current", "may_retry"),
        after=("refetch_all",),
    ),
    T("image_checked", (S.VERIFYING,), S.FAILED, ("is_current",), after=("fail",)),
    # -- Install, restart, self-test, commit; rollback on any failure ----------------------
    # Every step is journaled before the installer runs it, and each installer call is
    # idempotent: a restart re-runs the state's step (resume_work).
    T(
        "install_finished",
        (S.INSTALLING,),
        S.AWAIT_RESTART,
        ("is_current", "succeeded", "needs_restart"),
        after=("report_restart", "request_restart"),
    ),
    T(
        "install_finished",
        (S.INSTALLING,),
        S.AWAIT_COMMIT,
        ("is_current", "succeeded"),
        after=("start_self_test",),
    ),
    T("install_finished", (S.INSTALLING,), S.ROLLING_BACK, ("is_current",), after=("roll_back",)),
    T(
        "boot_checked",
        (S.AWAIT_RESTART,),
        S.AWAIT_COMMIT,
        ("is_current", "succeeded"),
        after=("start_self_test",),
    ),
    T("boot_checked", (S.AWAIT_RESTART,), S.ROLLING_BACK, ("is_current",), after=("roll_back",)),
    T(
        "self_test_finished",
        (S.AWAIT_COMMIT,),
        None,
        ("is_current", "succeeded"),
        after=("commit",),
    ),
    # A failed attempt is retried until the self-test deadline.
    T(
        "self_test_finished",
        (S.AWAIT_COMMIT,),
        None,
        ("is_current", "before_commit_deadline"),
        after=("retry_self_test",),
    ),
    T(
        "self_test_finished",
        (S.AWAIT_COMMIT,),
        S.ROLLING_BACK,
        ("is_current",),
        after=("roll_back",),
    ),
    T(
        "timer_fired",
        (S.AWAIT_COMMIT,),
        None,
        ("is_current", "is_self_test_timer"),
        after=("run_self_test",),
    ),
    # Only a commit that ran after a passed self-test counts.
    T(
        "commit_finished",
        (S.AWAIT_COMMIT,),
        S.IDLE,
        ("is_current", "is_tested", "succeeded"),
        after=("commit_done",),
    ),
    T(
        "commit_finished",
        (S.AWAIT_COMMIT,),
        S.ROLLING_BACK,
        ("is_current", "is_tested"),
        after=("roll_back",),
    ),
    T(
        "rollback_finished",
        (S.ROLLING_BACK,),
        None,
        ("is_current", "succeeded", "needs_restart"),
        after=("request_restart",),
    ),
    T(
        "rollback_finished",
        (S.ROLLING_BACK,),
        S.FAILED,
        ("is_current", "succeeded"),
        after=("rolled_back",),
    ),
    T(
        "rollback_finished",
        (S.ROLLING_BACK,),
        S.FAILED,
        ("is_current",),
        after=("rollback_failed",),
    ),
    # -- Start: the journal could not load the pending manifest; the update is dropped. ----
    T("pending_lost", ALL, S.IDLE, after=("drop_lost_pending",)),
    # -- Restart: break a reboot loop, else re-issue the restored state's work explicitly. ---
    # Once the self-test passed, the commit may already have dropped what a rollback needs:
    # a restart then finishes the commit, however many restarts it took.
    T(
        "restarted",
        (S.INSTALLING, S.AWAIT_RESTART, S.AWAIT_COMMIT),
        S.ROLLING_BACK,
        ("restart_limit_reached",),
        unless=("is_tested",),
        after=("roll_back",),
    ),
    T(
        "restarted",
        (S.ROLLING_BACK,),
        S.FAILED,
        ("restart_limit_reached",),
        after=("rollback_failed",),
    ),
    T(
        "restarted",
        (S.DOWNLOADING, S.VERIFYING),
        S.FAILED,
        ("restart_limit_reached",),
        after=("fail",),
    ),
    T("restarted", (S.DOWNLOADING,), S.FAILED, ("resume_unsupported",), after=("fail",)),
    T("restarted", ALL, None, after=("resume_work",)),
    # -- Reports ----------------------------------------------------------------------------
    T("report_delivered", ALL, None, after=("drop_report",)),
    # -- Keys -------------------------------------------------------------------------------
    # A root keyset was applied (fota.trust): refusals are judged again, and its floor reset,
    # if any, becomes the anti-rollback floor. In any state: it changes no state.
    T("keyset_applied", ALL, None, after=("note_keyset",)),
    T("announcements_stale", ALL, None, after=("report_stale",)),
)
"""The whole lifecycle. Pairs of (state, trigger) absent here are illegal."""


LEGAL: frozenset[tuple[State, str]] = frozenset(
    (state, t.trigger) for t in TRANSITIONS for state in t.source
)
"""Every (state, trigger) pair with a row; :meth:`Machine.handle` drops others without calling
``transitions`` (which logs an invalid trigger at ERROR level before it raises)."""


def triggers() -> tuple[str, ...]:
    """Every trigger name, in table order."""
    return tuple(dict.fromkeys(t.trigger for t in TRANSITIONS))


class Model:
    """The machine's model: the durable record, the manifests, and the command outbox.

    ``state`` is set by the machine; everything else changes only in the callbacks below.
    """

    state: State
    trigger: Callable[..., Awaitable[bool]]
    """Added by the AsyncMachine :class:`Machine` builds: ``await model.trigger(name, **kw)``."""

    def __init__(
        self,
        policy: Policy,
        trust: TrustStore,
        record: Record | None = None,
        *,
        pending: Manifest | None = None,
        installed: Manifest | None = None,
    ) -> None:
        self.policy = policy
        self.trust = trust
        self.record = record or Record()
        self.pending = pending
        self.installed = installed
        self.state = self.record.state
        # The update a recovery left pending: its commit keeps the recovery's note, so the
        # operator still sees it after the resumed update finishes (a new update clears it).
        self._resumed_after_recovery = self.record.pending if self.record.recovered else None
        self.outbox: list[cmd.Command] = []
        # Set by check_manifest (a prepare callback) for the conditions that follow it.
        self._candidate: Manifest | None = None
        self.refusal: ManifestError | None = None
        self.handler_present = False
        """Whether an application handler is registered (not journaled: the engine sets it
        at start, before ``Restarted``)."""
        self.boot_id = ""
        """The current boot of the device (Linux: ``/proc/sys/kernel/random/boot_id``; ""
        when unknown). Set by the engine at start; a restart the installer asked for
        happened when it differs from ``record.boot_id``."""
        self._cancel_refused: bytes | None = None
        self._entry: tuple[ResultCode, str] | None = None
        # Issue 17 §3, kept in memory only (a restart is a fresh start for each):
        self.stall: tuple[str, float] | None = None
        """``(kind, since)`` of a download waiting out a stall: ``missing`` (the image
        answered 4.04) or ``space`` (the disk is full)."""
        # The retries of a failed update are counted in the record (``revived``): each is an
        # attempt of its own, which its reports carry, so that count must survive a restart.
        self.revive_after = 0.0
        """Wall-clock time before which an announcement does not retry the failed update."""
        self.local_refused: tuple[bytes, ...] = ()
        """Manifests refused because of a local setting (allowed_origins, device_class,
        max_image_size, keys): not journaled, so they are judged again, by the settings of
        the time, after a restart."""
        self.refusal_setting = ""
        self.last_refusal = ""
        """The last refusal, for ``fota status``: ``<update id>: <result>: <detail>``."""

    # -- helpers -------------------------------------------------------------------------

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a trigger may change, to put back if its effects cannot be kept."""
        return (
            self.state,
            self.record,
            self.pending,
            self.installed,
            self.handler_present,
            self._cancel_refused,
            self._entry,
            self.stall,
            self.revive_after,
            self.local_refused,
            self.last_refusal,
        )

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        """Undo a trigger (its journal write failed, or a callback raised); drop its commands."""
        (
            self.state,
            self.record,
            self.pending,
            self.installed,
            self.handler_present,
            self._cancel_refused,
            self._entry,
            self.stall,
            self.revive_after,
            self.local_refused,
            self.last_refusal,
        ) = snapshot
        self.outbox = []

    def take_commands(self) -> list[cmd.Command]:
        """Return and clear the commands appended since the last call."""
        out, self.outbox = self.outbox, []
        return out

    @property
    def update_id(self) -> str | None:
        """The current update's id, or None."""
        return self.pending.update_id if self.pending else None

    def info(self, now: float) -> UpdateInfo | None:
        """The pending update (else the installed image) as the application is told it."""
        m = self.pending or self.installed
        if m is None:
            return None
        installed = self.installed if self.installed is not m else None
        pending = m is self.pending
        deadline = pol.deadline_of(m, self.record, self.policy) if pending else None
        return UpdateInfo(
            update_id=m.update_id,
            version=m.body.version,
            sequence=m.body.sequence,
            component=m.body.component,
            severity=m.body.severity,
            image_size=m.body.image_size,
            installed_version=installed.body.version if installed else None,
            polite=must_ask(installed),
            reason=UpdateReason.of(m.body.component),
            deadline=datetime.fromtimestamp(deadline, UTC) if deadline is not None else None,
            deferred=pol.deferred_so_far(self.record, now) if pending else 0.0,
            deferral_limit=pol.deferral_bound(m, self.policy),
            forced=self.record.forced if pending else "",
        )

    def authorization_needed(self, now: float) -> cmd.Tell | None:
        """The ``authorization_needed`` notice while an answer is awaited, else None.

        Told when the client starts waiting; the control socket also sends it to a
        connection that subscribes while the client waits (the application missed the first).
        """
        if self.state not in (S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH):
            return None
        info = self.info(now)
        assert info is not None  # an update is pending in these states
        return cmd.Tell(
            "authorization_needed",
            info.update_id,
            {
                "step": "download" if self.state is S.AWAIT_DOWNLOAD_AUTH else "install",
                "version": info.version,
                "polite": info.polite,
                "deferred": info.deferred,
                "deferral_limit": info.deferral_limit,
                "deadline": info.deadline.timestamp() if info.deadline else None,
            },
        )

    def verified_bytes(self) -> int:
        """Bytes of the pending image covered by verified fragments."""
        if self.pending is None:
            return 0
        done = bitmap_count(self.record.verified)
        last = self.pending.fragment_count - 1
        total = done * self.pending.body.fragment_size
        if done and bitmap_get(self.record.verified, last):
            # The last fragment is usually short.
            total -= self.pending.body.fragment_size - self.pending.fragment_span(last)[1]
        return total

    def _report(
        self,
        result: ResultCode,
        detail: str = "",
        until: float | None = None,
        *,
        refused: bytes | None = None,
    ) -> None:
        """Queue a report in the durable outbox.

        ``refused`` is the digest of a refused manifest: the report is then about it, not about
        the pending update.
        """
        sequence, rec = take_report_seq(self.record)
        about = None if refused is not None else self.pending
        report = Report(
            sequence=sequence,
            state=self.state,
            result=result,
            update_id=update_id_of(refused) if refused is not None else self.update_id,
            manifest_sequence=about.body.sequence if about else None,
            verified_bytes=self.verified_bytes() if about else None,
            detail=detail[:200],
            until=int(until) if until is not None else None,
            # Which attempt of the update (0: the first; see revive). A refusal is about
            # another manifest, whose first attempt it ends.
            attempt=rec.revived if about else 0,
        )
        self.record = rec.evolve(outbox=queue_report(rec.outbox, report))
        self.outbox.append(cmd.SendReports())

    def sync_state(self) -> None:
        """After a row that changed the state: the record always holds the machine's state."""
        if self.record.state is not self.state:
            self.record = self.record.evolve(state=self.state)

    def _clear_pending(self) -> None:
        self.pending = None
        self.stall, self.revive_after = None, 0.0
        self.record = self.record.without_update()

    def _step(self) -> str:
        """The step the current state is about (valid in the ask, held and work states)."""
        download = (S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED, S.DOWNLOAD_HELD, S.DOWNLOADING)
        return "download" if self.state in download else "install"

    def _subject(self, e: Any) -> tuple[Manifest | None, Record]:
        """The manifest a condition is about, with its record.

        For ``manifest_fetched``: the candidate as it would be adopted now; else the pending
        update.
        """
        if e.event.name == "manifest_fetched":
            return self._candidate, Record(first_seen=e.kwargs["now"])
        return self.pending, self.record

    def _deadline(self, e: Any) -> float | None:
        manifest, record = self._subject(e)
        return pol.deadline_of(manifest, record, self.policy) if manifest else None

    def _past_deadline(self, e: Any) -> bool:
        deadline = self._deadline(e)
        return deadline is not None and e.kwargs["now"] >= deadline

    def _forcing(self, e: Any) -> str:
        """The rule forcing the subject update past the application now, or ""."""
        manifest, record = self._subject(e)
        if manifest is None:
            return ""
        reason = pol.force_reason(e.kwargs["now"], manifest, record, self.policy)
        event = e.kwargs["event"]
        if not reason and isinstance(event, ev.TimerFired) and event.name == "grace":
            reason = pol.UNANSWERED
        return reason

    def _clear(self, step: str, e: Any) -> bool:
        """Nothing can hold ``step`` now: no local hold applies, or the deadline passed."""
        now = e.kwargs["now"]
        if self._past_deadline(e):
            return True
        if pol.needs_check(step, self.installed, self.policy):
            return False
        return not pol.blockers(now, step, self.record, self.installed, self.policy)

    def _leave_waiting(self) -> None:
        """Timers that only matter while the application is asked."""
        self.outbox += [cmd.CancelTimer("grace"), cmd.CancelTimer("deadline")]

    def _stop_everything(self) -> None:
        """The update ends before install: stop its work and every timer."""
        self.outbox += [cmd.StopDownload()]
        self.outbox += [
            cmd.CancelTimer(n) for n in ("defer", "retry", "budget", "hold", "deadline", "grace")
        ]

    # -- conditions (pure) ---------------------------------------------------------------

    def is_current(self, e: Any) -> bool:
        """The event names the pending update."""
        return (
            self.pending is not None
            and getattr(e.kwargs["event"], "update_id", None) == self.pending.update_id
        )

    def is_new_announcement(self, e: Any) -> bool:
        """The announced manifest is not one we have, are doing, refused, rejected or cancelled."""
        a: ev.AnnouncementReceived = e.kwargs["event"]
        rec = self.record
        known = {
            rec.installed,
            rec.pending,
            *rec.refused,
            *rec.rejected,
            *rec.cancelled,
            *self.local_refused,
        }
        return (
            a.manifest_digest is not None
            and a.manifest_uri is not None
            and a.manifest_digest not in known
        )

    def _known(self) -> set[bytes]:
        rec = self.record
        return {d for d in (rec.pending, rec.installed) if d is not None} | {
            *rec.refused,
            *rec.rejected,
            *self.local_refused,
        }

    def is_known_manifest(self, e: Any) -> bool:
        """The fetched manifest is the pending, a refused, a rejected or the running one."""
        return bool(_names(e.kwargs["event"]) & self._known())

    def is_cancel(self, e: Any) -> bool:
        """The announcement withdraws the pending update."""
        cancel = getattr(e.kwargs["event"], "cancel", None)
        return cancel is not None and cancel == self.record.pending

    def candidate_must_ask(self, e: Any) -> bool:
        """The fetched manifest waits for the application (polite image, no deadline passed)."""
        return self._asks() and not self._forcing(e)

    def download_clear(self, e: Any) -> bool:
        """Nothing holds the download (see :func:`fota.core.policy.blockers`)."""
        return self._clear("download", e)

    def install_clear(self, e: Any) -> bool:
        """Nothing holds the install."""
        return self._clear("install", e)

    def may_defer(self, e: Any) -> bool:
        """No forcing rule applies: the deferral is granted (cut to the bound and deadline).

        A deferral asked until a time already past is granted too: it ends at once and the
        application is asked again; only a spent bound or a passed deadline refuse it.
        """
        return not self.is_forced(e)

    def is_forced(self, e: Any) -> bool:
        """A forcing rule (deadline, deferral bound) applies to the pending update now."""
        return self.pending is not None and bool(
            pol.force_reason(e.kwargs["now"], self.pending, self.record, self.policy)
        )

    def timer_forces(self, e: Any) -> bool:
        """A deferral, deadline or grace timer fired and a forcing rule now applies."""
        t: ev.TimerFired = e.kwargs["event"]
        if t.name == "grace":
            return not self.handler_present and self.policy.unanswered == "proceed"
        return t.name in ("defer", "deadline") and bool(self._forcing(e))

    def is_hold_timer(self, e: Any) -> bool:
        """The timer to look at a held update again (a window opens, a lock expires...)."""
        return bool(e.kwargs["event"].name == "hold")

    def gates_open(self, e: Any) -> bool:
        """No local hold is left (conditions as the engine found them), or the deadline passed."""
        if self._past_deadline(e):
            return True
        failing = e.kwargs["event"].failing
        now = e.kwargs["now"]
        return not pol.blockers(
            now, self._step(), self.record, self.installed, self.policy, failing
        )

    def lock_room(self, e: Any) -> bool:
        """The lock is a renewal, or there is room for another."""
        lock: ev.LockTaken = e.kwargs["event"]
        active = pol.active_locks(self.record, e.kwargs["now"])
        return any(name == lock.name for name, _ in active) or len(active) < self.policy.max_locks

    def handler_arrived(self, e: Any) -> bool:
        """A handler registered where none was."""
        return bool(e.kwargs["event"].present) and not self.handler_present

    def manifest_refused(self, e: Any) -> bool:
        """check_manifest found a problem with the fetched manifest."""
        return self.refusal is not None

    def must_ask(self, e: Any) -> bool:
        """The running image is polite: the application decides.

        So it does when the running image's manifest was lost and moved aside by a recovery
        (``record.recovered``): nothing proves that image impolite, and a device that runs
        an image is not an empty one to install on at once.
        """
        return self._asks()

    def _asks(self) -> bool:
        lost = self.installed is None and bool(self.record.recovered)
        return must_ask(self.installed) or lost

    def is_defer_timer(self, e: Any) -> bool:
        """The timer that fired is the deferral timer."""
        return bool(e.kwargs["event"].name == "defer")

    def is_retry_timer(self, e: Any) -> bool:
        """The timer that fired is the retry back-off timer."""
        return bool(e.kwargs["event"].name == "retry")

    def all_fragments_verified(self, e: Any) -> bool:
        """Every fragment's bit is set."""
        assert self.pending is not None
        return bitmap_count(self.record.verified) == self.pending.fragment_count

    def may_retry(self, e: Any) -> bool:
        """The failure is retryable and the attempt budget is not spent."""
        error: FotaError | None = getattr(e.kwargs["event"], "error", None)
        retryable = error.retryable if error is not None else True
        return retryable and self.record.attempts + 1 < self.policy.max_attempts

    def _stall_kind(self, error: FotaError | None) -> str | None:
        """``missing``, ``space`` or None: whether a download failure is a stall.

        Too little space before the first fragment is final (NOT_ENOUGH_SPACE: the image
        does not fit); once a fragment is verified, or while waiting for space, it pauses.
        """
        if isinstance(error, ResourceMissing):
            return "missing"
        if isinstance(error, DiskFull):
            return "space"
        if isinstance(error, NotEnoughSpace) and (
            (self.stall is not None and self.stall[0] == "space")
            or bitmap_count(self.record.verified) > 0
        ):
            return "space"
        return None

    def stalled(self, e: Any) -> bool:
        """The download stalled (4.04 within ``not_found_budget``, or a full disk)."""
        kind = self._stall_kind(getattr(e.kwargs["event"], "error", None))
        if kind is None:
            return False
        if kind == "space":
            return True
        now: float = e.kwargs["now"]
        since = self.stall[1] if self.stall is not None and self.stall[0] == kind else now
        return now - since < self.policy.not_found_budget

    def is_failed_again(self, e: Any) -> bool:
        """The failed update is announced again, and may be retried now.

        Only an update that failed before its install, once the back-off since its last
        retry (``revive_after``) is over.
        """
        a: ev.AnnouncementReceived = e.kwargs["event"]
        rec = self.record
        return (
            self.pending is not None
            and a.manifest_digest is not None
            and a.manifest_digest == rec.pending
            and not rec.failure
            and e.kwargs["now"] >= self.revive_after
        )

    def is_budget_timer(self, e: Any) -> bool:
        """The timer that fired is the download's time budget."""
        return bool(e.kwargs["event"].name == "budget")

    def over_data_budget(self, e: Any) -> bool:
        """The bytes received, this event's included, exceed the data budget."""
        limit = self.policy.max_download_bytes
        return limit is not None and self.record.fetched + e.kwargs["event"].fetched > limit

    def image_changed(self, e: Any) -> bool:
        """The download failed because the image behind the URI changed."""
        return isinstance(getattr(e.kwargs["event"], "error", None), ImageChanged)

    def resume_unsupported(self, e: Any) -> bool:
        """Config.resume is ``none``: a download interrupted by a restart fails."""
        return self.policy.resume == "none"

    def image_ok(self, e: Any) -> bool:
        """The whole image matched."""
        return bool(e.kwargs["event"].ok)

    def succeeded(self, e: Any) -> bool:
        """An install or self-test succeeded."""
        event = e.kwargs["event"]
        return bool(getattr(event, "ok", getattr(event, "error", None) is None))

    def is_tested(self, e: Any) -> bool:
        """The self-test passed (journaled): the commit is under way."""
        return self.record.tested

    def needs_restart(self, e: Any) -> bool:
        """The installer said the image runs only after a restart of the device."""
        return bool(e.kwargs["event"].restart)

    def before_commit_deadline(self, e: Any) -> bool:
        """There is time left for another self-test attempt.

        A wall clock that stepped back to before the self-test began (a device without an
        RTC, whose new image broke time synchronisation) counts as past the deadline: the
        attempts must not go on forever.
        """
        by = self.record.commit_by
        now = e.kwargs["now"]
        return by is not None and by - self.policy.self_test_deadline <= now < by

    def is_self_test_timer(self, e: Any) -> bool:
        """The timer that fired is the next self-test attempt's."""
        return bool(e.kwargs["event"].name == "selftest")

    def restart_limit_reached(self, e: Any) -> bool:
        """Restarting once more would pass the restart limit."""
        return self.record.restarts + 1 > self.policy.restart_limit

    # -- prepare -------------------------------------------------------------------------

    def check_manifest(self, e: Any) -> None:
        """Verify the fetched manifest once, for the conditions that follow."""
        fetched: ev.ManifestFetched = e.kwargs["event"]
        self._candidate, self.refusal, self.refusal_setting = None, None, ""
        setting = ""
        if _names(fetched) & self._known():
            return  # is_known_manifest handles it: not refused (nor reported) again
        floor = self.record.floor
        try:
            self._candidate = accept(
                fetched.raw,
                self.trust,
                device_class=self.policy.device_class,
                # A floor a root keyset reset replaces the running image's sequence number.
                installed=self.installed if floor is None else None,
                # A manifest replacing a live update must be newer than it too; a failed one
                # is simply replaced.
                pending=self.pending if self.state in CANCELLABLE else None,
                max_image_size=self.policy.max_image_size,
            )
            sequence = self._candidate.body.sequence
            # The manifest a recovery found at the floor may be taken at it (floor_identity).
            again = sequence == floor and self.record.floor_identity in _names(fetched)
            if floor is not None and sequence <= floor and not again:
                raise ManifestError(
                    "rollback",
                    "sequence",
                    f"{self._candidate.body.sequence} is not greater than {floor}"
                    f" (the floor keyset {self.record.keyset_version} set)",
                )
            if _names(fetched) & set(self.record.cancelled):
                raise ManifestError("cancelled", "digest", "the server cancelled this manifest")
            image = resolve(fetched.uri, self._candidate.body.image_uri)
            if self.policy.origins and not allowed(image, self.policy.origins):
                setting = "allowed_origins"
                # Signed, but fetching from anywhere would let a leaked key (or a typo) send
                # the fleet to any host; the configuration says where images may come from.
                raise ManifestError(
                    "invalid_uri",
                    "image_uri",
                    f"{show(image, 120)} is not on an allowed origin "
                    f"({', '.join(self.policy.origins)})",
                )
        except ManifestError as exc:
            self._candidate, self.refusal = None, exc
            self.refusal_setting = setting or _local_setting(exc)

    # -- callbacks (plain def: change the record, append commands) ------------------------

    def fetch_manifest(self, e: Any) -> None:
        """Fetch the announced manifest."""
        a: ev.AnnouncementReceived = e.kwargs["event"]
        assert a.manifest_uri is not None and a.manifest_digest is not None
        if self.names_cancel(e):  # the same announcement withdraws another manifest
            self.note_cancel(e)
        self.outbox.append(cmd.FetchManifest(a.manifest_uri, a.manifest_digest))

    def refuse_manifest(self, e: Any) -> None:
        """Remember and report a refused manifest; it is not fetched again."""
        fetched: ev.ManifestFetched = e.kwargs["event"]
        assert self.refusal is not None
        if self.refusal_setting:
            # The device's own settings refused it: remembered until a restart only, so a
            # fixed setting lets it be fetched and judged again (issue 17 §3).
            self.local_refused = remember(self.local_refused, fetched.digest)
        else:
            self.record = self.record.evolve(refused=remember(self.record.refused, fetched.digest))
        # The report names the manifest's identity (what the server announced), whatever
        # key the refusal is filed under (fetched_key).
        named = envelope_id(fetched.raw) or fetched.digest
        self._report(self.refusal.result, str(self.refusal), refused=named)
        because = f" (local setting {self.refusal_setting})" if self.refusal_setting else ""
        self.last_refusal = (
            f"{update_id_of(named)}: {self.refusal.result.name}: {self.refusal}{because}"
        )

    def adopt_manifest(self, e: Any) -> None:
        """Make the fetched manifest the pending update, with a fresh download state.

        A live update it replaces is superseded (reported, told, stopped); its verified
        fragments are kept when the new manifest describes the same image the same way.
        """
        new = self._candidate
        assert new is not None
        old = self.pending
        verified = bitmap_new(new.fragment_count)
        if old is not None:
            live = e.kwargs["source"] in CANCELLABLE
            same = (
                live
                and old.body.image_sha256 == new.body.image_sha256
                and old.body.fragment_sha256 == new.body.fragment_sha256
            )
            if live:
                detail = f"superseded by {new.update_id} (sequence {new.body.sequence})"
                self._report(ResultCode.SUPERSEDED, detail)
                self._stop_everything()
                self.outbox.append(cmd.NotifyComplete(old.update_id, ResultCode.SUPERSEDED, detail))
            if same:
                verified = self.record.verified
            else:
                self.outbox.append(cmd.DiscardCandidate())
        self._clear_pending()
        self.pending = new
        self.record = self.record.evolve(
            pending=new.digest,
            manifest_uri=e.kwargs["event"].uri,
            verified=verified,
            first_seen=e.kwargs["now"],
        )

    def _ask(self, e: Any, step: str) -> None:
        """Ask the application, with the timers that bound the wait for its answer."""
        assert self.pending is not None
        uid = self.pending.update_id
        ask = cmd.AskDownloadAuthorization if step == "download" else cmd.AskInstallAuthorization
        self.outbox.append(ask(uid))
        self._arm_wait_timers(e.kwargs["now"])

    def _arm_wait_timers(self, now: float, grace_from: float | None = None) -> None:
        """Arm the timers that force a waiting update.

        The deadline always; the grace period when nobody is there to answer and the
        configuration says to proceed, counted from ``grace_from`` (default: when the update
        was first seen).
        """
        assert self.pending is not None
        uid = self.pending.update_id
        deadline = pol.deadline_of(self.pending, self.record, self.policy)
        if deadline is not None:
            self.outbox.append(cmd.StartTimer("deadline", deadline, uid))
        if not self.handler_present and self.policy.unanswered == "proceed":
            start = grace_from if grace_from is not None else self.record.first_seen
            start = now if start is None else start
            self.outbox.append(cmd.StartTimer("grace", start + self.policy.unanswered_grace, uid))

    def ask_download(self, e: Any) -> None:
        """Ask the application whether to download."""
        self._report(ResultCode.INITIAL)
        self._ask(e, "download")

    def ask_install(self, e: Any) -> None:
        """Ask the application whether to install."""
        self._report(ResultCode.INITIAL)
        self._ask(e, "install")

    def authorize(self, e: Any) -> None:
        """The application said yes: the report of the step's start says so."""
        self._leave_waiting()
        self._entry = (ResultCode.AUTHORIZED, self._step())

    def report_entry(self, e: Any) -> None:
        """Report entering a work or held state, with the decision that led there.

        A step that starts past its deadline through local holds overrules their holders:
        that is reported as forced too (unless the step was already forced past the
        application, which reported it).
        """
        result, detail = self._entry or (ResultCode.INITIAL, "")
        self._entry = None
        self._report(result, detail)
        # A refetch after VERIFYING is not a new start of the step: no hold applies to it.
        if result is not ResultCode.FORCED and e.kwargs["source"] is not S.VERIFYING:
            self._force_past_holds(e)

    def _force_past_holds(self, e: Any) -> None:
        assert self.pending is not None
        now, step = e.kwargs["now"], self._step()
        failing = getattr(e.kwargs["event"], "failing", ())
        if not self._past_deadline(e) or not pol.blockers(
            now, step, self.record, self.installed, self.policy, failing
        ):
            return
        self.record = self.record.evolve(forced=pol.DEADLINE)
        self._report(ResultCode.FORCED, f"{step}: {pol.DEADLINE}")
        self.outbox.append(cmd.NotifyForced(self.pending.update_id, step, pol.DEADLINE))

    def proceed(self, e: Any) -> None:
        """The step goes ahead without the application's yes: say why, to whom it concerns.

        Forced (deadline, deferral bound, nobody answered): reported and told. An impolite
        running image: the application's hook is called for information only. A first install
        on an empty device: nobody to tell.
        """
        assert self.pending is not None
        uid, step = self.pending.update_id, self._step()
        self._leave_waiting()
        reason = self._forcing(e)
        if reason and self._asks():
            self.record = self.record.evolve(forced=reason)
            self._entry = (ResultCode.FORCED, f"{step}: {reason}")
            self.outbox.append(cmd.NotifyForced(uid, step, reason))
        elif self.installed is not None and not self.installed.body.polite:
            self.outbox.append(cmd.Inform(uid, step))

    def check_gates(self, e: Any) -> None:
        """Have the engine evaluate the configured conditions for the held step."""
        assert self.pending is not None
        self.outbox.append(cmd.CheckGates(self.pending.update_id, self._step()))

    def hold(self, e: Any) -> None:
        """Still held: look again when something may have changed; report what holds it."""
        assert self.pending is not None
        now = e.kwargs["now"]
        failing = e.kwargs["event"].failing
        locks = pol.capped_locks(self.record, now, self.policy.max_lock_ttl)
        if locks != pol.active_locks(self.record, now):
            self.record = self.record.evolve(locks=locks)
        held = pol.blockers(now, self._step(), self.record, self.installed, self.policy, failing)
        deadline = pol.deadline_of(self.pending, self.record, self.policy)
        again = pol.next_check(now, self.record, self.policy, failing, deadline)
        if held != self.record.held:
            self.record = self.record.evolve(held=held)
            self._report(ResultCode.INITIAL, "held: " + ", ".join(held), again)
        if again is None:  # cannot happen while something holds; be safe
            again = now + self.policy.condition_recheck
        self.outbox.append(cmd.StartTimer("hold", again, self.pending.update_id))

    def release_hold(self, e: Any) -> None:
        """Nothing holds the step any more."""
        self.record = self.record.evolve(held=())
        self.outbox.append(cmd.CancelTimer("hold"))

    def take_lock(self, e: Any) -> None:
        """Take or renew an inhibitor lock.

        Its time to live is capped, so a crashed holder cannot block updates forever.
        """
        lock: ev.LockTaken = e.kwargs["event"]
        now = e.kwargs["now"]
        ttl = min(max(0.0, lock.ttl), self.policy.max_lock_ttl)
        locks = tuple(
            x
            for x in pol.capped_locks(self.record, now, self.policy.max_lock_ttl)
            if x[0] != lock.name
        )
        self.record = self.record.evolve(locks=(*locks, (lock.name, now + ttl)))

    def release_lock(self, e: Any) -> None:
        """Drop an inhibitor lock (and any that expired)."""
        name = e.kwargs["event"].name
        now, cap = e.kwargs["now"], self.policy.max_lock_ttl
        locks = tuple(x for x in pol.capped_locks(self.record, now, cap) if x[0] != name)
        self.record = self.record.evolve(locks=locks)

    def note_handler(self, e: Any) -> None:
        """Remember whether a handler is registered.

        One that arrives ends the grace period; one that leaves while the application is
        asked starts a new one from now (an application restarting itself must have the time
        to register again).
        """
        self.handler_present = bool(e.kwargs["event"].present)
        if self.handler_present:
            self.outbox.append(cmd.CancelTimer("grace"))
        elif self.state in (S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH):
            self._arm_wait_timers(e.kwargs["now"], grace_from=e.kwargs["now"])

    def cancel_update(self, e: Any) -> None:
        """The server withdrew the pending update: stop, discard, report; not fetched again."""
        assert self.pending is not None
        uid, digest = self.pending.update_id, self.pending.digest
        detail = "cancelled by the server"
        self._report(ResultCode.CANCELLED, detail)
        self._stop_everything()
        self.outbox += [
            cmd.DiscardCandidate(),
            cmd.NotifyComplete(uid, ResultCode.CANCELLED, detail),
        ]
        self._clear_pending()
        self.record = self.record.evolve(cancelled=remember(self.record.cancelled, digest))
        # The same announcement may name the manifest that replaces the cancelled one.
        if self.is_new_announcement(e):
            self.fetch_manifest(e)

    def refuse_cancel(self, e: Any) -> None:
        """Too late to cancel once installing: say so once."""
        if self._cancel_refused != self.record.pending:
            self._cancel_refused = self.record.pending
            doing = "rolled back" if self.state is S.ROLLING_BACK else "installed"
            self._report(ResultCode.INITIAL, f"cancel refused: the update is being {doing}")

    def names_cancel(self, e: Any) -> bool:
        """The announcement withdraws a manifest that is not pending (yet)."""
        cancel = getattr(e.kwargs["event"], "cancel", None)
        return cancel is not None and cancel not in self.record.cancelled

    def note_cancel(self, e: Any) -> None:
        """Remember a withdrawn manifest, in case its fetch is still under way."""
        cancel = e.kwargs["event"].cancel
        self.record = self.record.evolve(cancelled=remember(self.record.cancelled, cancel))

    def start_download(self, e: Any) -> None:
        """Start or resume the download task."""
        assert self.pending is not None
        if self.record.download_started is None:
            self.record = self.record.evolve(download_started=e.kwargs["now"])
        # Every start (a refetch after VERIFYING cancelled it too); a timer of that name is
        # replaced, and the deadline counts from the first start.
        self._arm_time_budget()
        self.outbox.append(cmd.StartDownload(self.pending.update_id))

    def _arm_time_budget(self) -> None:
        limit, started = self.policy.max_download_time, self.record.download_started
        if limit is not None and started is not None and self.pending is not None:
            self.outbox.append(cmd.StartTimer("budget", started + limit, self.pending.update_id))

    def defer(self, e: Any) -> None:
        """Wait until the application's time (cut to the bound and the deadline), then ask again.

        The deferral counts toward the update's cumulative deferral.
        """
        d: ev.Deferred = e.kwargs["event"]
        assert self.pending is not None
        now = e.kwargs["now"]
        self._end_deferral(now)
        until = pol.clamp_deferral(now, d.until, self.pending, self.record, self.policy)
        self.record = self.record.evolve(defer_until=until, defer_since=now, defer_reason=d.reason)
        self._leave_waiting()
        self._report(ResultCode.DEFERRED, d.reason, until)
        # The deferral is cut to the deadline, so its own timer is the only one needed.
        self.outbox.append(cmd.StartTimer("defer", until, d.update_id))

    def _end_deferral(self, now: float) -> None:
        rec = self.record
        if rec.defer_until is not None:
            self.record = rec.evolve(
                deferred_total=pol.deferred_so_far(rec, now),
                defer_until=None,
                defer_since=None,
                defer_reason="",
            )
            self.outbox.append(cmd.CancelTimer("defer"))

    def end_deferral(self, e: Any) -> None:
        """Leave a deferral (answered, resumed, due or forced); its length is added up."""
        self._end_deferral(e.kwargs["now"])

    def reject(self, e: Any) -> None:
        """Drop the update for good; the same manifest is never fetched (nor asked) again."""
        r: ev.Rejected = e.kwargs["event"]
        assert self.pending is not None
        uid = self.pending.update_id
        self._end_deferral(e.kwargs["now"])
        self._stop_everything()
        self._report(ResultCode.REJECTED, r.reason)
        self.record = self.record.evolve(
            rejected=remember(self.record.rejected, self.pending.digest)
        )
        self._clear_pending()
        self.outbox += [
            cmd.DiscardCandidate(),
            cmd.NotifyComplete(uid, ResultCode.REJECTED, r.reason),
        ]

    def mark_fragment(self, e: Any) -> None:
        """Record a verified fragment; tell the application every ``progress_step`` percent."""
        f: ev.FragmentVerified = e.kwargs["event"]
        assert self.pending is not None
        indexes = [i for i in f.indexes if 0 <= i < self.pending.fragment_count]
        if not indexes:
            return
        verified = self.record.verified
        for index in indexes:
            verified = bitmap_set(verified, index)
        # The note of partial fragments rides on this write (fsynced with the fragments).
        self.record = self.record.evolve(verified=verified, partial=f.partial)
        self.stall = None  # progress: a later 4.04 starts a budget of its own
        if self.record.restarts:
            # Progress since the last restart: an interrupted download, not a reboot loop.
            self.record = self.record.evolve(restarts=0)
        size = max(1, self.pending.body.image_size)
        done = self.verified_bytes()
        percent = done * 100 // size
        step = max(1, self.policy.progress_step)
        if percent // step > self.record.progress // step:
            self.record = self.record.evolve(progress=percent)
            self.outbox.append(cmd.NotifyProgress(self.pending.update_id, done, size))

    def count_fetched(self, e: Any) -> None:
        """Add the bytes the download task received to the update's total (data budget)."""
        fetched: int = e.kwargs["event"].fetched
        if fetched:
            self.record = self.record.evolve(fetched=self.record.fetched + fetched)

    def restart_from_zero(self, e: Any) -> None:
        """The image changed under us: forget every fragment and fetch them all again."""
        assert self.pending is not None
        error = e.kwargs["event"].error
        self.record = self.record.evolve(
            attempts=self.record.attempts + 1,
            verified=bitmap_new(self.pending.fragment_count),
            partial=b"",
        )
        self._report(ResultCode.INITIAL, f"image changed, restarting from zero: {error}")
        self.outbox.append(cmd.StartDownload(self.pending.update_id))

    def clear_fragments(self, e: Any) -> None:
        """Forget fragments that no longer verify on disk."""
        f: ev.FragmentsInvalid = e.kwargs["event"]
        verified = self.record.verified
        for i in f.indexes:
            if 0 <= i < len(verified) * 8:
                verified = bitmap_set(verified, i, False)
        self.record = self.record.evolve(verified=verified)

    def schedule_retry(self, e: Any) -> None:
        """Count the failed attempt and retry after a back-off."""
        attempts = self.record.attempts + 1
        self.record = self.record.evolve(attempts=attempts)
        now: float = e.kwargs["now"]
        assert self.pending is not None
        delay = retry_delay(attempts, self.policy, e.kwargs.get("draw", 0.5))
        self.outbox.append(cmd.StartTimer("retry", now + delay, self.pending.update_id, delay))

    def pause_download(self, e: Any) -> None:
        """Wait out a stall: ask again after a back-off, reported once per stall."""
        assert self.pending is not None
        error: FotaError = e.kwargs["event"].error
        now: float = e.kwargs["now"]
        kind = self._stall_kind(error)
        assert kind is not None
        if self.stall is None or self.stall[0] != kind:
            self.stall = (kind, now)
            until = (
                f"for up to {self.policy.not_found_budget:g} s"
                if kind == "missing"
                else "when there is room"
            )
            self._report(ResultCode.INITIAL, f"download paused: {error}; resuming {until}")
        since = self.stall[1]
        delay = pol.stall_delay(now - since, self.policy, e.kwargs.get("draw", 0.5))
        if kind == "missing":  # one last try when the budget ends
            delay = min(delay, max(0.0, since + self.policy.not_found_budget - now))
        self.outbox.append(cmd.StartTimer("retry", now + delay, self.pending.update_id, delay))

    def revive(self, e: Any) -> None:
        """Retry the failed update from its verified fragments, with fresh attempt counters.

        A new attempt of the update: the failure was reported as final (the server must
        learn it whether or not it ever announces the update again), so the reports from here
        on carry the next attempt number (report key 10), and this attempt ends with a final
        report of its own.
        """
        assert self.pending is not None
        self.stall = None
        self.record = self.record.evolve(attempts=0, restarts=0, revived=self.record.revived + 1)
        # Reported as the step's entry (start_download or hold), with this detail.
        self._entry = (
            ResultCode.INITIAL,
            f"announced again: retrying from {bitmap_count(self.record.verified)} verified"
            f" of {self.pending.fragment_count} fragments",
        )

    def verify_image(self, e: Any) -> None:
        """Check the whole image (the download and its time budget are over)."""
        assert self.pending is not None
        self._report(ResultCode.INITIAL)
        self.record = self.record.evolve(partial=b"")  # the download is over
        if self.policy.max_download_time is not None:
            self.outbox.append(cmd.CancelTimer("budget"))
        self.outbox.append(cmd.VerifyImage(self.pending.update_id))

    def refetch_all(self, e: Any) -> None:
        """The whole image failed although its fragments passed: fetch everything again."""
        assert self.pending is not None
        self.record = self.record.evolve(
            attempts=self.record.attempts + 1, verified=bitmap_new(self.pending.fragment_count)
        )
        self.report_entry(e)
        self.start_download(e)

    def install(self, e: Any) -> None:
        """Run the installer.

        The install steps count their restarts from here: those of the download are not a
        reason to roll back at the restart the installer asks for.
        """
        assert self.pending is not None
        self.report_entry(e)
        self.record = self.record.evolve(restarts=0)
        self.outbox.append(cmd.Install(self.pending.update_id))

    def start_self_test(self, e: Any) -> None:
        """The new image runs: it must pass the self-test before the deadline."""
        assert self.pending is not None
        now = e.kwargs["now"]
        self.record = self.record.evolve(
            commit_by=now + self.policy.self_test_deadline, tested=False, boot_id=""
        )
        self._report(ResultCode.INITIAL)
        self.outbox.append(cmd.RunSelfTest(self.pending.update_id))

    def run_self_test(self, e: Any) -> None:
        """Another self-test attempt."""
        assert self.pending is not None
        self.outbox.append(cmd.RunSelfTest(self.pending.update_id))

    def retry_self_test(self, e: Any) -> None:
        """The attempt failed with time left: try again after the interval (or at the deadline)."""
        assert self.pending is not None and self.record.commit_by is not None
        at = min(e.kwargs["now"] + self.policy.self_test_interval, self.record.commit_by)
        self.outbox.append(cmd.StartTimer("selftest", at, self.pending.update_id))

    def request_restart(self, e: Any) -> None:
        """The image runs only after a restart of the device: ask for one, remember this boot."""
        assert self.pending is not None
        self.record = self.record.evolve(boot_id=self.boot_id)
        self.outbox.append(cmd.RequestRestart(self.pending.update_id))

    def report_restart(self, e: Any) -> None:
        """Report that the install waits for a restart (not again when a rollback does)."""
        self._report(ResultCode.INITIAL, "restart required")

    def commit(self, e: Any) -> None:
        """The self-test passed: make the new image permanent."""
        assert self.pending is not None
        self.record = self.record.evolve(tested=True)
        self.outbox += [cmd.CancelTimer("selftest"), cmd.Commit(self.pending.update_id)]

    def commit_done(self, e: Any) -> None:
        """The new image is the installed one; it now decides politeness."""
        assert self.pending is not None
        uid = self.pending.update_id
        self.installed = self.pending
        # Its sequence number is the floor now (it passed a floor a keyset set, if any).
        self.record = self.record.evolve(
            installed=self.pending.digest,
            installed_sequence=self.pending.body.sequence,
            floor=None,
            recovered=(
                self.record.recovered if self.pending.digest == self._resumed_after_recovery else ""
            ),
        )
        self._report(ResultCode.SUCCESS)
        self._clear_pending()
        self.outbox += [
            cmd.DiscardCandidate(),
            cmd.NotifyComplete(uid, ResultCode.SUCCESS),
            cmd.CheckAnnouncement(),
        ]

    def roll_back(self, e: Any) -> None:
        """Something failed from the install on: report why, then put the previous image back.

        The rollback gets a restart budget of its own.
        """
        assert self.pending is not None
        result, detail = self._failure(e)
        self.record = self.record.evolve(failure=detail, restarts=0, tested=False, boot_id="")
        self._report(result, detail)
        self.outbox += [cmd.CancelTimer("selftest"), cmd.Rollback(self.pending.update_id)]

    def _failure(self, e: Any) -> tuple[ResultCode, str]:
        """The result code and detail of what sent the update to ROLLING_BACK."""
        event = e.kwargs["event"]
        error: FotaError | None = getattr(event, "error", None)
        if isinstance(event, ev.BootChecked):
            return ResultCode.FAILED, f"the new image did not start: {event.detail or 'no detail'}"
        if isinstance(event, ev.SelfTestFinished):
            return ResultCode.FAILED, f"self-test failed: {event.detail or 'no detail'}"
        if isinstance(event, ev.CommitFinished) and error is not None:
            return error.result, f"commit failed: {error}"
        if isinstance(event, ev.Restarted):
            step = e.kwargs["source"].name
            return ResultCode.FAILED, f"restart limit {self.policy.restart_limit} reached in {step}"
        if error is not None:
            return error.result, str(error)
        return ResultCode.FAILED, e.event.name

    def _previous(self) -> str:
        return f"version {self.installed.body.version}" if self.installed else "the previous image"

    def rolled_back(self, e: Any) -> None:
        """The previous image runs again: the final report says so, and why."""
        assert self.pending is not None
        detail = f"rolled back to {self._previous()}: {self.record.failure}"
        self._finish(ResultCode.ROLLED_BACK, detail)

    def rollback_failed(self, e: Any) -> None:
        """The previous image could not be restored: the device needs attention."""
        assert self.pending is not None
        event = e.kwargs["event"]
        why = (
            f"restart limit {self.policy.restart_limit} reached"
            if isinstance(event, ev.Restarted)
            else str(getattr(event, "error", None) or "unknown")
        )
        self._finish(ResultCode.ROLLBACK_FAILED, f"rollback failed ({why}): {self.record.failure}")

    def _finish(self, result: ResultCode, detail: str) -> None:
        assert self.pending is not None
        self.record = self.record.evolve(boot_id="", commit_by=None)
        self._report(result, detail)
        self.outbox += [
            cmd.NotifyComplete(self.pending.update_id, result, detail),
            cmd.CheckAnnouncement(),
        ]

    def fail(self, e: Any) -> None:
        """The update failed: report why. It stays pending (to inspect) until a new one comes."""
        assert self.pending is not None
        event = e.kwargs["event"]
        error: FotaError | None = getattr(event, "error", None)
        if isinstance(event, ev.ImageChecked) and error is not None:
            # The image could not be checked (unreadable candidate, a crashed task).
            result, detail = error.result, f"verify failed: {error}"
        elif isinstance(event, ev.ImageChecked):
            result, detail = ResultCode.INTEGRITY_FAILURE, "image digest mismatch"
        elif isinstance(event, ev.TimerFired):
            result = ResultCode.TIME_BUDGET_EXCEEDED
            detail = f"download took longer than {self.policy.max_download_time:g} s"
        elif isinstance(event, ev.FragmentVerified):
            result = ResultCode.DATA_BUDGET_EXCEEDED
            detail = (
                f"{self.record.fetched} bytes received, over the budget of "
                f"{self.policy.max_download_bytes}"
            )
        elif e.event.name == "restarted" and self.policy.resume == "none":
            result, detail = ResultCode.FAILED, "interrupted download, and resume is off"
        elif isinstance(event, ev.DownloadFinished):
            missing = self.pending.fragment_count - bitmap_count(self.record.verified)
            result = ResultCode.INTEGRITY_FAILURE
            detail = f"download ended with {missing} fragments missing"
        elif e.event.name == "restarted":
            result, detail = ResultCode.FAILED, f"restart limit {self.policy.restart_limit} reached"
        elif error is not None:
            result, detail = error.result, str(error)
        else:
            result, detail = ResultCode.FAILED, e.event.name
        self._report(result, detail)
        self.record = self.record.evolve(partial=b"")
        # An announcement of this update retries it (revive): the first at once, later ones
        # after a back-off, so a server announcing it over and over cannot loop it.
        self.stall = None
        draw = e.kwargs.get("draw", 0.5)
        revived = self.record.revived
        self.revive_after = e.kwargs["now"] + (
            retry_delay(revived, self.policy, draw) if revived else 0.0
        )
        self.outbox += [
            cmd.StopDownload(),
            cmd.CancelTimer("retry"),
            *([cmd.CancelTimer("budget")] if self.policy.max_download_time is not None else []),
            cmd.NotifyComplete(self.pending.update_id, result, detail),
        ]

    def resume_work(self, e: Any) -> None:
        """After a restart, re-issue the restored state's work (on_enter does not run for it)."""
        if self.state in ACTIVE:
            self.record = self.record.evolve(restarts=self.record.restarts + 1)
        now = e.kwargs["now"]
        # Fields a journal of fota 0.1 (schema 1) does not have; filled first, because the
        # timers below count from them.
        if self.record.provisioned_at is None:
            # The first start ever: the quiet period begins. A migrated journal with reports
            # sent is no new device: its quiet period is long over.
            self.record = self.record.evolve(
                provisioned_at=now if not self.record.report_seq else 0.0
            )
        if self.pending is not None and self.record.first_seen is None:
            self.record = self.record.evolve(first_seen=now)  # seen from now on
        if self.record.defer_until is not None and self.record.defer_since is None:
            self.record = self.record.evolve(defer_since=now)  # counts from now on
        uid = self.update_id
        work: dict[State, cmd.Command] = {}
        if uid is not None:
            until = (
                self.record.defer_until if self.record.defer_until is not None else e.kwargs["now"]
            )
            work = {
                S.AWAIT_DOWNLOAD_AUTH: cmd.AskDownloadAuthorization(uid),
                S.DOWNLOAD_DEFERRED: cmd.StartTimer("defer", until, uid),
                S.DOWNLOADING: cmd.StartDownload(uid),
                S.VERIFYING: cmd.VerifyImage(uid),
                S.AWAIT_INSTALL_AUTH: cmd.AskInstallAuthorization(uid),
                S.INSTALL_DEFERRED: cmd.StartTimer("defer", until, uid),
                S.INSTALLING: cmd.Install(uid),
                S.AWAIT_RESTART: (
                    cmd.CheckBoot(uid) if self._rebooted() else cmd.RequestRestart(uid)
                ),
                S.AWAIT_COMMIT: cmd.Commit(uid) if self.record.tested else cmd.RunSelfTest(uid),
                S.ROLLING_BACK: cmd.Rollback(uid),
                S.DOWNLOAD_HELD: cmd.CheckGates(uid, "download"),
                S.INSTALL_HELD: cmd.CheckGates(uid, "install"),
            }
        if self.state is S.DOWNLOADING and self.pending is not None:
            if self.policy.resume == "restart":  # Config.resume: start over after a restart
                self.record = self.record.evolve(
                    verified=bitmap_new(self.pending.fragment_count), partial=b""
                )
            self._arm_time_budget()
        asking = self.state in (S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH)
        # Past its deadline (the device was off when it came) an update is not asked about:
        # the deadline timer armed below fires at once and forces it.
        if self.state in work and not (asking and self._past_deadline(e)):
            self.outbox.append(work[self.state])
        if asking:
            self._arm_wait_timers(now)
        if self.record.outbox:
            self.outbox.append(cmd.SendReports())

    def drop_lost_pending(self, e: Any) -> None:
        """Forget the update whose manifest the journal could not load (it reported why)."""
        self._clear_pending()
        # The recovery was about this update, not one that resumes: the next commit, of
        # whatever update, clears the note.
        self._resumed_after_recovery = None

    def _rebooted(self) -> bool:
        """The device restarted since the installer asked for it (or nobody can tell)."""
        return not self.record.boot_id or self.boot_id != self.record.boot_id

    def report_stale(self, e: Any) -> None:
        """No fresh announcement for the window: tell the server, if it can still hear us."""
        stale = e.kwargs["event"]
        self._report(ResultCode.INITIAL, f"stale: no fresh announcement for {stale.window:g} s")

    def note_keyset(self, e: Any) -> None:
        """A newer root keyset was applied: judge refused manifests again; take its floor.

        New keys or a new floor can make a refused manifest acceptable, so the refusals are
        forgotten (rejections and cancels are not: those were decisions, not checks). A floor
        reset is how an operator recovers from a stolen key that signed a huge sequence
        number: the reset replaces the running image's number as the anti-rollback floor
        until the next update commits. It is reported. An older or the same keyset again
        (the engine offers the stored one at every start) changes nothing.
        """
        k: ev.KeysetApplied = e.kwargs["event"]
        if k.version <= self.record.keyset_version:
            return
        self.record = self.record.evolve(keyset_version=k.version, refused=())
        self.local_refused = ()
        if k.floor is not None:
            # A floor set by the root key replaces the one a recovery inferred, exemption too.
            self.record = self.record.evolve(floor=k.floor, floor_identity=None)
            self._report(
                ResultCode.INITIAL,
                f"anti-rollback floor reset to {k.floor} by keyset {k.version}",
            )

    def drop_report(self, e: Any) -> None:
        """The server has the report: remove it from the durable outbox."""
        seq = e.kwargs["event"].sequence
        self.record = self.record.evolve(
            outbox=tuple(r for r in self.record.outbox if r.sequence != seq)
        )


@dataclass(frozen=True, slots=True)
class Handled:
    """What :meth:`Machine.handle` did with one event.

    Attributes:
        accepted: a row fired (False: the pair is illegal, or no row's conditions held;
            nothing changed then).
        commands: the work to do, in order, once the record is journaled.
        notices: the facts to tell listeners (state, update_available,
            authorization_needed, deferred, held), before the commands run.
        row: the row that fired, None when not accepted.
        previous: the state before the event.
        before: the record before the event (compare with the model's to know whether to
            journal).
        refusal: for an API event not accepted, why, as its caller is told it ("" else).
    """

    accepted: bool
    commands: tuple[cmd.Command, ...]
    notices: tuple[cmd.Tell, ...]
    row: Transition | None
    previous: State
    before: Record
    refusal: str = ""
    undo: tuple[Any, ...] = field(default=(), repr=False, compare=False)


class Machine:
    """The one entry to the core: an event in, the commands and notices it causes out.

    Builds the ``transitions`` AsyncMachine over ``model`` from :data:`TRANSITIONS` (no auto
    transitions, ``send_event``, not queued). A fired row's callbacks run as one plain call,
    in table order, then the record takes the new state: nothing depends on how
    ``transitions`` schedules a callback list.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self._told: str | None = None  # the update whose update_available was told
        self._fired: Transition | None = None
        AsyncMachine(
            model=model,
            states=State,
            transitions=[
                {
                    "trigger": t.trigger,
                    "source": list(t.source),
                    "dest": t.dest,
                    "conditions": list(t.conditions),
                    "unless": list(t.unless),
                    "after": [functools.partial(self._run_row, t)],
                    "prepare": list(t.prepare),
                }
                for t in TRANSITIONS
            ],
            initial=model.record.state,
            auto_transitions=False,
            send_event=True,
            queued=False,
        )

    def _run_row(self, row: Transition, e: Any) -> None:
        self._fired = row
        for name in row.after:
            getattr(self.model, name)(e)
        if row.dest is not None:
            self.model.sync_state()

    async def handle(self, event: ev.Event, now: float, draw: float = 0.5) -> Handled:
        """Apply ``event`` at wall-clock ``now``; ``draw`` in [0, 1) is the retry jitter.

        An illegal (state, trigger) pair, or one whose rows' conditions all fail, changes
        nothing. A callback that raises leaves the model as it was, and the error propagates.
        The caller journals the record when it changed, then runs the commands; if it cannot
        journal, :meth:`undo` puts the model back.
        """
        model = self.model
        previous, before = model.state, model.record
        undo = (model.snapshot(), self._told)
        self._fired = None
        accepted = False
        if (previous, event.trigger) in LEGAL:
            try:
                accepted = await model.trigger(
                    event.trigger, event=event, now=now, draw=draw, source=previous
                )
            except MachineError:
                accepted = False
            except Exception:
                # transitions leaves the state changed when a callback raises: put it back.
                model.restore(undo[0])
                raise
        commands = model.take_commands()
        if not accepted:
            # Only an API caller is told why (announcements, dropped all the time, are not).
            refusal = (
                f"{type(event).__name__} is not valid in state {model.state.name}"
                f" for update {getattr(event, 'update_id', None)!r}"
                f" (current update: {model.update_id!r})"
                if event.from_api
                else ""
            )
            return Handled(False, (), (), None, previous, before, refusal, undo)
        notices = self._notices(previous, before, now)
        return Handled(True, tuple(commands), notices, self._fired, previous, before, "", undo)

    def undo(self, handled: Handled) -> None:
        """Put the model back as it was before ``handled`` (its journal write failed)."""
        snapshot, self._told = handled.undo
        self.model.restore(snapshot)

    def _notices(self, previous: State, before: Record, now: float) -> tuple[cmd.Tell, ...]:
        model = self.model
        state, rec, uid = model.state, model.record, model.update_id
        out: list[cmd.Tell] = []
        if uid is not None and uid != self._told:
            # A new update (or the pending one, first told after a start).
            self._told = uid
            info = model.info(now)
            assert info is not None
            out.append(
                cmd.Tell(
                    "update_available",
                    uid,
                    {
                        "version": info.version,
                        "installed_version": info.installed_version,
                        "reason": info.reason.value,
                        "component": info.component.name.lower(),
                        "severity": info.severity.name.lower(),
                        "polite": info.polite,
                        "image_size": info.image_size,
                        "deadline": info.deadline.timestamp() if info.deadline else None,
                    },
                )
            )
        version = model.pending.body.version if model.pending else None
        if state is not previous:
            moved = {"state": state.name, "previous": previous.name, "version": version}
            out.append(cmd.Tell("state", uid, moved))
            asking = model.authorization_needed(now)
            if asking is not None:
                out.append(asking)
        deferred = (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED)
        if state in deferred and (state is not previous or rec.defer_until != before.defer_until):
            step = "download" if state is S.DOWNLOAD_DEFERRED else "install"
            until = {"step": step, "until": rec.defer_until, "reason": rec.defer_reason}
            out.append(cmd.Tell("deferred", uid, until))
        if rec.held != before.held:
            out.append(cmd.Tell("held", uid, {"held": list(rec.held)}))
        return tuple(out)


def table_markdown() -> str:
    """The transition table as Markdown (docs/state-machine.md embeds it; a test compares)."""
    rows = [
        "| trigger | from | to | conditions | unless | callbacks |",
        "|---|---|---|---|---|---|",
    ]
    for t in TRANSITIONS:
        source = "any" if t.source == ALL else ", ".join(s.name for s in t.source)
        dest = t.dest.name if t.dest else "(stays)"
        rows.append(
            f"| `{t.trigger}` | {source} | {dest} | {', '.join(t.conditions)} "
            f"| {', '.join(t.unless)} | {', '.join((*t.prepare, *t.after))} |"
        )
    return "\n".join(rows)


_SETTINGS = {"wrong_device_class": "device_class", "unknown_key": "keys"}


def _local_setting(exc: ManifestError) -> str:
    """The local setting a refusal comes from ("" when it is the manifest's own fault).

    Such refusals are not journaled: they are judged again after a restart, when the setting
    may have been fixed.
    """
    if exc.kind == "oversize" and exc.field == "image_size":
        return "max_image_size"
    return _SETTINGS.get(exc.kind, "")


def _names(fetched: ev.ManifestFetched) -> set[bytes]:
    """Every digest the lists may know a fetched manifest by.

    Its identity (``fetched.digest``), and the SHA-256 of its bytes: journals written before
    manifests were named by identity (schema 2) hold that in their cancelled, refused and
    rejected lists, and a manifest cancelled or rejected then must stay so after an upgrade.
    """
    return {fetched.digest, hashlib.sha256(fetched.raw).digest()}
