"""Tier 1: hypothesis stateful test of polite deployment (issue 4) over a simulated engine.

A :class:`~fota.core.machine.Model` inside the core's :class:`~fota.core.machine.Machine`, as
``fota.engine`` uses it, is driven by a minimal, faithful simulation of the engine's duties:

* an inbox of events handled one at a time (run-to-completion) by ``Machine.handle``, which
  drops events the machine has no row for in the current state before the trigger (``LEGAL``);
* timers (``StartTimer``/``CancelTimer``) kept by name as UTC wall-clock instants and fired
  when the injected clock passes them;
* child tasks for the work commands, one per name, a new one replacing the old, under the
  engine's names (``StartDownload`` -> ``FragmentVerified``.../``DownloadFinished``,
  ``VerifyImage`` -> ``ImageChecked``, ``CheckGates`` -> ``GatesChecked`` with failing
  conditions, ``FetchManifest`` -> ``ManifestFetched``, ``Ask*Authorization`` -> the handler's
  answer, ``RunSelfTest`` -> ``SelfTestFinished``, ``CheckAnnouncement`` -> a poll that
  announces the server's latest manifest; the installer's steps share the task ``install``:
  ``Install`` -> ``InstallFinished``, ``CheckBoot`` -> ``BootChecked``, ``Commit`` ->
  ``CommitFinished``, ``Rollback`` -> ``RollbackFinished``; ``RequestRestart`` -> a restart
  of the device);
* an A/B installer: the image running on the device, and the one staged for the next boot.
  An install puts the new image in place at once or, for an update whose installer needs a
  restart, stages it; a rollback puts the previous one back, at once or staged (its installer
  may need a restart too). A boot runs the staged image, unless the new image does not start
  (the bootloader falls back). Updates have flaws drawn when published: an image that does not
  start, fails its self-test always or now and then, or cannot be committed; each step can also
  fail on its own;
* the durable outbox: ``SendReports`` starts a delivery task that sends the head report over a
  lossy link to a simulated server de-duplicating on (device, report sequence); the request may
  be lost, or reach the server with its acknowledgement lost (the same report is sent again);
* the journal: the record is written (``Record.to_bytes()``) after every handled event, before
  its commands run;
* restarts (a power cut, the restart an install or a rollback asked for, or fota alone): the
  record is read back from the journal (``Record.from_bytes()``), the model is rebuilt with the
  same manifests and the boot id (a new one after a reboot, the same after fota alone restarted,
  "" on a device that cannot tell), timers, tasks and queued events are lost, and ``Restarted``
  must make the core re-issue what it needs.

Rules draw the server (publish with random severity, politeness, deadline, max_deferral,
installer and flaw; supersede, re-announce, cancel), the application (authorize, defer until a
random instant, reject, no answer; through the hook or the API; handler registered or not),
inhibitor locks, the clock (small and large steps), the link, the child tasks' outcomes (a
failed install, boot, self-test, commit or rollback) and restarts (with downtime; a reboot or
fota alone; a device with or without boot ids; restart limit 2 or 8). Checked after every step:

1. no ``Install`` without an install authorization for that update, or a forcing rule (first
   install, impolite running image, a FORCED install step);
2. every step that proceeds under a polite running image without the application's yes is
   forced: ``NotifyForced`` and a FORCED (109) report about it;
3. cumulative deferral (the test's own account across restarts, ``deferred_so_far`` and
   ``deferred_total``) never exceeds ``deferral_bound``, and a deferral never outlives the
   deadline;
4. report sequences are contiguous and never reused (across restarts too); a report leaves the
   outbox only once the server has it; the server holds each exactly once; every
   AUTHORIZED / DEFERRED / REJECTED / FORCED decision is reported exactly once (checked again
   after draining the outbox);
5. ``record.state is model.state``, the journal written after every step holds the record
   (and so the machine's state), and the record survives ``to_bytes``/``from_bytes``;
6. after an update ends (IDLE or FAILED) the device runs exactly its old or its new image: the
   new one after SUCCESS, the old one after ROLLED_BACK (nothing staged); and while no update
   is being installed the device runs the installed manifest's image (unless a rollback
   failed: then the device needs attention and the test stops checking this);
7. every update that reaches INSTALLING ends (IDLE or FAILED, never otherwise) with exactly
   one final report (SUCCESS, ROLLED_BACK or ROLLBACK_FAILED), across restarts; after draining
   the outbox the de-duplicating server holds exactly one for each ended update;
8. a commit only of the new image running, and only once its self-test passed.

Seeded (``derandomize=True``), no deadline, no example database; about 15 s as configured.
A long job raises the budget, e.g. ``FOTA_STATEFUL_EXAMPLES=6000 FOTA_STATEFUL_STEPS=80
pytest --timeout=0 tests/core/test_polite_stateful.py`` (about 8 minutes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections import Counter, deque
from dataclasses import dataclass, fields
from datetime import UTC
from itertools import pairwise
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fota.core import commands as C
from fota.core import events as ev
from fota.core.machine import (
    ASK_DOWNLOAD,
    ASK_INSTALL,
    INSTALL_STEPS,
    Machine,
    Model,
)
from fota.core.manifest import (
    Component,
    Manifest,
    ManifestBody,
    Severity,
    TrustStore,
    kid_for,
    sign,
    verify,
)
from fota.core.policy import (
    DEADLINE,
    UNANSWERED,
    Policy,
    active_locks,
    blockers,
    deadline_of,
    deferral_bound,
    deferred_so_far,
    force_reason,
    must_ask,
    needs_check,
)
from fota.core.record import PROGRESS_RESULTS, Record, Report, bitmap_get
from fota.core.states import State
from fota.core.windows import parse_window
from fota.errors import InstallError, ResultCode, TransportError

S = State
R = ResultCode
EXAMPLES = int(os.environ.get("FOTA_STATEFUL_EXAMPLES", "300"))
STEPS = int(os.environ.get("FOTA_STATEFUL_STEPS", "60"))
DEVICE_ID = "polite-gw-1"
DEVICE_CLASS = "polite-gw"
KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(40, 72)))
KID = kid_for(KEY.public_key())
TRUST = TrustStore({KID: KEY.public_key()})
START = 1_700_000_000.0
"""2023-11-14 22:13:20 UTC: the maintenance window below opens some hours later."""
URI = "coap://server/manifest"
EPS = 1e-6
HOUR = 3600.0
DAY = 86400.0
DEFERRED_STATES = (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED)
HELD_STATES = (S.DOWNLOAD_HELD, S.INSTALL_HELD)
DECISIONS = (R.AUTHORIZED, R.DEFERRED, R.REJECTED, R.FORCED)
FINAL = (R.SUCCESS, R.ROLLED_BACK, R.ROLLBACK_FAILED)
EMPTY = "-"
"""The image of an empty device (no manifest ever installed)."""
CONDITIONS = ("battery", "mains")
LOCKS = ("hmi", "modem")
BOUNDS: dict[str, dict[str, Any]] = {
    "default": {},
    "tight": {
        "max_deferral": (4 * HOUR, 2 * HOUR, 1800.0),
        "deadline_after": (None, DAY, 6 * HOUR),
    },
    "manifest-only": {"max_deferral": (None, None, None)},
}
"""Deferral bounds and severity deadlines: the device's defaults, tight ones, or only what the
manifest says (unbounded when it says nothing)."""
HOLDS: dict[str, dict[str, Any]] = {
    "none": {},
    "window": {"windows": (parse_window("daily 02:00-04:00"),), "tz": UTC},
    "conditions": {"conditions": CONDITIONS, "condition_recheck": 600.0},
    "quiet": {"quiet_period": 2 * HOUR},
    "all": {
        "windows": (parse_window("Mon-Fri 01:00-05:00"),),
        "tz": UTC,
        "conditions": CONDITIONS,
        "condition_recheck": 600.0,
        "quiet_period": HOUR,
        "max_locks": 1,
        "max_lock_ttl": 3 * HOUR,
    },
}


def _body(
    sequence: int,
    *,
    fragments: int = 2,
    polite: bool = True,
    severity: Severity = Severity.OPTIONAL,
    deadline: int | None = None,
    max_deferral: int = 0,
    image: ManifestBody | None = None,
) -> ManifestBody:
    """A manifest body; ``image`` reuses another manifest's image (same digests)."""
    if image is None:
        size = fragments * 1024 - 100
        digests = tuple(hashlib.sha256(b"%d/%d" % (sequence, i)).digest() for i in range(fragments))
        image_sha = hashlib.sha256(b"image %d" % sequence).digest()
    else:
        size, digests, image_sha = image.image_size, image.fragment_sha256, image.image_sha256
    return ManifestBody(
        sequence=sequence,
        component=Component.APPLICATION,
        version=f"3.{sequence}",
        device_class=DEVICE_CLASS,
        image_size=size,
        image_sha256=image_sha,
        image_uri=f"/img/{sequence}",
        fragment_size=1024,
        fragment_sha256=digests,
        polite=polite,
        severity=severity,
        max_deferral=max_deferral,
        deadline=deadline,
    )


