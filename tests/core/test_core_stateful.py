"""Tier 1: hypothesis stateful tests of the core state machine's invariants.

Random event sequences (current and stale update ids, valid and refused manifests, timers,
fragments, failures, installs with and without a restart, boot checks, self-tests, commits,
rollbacks, restarts with and without a reboot, report acknowledgements) are fed to a Model
inside the core's :class:`~fota.core.machine.Machine`, handled as the engine handles them
(``Machine.handle``). After every step:

(a) no ``Install`` is emitted unless the triggering event is an ``Authorized`` for that same
    update accepted in AWAIT_INSTALL_AUTH / INSTALL_DEFERRED, or a forcing rule applies (no
    installed manifest: first install; the installed manifest is not polite), or it is the
    re-issue of the work of INSTALLING after ``restarted``;
(b) every persisted state is the machine's state (``record.state is model.state``);
(c) the verified bitmap has the pending manifest's fragment count (and no bit past it);
(d) report sequence numbers in the durable outbox strictly increase;
(e) there is a pending update exactly when the state is not IDLE;
(f) no ``Commit`` unless the update's self-test passed (``record.tested``, set only by a
    passed ``SelfTestFinished``), and the new image becomes the installed one only by a
    ``CommitFinished`` without error after that;
(g) from the install on, an update ends only in IDLE (from AWAIT_COMMIT, SUCCESS) or FAILED
    (from ROLLING_BACK, ROLLED_BACK or ROLLBACK_FAILED), with exactly one such final report,
    told to the application, and a ``CheckAnnouncement``; no final report otherwise;
(h) the installer's steps are asked for only in their states (``Rollback`` in ROLLING_BACK,
    ``CheckBoot`` in AWAIT_RESTART, ``RequestRestart`` in AWAIT_RESTART or ROLLING_BACK);
(i) the restart count never passes the restart limit;
and every state change appends a report about the new state (docs/state-machine.md).

Events the machine drops (illegal in the state, or a failed condition) must change nothing.
Random events are still ones the engine could post: the current update's ``CommitFinished``
only for a commit under way (the self-test passed), its ``selftest`` timer not once the commit
cancelled it (the engine drops a cancelled timer even if it already fired).
Seeded (``derandomize=True``), no deadline, no example database.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from itertools import pairwise

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fota.core import commands as C
from fota.core import events as ev
from fota.core.machine import CANCELLABLE, INSTALL_STEPS, Machine, Model
from fota.core.manifest import (
    Component,
    Manifest,
    ManifestBody,
    TrustStore,
    fetched_key,
    kid_for,
    sign,
    verify,
)
from fota.core.policy import Policy, must_ask
from fota.core.record import Record, bitmap_count, bitmap_get, bitmap_new, bitmap_set
from fota.core.states import State
from fota.errors import InstallError, PermanentServerError, ResultCode, TransportError

S = State
DEVICE_CLASS = "stateful-gw"
KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
KID = kid_for(KEY.public_key())
OTHER_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(132, 164)))
TRUST = TrustStore({KID: KEY.public_key()})
POLICY = Policy(
    device_class=DEVICE_CLASS,
    max_image_size=1 << 20,
    progress_step=10,
    max_attempts=3,
    restart_limit=2,
)
START = 1_700_000_000.0
STALE = "00000000deadbeef"


def _body(sequence: int, fragments: int, polite: bool, device_class: str) -> ManifestBody:
    size = fragments * 1024 - 100
    return ManifestBody(
        sequence=sequence,
        component=Component.APPLICATION,
        version=f"2.{sequence}.{int(polite)}",
        device_class=device_class,
        image_size=size,
        image_sha256=hashlib.sha256(b"%d" % sequence).digest(),
        image_uri=f"/img/{sequence}",
        fragment_size=1024,
        fragment_sha256=tuple(hashlib.sha256(bytes([i])).digest() for i in range(fragments)),
        polite=polite,
    )


def _manifest(body: ManifestBody) -> Manifest:
    return verify(sign(body, KEY, KID), TRUST)


INSTALLED: dict[str, Manifest | None] = {
    "none": None,
    "polite": _manifest(_body(10, 2, True, DEVICE_CLASS)),
    "impolite": _manifest(_body(10, 2, False, DEVICE_CLASS)),
}
POOL: tuple[Manifest, ...] = tuple(
    _manifest(_body(seq, fragments, polite, DEVICE_CLASS))
    for seq, fragments in ((11, 1), (12, 3), (13, 4), (14, 2))
    for polite in (True, False)
)
"""Candidate updates: newer than the installed image, polite or not, 1 to 4 fragments."""
RAW_BAD_SIGNATURE = sign(_body(15, 2, True, DEVICE_CLASS), OTHER_KEY, KID)
RAW_LOWER_SEQUENCE = sign(_body(5, 2, True, DEVICE_CLASS), KEY, KID)
RAW_WRONG_CLASS = sign(_body(16, 2, True, "elsewhere"), KEY, KID)
POOL_INDEX = st.integers(0, len(POOL) - 1)
OTHER_IDS = (STALE, *(m.update_id for m in POOL))

UIDS = st.sampled_from(["current", "current", "other"])
"""Mostly the current update's id; else a stale one (or, by chance, the current one)."""
DOWNLOADED = (S.VERIFYING, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED, *INSTALL_STEPS)
FINAL = (ResultCode.SUCCESS, ResultCode.ROLLED_BACK, ResultCode.ROLLBACK_FAILED)
"""The result of an update that reached INSTALLING: exactly one of these ends it."""


