"""The update lifecycle as data: a transition table, and the model whose callbacks emit commands.

Theory of operation (the rules that keep this correct; see docs/state-machine.md):

1. ``TRANSITIONS`` below is the whole lifecycle. The engine builds a
   ``transitions`` AsyncMachine from it (``auto_transitions=False``, ``send_event=True``,
   ``queued=False``) with a :class:`Model` as the model, and is the only task that triggers it.
2. Conditions are pure functions of the model and the event. Callbacks are plain ``def``, fast,
   and only change the model's :class:`~fota.core.record.Record` and append
   :mod:`~fota.core.commands` to ``Model.outbox``. Nothing here waits, reads a clock or touches
   a file: the time is passed in as ``now`` beside the event.
3. The engine persists the record after every trigger that changed it and *before* it runs the
   commands, so every state change is journaled before its effects.
4. For one trigger, the first transition whose conditions hold wins; the order in the table is
   part of the logic (e.g. "refused" is checked before "accepted").
5. Events for an update that is no longer current fail the ``is_current`` condition. The engine
   drops those from the network and timers, and raises ``InvalidTransition`` for API calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fota.core import commands as cmd
from fota.core import events as ev
from fota.core.manifest import Manifest, TrustStore, accept, update_id_of
from fota.core.policy import Policy, must_ask, retry_delay
from fota.core.record import Record, Report, bitmap_count, bitmap_get, bitmap_new, bitmap_set
from fota.core.states import State
from fota.errors import FotaError, ImageChanged, ManifestError, ResultCode

S = State
WAITING = (S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED)
ACTIVE = (S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.AWAIT_COMMIT)
"""States whose work a reboot loop could repeat forever; restarts in them are counted."""
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
TRANSITIONS: tuple[Transition, ...] = (
    # A new manifest was announced: fetch it (only when nothing is in progress).
    T(
        "announcement_received",
        (S.IDLE, S.FAILED),
        None,
        ("is_new_announcement",),
        after=("fetch_manifest",),
    ),
    # Its bytes arrived: refuse it, start at once (first install / impolite image), or ask.
    T(
        "manifest_fetched",
        (S.IDLE, S.FAILED),
        None,
        ("manifest_refused",),
        after=("refuse_manifest",),
        prepare=("check_manifest",),
    ),
    T(
        "manifest_fetched",
        (S.IDLE, S.FAILED),
        S.DOWNLOADING,
        unless=("must_ask",),
        after=("adopt_manifest", "start_download"),
    ),
    T(
        "manifest_fetched",
        (S.IDLE, S.FAILED),
        S.AWAIT_DOWNLOAD_AUTH,
        after=("adopt_manifest", "ask_download"),
    ),
    # Application answers.
    T(
        "authorized",
        (S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED),
        S.DOWNLOADING,
        ("is_current",),
        after=("end_deferral", "start_download"),
    ),
    T(
        "authorized",
        (S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED),
        S.INSTALLING,
        ("is_current",),
        after=("end_deferral", "install"),
    ),
    T(
        "deferred",
        (S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED),
        S.DOWNLOAD_DEFERRED,
        ("is_current",),
        after=("defer",),
    ),
    T(
        "deferred",
        (S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED),
        S.INSTALL_DEFERRED,
        ("is_current",),
        after=("defer",),
    ),
    T("rejected", WAITING, S.IDLE, ("is_current",), after=("reject",)),
    T(
        "resume_requested",
        (S.DOWNLOAD_DEFERRED,),
        S.AWAIT_DOWNLOAD_AUTH,
        after=("end_deferral", "ask_download"),
    ),
    T(
        "resume_requested",
        (S.INSTALL_DEFERRED,),
        S.AWAIT_INSTALL_AUTH,
        after=("end_deferral", "ask_install"),
    ),
    # Timers.
    T(
        "timer_fired",
        (S.DOWNLOAD_DEFERRED,),
        S.AWAIT_DOWNLOAD_AUTH,
        ("is_current", "is_defer_timer"),
        after=("end_deferral", "ask_download"),
    ),
    T(
        "timer_fired",
        (S.INSTALL_DEFERRED,),
        S.AWAIT_INSTALL_AUTH,
        ("is_current", "is_defer_timer"),
        after=("end_deferral", "ask_install"),
    ),
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
    # Download. Every event of the download task carries the bytes it received (data budget).
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
    # Verification of the whole image.
    T(
        "image_checked",
        (S.VERIFYING,),
        S.INSTALLING,
        ("is_current", "image_ok"),
        unless=("must_ask",),
        after=("install",),
    ),
    T(
        "image_checked",
        (S.VERIFYING,),
        S.AWAIT_INSTALL_AUTH,
        ("is_current", "image_ok"),
        after=("ask_install",),
    ),
    T(
        "image_checked",
        (S.VERIFYING,),
        S.DOWNLOADING,
        ("is_current", "may_retry"),
        after=("refetch_all",),
    ),
    T("image_checked", (S.VERIFYING,), S.FAILED, ("is_current",), after=("fail",)),
    # Install, self-test, commit.
    T(
        "install_finished",
        (S.INSTALLING,),
        S.AWAIT_COMMIT,
        ("is_current", "succeeded"),
        after=("self_test",),
    ),
    T("install_finished", (S.INSTALLING,), S.FAILED, ("is_current",), after=("rollback", "fail")),
    T(
        "self_test_finished",
        (S.AWAIT_COMMIT,),
        S.IDLE,
        ("is_current", "succeeded"),
        after=("commit",),
    ),
    T(
        "self_test_finished",
        (S.AWAIT_COMMIT,),
        S.FAILED,
        ("is_current",),
        after=("rollback", "fail"),
    ),
    # Restart: fail a reboot loop, else re-issue the restored state's work explicitly.
    T("restarted", ACTIVE, S.FAILED, ("restart_limit_reached",), after=("fail",)),
    T("restarted", (S.DOWNLOADING,), S.FAILED, ("resume_unsupported",), after=("fail",)),
    T("restarted", ALL, None, after=("resume_work",)),
    # Reports.
    T("report_delivered", ALL, None, after=("drop_report",)),
)
"""The whole lifecycle. Pairs of (state, trigger) absent here are illegal."""


def transitions_kwargs() -> list[dict[str, Any]]:
    """The table in the form ``transitions.Machine(transitions=...)`` takes."""
    return [
        {
            "trigger": t.trigger,
            "source": list(t.source),
            "dest": t.dest,
            "conditions": list(t.conditions),
            "unless": list(t.unless),
            "after": list(t.after),
            "prepare": list(t.prepare),
        }
        for t in TRANSITIONS
    ]


LEGAL: frozenset[tuple[State, str]] = frozenset(
    (state, t.trigger) for t in TRANSITIONS for state in t.source
)
"""Every (state, trigger) pair with a row; the engine drops others without calling the machine
(transitions logs an invalid trigger at ERROR level before it raises)."""


def triggers() -> tuple[str, ...]:
    """Every trigger name, in table order."""
    return tuple(dict.fromkeys(t.trigger for t in TRANSITIONS))


class Model:
    """The machine's model: the durable record, the manifests, and the command outbox.

    ``state`` is set by the machine; everything else changes only in the callbacks below.
    """

    state: State
    trigger: Callable[..., Awaitable[bool]]
    """Added by the AsyncMachine the engine builds: ``await model.trigger(name, **kwargs)``."""

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
        self.outbox: list[cmd.Command] = []
        # Set by check_manifest (a prepare callback) for the conditions that follow it.
        self._candidate: Manifest | None = None
        self.refusal: ManifestError | None = None

    # -- helpers -------------------------------------------------------------------------

    def take_commands(self) -> list[cmd.Command]:
        """Return and clear the commands appended since the last call."""
        out, self.outbox = self.outbox, []
        return out

    @property
    def update_id(self) -> str | None:
        """The current update's id, or None."""
        return self.pending.update_id if self.pending else None

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
        rec = self.record
        about = None if refused is not None else self.pending
        report = Report(
            sequence=rec.report_seq,
            state=self.state,
            result=result,
            update_id=update_id_of(refused) if refused is not None else self.update_id,
            manifest_sequence=about.body.sequence if about else None,
            verified_bytes=self.verified_bytes() if about else None,
            detail=detail[:200],
            until=int(until) if until is not None else None,
        )
        self.record = rec.evolve(report_seq=rec.report_seq + 1, outbox=(*rec.outbox, report))
        self.outbox.append(cmd.SendReports())

    def sync_state(self, e: Any) -> None:
        """Machine-wide ``after_state_change``: the record always holds the machine's state."""
        if self.record.state is not self.state:
            self.record = self.record.evolve(state=self.state)

    def _clear_pending(self) -> None:
        self.pending = None
        self.record = self.record.evolve(
            pending=None,
            manifest_uri=None,
            fetched=0,
            download_started=None,
            verified=b"",
            etag=None,
            defer_until=None,
            defer_reason="",
            attempts=0,
            restarts=0,
            progress=0,
        )

    # -- conditions (pure) ---------------------------------------------------------------

    def is_current(self, e: Any) -> bool:
        """The event names the pending update."""
        return (
            self.pending is not None
            and getattr(e.kwargs["event"], "update_id", None) == self.pending.update_id
        )

    def is_new_announcement(self, e: Any) -> bool:
        """The announced manifest is not one we have, are doing, or refused."""
        a: ev.AnnouncementReceived = e.kwargs["event"]
        known = {self.record.installed, self.record.pending, self.record.refused}
        return (
            a.manifest_digest is not None
            and a.manifest_uri is not None
            and a.manifest_digest not in known
        )

    def manifest_refused(self, e: Any) -> bool:
        """check_manifest found a problem with the fetched manifest."""
        return self.refusal is not None

    def must_ask(self, e: Any) -> bool:
        """The running image is polite: the application decides."""
        return must_ask(self.installed)

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

    def restart_limit_reached(self, e: Any) -> bool:
        """Restarting once more would pass the restart limit."""
        return self.record.restarts + 1 > self.policy.restart_limit

    # -- prepare -------------------------------------------------------------------------

    def check_manifest(self, e: Any) -> None:
        """Verify the fetched manifest once, for the conditions that follow."""
        fetched: ev.ManifestFetched = e.kwargs["event"]
        self._candidate, self.refusal = None, None
        try:
            self._candidate = accept(
                fetched.raw,
                self.trust,
                device_class=self.policy.device_class,
                installed=self.installed,
                pending=None,
                max_image_size=self.policy.max_image_size,
            )
        except ManifestError as exc:
            self.refusal = exc

    # -- callbacks (plain def: change the record, append commands) ------------------------

    def fetch_manifest(self, e: Any) -> None:
        """Fetch the announced manifest."""
        a: ev.AnnouncementReceived = e.kwargs["event"]
        assert a.manifest_uri is not None and a.manifest_digest is not None
        self.outbox.append(cmd.FetchManifest(a.manifest_uri, a.manifest_digest))

    def refuse_manifest(self, e: Any) -> None:
        """Remember and report a refused manifest; it is not fetched again."""
        fetched: ev.ManifestFetched = e.kwargs["event"]
        assert self.refusal is not None
        self.record = self.record.evolve(refused=fetched.digest)
        self._report(self.refusal.result, str(self.refusal), refused=fetched.digest)

    def adopt_manifest(self, e: Any) -> None:
        """Make the fetched manifest the pending update, with a fresh download state."""
        assert self._candidate is not None
        if self.pending is not None:  # a failed update is replaced by the new one
            self.outbox.append(cmd.DiscardCandidate())
        self._clear_pending()
        self.pending = self._candidate
        self.record = self.record.evolve(
            pending=self._candidate.digest,
            manifest_uri=e.kwargs["event"].uri,
            verified=bitmap_new(self._candidate.fragment_count),
        )

    def ask_download(self, e: Any) -> None:
        """Ask the application whether to download."""
        assert self.pending is not None
        self._report(ResultCode.INITIAL)
        self.outbox.append(cmd.AskDownloadAuthorization(self.pending.update_id))

    def ask_install(self, e: Any) -> None:
        """Ask the application whether to install."""
        assert self.pending is not None
        self._report(ResultCode.INITIAL)
        self.outbox.append(cmd.AskInstallAuthorization(self.pending.update_id))

    def start_download(self, e: Any) -> None:
        """Start or resume the download task."""
        assert self.pending is not None
        if e.transition.dest is not None:  # entered DOWNLOADING (not a retry inside it)
            self._report(ResultCode.INITIAL)
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
        """Wait until the application's deadline, then ask again."""
        d: ev.Deferred = e.kwargs["event"]
        self.record = self.record.evolve(defer_until=d.until, defer_reason=d.reason)
        self._report(ResultCode.DEFERRED, d.reason, d.until)
        self.outbox.append(cmd.StartTimer("defer", d.until, d.update_id))

    def end_deferral(self, e: Any) -> None:
        """Leave a deferral (answered, resumed or due)."""
        if self.record.defer_until is not None:
            self.record = self.record.evolve(defer_until=None, defer_reason="")
            self.outbox.append(cmd.CancelTimer("defer"))

    def reject(self, e: Any) -> None:
        """Drop the update for good; the same manifest is not fetched again."""
        r: ev.Rejected = e.kwargs["event"]
        assert self.pending is not None
        uid = self.pending.update_id
        self.end_deferral(e)
        self._report(ResultCode.REJECTED, r.reason)
        self.record = self.record.evolve(refused=self.pending.digest)
        self._clear_pending()
        self.outbox += [
            cmd.DiscardCandidate(),
            cmd.NotifyComplete(uid, ResultCode.REJECTED, r.reason),
        ]

    def mark_fragment(self, e: Any) -> None:
        """Record a verified fragment; tell the application every ``progress_step`` percent."""
        f: ev.FragmentVerified = e.kwargs["event"]
        assert self.pending is not None
        if not 0 <= f.index < self.pending.fragment_count:
            return
        self.record = self.record.evolve(verified=bitmap_set(self.record.verified, f.index))
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
            attempts=self.record.attempts + 1, verified=bitmap_new(self.pending.fragment_count)
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
        self.outbox.append(
            cmd.StartTimer(
                "retry",
                now + retry_delay(attempts, self.policy, e.kwargs.get("draw", 0.5)),
                self.pending.update_id,
            )
        )

    def verify_image(self, e: Any) -> None:
        """Check the whole image (the download and its time budget are over)."""
        assert self.pending is not None
        self._report(ResultCode.INITIAL)
        if self.policy.max_download_time is not None:
            self.outbox.append(cmd.CancelTimer("budget"))
        self.outbox.append(cmd.VerifyImage(self.pending.update_id))

    def refetch_all(self, e: Any) -> None:
        """The whole image failed although its fragments passed: fetch everything again."""
        assert self.pending is not None
        self.record = self.record.evolve(
            attempts=self.record.attempts + 1, verified=bitmap_new(self.pending.fragment_count)
        )
        self.start_download(e)

    def install(self, e: Any) -> None:
        """Run the installer."""
        assert self.pending is not None
        self._report(ResultCode.INITIAL)
        self.outbox.append(cmd.Install(self.pending.update_id))

    def self_test(self, e: Any) -> None:
        """Check the installed image before committing it."""
        assert self.pending is not None
        self._report(ResultCode.INITIAL)
        self.outbox.append(cmd.RunSelfTest(self.pending.update_id))

    def commit(self, e: Any) -> None:
        """The new image becomes the installed one; it now decides politeness."""
        assert self.pending is not None
        uid = self.pending.update_id
        self.installed = self.pending
        self.record = self.record.evolve(installed=self.pending.digest)
        self._report(ResultCode.SUCCESS)
        self._clear_pending()
        self.outbox += [cmd.Commit(uid), cmd.NotifyComplete(uid, ResultCode.SUCCESS)]

    def rollback(self, e: Any) -> None:
        """Put the previous image back."""
        assert self.pending is not None
        self.outbox.append(cmd.Rollback(self.pending.update_id))

    def fail(self, e: Any) -> None:
        """The update failed: report why. It stays pending (to inspect) until a new one comes."""
        assert self.pending is not None
        event = e.kwargs["event"]
        error: FotaError | None = getattr(event, "error", None)
        if isinstance(event, ev.ImageChecked):
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
        elif isinstance(event, ev.SelfTestFinished):
            result, detail = ResultCode.FAILED, f"self-test failed: {event.detail}"
        elif e.event.name == "restarted":
            result, detail = ResultCode.FAILED, f"restart limit {self.policy.restart_limit} reached"
        elif error is not None:
            result, detail = error.result, str(error)
        else:
            result, detail = ResultCode.FAILED, e.event.name
        self._report(result, detail)
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
                S.AWAIT_COMMIT: cmd.RunSelfTest(uid),
            }
        if self.state is S.DOWNLOADING and self.pending is not None:
            if self.policy.resume == "restart":  # Config.resume: start over after a restart
                self.record = self.record.evolve(verified=bitmap_new(self.pending.fragment_count))
            self._arm_time_budget()
        if self.state in work:
            self.outbox.append(work[self.state])
        # Commit and rollback run after the journal already says IDLE / FAILED; a crash may
        # have cut them short. Both are idempotent (the Installer contract): run them again.
        if self.state is S.IDLE and self.installed is not None:
            self.outbox.append(cmd.Commit(self.installed.update_id))
        elif self.state is S.FAILED and uid is not None:
            self.outbox.append(cmd.Rollback(uid))
        if self.record.outbox:
            self.outbox.append(cmd.SendReports())

    def drop_report(self, e: Any) -> None:
        """The server has the report: remove it from the durable outbox."""
        seq = e.kwargs["event"].sequence
        self.record = self.record.evolve(
            outbox=tuple(r for r in self.record.outbox if r.sequence != seq)
        )


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