@dataclass(frozen=True)
class Release:
    """What the server publishes next; ``deadline`` is seconds from now (None: no deadline)."""

    severity: Severity
    polite: bool
    deadline: float | None
    max_deferral: int
    fragments: int
    same_image: bool
    restart: bool
    """The installer needs a restart for the new image to run (A/B slots)."""
    flaw: str
    """"": none; "boot": the new image does not start; "selftest": it always fails its
    self-test; "flaky": now and then; "commit": the installer cannot make it permanent."""


RELEASES = st.builds(
    Release,
    severity=st.sampled_from(Severity),
    polite=st.sampled_from([True, True, False]),
    deadline=st.sampled_from([None, None, None, None, -60.0, 1800.0, 2 * DAY]),
    max_deferral=st.sampled_from([0, 0, 600, 2 * 3600, 86400]),
    fragments=st.integers(1, 3),
    same_image=st.booleans(),
    restart=st.booleans(),
    flaw=st.sampled_from(["", "", "", "", "", "", "boot", "selftest", "flaky", "commit"]),
)
DEFER_DELAYS = st.sampled_from([-600.0, 0.0, 60.0, 1800.0, 3 * HOUR, DAY, 5 * DAY])
"""Deferrals the application asks for, from now (one already past is granted and ends)."""


def _manifest(body: ManifestBody) -> Manifest:
    return verify(sign(body, KEY, KID), TRUST)


FACTORY: dict[str, Manifest | None] = {
    "none": None,
    "polite": _manifest(_body(10, polite=True)),
    "impolite": _manifest(_body(10, polite=False)),
}
"""The running image at first start: none (an empty device), polite or not."""


def _show(event: ev.Event) -> str:
    """An event for the failure story: digests shortened, manifest bytes left out."""
    parts = []
    for field in fields(event):
        name, value = field.name, getattr(event, field.name)
        if isinstance(value, bytes):
            value = value.hex()[:16] if len(value) <= 32 else f"<{len(value)} bytes>"
        elif isinstance(value, float) and value > START / 2:
            value = f"t+{value - START:.0f}"
        parts.append(f"{name}={value}")
    return f"{type(event).__name__}({', '.join(parts)})"


def _wire(report: Report) -> dict[int, Any]:
    """What the server decodes from a report as the device sends it."""
    body: dict[int, Any] = cbor2.loads(report.to_cbor(DEVICE_ID))
    return body


def _coalesced(sequence: int, report: Report, made: dict[int, Report]) -> bool:
    """A progress report a later report about its update replaced in a backed-up outbox."""
    return report.result in PROGRESS_RESULTS and any(
        later > sequence and other.update_id == report.update_id for later, other in made.items()
    )


@settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    # No shrinking: shrinking a 60-step story outlasts the test's timeout, and the story
    # printed with a failure already shows every step.
    phases=(Phase.explicit, Phase.generate),
)
class PoliteMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.random = random.Random(4)  # the engine's jitter draw, seeded
        self.model: Model | None = None
        self.machine: Machine | None = None
        self.policy = Policy(device_class=DEVICE_CLASS)
        self.now = START
        # The device: manifests on disk by digest, handler, inbox, timers, child tasks.
        self.manifests: dict[bytes, Manifest] = {}
        self.handler = False
        self.inbox: deque[ev.Event] = deque()
        self.lag = False
        """Events queue up in the inbox instead of being handled at once."""
        self.timers: dict[str, tuple[float, str]] = {}
        self.tasks: dict[str, C.Command] = {}
        self.sending = False
        """The report delivery task runs (started by SendReports, ends on an empty outbox)."""
        self.awaiting_ack: int | None = None
        # The server.
        self.published: list[Manifest] = []
        self.next_sequence = 11
        self.server: dict[tuple[str, int], dict[int, Any]] = {}
        self.duplicates = 0
        # What the test saw happen (survives restarts: it is the world's memory).
        self.made: dict[int, Report] = {}
        self.decisions: Counter[tuple[ResultCode, str]] = Counter()
        self.install_authorized: set[str] = set()
        self.install_forced: set[str] = set()
        self.spent: dict[str, float] = {}
        """Seconds each update spent deferred, accounted by the test across restarts."""
        self.trail: list[str] = []
        # The device's images (A/B slots) and boots; what each update's install put in place.
        self.image = EMPTY
        """The image running: its manifest's digest (hex), or EMPTY."""
        self.staged: str | None = None
        """The image the next boot runs (None: the running one)."""
        self.releases: dict[str, Release] = {}
        """What each published update is like (its installer, its flaw), by update id."""
        self.boots = 0
        self.boot_ids = True
        """The engine can read a boot id (else ``Model.boot_id`` is "")."""
        self.journal = b""
        """The record as last written (after every handled event, before its commands)."""
        self.images: dict[str, tuple[str, str]] = {}
        """(old, new) image of every update that reached INSTALLING."""
        self.ended: set[str] = set()
        """Updates that reached INSTALLING and ended (in IDLE or FAILED)."""
        self.attention = False
        """A rollback failed: what the device runs is no longer what the journal says."""

    def teardown(self) -> None:
        self.loop.close()

    # -- setup ------------------------------------------------------------------------------

    @initialize(
        factory=st.sampled_from(sorted(FACTORY)),
        bounds=st.sampled_from(sorted(BOUNDS)),
        holds=st.sampled_from(sorted(HOLDS)),
        unanswered=st.sampled_from(["wait", "proceed"]),
        gates_download=st.booleans(),
        handler=st.booleans(),
        restart_limit=st.sampled_from([2, 8]),
        boot_ids=st.sampled_from([True, True, False]),
    )
    def first_start(
        self,
        factory: str,
        bounds: str,
        holds: str,
        unanswered: str,
        gates_download: bool,
        handler: bool,
        restart_limit: int,
        boot_ids: bool,
    ) -> None:
        """A new device: the factory image's manifest (if any) is the installed one."""
        self.policy = Policy(
            device_class=DEVICE_CLASS,
            unanswered=unanswered,
            unanswered_grace=1800.0,
            gates_download=gates_download,
            restart_limit=restart_limit,
            self_test_deadline=90.0,
            self_test_interval=30.0,
            **BOUNDS[bounds],
            **HOLDS[holds],
        )
        self.boot_ids = boot_ids
        installed = FACTORY[factory]
        record = Record()
        if installed is not None:
            self.manifests[installed.digest] = installed
            record = record.evolve(installed=installed.digest)
            self.image = installed.digest.hex()
        self.start(record, handler)

    def start(self, record: Record, handler: bool) -> None:
        """Engine.start: rebuild the model from the journal, then ``Restarted``."""
        pending = self.manifests[record.pending] if record.pending is not None else None
        installed = self.manifests[record.installed] if record.installed is not None else None
        model = Model(self.policy, TRUST, record, pending=pending, installed=installed)
        self.machine = Machine(model)  # as Engine.start builds it
        model.handler_present = handler
        model.boot_id = f"boot-{self.boots}" if self.boot_ids else ""
        self.model, self.handler = model, handler
        self.journal = record.to_bytes()
        self.timers.clear()
        self.tasks.clear()
        self.inbox.clear()
        self.sending, self.awaiting_ack = False, None
        self.trail.append(
            f"--- start in {record.state.name}, handler={handler}, boot {model.boot_id!r}, "
            f"running {self.image[:8]}, staged {self.staged and self.staged[:8]}"
        )
        self.handle(ev.Restarted())

    # -- the engine -------------------------------------------------------------------------

    @property
    def m(self) -> Model:
        assert self.model is not None
        return self.model

    def story(self) -> str:
        return "\n".join(self.trail[-25:])

    def post(self, event: ev.Event) -> None:
        """A child task, timer or API call puts an event in the inbox."""
        self.inbox.append(event)
        if not self.lag:
            self.pump(len(self.inbox))

    def pump(self, count: int) -> None:
        for _ in range(count):
            if not self.inbox:
                return
            self.handle(self.inbox.popleft())

    def handle(self, event: ev.Event) -> None:
        """Engine._handle: hand the event to the machine, check, then run the commands."""
        model = self.m
        assert self.machine is not None
        state, record = model.state, model.record
        pending, installed = model.pending, model.installed
        handled = self.loop.run_until_complete(
            self.machine.handle(event, self.now, self.random.random())
        )
        accepted, commands = handled.accepted, handled.commands
        outcome = model.state.name if accepted else "dropped"
        self.trail.append(
            f"t+{self.now - START:>8.0f} {state.name:<19} {_show(event)} -> {outcome} "
            f"{[type(c).__name__ for c in commands]}"
        )
        if isinstance(event, ev.ReportDelivered) and event.sequence == self.awaiting_ack:
            self.awaiting_ack = None
        if not accepted:
            story = self.story()
            assert model.state is state, story
            assert model.record == record, story
            assert model.pending is pending and model.installed is installed, story
            assert commands == (), story
            return
        self.journal = model.record.to_bytes()  # the engine persists before it runs commands
        self.check_step(event, state, record, pending, installed, commands)
        self.run(commands)

    def run(self, commands: tuple[C.Command, ...]) -> None:
        """Engine._execute, reduced to its effect on timers, tasks and report delivery."""
        model = self.m
        for c in commands:
            match c:
                case C.FetchManifest():
                    self.tasks["manifest"] = c
                case C.AskDownloadAuthorization() | C.AskInstallAuthorization():
                    if self.handler:  # without a handler the engine only logs
                        self.tasks["ask"] = c
                case C.StartDownload():
                    assert model.pending is not None and model.record.manifest_uri is not None
                    self.tasks["download"] = c
                case C.StopDownload() | C.DiscardCandidate():
                    self.tasks.pop("download", None)
                case C.VerifyImage():
                    self.tasks["verify"] = c
                case C.Install() | C.CheckBoot() | C.Commit() | C.Rollback():
                    self.tasks["install"] = c  # the installer's steps share a task
                case C.RunSelfTest():
                    self.tasks["selftest"] = c
                case C.RequestRestart():
                    self.tasks["restart"] = c
                case C.CheckAnnouncement():
                    self.tasks["poll"] = c
                case C.CheckGates():
                    self.tasks["gates"] = c
                case C.StartTimer(name=name, at=at, update_id=uid):
                    self.timers[name] = (at, uid)
                case C.CancelTimer(name=name):
                    self.timers.pop(name, None)
                case C.SendReports():
                    self.sending = True
                case C.Inform() | C.NotifyForced() | C.NotifyProgress() | C.NotifyComplete():
                    pass
                case _:
                    raise AssertionError(f"unhandled command {c!r}")

    # -- checks of one handled event --------------------------------------------------------

    def check_step(
        self,
        event: ev.Event,
        state: State,
        record: Record,
        pending: Manifest | None,
        installed: Manifest | None,
        commands: tuple[C.Command, ...],
    ) -> None:
        model, story = self.m, self.story()
        rec = model.record

        # Reports: contiguous new sequence numbers, never one already used.
        new = [r for r in rec.outbox if r.sequence >= record.report_seq]
        # (one replaced in a backed-up outbox by a later one of the same step leaves a gap;
        # the newest is always kept: record.queue_report)
        made_now = list(range(record.report_seq, rec.report_seq))
        seqs = [r.sequence for r in new]
        assert seqs == [q for q in made_now if q in seqs], story
        assert not made_now or seqs[-1:] == made_now[-1:], story
        for report in new:
            assert report.sequence not in self.made, f"sequence reused\n{story}"
            self.made[report.sequence] = report

        # A pending update is superseded only by a newer one, never by itself.
        for report in new:
            if report.result is R.SUPERSEDED:
                assert pending is not None and report.update_id == pending.update_id, story
                assert model.pending is not None, story
                assert model.pending.body.sequence > pending.body.sequence, (
                    f"superseded by itself\n{story}"
                )

        # The application's decisions, as the test saw them.
        if isinstance(event, ev.Authorized):
            assert state in (*ASK_DOWNLOAD, *ASK_INSTALL), story
            step = "download" if state in ASK_DOWNLOAD else "install"
            self.decisions[(R.AUTHORIZED, event.update_id)] += 1
            if step == "install":
                self.install_authorized.add(event.update_id)
            assert any(
                r.result is R.AUTHORIZED and r.update_id == event.update_id and r.detail == step
                for r in new
            ), story
        if isinstance(event, ev.Deferred) and model.state in DEFERRED_STATES:
            # Granted only while no forcing rule applies (a critical update past its
            # deadline, or one whose deferral bound is spent, is never deferred again).
            assert pending is not None, story
            assert not force_reason(self.now, pending, record, self.policy), story
            self.decisions[(R.DEFERRED, event.update_id)] += 1
            until = rec.defer_until
            assert until is not None and until <= event.until and rec.defer_since == self.now
            assert C.StartTimer("defer", until, event.update_id) in commands, story
            assert any(
                r.result is R.DEFERRED and r.until == int(until) and r.detail == event.reason
                for r in new
            ), story
        if isinstance(event, ev.Rejected):
            self.decisions[(R.REJECTED, event.update_id)] += 1
            assert model.state is S.IDLE, story

        # (2) a forced step is told and reported as forced.
        for c in commands:
            if isinstance(c, C.NotifyForced):
                self.decisions[(R.FORCED, c.update_id)] += 1
                if c.step == "install":
                    self.install_forced.add(c.update_id)
                if c.reason == UNANSWERED:  # only when configured, and nobody is there
                    assert self.policy.unanswered == "proceed", story
                    assert not model.handler_present, story
                assert rec.forced == c.reason, story
                assert any(
                    r.result is R.FORCED
                    and r.update_id == c.update_id
                    and r.detail == f"{c.step}: {c.reason}"
                    for r in new
                ), story
        proceeds = self.proceeding(event, state, pending)
        if proceeds is not None and not isinstance(event, ev.Authorized):
            step = proceeds
            uid = model.update_id
            told = [c for c in commands if isinstance(c, C.NotifyForced)]
            if must_ask(installed):  # polite: only a forcing rule goes without the yes
                assert [(c.update_id, c.step) for c in told] == [(uid, step)], story
            elif installed is None:  # first install: nobody to ask, no hold applies
                assert not told, story
            else:  # an impolite image only informs; past the deadline, holds are overruled
                assert C.Inform(str(uid), step) in commands, story
                assert all((c.update_id, c.step, c.reason) == (uid, step, DEADLINE) for c in told)

        # (1) no install without the application's yes or a forcing rule; and no install
        # (nor a gated download) while a local hold applies, unless the deadline passed.
        for c in commands:
            if isinstance(c, C.Install):
                assert c.update_id == model.update_id and model.state is S.INSTALLING, story
                assert (
                    installed is None
                    or not installed.body.polite
                    or c.update_id in self.install_authorized
                    or c.update_id in self.install_forced
                ), f"install without authorization or forcing rule\n{story}"
        if model.state is not state and model.state in (S.INSTALLING, S.DOWNLOADING):
            step = "install" if model.state is S.INSTALLING else "download"
            if state is not S.VERIFYING or step == "install":  # not a refetch
                self.check_unheld(event, step, installed)

        # Deadlines are wall-clock instants: the timer fires at the deadline itself.
        for c in commands:
            if isinstance(c, C.StartTimer) and c.name == "deadline":
                assert model.pending is not None, story
                assert c.at == deadline_of(model.pending, rec, self.policy), story

        # Entering a question (or restarting in one) asks it; a restart past the deadline
        # (the device was off when it came) does not: the deadline timer fires at once.
        changed = pending is not model.pending
        if model.state in (S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH) and (
            model.state is not state or changed or isinstance(event, ev.Restarted)
        ):
            assert model.pending is not None, story
            ask = (
                C.AskDownloadAuthorization
                if model.state is S.AWAIT_DOWNLOAD_AUTH
                else C.AskInstallAuthorization
            )
            uid = model.pending.update_id
            deadline = deadline_of(model.pending, rec, self.policy)
            if isinstance(event, ev.Restarted) and deadline is not None and self.now >= deadline:
                assert ask(uid) not in commands, story
                assert C.StartTimer("deadline", deadline, uid) in commands, story
            else:
                assert ask(uid) in commands, story

        # (6, 7) From the install on: the images the update changes, and how it ends.
        finals = [r for r in new if r.result in FINAL]
        if model.state is S.INSTALLING and state not in INSTALL_STEPS:
            assert model.pending is not None, story
            uid = model.pending.update_id
            assert uid not in self.images, f"installed twice\n{story}"
            self.images[uid] = (self.image, model.pending.digest.hex())
        if state in INSTALL_STEPS and model.state not in INSTALL_STEPS:
            assert pending is not None, story
            uid = pending.update_id
            ends = ((S.AWAIT_COMMIT, S.IDLE), (S.ROLLING_BACK, S.FAILED))
            assert (state, model.state) in ends, story
            assert [r.update_id for r in finals] == [uid], f"not one final report\n{story}"
            old, new_image = self.images[uid]
            result = finals[0].result
            assert self.image in (old, new_image), f"the device runs {self.image}\n{story}"
            if result is R.SUCCESS:
                assert self.image == new_image and self.staged is None, story
                assert model.state is S.IDLE and model.installed is pending, story
            elif result is R.ROLLED_BACK:
                assert self.image == old and self.staged is None, story
            else:  # the device needs attention: it may run either, or boot into the other
                self.attention = True
            self.ended.add(uid)
        else:
            assert not finals, f"a final report while the update goes on\n{story}"

    def check_unheld(self, event: ev.Event, step: str, installed: Manifest | None) -> None:
        """A step starts only when no quiet period, window, lock or failing condition holds
        it (conditions as the engine found them), or once the deadline passed."""
        model, story = self.m, self.story()
        assert model.pending is not None
        deadline = deadline_of(model.pending, model.record, self.policy)
        if deadline is not None and self.now >= deadline:
            return
        failing = event.failing if isinstance(event, ev.GatesChecked) else ()
        held = blockers(self.now, step, model.record, installed, self.policy, failing)
        assert not held, f"{step} started while held by {held}\n{story}"
        if not isinstance(event, ev.GatesChecked):  # the conditions were never evaluated
            assert not needs_check(step, installed, self.policy), story

    def proceeding(self, event: ev.Event, state: State, pending: Manifest | None) -> str | None:
        """The step that goes ahead with this event (leaves asking, or starts at once)."""
        new_state, new_pending = self.m.state, self.m.pending
        adopted = (
            isinstance(event, ev.ManifestFetched)
            and new_pending is not None
            and (pending is None or pending.digest != new_pending.digest)
        )
        if new_state in (S.DOWNLOAD_HELD, S.DOWNLOADING) and (state in ASK_DOWNLOAD or adopted):
            return "download"
        if new_state in (S.INSTALL_HELD, S.INSTALLING) and state in (*ASK_INSTALL, S.VERIFYING):
            return "install"
        return None

    # -- the clock and the timers ------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the injected clock; account deferral time as the test sees it."""
        model, t0, t1 = self.m, self.now, self.now + seconds
        rec = model.record
        if model.state in DEFERRED_STATES and model.pending is not None:
            assert rec.defer_since is not None and rec.defer_until is not None
            spent = max(0.0, min(t1, rec.defer_until) - max(t0, rec.defer_since))
            uid = model.pending.update_id
            self.spent[uid] = self.spent.get(uid, 0.0) + spent
        self.now = t1

    def fire_timers(self) -> None:
        """Engine._run_timers: post every due timer, earliest first; repeat while new ones
        come due at once (a storm of timers due now would be a bug)."""
        for _ in range(20):
            due = sorted(
                (at, name, uid) for name, (at, uid) in self.timers.items() if at <= self.now
            )
            if not due:
                return
            for _, name, _ in due:  # all taken off first, as the engine's timer task does
                del self.timers[name]
            for _, name, uid in due:
                self.post(ev.TimerFired(name, uid))
            if self.lag:
                return
        raise AssertionError(f"timers keep coming due at once\n{self.story()}")

    @rule(seconds=st.floats(1, 900))
    def clock_small(self, seconds: float) -> None:
        self.advance(seconds)
        self.fire_timers()

    @rule(seconds=st.sampled_from([HOUR, 3 * HOUR, 7 * HOUR, DAY, 3 * DAY, 9 * DAY]))
    def clock_large(self, seconds: float) -> None:
        self.advance(seconds)
        self.fire_timers()

    @rule()
    def timers_due(self) -> None:
        self.fire_timers()

    # -- the server ------------------------------------------------------------------------

    @rule(release=RELEASES)
    def publish(self, release: Release) -> None:
        """Publish and announce a newer manifest (supersedes a pending one)."""
        pending = self.m.pending
        body = _body(
            self.next_sequence,
            fragments=release.fragments,
            polite=release.polite,
            severity=release.severity,
            deadline=None if release.deadline is None else int(self.now + release.deadline),
            max_deferral=release.max_deferral,
            image=pending.body if release.same_image and pending is not None else None,
        )
        self.next_sequence += 1
        manifest = _manifest(body)
        self.published.append(manifest)
        self.releases[manifest.update_id] = release
        self.trail.append(
            f"  server publishes {manifest.update_id}: sequence {body.sequence}, "
            f"{body.severity.name}, polite={body.polite}, deadline={release.deadline}, "
            f"max_deferral={body.max_deferral}, same_image={release.same_image}, "
            f"restart={release.restart}, flaw={release.flaw!r}"
        )
        self.post(ev.AnnouncementReceived(body.sequence, manifest.digest, URI))

    @rule()
    def reannounce(self) -> None:
        """The server announces its latest manifest again (re-registration, poll)."""
        if self.published:
            latest = self.published[-1]
            self.post(ev.AnnouncementReceived(latest.body.sequence, latest.digest, URI))

    @rule()
    def announcement_repeated(self) -> None:
        """The latest announcement arrives again (an observe notification and a poll) while the
        fetch it started completes: the repeat is queued before the fetch's result."""
        if not self.published or "manifest" not in self.tasks:
            return
        latest = self.published[-1]
        self.lag = True
        self.post(ev.AnnouncementReceived(latest.body.sequence, latest.digest, URI))
        self.finish("manifest", True)
        self.network_lag(False)

    @rule(which=st.sampled_from(["pending", "latest"]))
    def server_cancel(self, which: str) -> None:
        """The server withdraws a manifest: ``{1: seq, 4: digest}``."""
        digest = self.m.record.pending if which == "pending" else None
        if which == "latest" and self.published:
            digest = self.published[-1].digest
        if digest is not None:
            self.next_sequence += 1
            self.post(ev.AnnouncementReceived(self.next_sequence - 1, None, None, cancel=digest))

    # -- the application ---------------------------------------------------------------------

    @rule(
        kind=st.sampled_from(["authorize", "authorize", "defer", "defer", "reject", "none"]),
        delay=DEFER_DELAYS,
        via_hook=st.booleans(),
        stale=st.integers(0, 5),
    )
    def answer(self, kind: str, delay: float, via_hook: bool, stale: int) -> None:
        """The handler's hook returns, or the application calls the Client API."""
        uid = self.m.update_id
        if via_hook:
            ask = self.tasks.pop("ask", None)
            if not isinstance(ask, C.AskDownloadAuthorization | C.AskInstallAuthorization):
                return
            uid = ask.update_id
        elif stale == 0 and self.published:  # an answer about an older update
            uid = self.published[(len(self.published) - 2) % len(self.published)].update_id
        if uid is None:
            return
        event: ev.Event | None = {
            "authorize": ev.Authorized(uid),
            "defer": ev.Deferred(uid, self.now + delay, f"busy {delay:g}"),
            "reject": ev.Rejected(uid, "not this one"),
            "none": None,
        }[kind]
        if event is not None:
            self.post(event)

    @rule()
    def resume(self) -> None:
        self.post(ev.ResumeRequested())

    @rule(present=st.booleans())
    def set_handler(self, present: bool) -> None:
        self.handler = present
        if not present:
            self.tasks.pop("ask", None)
        self.post(ev.HandlerChanged(present))

    @rule(name=st.sampled_from(LOCKS), ttl=st.sampled_from([0.0, 600.0, 4 * HOUR, 3 * DAY]))
    def take_lock(self, name: str, ttl: float) -> None:
        self.post(ev.LockTaken(name, ttl))

    @rule(name=st.sampled_from(LOCKS))
    def release_lock(self, name: str) -> None:
        self.post(ev.LockReleased(name))

    # -- child tasks ------------------------------------------------------------------------

    @rule(pick=st.integers(0, 6), ok=st.sampled_from([True, True, True, False]))
    def work(self, pick: int, ok: bool) -> None:
        """One child task finishes and posts its events."""
        names = sorted(n for n in self.tasks if n != "ask")
        if names:
            self.finish(names[pick % len(names)], ok, pick)

    def finish(self, name: str, ok: bool, pick: int = 0) -> None:
        """The child task ``name`` finishes (``ok``: the happy outcome) and posts its events."""
        command = self.tasks.pop(name)
        model = self.m
        events: list[ev.Event] = []
        match command:
            case C.FetchManifest(uri=uri, digest=digest):
                found = [m for m in self.published if m.digest == digest]
                if found:
                    self.manifests[digest] = found[0]  # the journal keeps manifest files
                    events.append(ev.ManifestFetched(found[0].raw, uri, digest))
            case C.StartDownload(update_id=uid):
                manifest = model.pending
                assert manifest is not None and manifest.update_id == uid
                for i in range(manifest.fragment_count):
                    if not bitmap_get(model.record.verified, i) and (ok or i == 0):
                        events.append(ev.FragmentVerified(uid, i, manifest.fragment_span(i)[1]))
                if ok:
                    events.append(ev.DownloadFinished(uid))
                else:
                    events.append(ev.DownloadFailed(uid, TransportError("timeout")))
            case C.VerifyImage(update_id=uid):
                events.append(ev.ImageChecked(uid, ok))
            case C.Install(update_id=uid):
                new = self.images[uid][1]
                if not ok:
                    events.append(ev.InstallFinished(uid, InstallError("flash")))
                elif self.releases[uid].restart:  # into the other slot, for the next boot
                    self.staged = new
                    events.append(ev.InstallFinished(uid, restart=True))
                else:
                    self.image, self.staged = new, None
                    events.append(ev.InstallFinished(uid))
            case C.CheckBoot(update_id=uid):
                booted = self.image == self.images[uid][1]
                detail = "" if booted else "the device runs the previous image"
                events.append(ev.BootChecked(uid, booted, detail))
            case C.RunSelfTest(update_id=uid):
                flaw = self.releases[uid].flaw
                passed = (
                    self.image == self.images[uid][1]
                    and flaw not in ("boot", "selftest")
                    and (ok or flaw != "flaky")
                )
                events.append(ev.SelfTestFinished(uid, passed, "" if passed else "probe failed"))
            case C.Commit(update_id=uid):
                # (8) only the new image, running, and only once its self-test passed.
                assert self.image == self.images[uid][1], f"commit of another image\n{self.story()}"
                assert model.record.tested and model.state is S.AWAIT_COMMIT, self.story()
                if ok and self.releases[uid].flaw != "commit":
                    events.append(ev.CommitFinished(uid))
                else:
                    events.append(ev.CommitFinished(uid, InstallError("bootloader")))
            case C.Rollback(update_id=uid):
                old = self.images[uid][0]
                if not ok:
                    events.append(ev.RollbackFinished(uid, InstallError("slot")))
                elif self.image == old:  # already back (the bootloader fell back, a restart)
                    self.staged = None
                    events.append(ev.RollbackFinished(uid))
                elif self.releases[uid].restart or pick % 3 == 0:
                    self.staged = old
                    events.append(ev.RollbackFinished(uid, restart=True))
                else:
                    self.image, self.staged = old, None
                    events.append(ev.RollbackFinished(uid))
            case C.RequestRestart():
                # Config.restart_command: the device restarts (Engine.start runs again).
                self.restart(60.0, self.handler, reboot=True)
            case C.CheckAnnouncement():
                if self.published:  # the poll finds the server's latest announcement
                    latest = self.published[-1]
                    events.append(ev.AnnouncementReceived(latest.body.sequence, latest.digest, URI))
            case C.CheckGates(update_id=uid, step=step):
                # Engine._check_gates evaluates the conditions only when they apply.
                failing: tuple[str, ...] = ()
                if not ok and needs_check(step, model.installed, self.policy):
                    failing = self.policy.conditions[: 1 + pick % len(self.policy.conditions)]
                events.append(ev.GatesChecked(uid, failing))
            case _:
                raise AssertionError(f"unexpected task {command!r}")
        for event in events:
            self.post(event)

    # -- a driver: what the update waits for, so that runs reach the later steps -----------

    @rule(release=RELEASES, choice=st.integers(0, 9), delay=DEFER_DELAYS)
    def drive(self, release: Release, choice: int, delay: float) -> None:
        """Do the next plausible thing: mostly the happy path, sometimes a failure, a deferral
        or a rejection."""
        model = self.m
        state = model.state
        need = {
            S.DOWNLOADING: ("download",),
            S.VERIFYING: ("verify",),
            S.INSTALLING: ("install",),
            S.AWAIT_RESTART: ("install", "restart"),
            S.AWAIT_COMMIT: ("install", "selftest"),
            S.ROLLING_BACK: ("install", "restart"),
            S.DOWNLOAD_HELD: ("gates",),
            S.INSTALL_HELD: ("gates",),
        }.get(state, ())
        ready = [name for name in need if name in self.tasks]
        waiting = (*DEFERRED_STATES, *HELD_STATES, S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH)
        if self.inbox:
            self.network_lag(False)
        elif state in waiting and choice == 9:  # a power cut while the update waits
            self.restart(max(0.0, delay), release.polite)
        elif state in DEFERRED_STATES and choice == 8:  # the application defers again
            self.answer("defer", delay, False, 1)
        elif state in DEFERRED_STATES and choice == 7:  # off for days, past the deferral
            self.restart(2 * DAY, release.polite)
        elif "manifest" in self.tasks:
            self.finish("manifest", True)
        elif ready:
            self.finish(ready[0], choice != 0, choice)
        elif "poll" in self.tasks and state in (S.IDLE, S.FAILED):
            self.finish("poll", True)
        elif state in (S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH):
            kind = "authorize" if choice >= 5 else "defer" if choice >= 1 else "reject"
            self.answer(kind, delay, "ask" in self.tasks and choice % 2 == 0, 1)
            if choice == 1 and self.m.state in DEFERRED_STATES:  # deferred, then a power cut
                self.restart(abs(delay) / 2, release.polite)
        elif self.timers:
            at = min(at for at, _ in self.timers.values())
            self.advance(max(0.0, at - self.now))
            self.fire_timers()
        elif state in (S.IDLE, S.FAILED):
            self.publish(release)
        else:
            self.advance(600.0)
            self.fire_timers()

    @rule(release=RELEASES, choice=st.integers(0, 9), delay=DEFER_DELAYS)
    def drive_again(self, release: Release, choice: int, delay: float) -> None:
        """The driver once more, so that it is picked about as often as the random events."""
        self.drive(release, choice, delay)

    @rule(release=RELEASES, choice=st.integers(0, 9), delay=DEFER_DELAYS)
    def drive_more(self, release: Release, choice: int, delay: float) -> None:
        self.drive(release, choice, delay)

    @rule(count=st.integers(1, 4))
    def handle_queued(self, count: int) -> None:
        self.pump(count)

    @rule(on=st.booleans())
    def network_lag(self, on: bool) -> None:
        """While on, events queue up in the inbox (handled by handle_queued or later)."""
        self.lag = on
        if not on:
            self.pump(len(self.inbox))

    # -- report delivery -----------------------------------------------------------------------

    def link(self, outcome: str) -> None:
        """One attempt of the delivery task: send the head of the durable outbox."""
        outbox = self.m.record.outbox
        if not self.sending or self.awaiting_ack is not None:
            return
        if not outbox:
            self.sending = False  # the task returns; the next SendReports starts another
            return
        report = outbox[0]
        if outcome != "lost":  # it reached the server, which de-duplicates
            body = _wire(report)
            key = (body[1], body[2])
            if key in self.server:
                self.duplicates += 1
                assert self.server[key] == body, f"sequence {key} reused\n{self.story()}"
            else:
                self.server[key] = body
        if outcome == "ok":  # acknowledged: Engine._deliver_reports submits ReportDelivered
            self.awaiting_ack = report.sequence
            self.post(ev.ReportDelivered(report.sequence))

    @rule(outcome=st.sampled_from(["ok", "ok", "ack-lost", "lost"]))
    def deliver(self, outcome: str) -> None:
        self.link(outcome)

    @rule(
        pattern=st.lists(st.sampled_from(["ok", "ack-lost", "lost"]), min_size=1, max_size=4),
    )
    def drain(self, pattern: list[str]) -> None:
        """Let the delivery task empty the outbox over the lossy link; then every report and
        every decision is at the server exactly once."""
        self.network_lag(False)
        outcomes = [*pattern, "ok"]
        for i in range(10 * len(self.m.record.outbox) * len(outcomes) + 10):
            if not self.m.record.outbox:
                break
            self.link(outcomes[i % len(outcomes)])
        story = self.story()
        assert not self.m.record.outbox, f"outbox not delivered\n{story}"
        # A progress report replaced in a backed-up outbox (record.queue_report) may be missing;
        # every other report is there.
        required = {s for s, r in self.made.items() if not _coalesced(s, r, self.made)}
        at = {s for d, s in self.server}
        assert required <= at <= set(self.made), story
        at_server = Counter(
            (R(b[4]), str(b.get(5))) for b in self.server.values() if R(b[4]) in DECISIONS
        )
        needed = Counter(
            (r.result, str(r.update_id))
            for s, r in self.made.items()
            if s in required and r.result in DECISIONS
        )
        assert needed <= at_server <= self.decisions, story
        finals = Counter(str(b.get(5)) for b in self.server.values() if R(b[4]) in FINAL)
        assert finals == Counter(self.ended), f"final reports at the server\n{story}"

    # -- restarts ----------------------------------------------------------------------------

    @rule(
        downtime=st.sampled_from([0.0, 60.0, 3 * HOUR, 2 * DAY]),
        handler=st.booleans(),
        reboot=st.sampled_from([True, True, False]),
    )
    def restart(self, downtime: float, handler: bool, reboot: bool = True) -> None:
        """A power cut (``reboot``) or fota alone restarting: only the journal survives; the
        device is off for ``downtime``; a boot runs the staged image (if it starts)."""
        self.advance(downtime)  # the deferral's clock runs while the device is off
        if reboot:
            self.boots += 1
            staged, self.staged = self.staged, None
            doomed = [u for u, (_, new) in self.images.items() if new == staged]
            if staged is not None and not (doomed and self.releases[doomed[0]].flaw == "boot"):
                self.image = staged
        record = Record.from_bytes(self.journal)
        assert record == self.m.record, "the journal is behind the record"
        self.lag = False
        self.start(record, handler)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def journaled(self) -> None:
        """(5) the record holds the machine's state and survives its encoding; the journal
        holds the record."""
        if self.model is not None:
            record = self.model.record
            assert record.state is self.model.state, self.story()
            assert Record.from_bytes(record.to_bytes()) == record, self.story()
            journaled = Record.from_bytes(self.journal)
            assert journaled == record and journaled.state is self.model.state, self.story()

    @invariant()
    def device_runs_the_installed_image(self) -> None:
        """(6) unless an update is being installed, the device runs the installed image."""
        model = self.model
        if model is None or self.attention or model.state in INSTALL_STEPS:
            return
        expected = model.installed.digest.hex() if model.installed is not None else EMPTY
        assert (self.image, self.staged) == (expected, None), self.story()

    @invariant()
    def one_final_report_per_install(self) -> None:
        """(7) every update that reached INSTALLING and ended has exactly one final report;
        the one being installed has none yet."""
        model = self.model
        if model is None:
            return
        finals = Counter(str(r.update_id) for r in self.made.values() if r.result in FINAL)
        assert finals == Counter(self.ended), self.story()
        assert self.ended <= set(self.images), self.story()
        if model.state in INSTALL_STEPS:
            assert model.update_id in self.images and model.update_id not in self.ended
        else:
            assert self.ended == set(self.images), self.story()

    @invariant()
    def deferral_bounded(self) -> None:
        """(3) cumulative deferral stays within the bound; a deferral ends by the deadline."""
        model = self.model
        if model is None or model.pending is None:
            return
        story, rec, pending = self.story(), model.record, model.pending
        so_far = deferred_so_far(rec, self.now)
        spent = self.spent.get(pending.update_id, 0.0)
        # The record's account is the test's: journaled, across restarts, never reset.
        assert abs(so_far - spent) < EPS * max(1.0, spent), (
            f"deferral journaled {so_far} != spent {spent}\n{story}"
        )
        bound = deferral_bound(pending, self.policy)
        if bound is not None:
            assert so_far <= bound + EPS, story
            assert rec.deferred_total <= bound + EPS, story
            assert spent <= bound + EPS, story
            if rec.defer_until is not None and rec.defer_since is not None:
                assert rec.deferred_total + (rec.defer_until - rec.defer_since) <= bound + EPS
        deadline = deadline_of(pending, rec, self.policy)
        if deadline is not None and rec.defer_until is not None:
            assert rec.defer_until <= deadline + EPS, story

    @invariant()
    def reports_sent_and_recorded_once(self) -> None:
        """(4) the outbox is being sent; what left it is at the server, exactly once."""
        model = self.model
        if model is None:
            return
        story, rec = self.story(), model.record
        sequences = [r.sequence for r in rec.outbox]
        assert all(a < b for a, b in pairwise(sequences)), story
        assert set(self.made) == set(range(rec.report_seq)), story
        assert not rec.outbox or self.sending, f"reports nobody sends\n{story}"
        for sequence, report in self.made.items():
            assert sequence not in sequences or rec.outbox[sequences.index(sequence)] == report
            if sequence not in sequences and not _coalesced(sequence, report, self.made):
                # dropped only after the server acknowledged it
                assert self.server.get((DEVICE_ID, sequence)) == _wire(report), story
        for (device, sequence), body in self.server.items():
            assert device == DEVICE_ID and body == _wire(self.made[sequence]), story
        made = Counter(
            (r.result, str(r.update_id)) for r in self.made.values() if r.result in DECISIONS
        )
        assert made == self.decisions, story

    @invariant()
    def locks_bounded(self) -> None:
        """A crashed holder cannot block updates forever: lock lifetimes and count are capped."""
        model = self.model
        if model is not None:
            active = active_locks(model.record, self.now)
            assert len(active) <= self.policy.max_locks, self.story()
            for _, expires in model.record.locks:
                assert expires <= self.now + self.policy.max_lock_ttl, self.story()

    @invariant()
    def forced_is_reported(self) -> None:
        """(2) an update marked forced has a FORCED report about it."""
        model = self.model
        if model is not None and model.record.forced and model.pending is not None:
            uid = model.pending.update_id
            assert any(r.result is R.FORCED and r.update_id == uid for r in self.made.values()), (
                self.story()
            )

    @invariant()
    def waits_for_something(self) -> None:
        """A deferred, held or working update has a timer, a task or an event coming."""
        model = self.model
        if model is None or model.pending is None or self.inbox:
            return
        uid, state, story = model.pending.update_id, model.state, self.story()
        timers = {name for name, (_, t_uid) in self.timers.items() if t_uid == uid}
        tasks = {name for name, c in self.tasks.items() if getattr(c, "update_id", None) == uid}
        if state in DEFERRED_STATES:
            assert "defer" in timers, story
        elif state in HELD_STATES:
            assert "gates" in tasks or "hold" in timers, story
        elif state is S.DOWNLOADING:
            assert "download" in tasks or "retry" in timers, story
        elif state is S.VERIFYING:
            assert "verify" in tasks, story
        elif state is S.INSTALLING:
            assert "install" in tasks, story
        elif state is S.AWAIT_RESTART:  # the restart asked for, or the boot checked
            assert "restart" in tasks or "install" in tasks, story
        elif state is S.AWAIT_COMMIT:  # a self-test attempt, the next one, or the commit
            assert "selftest" in tasks or "selftest" in timers or "install" in tasks, story
        elif state is S.ROLLING_BACK:  # the rollback, or the restart it asked for
            assert "install" in tasks or "restart" in tasks, story