@dataclass(frozen=True)
class Step:
    """One handled event, kept for the failure message."""

    state: State
    event: ev.Event
    accepted: bool
    new_state: State
    commands: tuple[C.Command, ...]


@settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
)
class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model: Model | None = None
        self.machine: Machine | None = None
        self.now = START
        self.steps: list[Step] = []
        self.install_authorized: set[str] = set()
        """Updates whose install the application authorized (they may wait in INSTALL_HELD)."""
        self.boots = 0
        """Boots of the simulated device; ``Model.boot_id`` is the current one's."""

    def teardown(self) -> None:
        self.loop.close()

    # -- setup ----------------------------------------------------------------------------

    @initialize(
        installed=st.sampled_from(["none", "polite", "impolite"]),
        state=st.sampled_from(State),
        pending_index=POOL_INDEX,
        verified=st.booleans(),
        tested=st.booleans(),
        rebooted=st.booleans(),
    )
    def restore(
        self,
        installed: str,
        state: State,
        pending_index: int,
        verified: bool,
        tested: bool,
        rebooted: bool,
    ) -> None:
        """Start from a journal record as the engine would load it (IDLE or mid-update).

        In AWAIT_RESTART the journal has the boot that asked for the restart (the device
        ``rebooted`` since, or not); in AWAIT_COMMIT the self-test deadline and perhaps a passed
        self-test; in ROLLING_BACK why.
        """
        pending = POOL[pending_index]
        inst = INSTALLED[installed]
        record = Record(state=state, installed=inst.digest if inst else None)
        if state is not S.IDLE:
            bitmap = bitmap_new(pending.fragment_count)
            if state in DOWNLOADED or (verified and state in (S.DOWNLOADING, S.FAILED)):
                for i in range(pending.fragment_count):
                    bitmap = bitmap_set(bitmap, i)
            record = record.evolve(
                pending=pending.digest, manifest_uri="coap://s/m", verified=bitmap
            )
        if state in (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED):
            record = record.evolve(defer_until=START + 3600, defer_reason="busy")
        if state is S.AWAIT_RESTART:
            record = record.evolve(boot_id="boot-0")
            self.boots = int(rebooted)
        if state is S.AWAIT_COMMIT:
            record = record.evolve(commit_by=START + 300.0, tested=tested)
        if state is S.ROLLING_BACK:
            record = record.evolve(failure="self-test failed: probe")
        if state is S.INSTALL_HELD:
            # A journal in INSTALL_HELD was written after the install was authorized (or
            # forced, or the image is impolite): the answer came before the restart.
            self.install_authorized.add(pending.update_id)
        model = Model(
            POLICY,
            TRUST,
            record,
            pending=pending if state is not S.IDLE else None,
            installed=inst,
        )
        model.boot_id = f"boot-{self.boots}"
        self.machine = Machine(model)
        self.model = model

    # -- driving ----------------------------------------------------------------------------

    @property
    def m(self) -> Model:
        assert self.model is not None
        return self.model

    def uid(self, which: str, other: int) -> str:
        if which == "current" and self.m.update_id is not None:
            return self.m.update_id
        return OTHER_IDS[other % len(OTHER_IDS)]

    def fire(self, event: ev.Event) -> Step:
        model = self.m
        assert self.machine is not None
        self.now += 7.0
        state, record = model.state, model.record
        pending, installed = model.pending, model.installed
        handled = self.loop.run_until_complete(self.machine.handle(event, self.now))
        accepted, commands = handled.accepted, handled.commands
        if (
            accepted
            and isinstance(event, ev.Authorized)
            and state in (S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED)
        ):
            self.install_authorized.add(event.update_id)
        step = Step(state, event, accepted, model.state, commands)
        self.steps.append(step)
        trail = "\n".join(map(repr, self.steps[-8:]))

        if not accepted:
            assert model.state is state, trail
            assert model.record == record, trail
            assert model.pending is pending and model.installed is installed, trail
            assert commands == (), trail

        # Every state change is reported: a report about the new state joins the outbox.
        added = [r for r in model.record.outbox if r.sequence >= record.report_seq]
        if accepted and model.state is not state:
            assert added and added[-1].state is model.state, trail

        # (f) a commit only after a passed self-test; the new image is installed by a commit.
        if model.record.tested and not record.tested:
            assert isinstance(event, ev.SelfTestFinished) and event.ok, trail
            assert state is S.AWAIT_COMMIT, trail
        if model.installed is not installed:
            assert isinstance(event, ev.CommitFinished) and event.error is None, trail
            assert state is S.AWAIT_COMMIT and record.tested and model.installed is pending, trail

        # (g) an update ends from the install on only in IDLE or FAILED, with one final report.
        if model.state in INSTALL_STEPS and state not in INSTALL_STEPS:
            assert model.state is S.INSTALLING, trail
        finals = [r for r in added if r.result in FINAL]
        if state in INSTALL_STEPS and model.state not in INSTALL_STEPS:
            assert pending is not None, trail
            assert (state, model.state) in (
                (S.AWAIT_COMMIT, S.IDLE),
                (S.ROLLING_BACK, S.FAILED),
            ), trail
            assert len(finals) == 1 and finals[0].update_id == pending.update_id, trail
            result = finals[0].result
            assert (result is ResultCode.SUCCESS) == (model.state is S.IDLE), trail
            told = [c for c in commands if isinstance(c, C.NotifyComplete)]
            assert [(c.update_id, c.result) for c in told] == [(pending.update_id, result)], trail
            assert commands[-1] == C.CheckAnnouncement(), trail
        else:
            assert not finals, trail

        # (h) each installer step only in its state, for the current update.
        for command in commands:
            states = {
                C.Rollback: (S.ROLLING_BACK,),
                C.CheckBoot: (S.AWAIT_RESTART,),
                C.RequestRestart: (S.AWAIT_RESTART, S.ROLLING_BACK),
                C.RunSelfTest: (S.AWAIT_COMMIT,),
                C.Commit: (S.AWAIT_COMMIT,),
            }.get(type(command))
            if states is not None:
                assert model.state in states, trail
                assert getattr(command, "update_id", None) == model.update_id, trail
            if isinstance(command, C.Commit):
                assert model.record.tested, trail
            if isinstance(command, C.RunSelfTest):
                assert not model.record.tested, trail
            if isinstance(command, C.CheckBoot):
                assert isinstance(event, ev.Restarted), trail

        # (a) no install without an authorization for that update or a forcing rule.
        for command in commands:
            if not isinstance(command, C.Install):
                continue
            authorized = command.update_id in self.install_authorized
            forced = not must_ask(installed) or bool(model.record.forced)
            reissued = isinstance(event, ev.Restarted) and state is S.INSTALLING
            assert authorized or forced or reissued, trail
            assert command.update_id == model.update_id, trail
            assert model.state is S.INSTALLING, trail
        return step

    # -- rules: the network ---------------------------------------------------------------

    @rule(
        which=st.sampled_from(["new", "installed", "pending", "refused", "no-manifest"]),
        index=POOL_INDEX,
    )
    def announce(self, which: str, index: int) -> None:
        manifest = POOL[index]
        digest: bytes | None = {
            "new": manifest.digest,
            "installed": self.m.record.installed,
            "pending": self.m.record.pending,
            "refused": (*self.m.record.refused, *self.m.record.rejected, None)[0],
            "no-manifest": None,
        }[which]
        uri = "coap://s/m" if digest is not None else None
        revivable = self.m.state is S.FAILED and not self.m.record.failure
        step = self.fire(ev.AnnouncementReceived(1, digest, uri))
        if step.accepted and which == "pending":
            # Issue 17 §3: the failed update announced again is retried (after its back-off).
            assert revivable
            assert self.m.state in (S.DOWNLOADING, S.DOWNLOAD_HELD)
            assert self.m.record.attempts == 0
        elif step.accepted:
            assert which == "new" and digest is not None and uri is not None
            assert step.commands == (C.FetchManifest(uri, digest),)

    @rule(
        kind=st.sampled_from(["valid", "valid", "bad-signature", "lower-sequence", "wrong-class"]),
        index=POOL_INDEX,
    )
    def manifest_fetched(self, kind: str, index: int) -> None:
        manifest = POOL[index]
        raw = {
            "valid": manifest.raw,
            "bad-signature": RAW_BAD_SIGNATURE,
            "lower-sequence": RAW_LOWER_SEQUENCE,
            "wrong-class": RAW_WRONG_CLASS,
        }[kind]
        # The digest the engine files the bytes under: their identity, or their SHA-256
        # when the signature fails (issue 16 §3).
        state, digest = self.m.state, fetched_key(raw, TRUST)
        installed, pending = self.m.installed, self.m.pending
        sequence = {"valid": manifest.body.sequence, "lower-sequence": 5}.get(kind)
        # Refused: a bad signature or another class, or not newer than the running image (nor
        # than a live update it would replace).
        floor = installed.body.sequence if installed is not None else -1
        if pending is not None and state in CANCELLABLE:
            floor = max(floor, pending.body.sequence)
        refuse = sequence is None or sequence <= floor
        rec = self.m.record
        known = digest in {
            rec.pending,
            *rec.refused,
            *rec.rejected,
            rec.installed,
            *self.m.local_refused,
        }
        before = rec
        if self.fire(ev.ManifestFetched(raw, "coap://s/m", digest)).accepted:
            if known:  # pending, refused (or rejected) or running: nothing changes at all
                assert self.m.state is state and self.m.pending is pending
                assert self.m.record == before
            elif refuse:  # remembered; a failed update stays pending
                assert self.m.state is state
                # A local setting's refusal (another device class) is kept in memory only.
                local = kind == "wrong-class"
                remembered = self.m.local_refused if local else self.m.record.refused
                assert remembered[-1] == digest
                assert self.m.pending is pending
            else:  # adopted as the new pending update, asking first under a polite image
                assert self.m.pending is not None and self.m.pending.raw == raw
                assert self.m.record.attempts == self.m.record.restarts == 0
                assert self.m.state is (
                    S.AWAIT_DOWNLOAD_AUTH if must_ask(installed) else S.DOWNLOADING
                )

    # -- rules: the application -------------------------------------------------------------

    @rule(which=UIDS, other=st.integers(0, 20))
    def authorized(self, which: str, other: int) -> None:
        self.fire(ev.Authorized(self.uid(which, other)))

    @rule(which=UIDS, other=st.integers(0, 20), delay=st.floats(0, 86_400))
    def deferred(self, which: str, other: int, delay: float) -> None:
        until = self.now + delay
        if self.fire(ev.Deferred(self.uid(which, other), until, "later")).accepted:
            assert self.m.state in (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED)
            assert self.m.record.defer_until == until

    @rule(which=UIDS, other=st.integers(0, 20))
    def rejected(self, which: str, other: int) -> None:
        uid = self.uid(which, other)
        if self.fire(ev.Rejected(uid, "no")).accepted:
            assert self.m.state is S.IDLE
            assert self.m.record.outbox[-1].result is ResultCode.REJECTED

    @rule()
    def resume_requested(self) -> None:
        self.fire(ev.ResumeRequested())

    # -- rules: timers and the download ----------------------------------------------------

    @rule(
        name=st.sampled_from(["defer", "retry", "selftest"]),
        which=UIDS,
        other=st.integers(0, 20),
    )
    def timer_fired(self, name: str, which: str, other: int) -> None:
        if name == "selftest" and self.m.record.tested:
            return  # the commit cancelled it: the engine drops it, even if it already fired
        step = self.fire(ev.TimerFired(name, self.uid(which, other)))
        if step.accepted and step.state is S.AWAIT_COMMIT:
            assert name == "selftest"
            assert step.commands == (C.RunSelfTest(str(self.m.update_id)),)

    @rule(seconds=st.sampled_from([60.0, 400.0, 3600.0, 86_400.0]))
    def clock(self, seconds: float) -> None:
        """Time passes (a self-test deadline, a deferral's end)."""
        self.now += seconds

    @rule(which=UIDS, other=st.integers(0, 20), index=st.integers(-1, 5))
    def fragment_verified(self, which: str, other: int, index: int) -> None:
        self.fire(ev.FragmentVerified(self.uid(which, other), index))

    @rule()
    def every_fragment_verified(self) -> None:
        if self.m.pending is not None:
            for index in range(self.m.pending.fragment_count):
                self.fire(ev.FragmentVerified(self.m.pending.update_id, index))

    @rule(which=UIDS, other=st.integers(0, 20), indexes=st.lists(st.integers(-1, 9), max_size=4))
    def fragments_invalid(self, which: str, other: int, indexes: list[int]) -> None:
        self.fire(ev.FragmentsInvalid(self.uid(which, other), tuple(indexes)))

    @rule(which=UIDS, other=st.integers(0, 20))
    def download_finished(self, which: str, other: int) -> None:
        self.fire(ev.DownloadFinished(self.uid(which, other)))

    @rule(which=UIDS, other=st.integers(0, 20), retryable=st.booleans())
    def download_failed(self, which: str, other: int, retryable: bool) -> None:
        error = TransportError("timeout") if retryable else PermanentServerError("u", "4.04")
        self.fire(ev.DownloadFailed(self.uid(which, other), error))

    @rule(which=UIDS, other=st.integers(0, 20), ok=st.booleans())
    def image_checked(self, which: str, other: int, ok: bool) -> None:
        self.fire(ev.ImageChecked(self.uid(which, other), ok))

    # -- rules: install, restart, self-test, commit, rollback, reports -------------------------

    @rule(
        which=UIDS,
        other=st.integers(0, 20),
        outcome=st.sampled_from(["ok", "restart", "failed", "failed-restart"]),
    )
    def install_finished(self, which: str, other: int, outcome: str) -> None:
        error = InstallError("x") if outcome.startswith("failed") else None
        restart = outcome.endswith("restart")
        step = self.fire(ev.InstallFinished(self.uid(which, other), error, restart))
        if step.accepted:
            expected = {"ok": S.AWAIT_COMMIT, "restart": S.AWAIT_RESTART}
            assert self.m.state is expected.get(outcome, S.ROLLING_BACK)
            if outcome == "restart":
                assert self.m.record.boot_id == self.m.boot_id

    @rule(which=UIDS, other=st.integers(0, 20), ok=st.booleans())
    def boot_checked(self, which: str, other: int, ok: bool) -> None:
        if self.fire(ev.BootChecked(self.uid(which, other), ok, "probe")).accepted:
            assert self.m.state is (S.AWAIT_COMMIT if ok else S.ROLLING_BACK)
            if ok:  # the self-test deadline counts from the new image's start
                assert self.m.record.commit_by == self.now + POLICY.self_test_deadline

    @rule(which=UIDS, other=st.integers(0, 20), ok=st.booleans())
    def self_test_finished(self, which: str, other: int, ok: bool) -> None:
        uid = self.uid(which, other)
        installed, by = self.m.installed, self.m.record.commit_by
        step = self.fire(ev.SelfTestFinished(uid, ok, "probe"))
        if step.accepted:
            assert self.m.installed is installed  # not before the commit finished
            if ok:
                assert self.m.state is S.AWAIT_COMMIT and self.m.record.tested
                assert step.commands == (C.CancelTimer("selftest"), C.Commit(uid))
            elif by is not None and self.now < by:  # retried until the deadline
                assert step.commands == (C.StartTimer("selftest", min(self.now + 10, by), uid),)
            else:
                assert self.m.state is S.ROLLING_BACK

    @rule(which=UIDS, other=st.integers(0, 20), ok=st.booleans())
    def commit_finished(self, which: str, other: int, ok: bool) -> None:
        pending, uid = self.m.pending, self.uid(which, other)
        if uid == self.m.update_id and not self.m.record.tested:
            return  # the engine posts it only for the Commit it ran (after the self-test passed)
        error = None if ok else InstallError("x")
        if self.fire(ev.CommitFinished(uid, error)).accepted:
            assert self.m.state is (S.IDLE if ok else S.ROLLING_BACK)
            if ok:
                assert self.m.installed is pending

    @rule(
        which=UIDS,
        other=st.integers(0, 20),
        outcome=st.sampled_from(["ok", "ok", "restart", "failed"]),
    )
    def rollback_finished(self, which: str, other: int, outcome: str) -> None:
        error = InstallError("x") if outcome == "failed" else None
        restart = outcome == "restart"
        installed = self.m.installed
        step = self.fire(ev.RollbackFinished(self.uid(which, other), error, restart))
        if step.accepted:
            assert self.m.installed is installed
            if restart:
                assert self.m.state is S.ROLLING_BACK
                assert step.commands == (C.RequestRestart(str(self.m.update_id)),)
            else:
                assert self.m.state is S.FAILED
                final = ResultCode.ROLLBACK_FAILED if error else ResultCode.ROLLED_BACK
                assert self.m.record.outbox[-1].result is final

    @rule(boot=st.sampled_from(["same", "next", "next", "unknown"]))
    def restarted(self, boot: str) -> None:
        """fota restarts: alone (the same boot), with the device (the next), or unable to tell."""
        if boot == "next":
            self.boots += 1
        self.m.boot_id = "" if boot == "unknown" else f"boot-{self.boots}"
        asked = self.m.record.boot_id
        step = self.fire(ev.Restarted())
        if step.state is S.AWAIT_RESTART and step.new_state is S.AWAIT_RESTART:
            uid = str(self.m.update_id)
            rebooted = not asked or self.m.boot_id != asked
            assert step.commands[0] == (C.CheckBoot(uid) if rebooted else C.RequestRestart(uid))

    @rule(pick=st.integers(0, 50))
    def report_delivered(self, pick: int) -> None:
        outbox = self.m.record.outbox
        sequence = outbox[pick % len(outbox)].sequence if outbox and pick < 40 else pick
        kept = tuple(r for r in outbox if r.sequence != sequence)
        assert self.fire(ev.ReportDelivered(sequence)).accepted
        assert self.m.record.outbox == kept

    # -- a driver: the event the current state waits for, so runs reach the later states --------

    @rule(
        choice=st.integers(0, 5),
        index=POOL_INDEX,
        delay=st.floats(1, 3600),
    )
    def advance(self, choice: int, index: int, delay: float) -> None:
        """Feed one plausible next event for the current update (mostly the happy path)."""
        model = self.m
        uid = model.update_id
        state = model.state
        ok = choice != 0  # one in six fails
        event: ev.Event
        if uid is None or state in (S.IDLE, S.FAILED):
            manifest = POOL[index]
            event = ev.ManifestFetched(manifest.raw, "coap://s/m", manifest.digest)
        elif state in (S.AWAIT_DOWNLOAD_AUTH, S.AWAIT_INSTALL_AUTH):
            answers: tuple[ev.Event, ...] = (
                ev.Rejected(uid, "no"),
                ev.Deferred(uid, self.now + delay, "later"),
            )
            event = answers[choice] if choice < len(answers) else ev.Authorized(uid)
        elif state in (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED):
            event = ev.TimerFired("defer", uid) if choice % 2 else ev.ResumeRequested()
        elif state in (S.DOWNLOAD_HELD, S.INSTALL_HELD):
            event = ev.GatesChecked(uid, () if ok else ("power",))
        elif state is S.DOWNLOADING:
            if ok:
                self.every_fragment_verified()
                event = ev.DownloadFinished(uid)
            else:
                event = ev.DownloadFailed(uid, TransportError("timeout"))
        elif state is S.VERIFYING:
            event = ev.ImageChecked(uid, ok)
        elif state is S.INSTALLING:
            event = ev.InstallFinished(uid, None if ok else InstallError("x"), choice % 2 == 1)
        elif state is S.AWAIT_RESTART:
            if model.record.boot_id == model.boot_id:  # the restart asked for
                self.restarted("next" if choice != 5 else "same")
                return
            event = ev.BootChecked(uid, ok, "" if ok else "the previous image runs")
        elif state is S.AWAIT_COMMIT and model.record.tested:
            event = ev.CommitFinished(uid, None if ok else InstallError("x"))
        elif state is S.AWAIT_COMMIT:
            if choice == 1:  # the deadline passes while the self-test keeps failing
                self.now += delay
            event = ev.SelfTestFinished(uid, choice > 2, "probe")
        else:
            assert state is S.ROLLING_BACK
            if model.record.boot_id and model.record.boot_id == model.boot_id:
                self.restarted("next")  # the restart the rollback asked for
                return
            error = None if ok else InstallError("x")
            event = ev.RollbackFinished(uid, error, restart=choice == 5)
        self.fire(event)

    @rule(
        choice=st.integers(0, 5),
        index=POOL_INDEX,
        delay=st.floats(1, 3600),
    )
    def advance_again(self, choice: int, index: int, delay: float) -> None:
        """The driver once more, so that it is picked about as often as the random events."""
        self.advance(choice, index, delay)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def persisted_state_is_machine_state(self) -> None:
        if self.model is not None:
            assert self.model.record.state is self.model.state

    @invariant()
    def bitmap_matches_pending(self) -> None:
        model = self.model
        if model is not None and model.pending is not None:
            count = model.pending.fragment_count
            assert len(model.record.verified) == (count + 7) // 8
            assert bitmap_count(model.record.verified) <= count
            assert bitmap_count(model.record.verified) == sum(
                bitmap_get(model.record.verified, i) for i in range(count)
            )

    @invariant()
    def report_sequences_increase(self) -> None:
        if self.model is not None:
            record = self.model.record
            sequences = [r.sequence for r in record.outbox]
            assert all(a < b for a, b in pairwise(sequences))
            assert all(s < record.report_seq for s in sequences)

    @invariant()
    def restarts_within_limit(self) -> None:
        # Past the limit only while a commit that started is finished (it may already have
        # dropped what a rollback needs).
        if self.model is not None and not (
            self.model.state is S.AWAIT_COMMIT and self.model.record.tested
        ):
            assert self.model.record.restarts <= POLICY.restart_limit

    @invariant()
    def pending_exactly_when_busy(self) -> None:
        model = self.model
        if model is not None:
            assert (model.pending is None) == (model.state is S.IDLE)
            assert model.record.pending == (model.pending.digest if model.pending else None)
            assert model.record.installed == (model.installed.digest if model.installed else None)


TestCoreMachine = CoreMachine.TestCase