TestPoliteMachine = PoliteMachine.TestCase


def test_same_manifest_fetched_twice_is_not_a_new_update() -> None:
    """The minimal sequence the state machine found (rule ``announcement_repeated``).

    An announcement repeated while its fetch completes makes the engine fetch the manifest
    twice; the second ``ManifestFetched`` of the pending manifest must not adopt it again as
    a new update (that reports it superseded by itself and resets its cumulative deferral
    and first_seen, so a critical update could be deferred past its bound).
    """
    policy = Policy(device_class=DEVICE_CLASS)  # critical: 1 day of deferral at most
    installed = FACTORY["polite"]
    assert installed is not None
    model = Model(policy, TRUST, Record(installed=installed.digest), installed=installed)
    machine = Machine(model)
    update = _manifest(_body(11, severity=Severity.CRITICAL))
    loop = asyncio.new_event_loop()
    now = START

    def fire(event: ev.Event) -> None:
        assert loop.run_until_complete(machine.handle(event, now, 0.5)).accepted

    try:
        fire(ev.Restarted())
        fire(ev.AnnouncementReceived(11, update.digest, URI))
        fire(ev.ManifestFetched(update.raw, URI, update.digest))
        fire(ev.Deferred(update.update_id, now + 5 * DAY, "busy"))
        assert model.state is S.DOWNLOAD_DEFERRED
        assert model.record.defer_until == now + DAY
        now += 20 * HOUR
        before = model.record
        # The second fetch's result: the same bytes as the pending update.
        handled = loop.run_until_complete(
            machine.handle(ev.ManifestFetched(update.raw, URI, update.digest), now, 0.5)
        ).accepted
        superseded = [r for r in model.record.outbox if r.result is R.SUPERSEDED]
        assert not superseded, f"superseded by itself: {superseded}"
        assert model.state is S.DOWNLOAD_DEFERRED, (handled, model.state)
        assert model.record.first_seen == before.first_seen
        assert deferred_so_far(model.record, now) == 20 * HOUR
    finally:
        loop.close()
