"""Tier 1: the core state machine as a table, ``state + event -> state + commands``.

The expected behaviour is written out below as data (``CASES``, ``LEGAL``, ``SHADOWED`` and
``EVENT_FOR``), not derived from ``fota.core.machine.TRANSITIONS``: a change to the table in the
product must be matched by a deliberate change here. Meta-tests check that the data covers every
row (and every source state of every row) of ``TRANSITIONS``, every conditional row's
fall-through, and every illegal ``(state, trigger)`` pair; each accepted case must also go
through the very row it claims to cover.

The machine is built exactly as :class:`fota.engine.Engine` builds it, with real Ed25519-signed
manifests, a real :class:`~fota.core.policy.Policy` and a real trust store. Time is the constant
``NOW``: deadlines, deferral bounds, windows, quiet periods and locks are placed around it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota.core import commands as C
from fota.core import events as ev
from fota.core.machine import TRANSITIONS, Handled, Machine, Model, triggers
from fota.core.manifest import (
    MAX_MANIFEST_BYTES,
    Component,
    Manifest,
    ManifestBody,
    Severity,
    TrustStore,
    envelope_id,
    fetched_key,
    kid_for,
    sign,
    update_id_of,
    verify,
)
from fota.core.policy import Policy
from fota.core.record import Record, Report
from fota.core.states import State
from fota.core.windows import parse_windows
from fota.errors import (
    DiskFull,
    ImageChanged,
    InstallError,
    IntegrityError,
    NotEnoughSpace,
    PermanentServerError,
    ResourceMissing,
    ResultCode,
    StorageError,
    TransportError,
)

S = State
R = ResultCode

# -- fixtures: deterministic keys and manifests (Ed25519 signatures are deterministic) ----------

DEVICE_CLASS = "table-gw"
KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KID = kid_for(KEY.public_key())
OTHER_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
OTHER_KID = kid_for(OTHER_KEY.public_key())
TRUST = TrustStore({KID: KEY.public_key()})
POLICY = Policy(
    device_class=DEVICE_CLASS,
    max_image_size=65_536,
    progress_step=25,
    max_attempts=3,
    retry_base=1.0,
    retry_cap=300.0,
    restart_limit=2,
)
"""The base policy: optional updates may be deferred without bound, nothing holds them, and an
update nobody answers waits."""
NOW = 1_000_000.0
"""Monday 1970-01-12 13:46:40 UTC: every event happens at this instant."""
DEFER_UNTIL = 1_003_600.0
"""The deferral a record in a *_DEFERRED state runs until."""
DEFER_SINCE = NOW - 600.0
"""When that deferral started: ten minutes of it count toward the bound at NOW."""
LATER = 1_007_200.75
"""A new deferral (fractional on purpose: reports carry whole seconds)."""
SEEN = NOW - 3600.0
"""When the pending update of a starting record was adopted (severity deadlines count from it)."""
PROVISIONED = NOW - 30 * 86400.0
"""The device's first start, a month ago: no quiet period is running unless a case says so."""
STALE = "00000000deadbeef"
"""An update id that is never the current one."""
BOOT = "boot-2"
"""The boot the device runs now (the engine sets ``Model.boot_id`` before ``Restarted``)."""
EARLIER_BOOT = "boot-1"
"""The boot during which an AWAIT_RESTART record's installer asked for the restart."""
COMMIT_BY = NOW + 240.0
"""An AWAIT_COMMIT record's self-test deadline: one minute of the five has passed."""
FAILURE = "self-test failed: no network"
"""Why a ROLLING_BACK record's update is being rolled back (its final report repeats it)."""


def _body(
    sequence: int,
    *,
    size: int,
    polite: bool = True,
    device_class: str = DEVICE_CLASS,
    fragment_size: int = 1024,
    image: int | None = None,
    severity: Severity = Severity.OPTIONAL,
    deadline: int | None = None,
) -> ManifestBody:
    """A manifest body; ``image`` names the image (default: the sequence), so two manifests can
    describe the same image."""
    count = max(1, -(-size // max(1, fragment_size)))
    return ManifestBody(
        sequence=sequence,
        component=Component.FIRMWARE,
        version=f"1.{sequence}",
        device_class=device_class,
        image_size=size,
        image_sha256=hashlib.sha256(b"image %d" % (image or sequence)).digest(),
        image_uri=f"/fw/{sequence}.bin",
        fragment_size=fragment_size,
        fragment_sha256=tuple(hashlib.sha256(bytes([i])).digest() for i in range(count)),
        polite=polite,
        severity=severity,
        deadline=deadline,
    )


def _signed(body: ManifestBody, key: ed25519.Ed25519PrivateKey = KEY, kid: bytes = KID) -> bytes:
    return sign(body, key, kid)


def _manifest(body: ManifestBody) -> Manifest:
    return verify(_signed(body), TRUST)


def sha256(data: bytes) -> bytes:
    """The digest the engine files fetched bytes under (``fetched_key``): a manifest's
    identity, or the SHA-256 of bytes whose signature fails or that are no envelope."""
    return fetched_key(data, TRUST)


INSTALLED_POLITE = _manifest(_body(10, size=4096, polite=True))
INSTALLED_IMPOLITE = _manifest(_body(10, size=4096, polite=False))
PENDING = _manifest(_body(11, size=2560))  # 3 fragments; the last one is 512 bytes
PENDING_URI = "coap://fota.example/m/11"
U = PENDING.update_id
NEW = _manifest(_body(12, size=1500))  # 2 fragments, another image
NEW_URI = "coap://fota.example/m/12"
N = NEW.update_id
SAME = _manifest(_body(12, size=2560, image=11))
"""A newer manifest for PENDING's very image (re-signed with, say, a new deadline)."""
SM = SAME.update_id
NEW_DUE = _manifest(_body(12, size=1500, deadline=int(NOW) - 60))
"""A newer manifest whose deadline has already passed when it arrives."""
ND = NEW_DUE.update_id
CRITICAL_DUE = _manifest(_body(11, size=2560, severity=Severity.CRITICAL, deadline=int(NOW) - 1))
"""A critical pending update one second past its manifest's deadline."""
CD = CRITICAL_DUE.update_id

RAW_BAD_SIGNATURE = _signed(_body(12, size=1500), OTHER_KEY, KID)
RAW_UNKNOWN_KEY = _signed(_body(12, size=1500), OTHER_KEY, OTHER_KID)
RAW_ROLLBACK = _signed(_body(9, size=1500))
RAW_REPLAY = _signed(_body(11, size=1500))
"""Another manifest with the pending update's sequence number: a conflicting replay."""
RAW_WRONG_CLASS = _signed(_body(12, size=1500, device_class="other-gw"))
RAW_OVERSIZE_IMAGE = _signed(_body(12, size=65_537))
RAW_CUT_OFF = b"\x00" * (MAX_MANIFEST_BYTES + 1)
"""What the engine hands over when the manifest ran past the size limit."""
RAW_MALFORMED = _signed(_body(12, size=1500, fragment_size=1000))

FULL = b"\x07"
"""Bitmap with all three of PENDING's fragments verified."""
PRIOR = Report(6, S.IDLE, R.SUCCESS, detail="an earlier update")
"""The report every starting record already has in its outbox (report_seq is 7)."""

Installed = Literal["polite", "impolite", "none"]
INSTALLED: dict[Installed, Manifest | None] = {
    "polite": INSTALLED_POLITE,
    "impolite": INSTALLED_IMPOLITE,
    "none": None,
}


def fetched(raw: bytes, uri: str = NEW_URI) -> ev.ManifestFetched:
    """The event the engine posts once announced bytes arrived."""
    return ev.ManifestFetched(raw=raw, uri=uri, digest=sha256(raw))


ANNOUNCE_NEW = ev.AnnouncementReceived(12, NEW.digest, NEW_URI)
ANNOUNCE_PENDING = ev.AnnouncementReceived(11, PENDING.digest, PENDING_URI)
CANCEL_PENDING = ev.AnnouncementReceived(13, None, None, cancel=PENDING.digest)
"""The server withdraws the pending update (an announcement may carry only a cancel)."""
CANCEL_NEW = ev.AnnouncementReceived(13, None, None, cancel=NEW.digest)
"""The server withdraws a manifest that is not pending (its fetch may be under way)."""
CANCEL_PENDING_ANNOUNCE_NEW = ev.AnnouncementReceived(13, NEW.digest, NEW_URI, PENDING.digest)
"""The server withdraws the pending update and announces its replacement at once."""
CANCEL_SAME_ANNOUNCE_NEW = ev.AnnouncementReceived(13, NEW.digest, NEW_URI, SAME.digest)
"""The server announces NEW and withdraws SAME (not pending; its fetch may be under way)."""

# -- policies: the base one with one rule switched on ------------------------------------------

BUDGETS = replace(POLICY, max_download_bytes=100_000, max_download_time=600.0)
"""Both download budgets set."""
BOUNDED = replace(POLICY, max_deferral=(7200.0, None, None))
"""Optional updates may be deferred two hours in all."""
DEADLINE = replace(POLICY, deadline_after=(7200.0, None, None))
"""Optional updates are forced two hours after they are first seen: at DUE for PENDING."""
DUE = SEEN + 7200.0
LATE = replace(POLICY, deadline_after=(3600.0, None, None))
"""Optional updates are forced an hour after they are first seen: PENDING's deadline is NOW."""
PROCEED = replace(POLICY, unanswered="proceed", unanswered_grace=1800.0)
"""Nobody registered within half an hour: proceed (PENDING's grace ended at NOW - 1800)."""
WINDOWED = replace(POLICY, windows=parse_windows(["daily 02:00-04:00"]), tz=UTC)
"""Installs only at night; at NOW (13:46 UTC) the window is closed."""
OPENS = 1_044_000.0
"""The next time WINDOWED's window opens: Tuesday 1970-01-13 02:00 UTC."""
OPEN_NOW = replace(POLICY, windows=parse_windows(["Mon 13:00-14:00"]), tz=UTC)
"""A window that is open at NOW."""
QUIET = replace(POLICY, quiet_period=86400.0)
"""A day of quiet after the first start (cases that use it start ten minutes after it)."""
CONDITIONS = replace(POLICY, conditions=("battery", "network"))
"""Two configured conditions the engine evaluates before an install."""
GATED = replace(POLICY, gates_download=True)
"""Locks, windows, quiet period and conditions hold the download too."""
GATED_CONDITIONS = replace(CONDITIONS, gates_download=True)
BOUNDED_GATED = replace(BOUNDED, gates_download=True)
PROCEED_GATED = replace(PROCEED, gates_download=True)
PROCEED_WINDOWED = replace(WINDOWED, unanswered="proceed", unanswered_grace=1800.0)
BOUNDED_WINDOWED = replace(BOUNDED, windows=WINDOWED.windows, tz=UTC)
LATE_WINDOWED = replace(LATE, windows=WINDOWED.windows, tz=UTC)
DEADLINE_WINDOWED = replace(DEADLINE, windows=WINDOWED.windows, tz=UTC)
ONE_LOCK = replace(POLICY, max_locks=1)
"""Room for a single inhibitor lock."""

LOCKED = (("backup", NOW + 600.0),)
"""An inhibitor lock that expires in ten minutes."""
SPENT: dict[str, Any] = {"deferred_total": 7200.0}
"""A waiting record whose cumulative deferral has reached BOUNDED's two hours."""
SPENT_DEFERRED: dict[str, Any] = {"deferred_total": 6600.0}
"""A deferred record that reaches the two hours with its current ten minutes."""


# -- the machine, built as the engine builds it ------------------------------------------------


_DOWNLOADED = (
    S.VERIFYING,
    S.AWAIT_INSTALL_AUTH,
    S.INSTALL_DEFERRED,
    S.INSTALL_HELD,
    S.INSTALLING,
    S.AWAIT_RESTART,
    S.AWAIT_COMMIT,
    S.ROLLING_BACK,
)


def start_record(
    state: State, installed: Installed, pending: Manifest = PENDING, **overrides: Any
) -> Record:
    """A realistic record in ``state``: ``pending`` is the update unless the state is IDLE."""
    inst = INSTALLED[installed]
    base = Record(
        state=state,
        installed=inst.digest if inst is not None else None,
        report_seq=7,
        outbox=(PRIOR,),
        provisioned_at=PROVISIONED,
    )
    if state is not S.IDLE:
        verified = b"\x00"  # waiting for or doing the download
        if state in _DOWNLOADED:
            verified = FULL
        elif state is S.FAILED:
            verified = b"\x03"  # failed part-way
        base = base.evolve(
            pending=pending.digest, manifest_uri=PENDING_URI, verified=verified, first_seen=SEEN
        )
    if state in (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED):
        base = base.evolve(defer_until=DEFER_UNTIL, defer_since=DEFER_SINCE, defer_reason="busy")
    if state is S.AWAIT_RESTART:
        base = base.evolve(boot_id=EARLIER_BOOT)
    if state is S.AWAIT_COMMIT:
        base = base.evolve(commit_by=COMMIT_BY)
    if state is S.ROLLING_BACK:
        base = base.evolve(failure=FAILURE)
    return base.evolve(**overrides)


class Driven:
    """A :class:`Model` inside the core's :class:`Machine`, driven as the engine drives it.

    ``take_commands`` returns the commands of the events fired since it was last called;
    ``last`` is what the machine did with the latest event (``last.row``: the row that fired).
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.machine = Machine(model)
        self.last: Handled | None = None
        self._commands: list[C.Command] = []

    async def fire(self, event: ev.Event, now: float = NOW) -> bool:
        """Hand ``event`` to the machine; False: illegal or dropped."""
        self.last = await self.machine.handle(event, now)
        self._commands += self.last.commands
        return self.last.accepted

    def take_commands(self) -> list[C.Command]:
        out, self._commands = self._commands, []
        return out


def build(
    record: Record,
    installed: Installed,
    policy: Policy = POLICY,
    *,
    pending: Manifest = PENDING,
    handler: bool = False,
    boot: str = BOOT,
) -> Driven:
    """A Model restored from ``record`` inside the core's Machine, as the engine builds it.

    ``handler`` says whether an application handler is registered and ``boot`` is the current
    boot id (the engine sets both before ``Restarted``).
    """
    model = Model(
        policy,
        TRUST,
        record,
        pending=pending if record.pending is not None else None,
        installed=INSTALLED[installed],
    )
    model.handler_present = handler
    model.boot_id = boot
    driven = Driven(model)
    assert model.state is record.state
    return driven


def _state(model: Model) -> State:
    """The machine's state now (a call, so a type checker does not keep an earlier answer)."""
    return model.state


# -- the expected table --------------------------------------------------------------------------

WAITING = frozenset(
    {S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED}
)
"""The application is asked, or has deferred its answer."""
HELD = frozenset({S.DOWNLOAD_HELD, S.INSTALL_HELD})
"""Authorized (or forced, or impolite): waiting for local holds."""
INSTALL_STEPS = frozenset({S.INSTALLING, S.AWAIT_RESTART, S.AWAIT_COMMIT, S.ROLLING_BACK})
"""From the install on: too late to cancel or replace; the update ends in IDLE or FAILED."""
EVERY_STATE = frozenset(State)

LEGAL: dict[str, frozenset[State]] = {
    # Announcements: a cancel can come at any time (refused once installing), a new manifest
    # is fetched wherever it could still replace the pending one.
    "announcement_received": EVERY_STATE,
    "manifest_fetched": EVERY_STATE - INSTALL_STEPS,
    "authorized": WAITING,
    "deferred": WAITING,
    "rejected": WAITING | HELD,
    "resume_requested": frozenset({S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED}),
    "handler_changed": EVERY_STATE,
    "timer_fired": WAITING | HELD | {S.DOWNLOADING, S.AWAIT_COMMIT},
    "gates_checked": HELD,
    "lock_taken": EVERY_STATE,
    "lock_released": EVERY_STATE,
    "fragment_verified": frozenset({S.DOWNLOADING}),
    "fragments_invalid": frozenset({S.DOWNLOADING}),
    "download_finished": frozenset({S.DOWNLOADING}),
    "download_failed": frozenset({S.DOWNLOADING}),
    "image_checked": frozenset({S.VERIFYING}),
    # One installer step per state; each step's result is legal only there.
    "install_finished": frozenset({S.INSTALLING}),
    "boot_checked": frozenset({S.AWAIT_RESTART}),
    "self_test_finished": frozenset({S.AWAIT_COMMIT}),
    "commit_finished": frozenset({S.AWAIT_COMMIT}),
    "rollback_finished": frozenset({S.ROLLING_BACK}),
    "pending_lost": EVERY_STATE,
    "restarted": EVERY_STATE,
    "report_delivered": EVERY_STATE,
    "keyset_applied": EVERY_STATE,
    "announcements_stale": EVERY_STATE,
}
"""Every (state, trigger) pair that has a row in the table; all others are illegal."""

SHADOWED: frozenset[tuple[str, tuple[str, ...], State]] = frozenset(
    {
        # The general lock rows list every state, but in a HELD state the HELD row (same
        # conditions, placed before) always wins: the general one never fires there.
        ("lock_taken", ("take_lock",), S.DOWNLOAD_HELD),
        ("lock_taken", ("take_lock",), S.INSTALL_HELD),
        ("lock_released", ("release_lock",), S.DOWNLOAD_HELD),
        ("lock_released", ("release_lock",), S.INSTALL_HELD),
    }
)
"""(trigger, callbacks, state) of row sources no event can reach: an earlier row for the same
trigger and state has a subset of the conditions, so it always matches first."""

EXHAUSTIVE: frozenset[tuple[State, str]] = frozenset(
    {
        # A resume asks again, unless a forcing rule applies; then the step proceeds, forced.
        # Either way the event is taken: there is no fall-through to show.
        (S.DOWNLOAD_DEFERRED, "resume_requested"),
        (S.INSTALL_DEFERRED, "resume_requested"),
    }
)
"""(state, trigger) pairs whose rows all have conditions, but complementary ones."""


@dataclass(frozen=True)
class Case:
    """One row of the expected table.

    Attributes:
        id: the test id.
        state: the starting state (the record is :func:`start_record` plus ``start``).
        event: the event fed.
        new_state: the state after it.
        commands: the commands emitted, in order.
        reports: (state, result) of every report appended to ``record.outbox``, in order.
        installed: the running image's manifest.
        start: overrides on the starting record.
        after: fields of the record after the event.
        accepted: False when the event is dropped (a condition failed): nothing changes.
        report: one report appended, exactly (found by its sequence), for key transitions.
        policy: the settings.
        pending: the pending update's manifest (states other than IDLE).
        handler: whether an application handler is registered.
        boot: the current boot id (``Model.boot_id``).
        via: the condition that tells this row from others with the same outcome (see
            :func:`_row_for`).
        bug: a product bug: the case states the behaviour the product should have and is
            expected to fail (``xfail(strict=True)``) until it is fixed; it covers no row.
    """

    id: str
    state: State
    event: ev.Event
    new_state: State
    commands: tuple[C.Command, ...] = ()
    reports: tuple[tuple[State, ResultCode], ...] = ()
    installed: Installed = "polite"
    start: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    accepted: bool = True
    report: Report | None = None
    policy: Policy = POLICY
    pending: Manifest = PENDING
    handler: bool = False
    boot: str = BOOT
    via: str | None = None
    bug: str = ""


def drop(
    id: str,
    state: State,
    event: ev.Event,
    installed: Installed = "polite",
    start: dict[str, Any] | None = None,
    policy: Policy = POLICY,
    handler: bool = False,
) -> Case:
    """A legal (state, trigger) pair whose conditions fail: the event changes nothing."""
    return Case(
        id,
        state,
        event,
        state,
        installed=installed,
        start=start or {},
        accepted=False,
        policy=policy,
        handler=handler,
    )


_FAIL = (C.StopDownload(), C.CancelTimer("retry"))
"""What ``fail`` always emits after its report."""
_LEAVE = (C.CancelTimer("grace"), C.CancelTimer("deadline"))
"""Leaving the question to the application: its grace and deadline timers no longer apply."""
_STOP = (
    C.StopDownload(),
    C.CancelTimer("defer"),
    C.CancelTimer("retry"),
    C.CancelTimer("budget"),
    C.CancelTimer("hold"),
    C.CancelTimer("deadline"),
    C.CancelTimer("grace"),
)
"""An update that ends before its install stops its download and every timer."""


def _floor_report(state: State) -> Report:
    """The report of a floor reset (keyset 2, floor 5) in ``state``: about the pending update,
    if there is one, with its verified bytes as :func:`start_record` sets them."""
    detail = "anti-rollback floor reset to 5 by keyset 2"
    if state is S.IDLE:
        return Report(7, state, R.INITIAL, detail=detail)
    verified = 2048 if state is S.FAILED else 2560 if state in _DOWNLOADED else 0
    return Report(7, state, R.INITIAL, U, 11, verified, detail)


CANCEL_DETAIL = "cancelled by the server"
_CANCELLED = (
    C.SendReports(),
    *_STOP,
    C.DiscardCandidate(),
    C.NotifyComplete(U, R.CANCELLED, CANCEL_DETAIL),
)
"""What a server cancel of PENDING emits."""
BY_NEW = f"superseded by {N} (sequence 12)"
BY_SAME = f"superseded by {SM} (sequence 12)"
BY_DUE = f"superseded by {ND} (sequence 12)"
_BY_NEW = (C.SendReports(), *_STOP, C.NotifyComplete(U, R.SUPERSEDED, BY_NEW))
_BY_SAME = (C.SendReports(), *_STOP, C.NotifyComplete(U, R.SUPERSEDED, BY_SAME))
_BY_DUE = (C.SendReports(), *_STOP, C.NotifyComplete(U, R.SUPERSEDED, BY_DUE))
"""What replacing a live PENDING emits: reported and told, then stopped."""
_CLEARED: dict[str, Any] = {
    "pending": None,
    "manifest_uri": None,
    "verified": b"",
    "defer_until": None,
    "defer_reason": "",
    "attempts": 0,
    "restarts": 0,
    "progress": 0,
    "fetched": 0,
    "download_started": None,
    "first_seen": None,
    "deferred_total": 0.0,
    "defer_since": None,
    "forced": "",
    "held": (),
    "boot_id": "",
    "commit_by": None,
    "tested": False,
    "failure": "",
}
"""The record of an update that is over."""
_FRESH: dict[str, Any] = {
    "defer_until": None,
    "defer_since": None,
    "defer_reason": "",
    "deferred_total": 0.0,
    "first_seen": NOW,
    "forced": "",
    "held": (),
    "attempts": 0,
    "restarts": 0,
    "progress": 0,
    "fetched": 0,
}
"""A newly adopted update's record: every clock of the one it replaced starts over."""
_ADOPTED_NEW: dict[str, Any] = {
    **_FRESH,
    "pending": NEW.digest,
    "manifest_uri": NEW_URI,
    "verified": b"\x00",
}
_ADOPTED_DUE: dict[str, Any] = {**_ADOPTED_NEW, "pending": NEW_DUE.digest, "forced": "deadline"}


CASES: tuple[Case, ...] = (
    # -- announcement_received: a server cancel ----------------------------------------------
    # Cancellable until the install starts: the update ends, its candidate is discarded, and
    # the digest is remembered so that the (still downloadable) manifest is not fetched again.
    Case(
        "cancel/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        after={**_CLEARED, "cancelled": (PENDING.digest,), "refused": ()},
        report=Report(7, S.IDLE, R.CANCELLED, U, 11, 0, CANCEL_DETAIL),
    ),
    Case(
        "cancel/download-deferred",
        S.DOWNLOAD_DEFERRED,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
    ),
    Case(
        "cancel/await-install",
        S.AWAIT_INSTALL_AUTH,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
        report=Report(7, S.IDLE, R.CANCELLED, U, 11, 2560, CANCEL_DETAIL),
    ),
    Case(
        "cancel/install-deferred",
        S.INSTALL_DEFERRED,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
    ),
    Case(
        "cancel/download-held",
        S.DOWNLOAD_HELD,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        start={"held": ("lock backup",), "locks": LOCKED},
        # The lock belongs to its holder, not to the update: it outlives the cancel.
        after={**_CLEARED, "cancelled": (PENDING.digest,), "locks": LOCKED},
        policy=GATED,
    ),
    Case(
        "cancel/install-held",
        S.INSTALL_HELD,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        start={"held": ("maintenance window",)},
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
        policy=WINDOWED,
    ),
    Case(
        "cancel/downloading",
        S.DOWNLOADING,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        start={"verified": b"\x03", "fetched": 2048, "download_started": NOW - 60},
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
        report=Report(7, S.IDLE, R.CANCELLED, U, 11, 2048, CANCEL_DETAIL),
    ),
    Case(
        "cancel/verifying",
        S.VERIFYING,
        CANCEL_PENDING,
        S.IDLE,
        _CANCELLED,
        ((S.IDLE, R.CANCELLED),),
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
    ),
    # Too late once installing: refused, and said so (once; see the test below the table).
    Case(
        "cancel/installing-refused",
        S.INSTALLING,
        CANCEL_PENDING,
        S.INSTALLING,
        (C.SendReports(),),
        ((S.INSTALLING, R.INITIAL),),
        after={"pending": PENDING.digest, "cancelled": (), "verified": FULL},
        report=Report(
            7, S.INSTALLING, R.INITIAL, U, 11, 2560, "cancel refused: the update is being installed"
        ),
    ),
    Case(
        "cancel/await-restart-refused",
        S.AWAIT_RESTART,
        CANCEL_PENDING,
        S.AWAIT_RESTART,
        (C.SendReports(),),
        ((S.AWAIT_RESTART, R.INITIAL),),
        after={"pending": PENDING.digest, "cancelled": (), "boot_id": EARLIER_BOOT},
    ),
    Case(
        "cancel/await-commit-refused",
        S.AWAIT_COMMIT,
        CANCEL_PENDING,
        S.AWAIT_COMMIT,
        (C.SendReports(),),
        ((S.AWAIT_COMMIT, R.INITIAL),),
        after={"pending": PENDING.digest, "cancelled": ()},
    ),
    Case(
        "cancel/rolling-back-refused",
        S.ROLLING_BACK,
        CANCEL_PENDING,
        S.ROLLING_BACK,
        # The update ends anyway, in FAILED; the rollback is not cut short.
        (C.SendReports(),),
        ((S.ROLLING_BACK, R.INITIAL),),
        after={"pending": PENDING.digest, "cancelled": ()},
        report=Report(
            7,
            S.ROLLING_BACK,
            R.INITIAL,
            U,
            11,
            2560,
            "cancel refused: the update is being rolled back",
        ),
    ),
    # A new manifest waits too: it is fetched once the update ended (CheckAnnouncement).
    drop("announce/installing/new-waits", S.INSTALLING, ANNOUNCE_NEW),
    drop("announce/installing/cancel-other", S.INSTALLING, CANCEL_NEW),
    drop("announce/await-restart/new-waits", S.AWAIT_RESTART, ANNOUNCE_NEW),
    drop("announce/await-commit/new-waits", S.AWAIT_COMMIT, ANNOUNCE_NEW),
    drop("announce/rolling-back/new-waits", S.ROLLING_BACK, ANNOUNCE_NEW),
    drop("announce/rolling-back/cancel-other", S.ROLLING_BACK, CANCEL_NEW),
    # One announcement may withdraw the pending update and name its replacement.
    Case(
        "cancel/downloading/and-new",
        S.DOWNLOADING,
        CANCEL_PENDING_ANNOUNCE_NEW,
        S.IDLE,
        (*_CANCELLED, C.FetchManifest(NEW_URI, NEW.digest)),
        ((S.IDLE, R.CANCELLED),),
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
    ),
    Case(
        "cancel/install-held/and-new",
        S.INSTALL_HELD,
        CANCEL_PENDING_ANNOUNCE_NEW,
        S.IDLE,
        (*_CANCELLED, C.FetchManifest(NEW_URI, NEW.digest)),
        ((S.IDLE, R.CANCELLED),),
        start={"held": ("maintenance window",)},
        after={**_CLEARED, "cancelled": (PENDING.digest,)},
        policy=WINDOWED,
    ),
    # -- announcement_received: a new manifest is fetched wherever it could be adopted ---------
    Case(
        "announce/idle/new",
        S.IDLE,
        ANNOUNCE_NEW,
        S.IDLE,
        (C.FetchManifest(NEW_URI, NEW.digest),),
    ),
    Case(
        "announce/failed/new",
        S.FAILED,
        ANNOUNCE_NEW,
        S.FAILED,
        (C.FetchManifest(NEW_URI, NEW.digest),),
    ),
    Case(
        "announce/await-download/new",
        S.AWAIT_DOWNLOAD_AUTH,
        ANNOUNCE_NEW,
        S.AWAIT_DOWNLOAD_AUTH,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/download-deferred/new",
        S.DOWNLOAD_DEFERRED,
        ANNOUNCE_NEW,
        S.DOWNLOAD_DEFERRED,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/await-install/new",
        S.AWAIT_INSTALL_AUTH,
        ANNOUNCE_NEW,
        S.AWAIT_INSTALL_AUTH,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/install-deferred/new",
        S.INSTALL_DEFERRED,
        ANNOUNCE_NEW,
        S.INSTALL_DEFERRED,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/download-held/new",
        S.DOWNLOAD_HELD,
        ANNOUNCE_NEW,
        S.DOWNLOAD_HELD,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/install-held/new",
        S.INSTALL_HELD,
        ANNOUNCE_NEW,
        S.INSTALL_HELD,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/downloading/new",
        S.DOWNLOADING,
        ANNOUNCE_NEW,
        S.DOWNLOADING,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    Case(
        "announce/verifying/new",
        S.VERIFYING,
        ANNOUNCE_NEW,
        S.VERIFYING,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        via="is_new_announcement",
    ),
    drop(
        "announce/idle/installed",
        S.IDLE,
        ev.AnnouncementReceived(10, INSTALLED_POLITE.digest, "coap://fota.example/m/10"),
    ),
    # Issue 17 §3: the update that failed before its install, announced again, is retried
    # from its verified fragments; one that failed from its install on is not.
    Case(
        "announce/failed/pending-revived",
        S.FAILED,
        ANNOUNCE_PENDING,
        S.DOWNLOADING,
        (C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
        start={"attempts": 2, "verified": b"\x01"},
        after={"attempts": 0, "verified": b"\x01"},
        via="download_clear",
    ),
    Case(
        "announce/failed/pending-revived-held",
        S.FAILED,
        ANNOUNCE_PENDING,
        S.DOWNLOAD_HELD,
        (C.SendReports(), C.CheckGates(U, "download")),
        ((S.DOWNLOAD_HELD, R.INITIAL),),
        start={"held": ("lock backup",), "locks": LOCKED},
        policy=GATED,
    ),
    drop(
        "announce/failed/pending-after-rollback",
        S.FAILED,
        ANNOUNCE_PENDING,
        start={"failure": "self-test failed: no detail"},
    ),
    drop("announce/idle/refused", S.IDLE, ANNOUNCE_NEW, start={"refused": (NEW.digest,)}),
    drop("announce/idle/cancelled", S.IDLE, ANNOUNCE_NEW, start={"cancelled": (NEW.digest,)}),
    drop("announce/idle/no-manifest", S.IDLE, ev.AnnouncementReceived(12, None, None)),
    drop("announce/idle/no-uri", S.IDLE, ev.AnnouncementReceived(12, NEW.digest, None)),
    # The pending update announced again (announcements repeat): nothing to do.
    drop("announce/await-download/pending", S.AWAIT_DOWNLOAD_AUTH, ANNOUNCE_PENDING),
    drop("announce/download-deferred/pending", S.DOWNLOAD_DEFERRED, ANNOUNCE_PENDING),
    drop("announce/await-install/pending", S.AWAIT_INSTALL_AUTH, ANNOUNCE_PENDING),
    drop("announce/install-deferred/pending", S.INSTALL_DEFERRED, ANNOUNCE_PENDING),
    drop("announce/download-held/pending", S.DOWNLOAD_HELD, ANNOUNCE_PENDING),
    drop("announce/install-held/pending", S.INSTALL_HELD, ANNOUNCE_PENDING),
    drop("announce/downloading/pending", S.DOWNLOADING, ANNOUNCE_PENDING),
    drop("announce/verifying/pending", S.VERIFYING, ANNOUNCE_PENDING),
    # -- announcement_received: a cancel of a manifest that is not pending (yet) -----------------
    # Remembered, so that a fetch of it already under way is refused when it lands.
    Case(
        "announce/idle/cancel-noted",
        S.IDLE,
        CANCEL_NEW,
        S.IDLE,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/failed/cancel-of-failed-noted",
        S.FAILED,
        CANCEL_PENDING,  # the failed update is not live: nothing to stop, its digest is noted
        S.FAILED,
        after={"cancelled": (PENDING.digest,), "pending": PENDING.digest},
        via="names_cancel",
    ),
    Case(
        "announce/await-download/cancel-noted",
        S.AWAIT_DOWNLOAD_AUTH,
        CANCEL_NEW,
        S.AWAIT_DOWNLOAD_AUTH,
        after={"cancelled": (NEW.digest,), "pending": PENDING.digest},
        via="names_cancel",
    ),
    Case(
        "announce/download-deferred/cancel-noted",
        S.DOWNLOAD_DEFERRED,
        CANCEL_NEW,
        S.DOWNLOAD_DEFERRED,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/await-install/cancel-noted",
        S.AWAIT_INSTALL_AUTH,
        CANCEL_NEW,
        S.AWAIT_INSTALL_AUTH,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/install-deferred/cancel-noted",
        S.INSTALL_DEFERRED,
        CANCEL_NEW,
        S.INSTALL_DEFERRED,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/download-held/cancel-noted",
        S.DOWNLOAD_HELD,
        CANCEL_NEW,
        S.DOWNLOAD_HELD,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/install-held/cancel-noted",
        S.INSTALL_HELD,
        CANCEL_NEW,
        S.INSTALL_HELD,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/downloading/cancel-noted",
        S.DOWNLOADING,
        CANCEL_NEW,
        S.DOWNLOADING,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    Case(
        "announce/verifying/cancel-noted",
        S.VERIFYING,
        CANCEL_NEW,
        S.VERIFYING,
        after={"cancelled": (NEW.digest,)},
        via="names_cancel",
    ),
    drop(
        "announce/idle/cancel-already-noted", S.IDLE, CANCEL_NEW, start={"cancelled": (NEW.digest,)}
    ),
    # A new manifest and the cancel of another in one announcement: both are taken.
    Case(
        "announce/idle/new-and-cancel-other",
        S.IDLE,
        CANCEL_SAME_ANNOUNCE_NEW,
        S.IDLE,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        after={"cancelled": (SAME.digest,)},
        via="is_new_announcement",
    ),
    Case(
        "announce/downloading/new-and-cancel-other",
        S.DOWNLOADING,
        CANCEL_SAME_ANNOUNCE_NEW,
        S.DOWNLOADING,
        (C.FetchManifest(NEW_URI, NEW.digest),),
        after={"cancelled": (SAME.digest,), "pending": PENDING.digest},
        via="is_new_announcement",
    ),
    Case(
        "announce/failed/new-and-cancel-of-failed",
        S.FAILED,
        CANCEL_PENDING_ANNOUNCE_NEW,
        S.FAILED,
        # The failed update is not live (no cancel to do): its digest is noted, NEW fetched.
        (C.FetchManifest(NEW_URI, NEW.digest),),
        after={"cancelled": (PENDING.digest,), "pending": PENDING.digest},
        via="is_new_announcement",
    ),
    # -- manifest_fetched: proceed at once (first install, impolite image, deadline) or ask ----
    Case(
        "fetched/idle/first-install",
        S.IDLE,
        fetched(NEW.raw),
        S.DOWNLOADING,
        # Nobody to tell on an empty device; the timer cancels are the same call as when
        # leaving a waiting state (harmless: no such timer runs in IDLE).
        (*_LEAVE, C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="none",
        after={**_ADOPTED_NEW, "download_started": NOW},
        report=Report(7, S.DOWNLOADING, R.INITIAL, N, 12, 0),
        via="download_clear",
    ),
    Case(
        "fetched/idle/first-install-skips-holds",
        S.IDLE,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (*_LEAVE, C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="none",
        start={"locks": LOCKED, "provisioned_at": NOW - 600},
        policy=replace(GATED_CONDITIONS, windows=WINDOWED.windows, quiet_period=86400.0),
        via="download_clear",
    ),
    Case(
        "fetched/idle/impolite",
        S.IDLE,
        fetched(NEW.raw),
        S.DOWNLOADING,
        # The application's hook hears of it, for information: its answer changes nothing.
        (*_LEAVE, C.Inform(N, "download"), C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="impolite",
        after=_ADOPTED_NEW,
        report=Report(7, S.DOWNLOADING, R.INITIAL, N, 12, 0),
        via="download_clear",
    ),
    Case(
        "fetched/idle/deadline-passed",
        S.IDLE,
        fetched(NEW_DUE.raw),
        S.DOWNLOADING,
        (
            *_LEAVE,
            C.NotifyForced(ND, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(ND),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        after={**_ADOPTED_DUE, "download_started": NOW},
        report=Report(7, S.DOWNLOADING, R.FORCED, ND, 12, 0, "download: deadline"),
        via="download_clear",
    ),
    Case(
        "fetched/idle/polite",
        S.IDLE,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after=_ADOPTED_NEW,
        report=Report(7, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, N, 12, 0),
    ),
    Case(
        "fetched/idle/polite-deadline-armed",
        S.IDLE,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (
            C.SendReports(),
            C.AskDownloadAuthorization(N),
            C.StartTimer("deadline", NOW + 7200.0, N),
        ),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after=_ADOPTED_NEW,
        policy=DEADLINE,
    ),
    Case(
        "fetched/idle/polite-grace-armed",
        S.IDLE,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (
            C.SendReports(),
            C.AskDownloadAuthorization(N),
            C.StartTimer("grace", NOW + 1800.0, N),
        ),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        policy=PROCEED,
    ),
    Case(
        "fetched/idle/polite-handler-no-grace",
        S.IDLE,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        policy=PROCEED,
        handler=True,
    ),
    Case(
        "fetched/failed/polite",
        S.FAILED,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        # A failed update is not live: replaced without a report, its candidate discarded.
        (C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        start={"attempts": 2, "restarts": 1, "progress": 50},
        after=_ADOPTED_NEW,
    ),
    Case(
        "fetched/failed/first-install",
        S.FAILED,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (C.DiscardCandidate(), *_LEAVE, C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="none",
        after={"pending": NEW.digest, "verified": b"\x00"},
        via="download_clear",
    ),
    Case(
        "fetched/idle/impolite-held",
        S.IDLE,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (*_LEAVE, C.Inform(N, "download"), C.SendReports(), C.CheckGates(N, "download")),
        ((S.DOWNLOAD_HELD, R.INITIAL),),
        installed="impolite",
        after=_ADOPTED_NEW,
        report=Report(7, S.DOWNLOAD_HELD, R.INITIAL, N, 12, 0),
        policy=GATED_CONDITIONS,
    ),
    Case(
        "fetched/failed/impolite-held",
        S.FAILED,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.INITIAL),),
        installed="impolite",
        start={"locks": LOCKED},
        policy=GATED,
    ),
    # -- manifest_fetched: the pending update's own manifest again (a fetch raced another) -----
    # Nothing changes: no supersede, no new first_seen, the fragments stay.
    Case(
        "fetched-again/failed",
        S.FAILED,
        fetched(PENDING.raw, PENDING_URI),
        S.FAILED,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        fetched(PENDING.raw, PENDING_URI),
        S.AWAIT_DOWNLOAD_AUTH,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/download-deferred",
        S.DOWNLOAD_DEFERRED,
        fetched(PENDING.raw, PENDING_URI),
        S.DOWNLOAD_DEFERRED,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/download-held",
        S.DOWNLOAD_HELD,
        fetched(PENDING.raw, PENDING_URI),
        S.DOWNLOAD_HELD,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/downloading",
        S.DOWNLOADING,
        fetched(PENDING.raw, PENDING_URI),
        S.DOWNLOADING,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/verifying",
        S.VERIFYING,
        fetched(PENDING.raw, PENDING_URI),
        S.VERIFYING,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/await-install",
        S.AWAIT_INSTALL_AUTH,
        fetched(PENDING.raw, PENDING_URI),
        S.AWAIT_INSTALL_AUTH,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/install-deferred",
        S.INSTALL_DEFERRED,
        fetched(PENDING.raw, PENDING_URI),
        S.INSTALL_DEFERRED,
        via="is_known_manifest",
    ),
    Case(
        "fetched-again/install-held",
        S.INSTALL_HELD,
        fetched(PENDING.raw, PENDING_URI),
        S.INSTALL_HELD,
        via="is_known_manifest",
    ),
    # -- manifest_fetched: a newer manifest supersedes a live update -------------------------
    # Reported and told about the old one; its fragments are kept when the new manifest
    # describes the same image the same way (SAME), else discarded (NEW).
    Case(
        "supersede/await-download/ask",
        S.AWAIT_DOWNLOAD_AUTH,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_NEW, C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        start={"deferred_total": 1200.0},
        after=_ADOPTED_NEW,
        report=Report(8, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, N, 12, 0),
        via="candidate_must_ask",
    ),
    Case(
        "supersede/download-deferred/ask",
        S.DOWNLOAD_DEFERRED,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_NEW, C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        after=_ADOPTED_NEW,
    ),
    Case(
        "supersede/await-install/ask-same-image-kept",
        S.AWAIT_INSTALL_AUTH,
        fetched(SAME.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_SAME, C.SendReports(), C.AskDownloadAuthorization(SM)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        after={**_FRESH, "pending": SAME.digest, "verified": FULL},
        report=Report(8, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, SM, 12, 2560),
    ),
    Case(
        "supersede/install-deferred/ask",
        S.INSTALL_DEFERRED,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_NEW, C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        after=_ADOPTED_NEW,
        report=Report(8, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, N, 12, 0),
    ),
    Case(
        "supersede/download-held/ask",
        S.DOWNLOAD_HELD,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_NEW, C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        start={"held": ("lock backup",), "locks": LOCKED},
        after={**_ADOPTED_NEW, "locks": LOCKED},
        policy=GATED,
    ),
    Case(
        "supersede/install-held/ask-same-image-kept",
        S.INSTALL_HELD,
        fetched(SAME.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_SAME, C.SendReports(), C.AskDownloadAuthorization(SM)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        start={"held": ("maintenance window",)},
        after={**_FRESH, "pending": SAME.digest, "verified": FULL},
        policy=WINDOWED,
    ),
    Case(
        "supersede/downloading/ask-discards",
        S.DOWNLOADING,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_NEW, C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        start={"verified": b"\x03", "fetched": 2048, "download_started": NOW - 60},
        after={**_ADOPTED_NEW, "download_started": None},
        report=Report(8, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, N, 12, 0),
    ),
    Case(
        "supersede/downloading/ask-same-image-kept",
        S.DOWNLOADING,
        fetched(SAME.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_SAME, C.SendReports(), C.AskDownloadAuthorization(SM)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        start={"verified": b"\x03", "fetched": 2048},
        after={**_FRESH, "pending": SAME.digest, "verified": b"\x03"},
        report=Report(8, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, SM, 12, 2048),
    ),
    Case(
        "supersede/verifying/ask",
        S.VERIFYING,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (*_BY_NEW, C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED), (S.AWAIT_DOWNLOAD_AUTH, R.INITIAL)),
        after=_ADOPTED_NEW,
        report=Report(7, S.AWAIT_DOWNLOAD_AUTH, R.SUPERSEDED, U, 11, 2560, BY_NEW),
    ),
    # A successor already past its deadline proceeds at once, forced.
    Case(
        "supersede/await-download/due-forced",
        S.AWAIT_DOWNLOAD_AUTH,
        fetched(NEW_DUE.raw),
        S.DOWNLOADING,
        (
            *_BY_DUE,
            C.DiscardCandidate(),
            *_LEAVE,
            C.NotifyForced(ND, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(ND),
        ),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.FORCED)),
        after={**_ADOPTED_DUE, "download_started": NOW},
        report=Report(8, S.DOWNLOADING, R.FORCED, ND, 12, 0, "download: deadline"),
    ),
    Case(
        "supersede/download-deferred/due-forced",
        S.DOWNLOAD_DEFERRED,
        fetched(NEW_DUE.raw),
        S.DOWNLOADING,
        (
            *_BY_DUE,
            C.DiscardCandidate(),
            *_LEAVE,
            C.NotifyForced(ND, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(ND),
        ),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.FORCED)),
        after=_ADOPTED_DUE,
    ),
    Case(
        "supersede/await-install/due-forced",
        S.AWAIT_INSTALL_AUTH,
        fetched(NEW_DUE.raw),
        S.DOWNLOADING,
        (
            *_BY_DUE,
            C.DiscardCandidate(),
            *_LEAVE,
            C.NotifyForced(ND, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(ND),
        ),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.FORCED)),
        after=_ADOPTED_DUE,
    ),
    Case(
        "supersede/install-deferred/due-forced-past-holds",
        S.INSTALL_DEFERRED,
        fetched(NEW_DUE.raw),
        S.DOWNLOADING,
        (
            *_BY_DUE,
            C.DiscardCandidate(),
            *_LEAVE,
            C.NotifyForced(ND, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(ND),
        ),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.FORCED)),
        start={"locks": LOCKED},
        after={**_ADOPTED_DUE, "locks": LOCKED},
        policy=GATED,
    ),
    Case(
        "supersede/download-held/impolite",
        S.DOWNLOAD_HELD,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.StartDownload(N),
        ),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.INITIAL)),
        installed="impolite",
        start={"held": ("condition battery",)},
        after={**_ADOPTED_NEW, "download_started": NOW},
        policy=GATED,
    ),
    Case(
        "supersede/install-held/impolite-same-image-kept",
        S.INSTALL_HELD,
        fetched(SAME.raw),
        S.DOWNLOADING,
        (*_BY_SAME, *_LEAVE, C.Inform(SM, "download"), C.SendReports(), C.StartDownload(SM)),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.INITIAL)),
        installed="impolite",
        start={"held": ("maintenance window",)},
        after={**_FRESH, "pending": SAME.digest, "verified": FULL},
        policy=WINDOWED,
    ),
    Case(
        "supersede/downloading/impolite-same-image-kept",
        S.DOWNLOADING,
        fetched(SAME.raw),
        S.DOWNLOADING,
        (*_BY_SAME, *_LEAVE, C.Inform(SM, "download"), C.SendReports(), C.StartDownload(SM)),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.INITIAL)),
        installed="impolite",
        start={"verified": b"\x03", "fetched": 2048, "download_started": NOW - 60},
        after={**_FRESH, "pending": SAME.digest, "verified": b"\x03", "download_started": NOW},
        report=Report(8, S.DOWNLOADING, R.INITIAL, SM, 12, 2048),
        via="download_clear",
    ),
    Case(
        "supersede/downloading/first-install-discards",
        S.DOWNLOADING,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (*_BY_NEW, C.DiscardCandidate(), *_LEAVE, C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.INITIAL)),
        installed="none",
        start={"verified": b"\x03"},
        after=_ADOPTED_NEW,
        via="download_clear",
    ),
    Case(
        "supersede/verifying/first-install",
        S.VERIFYING,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (*_BY_NEW, C.DiscardCandidate(), *_LEAVE, C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.SUPERSEDED), (S.DOWNLOADING, R.INITIAL)),
        installed="none",
        after=_ADOPTED_NEW,
    ),
    # Impolite running image, downloads held by a condition: the successor waits in HELD.
    Case(
        "supersede/await-download/impolite-held",
        S.AWAIT_DOWNLOAD_AUTH,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        after=_ADOPTED_NEW,
        policy=GATED_CONDITIONS,
    ),
    Case(
        "supersede/download-deferred/impolite-held",
        S.DOWNLOAD_DEFERRED,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        after=_ADOPTED_NEW,
        policy=GATED_CONDITIONS,
    ),
    Case(
        "supersede/await-install/impolite-held",
        S.AWAIT_INSTALL_AUTH,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        after=_ADOPTED_NEW,
        policy=GATED_CONDITIONS,
    ),
    Case(
        "supersede/install-deferred/impolite-held",
        S.INSTALL_DEFERRED,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        after=_ADOPTED_NEW,
        policy=GATED_CONDITIONS,
    ),
    Case(
        "supersede/download-held/impolite-held",
        S.DOWNLOAD_HELD,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        start={"held": ("condition battery",)},
        # The old update's hold is forgotten: the successor reports its own when checked.
        after=_ADOPTED_NEW,
        policy=GATED_CONDITIONS,
    ),
    Case(
        "supersede/install-held/impolite-held",
        S.INSTALL_HELD,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        start={"locks": LOCKED, "held": ("lock backup",)},
        after={**_ADOPTED_NEW, "locks": LOCKED},
        policy=GATED,
    ),
    Case(
        "supersede/downloading/impolite-held",
        S.DOWNLOADING,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        start={"verified": b"\x01"},
        after=_ADOPTED_NEW,
        policy=GATED_CONDITIONS,
    ),
    Case(
        "supersede/verifying/impolite-held",
        S.VERIFYING,
        fetched(NEW.raw),
        S.DOWNLOAD_HELD,
        (
            *_BY_NEW,
            C.DiscardCandidate(),
            *_LEAVE,
            C.Inform(N, "download"),
            C.SendReports(),
            C.CheckGates(N, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.SUPERSEDED), (S.DOWNLOAD_HELD, R.INITIAL)),
        installed="impolite",
        after=_ADOPTED_NEW,
        report=Report(8, S.DOWNLOAD_HELD, R.INITIAL, N, 12, 0),
        policy=GATED_CONDITIONS,
    ),
    # -- manifest_fetched: refused, one case per result code -----------------------------------
    Case(
        "fetched/idle/refused-bad-signature",
        S.IDLE,
        fetched(RAW_BAD_SIGNATURE),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.BAD_SIGNATURE),),
        after={"refused": (sha256(RAW_BAD_SIGNATURE),), "pending": None},
        report=Report(
            7,
            S.IDLE,
            R.BAD_SIGNATURE,
            # Filed under its bytes (a bad signature vouches for no identity), reported
            # under the identity the server announced.
            update_id_of(envelope_id(RAW_BAD_SIGNATURE) or b""),
            detail=f"manifest signature: does not verify with key {KID.hex()}",
        ),
    ),
    Case(
        "fetched/idle/refused-unknown-key",
        S.IDLE,
        fetched(RAW_UNKNOWN_KEY),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.UNKNOWN_KEY),),
        after={"refused": ()},  # a local setting's refusal: in memory only (issue 17 §3)
    ),
    Case(
        "fetched/idle/refused-rollback",
        S.IDLE,
        fetched(RAW_ROLLBACK),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.ROLLBACK),),
        after={"refused": (sha256(RAW_ROLLBACK),)},
    ),
    Case(
        "fetched/idle/refused-wrong-device-class",
        S.IDLE,
        fetched(RAW_WRONG_CLASS),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.WRONG_DEVICE_CLASS),),
        installed="none",
        after={"refused": ()},  # a local setting's refusal: in memory only (issue 17 §3)
    ),
    Case(
        "fetched/idle/refused-oversize-image",
        S.IDLE,
        fetched(RAW_OVERSIZE_IMAGE),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.OVERSIZE),),
        after={"refused": ()},  # a local setting's refusal: in memory only (issue 17 §3)
    ),
    Case(
        "fetched/idle/refused-cut-off",
        S.IDLE,
        ev.ManifestFetched(raw=RAW_CUT_OFF, uri=NEW_URI, digest=NEW.digest),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.OVERSIZE),),
        installed="none",
        after={"refused": (NEW.digest,)},
    ),
    Case(
        "fetched/idle/refused-malformed",
        S.IDLE,
        fetched(RAW_MALFORMED),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.MALFORMED),),
        after={"refused": (sha256(RAW_MALFORMED),)},
    ),
    Case(
        "fetched/idle/refused-cancelled",
        S.IDLE,
        fetched(NEW.raw),  # its cancel came while the fetch was under way
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.CANCELLED),),
        start={"cancelled": (NEW.digest,)},
        after={"refused": (NEW.digest,), "pending": None},
        report=Report(
            7, S.IDLE, R.CANCELLED, N, detail="manifest digest: the server cancelled this manifest"
        ),
    ),
    Case(
        "fetched/idle/rejected-fetch-raced",
        S.IDLE,
        fetched(NEW.raw),  # a second fetch of it (the announcement repeated) landed late
        S.IDLE,
        # The application rejected NEW "for good": it does not become the pending update
        # again, and it is not refused (nor reported) a second time.
        start={"rejected": (NEW.digest,)},
        after={"rejected": (NEW.digest,), "pending": None},
        via="is_known_manifest",
    ),
    Case(
        "fetched/idle/installed-fetch-raced",
        S.IDLE,
        fetched(INSTALLED_POLITE.raw),  # the running image's own manifest, fetched once more
        S.IDLE,
        via="is_known_manifest",
    ),
    Case(
        "fetched/failed/refused-rollback",
        S.FAILED,
        fetched(RAW_ROLLBACK),
        S.FAILED,
        (C.SendReports(),),
        ((S.FAILED, R.ROLLBACK),),
        after={"refused": (sha256(RAW_ROLLBACK),), "pending": PENDING.digest, "verified": b"\x03"},
        report=Report(
            7,
            S.FAILED,
            R.ROLLBACK,
            update_id_of(sha256(RAW_ROLLBACK)),
            detail="manifest sequence: 9 is not greater than 10 (replay or downgrade)",
        ),
    ),
    # A live update is left alone by a manifest that is not newer than it.
    Case(
        "fetched/await-download/refused-replay",
        S.AWAIT_DOWNLOAD_AUTH,
        fetched(RAW_REPLAY),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.SendReports(),),
        ((S.AWAIT_DOWNLOAD_AUTH, R.ROLLBACK),),
        after={"refused": (sha256(RAW_REPLAY),), "pending": PENDING.digest, "first_seen": SEEN},
        report=Report(
            7,
            S.AWAIT_DOWNLOAD_AUTH,
            R.ROLLBACK,
            update_id_of(sha256(RAW_REPLAY)),
            detail="manifest sequence: 11 is not greater than 11 (replay or downgrade)",
        ),
        via="manifest_refused",
    ),
    Case(
        "fetched/download-deferred/refused-rollback",
        S.DOWNLOAD_DEFERRED,
        fetched(RAW_ROLLBACK),
        S.DOWNLOAD_DEFERRED,
        (C.SendReports(),),
        ((S.DOWNLOAD_DEFERRED, R.ROLLBACK),),
        after={"refused": (sha256(RAW_ROLLBACK),), "defer_until": DEFER_UNTIL},
        report=Report(
            7,
            S.DOWNLOAD_DEFERRED,
            R.ROLLBACK,
            update_id_of(sha256(RAW_ROLLBACK)),
            detail="manifest sequence: 9 is not greater than 11 (replay or downgrade)",
        ),
        via="manifest_refused",
    ),
    Case(
        "fetched/await-install/refused-bad-signature",
        S.AWAIT_INSTALL_AUTH,
        fetched(RAW_BAD_SIGNATURE),
        S.AWAIT_INSTALL_AUTH,
        (C.SendReports(),),
        ((S.AWAIT_INSTALL_AUTH, R.BAD_SIGNATURE),),
        after={"refused": (sha256(RAW_BAD_SIGNATURE),), "pending": PENDING.digest},
        via="manifest_refused",
    ),
    Case(
        "fetched/install-deferred/refused-rollback",
        S.INSTALL_DEFERRED,
        fetched(RAW_ROLLBACK),
        S.INSTALL_DEFERRED,
        (C.SendReports(),),
        ((S.INSTALL_DEFERRED, R.ROLLBACK),),
        after={"refused": (sha256(RAW_ROLLBACK),)},
        via="manifest_refused",
    ),
    Case(
        "fetched/download-held/refused-rollback",
        S.DOWNLOAD_HELD,
        fetched(RAW_ROLLBACK),
        S.DOWNLOAD_HELD,
        (C.SendReports(),),
        ((S.DOWNLOAD_HELD, R.ROLLBACK),),
        after={"refused": (sha256(RAW_ROLLBACK),), "pending": PENDING.digest},
        policy=GATED,
        via="manifest_refused",
    ),
    Case(
        "fetched/install-held/refused-cancelled",
        S.INSTALL_HELD,
        fetched(NEW.raw),
        S.INSTALL_HELD,
        (C.SendReports(),),
        ((S.INSTALL_HELD, R.CANCELLED),),
        start={"cancelled": (NEW.digest,)},
        after={"refused": (NEW.digest,), "pending": PENDING.digest},
        via="manifest_refused",
    ),
    Case(
        "fetched/downloading/refused-rollback",
        S.DOWNLOADING,
        fetched(RAW_ROLLBACK),
        S.DOWNLOADING,
        (C.SendReports(),),
        ((S.DOWNLOADING, R.ROLLBACK),),
        start={"verified": b"\x01"},
        after={"refused": (sha256(RAW_ROLLBACK),), "verified": b"\x01"},
        via="manifest_refused",
    ),
    Case(
        "fetched/verifying/refused-wrong-device-class",
        S.VERIFYING,
        fetched(RAW_WRONG_CLASS),
        S.VERIFYING,
        (C.SendReports(),),
        ((S.VERIFYING, R.WRONG_DEVICE_CLASS),),
        after={"refused": (), "pending": PENDING.digest},
        via="manifest_refused",
    ),
    # -- authorized: the application's yes, reported as AUTHORIZED on entering the step ------
    Case(
        "authorized/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Authorized(U),
        S.DOWNLOADING,
        (*_LEAVE, C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.AUTHORIZED),),
        after={"download_started": NOW, "forced": ""},
        report=Report(7, S.DOWNLOADING, R.AUTHORIZED, U, 11, 0, "download"),
    ),
    Case(
        "authorized/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Authorized(U),
        S.DOWNLOADING,
        # The deferral ends: its ten minutes are added to the update's cumulative deferral.
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.AUTHORIZED),),
        after={
            "defer_until": None,
            "defer_since": None,
            "defer_reason": "",
            "deferred_total": 600.0,
        },
    ),
    Case(
        "authorized/await-download/not-held-by-default",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Authorized(U),
        S.DOWNLOADING,
        # Locks, windows and conditions hold installs; downloads only with gates_download.
        (*_LEAVE, C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.AUTHORIZED),),
        start={"locks": LOCKED},
        policy=replace(CONDITIONS, windows=WINDOWED.windows),
    ),
    Case(
        "authorized/await-download/held-by-lock",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Authorized(U),
        S.DOWNLOAD_HELD,
        (*_LEAVE, C.SendReports(), C.CheckGates(U, "download")),
        ((S.DOWNLOAD_HELD, R.AUTHORIZED),),
        start={"locks": LOCKED},
        after={"locks": LOCKED, "held": (), "download_started": None},
        report=Report(7, S.DOWNLOAD_HELD, R.AUTHORIZED, U, 11, 0, "download"),
        policy=GATED,
    ),
    Case(
        "authorized/download-deferred/held-by-condition",
        S.DOWNLOAD_DEFERRED,
        ev.Authorized(U),
        S.DOWNLOAD_HELD,
        # Conditions are the engine's to evaluate: the update waits for its answer.
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.CheckGates(U, "download")),
        ((S.DOWNLOAD_HELD, R.AUTHORIZED),),
        after={"defer_until": None, "deferred_total": 600.0},
        policy=GATED_CONDITIONS,
    ),
    Case(
        "authorized/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALLING,
        (*_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.AUTHORIZED),),
        report=Report(7, S.INSTALLING, R.AUTHORIZED, U, 11, 2560, "install"),
    ),
    Case(
        "authorized/await-install/window-open",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALLING,
        (*_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.AUTHORIZED),),
        policy=OPEN_NOW,
    ),
    Case(
        "authorized/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Authorized(U),
        S.INSTALLING,
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.AUTHORIZED),),
        after={"defer_until": None, "defer_reason": "", "deferred_total": 600.0},
    ),
    Case(
        "authorized/await-install/held-by-lock",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALL_HELD,
        (*_LEAVE, C.SendReports(), C.CheckGates(U, "install")),
        ((S.INSTALL_HELD, R.AUTHORIZED),),
        start={"locks": LOCKED},
        report=Report(7, S.INSTALL_HELD, R.AUTHORIZED, U, 11, 2560, "install"),
    ),
    Case(
        "authorized/await-install/held-by-window",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALL_HELD,
        (*_LEAVE, C.SendReports(), C.CheckGates(U, "install")),
        ((S.INSTALL_HELD, R.AUTHORIZED),),
        policy=WINDOWED,
    ),
    Case(
        "authorized/await-install/held-by-quiet-period",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALL_HELD,
        (*_LEAVE, C.SendReports(), C.CheckGates(U, "install")),
        ((S.INSTALL_HELD, R.AUTHORIZED),),
        start={"provisioned_at": NOW - 600.0},
        policy=QUIET,
    ),
    Case(
        "authorized/await-install/quiet-period-over",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALLING,
        (*_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.AUTHORIZED),),
        start={"provisioned_at": NOW - 86400.0},
        policy=QUIET,
    ),
    Case(
        "authorized/install-deferred/held-by-condition",
        S.INSTALL_DEFERRED,
        ev.Authorized(U),
        S.INSTALL_HELD,
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.CheckGates(U, "install")),
        ((S.INSTALL_HELD, R.AUTHORIZED),),
        after={"defer_until": None, "deferred_total": 600.0},
        policy=CONDITIONS,
    ),
    Case(
        "authorized/await-install/expired-lock-holds-nothing",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALLING,
        (*_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.AUTHORIZED),),
        start={"locks": (("crashed", NOW),)},
    ),
    Case(
        "authorized/await-install/deadline-passed-ignores-holds",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALLING,
        # The application's yes is reported; the lock and the window it goes through are
        # overruled by the deadline: reported and told as forced.
        (
            *_LEAVE,
            C.SendReports(),
            C.SendReports(),
            C.NotifyForced(U, "install", "deadline"),
            C.Install(U),
        ),
        ((S.INSTALLING, R.AUTHORIZED), (S.INSTALLING, R.FORCED)),
        start={"locks": LOCKED},
        after={"forced": "deadline"},
        report=Report(8, S.INSTALLING, R.FORCED, U, 11, 2560, "install: deadline"),
        policy=LATE_WINDOWED,
    ),
    drop("authorized/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.Authorized(STALE)),
    drop("authorized/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.Authorized(STALE)),
    drop("authorized/await-install/stale", S.AWAIT_INSTALL_AUTH, ev.Authorized(STALE)),
    drop("authorized/install-deferred/stale", S.INSTALL_DEFERRED, ev.Authorized(STALE)),
    # -- deferred: granted, cut to the bound and the deadline -------------------------------------
    Case(
        "deferred/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOAD_DEFERRED,
        # The deferral's own timer replaces the grace and deadline timers (it is cut to the
        # deadline, so it fires no later).
        (*_LEAVE, C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        after={
            "defer_until": LATER,
            "defer_since": NOW,
            "defer_reason": "night",
            "deferred_total": 0.0,
        },
        report=Report(7, S.DOWNLOAD_DEFERRED, R.DEFERRED, U, 11, 0, "night", 1_007_200),
    ),
    Case(
        "deferred/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOAD_DEFERRED,
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        after={
            "defer_until": LATER,
            "defer_since": NOW,
            "defer_reason": "night",
            "deferred_total": 600.0,
        },
    ),
    Case(
        "deferred/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.INSTALL_DEFERRED,
        (*_LEAVE, C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.INSTALL_DEFERRED, R.DEFERRED),),
        after={"defer_until": LATER, "defer_reason": "night"},
        report=Report(7, S.INSTALL_DEFERRED, R.DEFERRED, U, 11, 2560, "night", 1_007_200),
    ),
    Case(
        "deferred/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Deferred(U, LATER, "night"),
        S.INSTALL_DEFERRED,
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.INSTALL_DEFERRED, R.DEFERRED),),
        after={"defer_until": LATER, "defer_reason": "night", "deferred_total": 600.0},
    ),
    Case(
        "deferred/await-download/clamped-to-bound",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOAD_DEFERRED,
        # An hour of the two-hour bound is left: the deferral ends an hour from now.
        (*_LEAVE, C.SendReports(), C.StartTimer("defer", NOW + 3600.0, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        start={"deferred_total": 3600.0},
        after={"defer_until": NOW + 3600.0, "defer_since": NOW, "deferred_total": 3600.0},
        report=Report(7, S.DOWNLOAD_DEFERRED, R.DEFERRED, U, 11, 0, "night", 1_003_600),
        policy=BOUNDED,
    ),
    Case(
        "deferred/install-deferred/clamped-to-bound",
        S.INSTALL_DEFERRED,
        ev.Deferred(U, LATER, "night"),
        S.INSTALL_DEFERRED,
        # 6000 s before plus the current 600 s: 600 s of the bound are left.
        (C.CancelTimer("defer"), *_LEAVE, C.SendReports(), C.StartTimer("defer", NOW + 600.0, U)),
        ((S.INSTALL_DEFERRED, R.DEFERRED),),
        start={"deferred_total": 6000.0},
        after={"defer_until": NOW + 600.0, "defer_since": NOW, "deferred_total": 6600.0},
        policy=BOUNDED,
    ),
    Case(
        "deferred/await-install/clamped-to-deadline",
        S.AWAIT_INSTALL_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.INSTALL_DEFERRED,
        (*_LEAVE, C.SendReports(), C.StartTimer("defer", DUE, U)),
        ((S.INSTALL_DEFERRED, R.DEFERRED),),
        after={"defer_until": DUE},
        report=Report(7, S.INSTALL_DEFERRED, R.DEFERRED, U, 11, 2560, "night", 1_003_600),
        policy=DEADLINE,
    ),
    Case(
        "deferred/await-download/half-a-second-left",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOAD_DEFERRED,
        # Half a second of the bound is left: granted, for half a second.
        (*_LEAVE, C.SendReports(), C.StartTimer("defer", NOW + 0.5, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        start={"deferred_total": 7199.5},
        after={"defer_until": NOW + 0.5, "deferred_total": 7199.5},
        policy=BOUNDED,
    ),
    Case(
        "deferred/await-download/bound-spent-but-rounding",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOADING,
        # Less than a millisecond left is a rounding error of adding the deferrals up
        # (policy.SPENT): the bound is spent, not granted as a deferral of no length.
        (
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        start={"deferred_total": 7199.9995},
        after={"forced": "deferral limit", "defer_until": None, "deferred_total": 7199.9995},
        policy=BOUNDED,
    ),
    Case(
        "deferred/await-download/until-past-is-granted",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, NOW - 5.0),
        S.DOWNLOAD_DEFERRED,
        # Nothing forces the update: the deferral is granted, ends at once, and asks again.
        (*_LEAVE, C.SendReports(), C.StartTimer("defer", NOW - 5.0, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        after={"defer_until": NOW - 5.0},
    ),
    # -- deferred: refused (bound spent, deadline passed): the step proceeds, forced ----------
    Case(
        "deferred/await-download/bound-spent-forced",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOADING,
        (
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        start=SPENT,
        after={"forced": "deferral limit", "defer_until": None, "deferred_total": 7200.0},
        report=Report(7, S.DOWNLOADING, R.FORCED, U, 11, 0, "download: deferral limit"),
        policy=BOUNDED,
    ),
    Case(
        "deferred/download-deferred/deadline-passed-forced",
        S.DOWNLOAD_DEFERRED,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOADING,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        after={"forced": "deadline", "defer_until": None, "deferred_total": 600.0},
        report=Report(7, S.DOWNLOADING, R.FORCED, U, 11, 0, "download: deadline"),
        policy=LATE,
    ),
    Case(
        "deferred/await-download/bound-spent-held",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER),
        S.DOWNLOAD_HELD,
        # Only the deadline forces past local holds: a spent bound waits for the lock.
        (
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.FORCED),),
        start={**SPENT, "locks": LOCKED},
        after={"forced": "deferral limit"},
        report=Report(7, S.DOWNLOAD_HELD, R.FORCED, U, 11, 0, "download: deferral limit"),
        policy=BOUNDED_GATED,
    ),
    Case(
        "deferred/download-deferred/bound-spent-held",
        S.DOWNLOAD_DEFERRED,
        ev.Deferred(U, LATER),
        S.DOWNLOAD_HELD,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.FORCED),),
        start={**SPENT_DEFERRED, "locks": LOCKED},
        after={"forced": "deferral limit", "deferred_total": 7200.0, "defer_until": None},
        policy=BOUNDED_GATED,
    ),
    Case(
        "deferred/await-install/deadline-passed-forced",
        S.AWAIT_INSTALL_AUTH,
        ev.Deferred(U, LATER),
        S.INSTALLING,
        (*_LEAVE, C.NotifyForced(U, "install", "deadline"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.FORCED),),
        start={"locks": LOCKED},  # the deadline forces past the lock too
        after={"forced": "deadline"},
        report=Report(7, S.INSTALLING, R.FORCED, U, 11, 2560, "install: deadline"),
        policy=LATE,
    ),
    Case(
        "deferred/await-install/critical-past-its-deadline",
        S.AWAIT_INSTALL_AUTH,
        ev.Deferred(CD, LATER),
        S.INSTALLING,
        # The manifest's own deadline: a critical update past it is never deferred again.
        (*_LEAVE, C.NotifyForced(CD, "install", "deadline"), C.SendReports(), C.Install(CD)),
        ((S.INSTALLING, R.FORCED),),
        after={"forced": "deadline", "pending": CRITICAL_DUE.digest},
        report=Report(7, S.INSTALLING, R.FORCED, CD, 11, 2560, "install: deadline"),
        pending=CRITICAL_DUE,
    ),
    Case(
        "deferred/install-deferred/bound-spent-forced",
        S.INSTALL_DEFERRED,
        ev.Deferred(U, LATER),
        S.INSTALLING,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.Install(U),
        ),
        ((S.INSTALLING, R.FORCED),),
        start=SPENT_DEFERRED,
        after={"forced": "deferral limit", "deferred_total": 7200.0},
        policy=BOUNDED,
    ),
    Case(
        "deferred/await-install/bound-spent-held",
        S.AWAIT_INSTALL_AUTH,
        ev.Deferred(U, LATER),
        S.INSTALL_HELD,
        (
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "install"),
        ),
        ((S.INSTALL_HELD, R.FORCED),),
        start={**SPENT, "locks": LOCKED},
        after={"forced": "deferral limit"},
        report=Report(7, S.INSTALL_HELD, R.FORCED, U, 11, 2560, "install: deferral limit"),
        policy=BOUNDED,
    ),
    Case(
        "deferred/install-deferred/bound-spent-held",
        S.INSTALL_DEFERRED,
        ev.Deferred(U, LATER),
        S.INSTALL_HELD,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "install"),
        ),
        ((S.INSTALL_HELD, R.FORCED),),
        start=SPENT_DEFERRED,
        after={"forced": "deferral limit", "deferred_total": 7200.0},
        policy=BOUNDED_WINDOWED,
    ),
    drop("deferred/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.Deferred(STALE, LATER)),
    drop("deferred/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.Deferred(STALE, LATER)),
    drop("deferred/await-install/stale", S.AWAIT_INSTALL_AUTH, ev.Deferred(STALE, LATER)),
    drop("deferred/install-deferred/stale", S.INSTALL_DEFERRED, ev.Deferred(STALE, LATER)),
    # -- rejected: from a waiting or held state, unless a forcing rule applies ------------------
    Case(
        "rejected/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            *_STOP,
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "rejected": (PENDING.digest,)},
        report=Report(7, S.IDLE, R.REJECTED, U, 11, 0, "not wanted"),
    ),
    Case(
        "rejected/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            C.CancelTimer("defer"),
            *_STOP,
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "rejected": (PENDING.digest,)},
    ),
    Case(
        "rejected/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            *_STOP,
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "rejected": (PENDING.digest,)},
        report=Report(7, S.IDLE, R.REJECTED, U, 11, 2560, "not wanted"),
    ),
    Case(
        "rejected/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            C.CancelTimer("defer"),
            *_STOP,
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "rejected": (PENDING.digest,)},
    ),
    Case(
        "rejected/download-held",
        S.DOWNLOAD_HELD,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            *_STOP,
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        start={"held": ("lock backup",), "locks": LOCKED},
        after={**_CLEARED, "rejected": (PENDING.digest,), "locks": LOCKED},
        policy=GATED,
    ),
    Case(
        "rejected/install-held/forced-by-nobody-answering",
        S.INSTALL_HELD,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        # "Nobody answered" forces only the wait for an answer: a late answer may still say no.
        (
            *_STOP,
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        start={"forced": "unanswered", "held": ("maintenance window",)},
        after={**_CLEARED, "rejected": (PENDING.digest,)},
        policy=PROCEED_WINDOWED,
    ),
    drop("rejected/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.Rejected(STALE)),
    drop("rejected/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.Rejected(STALE)),
    drop("rejected/await-install/stale", S.AWAIT_INSTALL_AUTH, ev.Rejected(STALE)),
    drop("rejected/install-deferred/stale", S.INSTALL_DEFERRED, ev.Rejected(STALE)),
    drop("rejected/download-held/stale", S.DOWNLOAD_HELD, ev.Rejected(STALE)),
    drop("rejected/install-held/stale", S.INSTALL_HELD, ev.Rejected(STALE)),
    drop(
        "rejected/await-install/deadline-passed",
        S.AWAIT_INSTALL_AUTH,
        ev.Rejected(U),
        policy=LATE,
    ),
    drop(
        "rejected/download-deferred/bound-spent",
        S.DOWNLOAD_DEFERRED,
        ev.Rejected(U),
        start=SPENT_DEFERRED,
        policy=BOUNDED,
    ),
    drop(
        "rejected/install-held/bound-spent",
        S.INSTALL_HELD,
        ev.Rejected(U),
        start={**SPENT, "forced": "deferral limit", "locks": LOCKED},
        policy=BOUNDED,
    ),
    # Under an impolite running image the application is told, not asked: it cannot say no.
    drop(
        "rejected/download-held/impolite",
        S.DOWNLOAD_HELD,
        ev.Rejected(U),
        "impolite",
        start={"held": ("lock backup",), "locks": LOCKED},
        policy=GATED,
    ),
    drop(
        "rejected/install-held/impolite",
        S.INSTALL_HELD,
        ev.Rejected(U),
        "impolite",
        start={"held": ("maintenance window",)},
        policy=WINDOWED,
    ),
    # -- resume_requested -----------------------------------------------------------------------
    Case(
        "resume/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.ResumeRequested(),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.CancelTimer("defer"), C.SendReports(), C.AskDownloadAuthorization(U)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": "", "deferred_total": 600.0},
    ),
    Case(
        "resume/install-deferred",
        S.INSTALL_DEFERRED,
        ev.ResumeRequested(),
        S.AWAIT_INSTALL_AUTH,
        # Asking again re-arms the deadline timer the deferral had replaced.
        (
            C.CancelTimer("defer"),
            C.SendReports(),
            C.AskInstallAuthorization(U),
            C.StartTimer("deadline", DUE, U),
        ),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": "", "deferred_total": 600.0},
        policy=DEADLINE,
    ),
    # Resumed past the deadline or the bound (the device slept through its timer): asking
    # again could only be answered by a deferral that is not granted; the step proceeds, forced.
    Case(
        "resume/download-deferred/deadline-passed-forced",
        S.DOWNLOAD_DEFERRED,
        ev.ResumeRequested(),
        S.DOWNLOADING,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        after={"forced": "deadline", "defer_until": None, "deferred_total": 600.0},
        report=Report(7, S.DOWNLOADING, R.FORCED, U, 11, 0, "download: deadline"),
        policy=LATE,
    ),
    Case(
        "resume/download-deferred/bound-spent-held",
        S.DOWNLOAD_DEFERRED,
        ev.ResumeRequested(),
        S.DOWNLOAD_HELD,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.FORCED),),
        start={**SPENT_DEFERRED, "locks": LOCKED},
        after={"forced": "deferral limit", "deferred_total": 7200.0, "locks": LOCKED},
        policy=BOUNDED_GATED,
    ),
    Case(
        "resume/install-deferred/bound-spent-forced",
        S.INSTALL_DEFERRED,
        ev.ResumeRequested(),
        S.INSTALLING,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.Install(U),
        ),
        ((S.INSTALLING, R.FORCED),),
        start=SPENT_DEFERRED,
        after={"forced": "deferral limit", "deferred_total": 7200.0, "defer_until": None},
        report=Report(7, S.INSTALLING, R.FORCED, U, 11, 2560, "install: deferral limit"),
        policy=BOUNDED,
    ),
    Case(
        "resume/install-deferred/bound-spent-held",
        S.INSTALL_DEFERRED,
        ev.ResumeRequested(),
        S.INSTALL_HELD,
        # Only the deadline forces past local holds: a spent bound waits for the window.
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "install"),
        ),
        ((S.INSTALL_HELD, R.FORCED),),
        start=SPENT_DEFERRED,
        after={"forced": "deferral limit", "deferred_total": 7200.0},
        policy=BOUNDED_WINDOWED,
    ),
    # -- handler_changed: a handler arriving while the update waits for one is asked at once ---
    Case(
        "handler/await-download/arrives",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.HandlerChanged(True),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.CancelTimer("grace"), C.SendReports(), C.AskDownloadAuthorization(U)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        policy=PROCEED,
        via="handler_arrived",
    ),
    Case(
        "handler/await-install/arrives",
        S.AWAIT_INSTALL_AUTH,
        ev.HandlerChanged(True),
        S.AWAIT_INSTALL_AUTH,
        (
            C.CancelTimer("grace"),
            C.SendReports(),
            C.AskInstallAuthorization(U),
            C.StartTimer("deadline", DUE, U),
        ),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        policy=DEADLINE,
        via="handler_arrived",
    ),
    # Already asked (a handler was there), or not waiting for an answer: only noted.
    Case(
        "handler/await-download/again",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.HandlerChanged(True),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.CancelTimer("grace"),),
        handler=True,
    ),
    Case(
        "handler/await-install/removed",
        S.AWAIT_INSTALL_AUTH,
        ev.HandlerChanged(False),
        S.AWAIT_INSTALL_AUTH,
        # Nobody answering waits (and there is no deadline): no timer to arm.
        handler=True,
    ),
    # A handler that leaves while the application is asked: the wait timers are armed again,
    # the grace period counted from when the update was first seen (as after a restart).
    Case(
        "handler/await-download/leaves-grace-rearmed",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.HandlerChanged(False),
        S.AWAIT_DOWNLOAD_AUTH,
        # A new grace period from now: an application restarting itself has the time to
        # register again.
        (C.StartTimer("grace", NOW + 1800.0, U),),
        policy=PROCEED,
        handler=True,
    ),
    Case(
        "handler/await-install/leaves-timers-rearmed",
        S.AWAIT_INSTALL_AUTH,
        ev.HandlerChanged(False),
        S.AWAIT_INSTALL_AUTH,
        (C.StartTimer("deadline", DUE, U), C.StartTimer("grace", NOW + 1800.0, U)),
        policy=replace(DEADLINE, unanswered="proceed", unanswered_grace=1800.0),
        handler=True,
    ),
    Case("handler/idle", S.IDLE, ev.HandlerChanged(True), S.IDLE, (C.CancelTimer("grace"),)),
    Case(
        "handler/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.HandlerChanged(True),
        S.DOWNLOAD_DEFERRED,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/install-deferred",
        S.INSTALL_DEFERRED,
        ev.HandlerChanged(False),
        S.INSTALL_DEFERRED,
        handler=True,
    ),
    Case(
        "handler/download-held",
        S.DOWNLOAD_HELD,
        ev.HandlerChanged(True),
        S.DOWNLOAD_HELD,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/install-held",
        S.INSTALL_HELD,
        ev.HandlerChanged(True),
        S.INSTALL_HELD,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/downloading",
        S.DOWNLOADING,
        ev.HandlerChanged(True),
        S.DOWNLOADING,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/verifying",
        S.VERIFYING,
        ev.HandlerChanged(False),
        S.VERIFYING,
        handler=True,
    ),
    Case(
        "handler/installing",
        S.INSTALLING,
        ev.HandlerChanged(True),
        S.INSTALLING,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/await-restart",
        S.AWAIT_RESTART,
        ev.HandlerChanged(True),
        S.AWAIT_RESTART,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/await-commit",
        S.AWAIT_COMMIT,
        ev.HandlerChanged(True),
        S.AWAIT_COMMIT,
        (C.CancelTimer("grace"),),
    ),
    Case(
        "handler/rolling-back",
        S.ROLLING_BACK,
        ev.HandlerChanged(False),
        S.ROLLING_BACK,
        handler=True,
    ),
    Case("handler/failed", S.FAILED, ev.HandlerChanged(False), S.FAILED),
    # -- timer_fired: a deferral that ends within its bound asks again --------------------------
    Case(
        "timer/download-deferred/defer",
        S.DOWNLOAD_DEFERRED,
        ev.TimerFired("defer", U),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.CancelTimer("defer"), C.SendReports(), C.AskDownloadAuthorization(U)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": "", "deferred_total": 600.0},
    ),
    Case(
        "timer/install-deferred/defer",
        S.INSTALL_DEFERRED,
        ev.TimerFired("defer", U),
        S.AWAIT_INSTALL_AUTH,
        (
            C.CancelTimer("defer"),
            C.SendReports(),
            C.AskInstallAuthorization(U),
            C.StartTimer("grace", SEEN + 1800.0, U),
        ),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": "", "deferred_total": 600.0},
        policy=PROCEED,
    ),
    # -- timer_fired: deadline, spent bound, nobody answering: the step proceeds, forced -----
    Case(
        "timer/await-download/deadline",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.TimerFired("deadline", U),
        S.DOWNLOADING,
        (
            *_LEAVE,
            C.NotifyForced(U, "download", "deadline"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        after={"forced": "deadline", "download_started": NOW},
        report=Report(7, S.DOWNLOADING, R.FORCED, U, 11, 0, "download: deadline"),
        policy=LATE,
    ),
    Case(
        "timer/download-deferred/defer-bound-spent",
        S.DOWNLOAD_DEFERRED,
        ev.TimerFired("defer", U),
        S.DOWNLOADING,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        start={**SPENT_DEFERRED, "defer_until": NOW},
        after={"forced": "deferral limit", "deferred_total": 7200.0, "defer_until": None},
        report=Report(7, S.DOWNLOADING, R.FORCED, U, 11, 0, "download: deferral limit"),
        policy=BOUNDED,
    ),
    Case(
        "timer/await-download/grace-held",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.TimerFired("grace", U),
        S.DOWNLOAD_HELD,
        (
            *_LEAVE,
            C.NotifyForced(U, "download", "unanswered"),
            C.SendReports(),
            C.CheckGates(U, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.FORCED),),
        start={"locks": LOCKED},
        after={"forced": "unanswered"},
        report=Report(7, S.DOWNLOAD_HELD, R.FORCED, U, 11, 0, "download: unanswered"),
        policy=PROCEED_GATED,
    ),
    Case(
        "timer/await-download/grace-proceeds",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.TimerFired("grace", U),
        S.DOWNLOADING,
        (
            *_LEAVE,
            C.NotifyForced(U, "download", "unanswered"),
            C.SendReports(),
            C.StartDownload(U),
        ),
        ((S.DOWNLOADING, R.FORCED),),
        after={"forced": "unanswered"},
        report=Report(7, S.DOWNLOADING, R.FORCED, U, 11, 0, "download: unanswered"),
        policy=PROCEED,
    ),
    Case(
        "timer/download-deferred/defer-bound-spent-held",
        S.DOWNLOAD_DEFERRED,
        ev.TimerFired("defer", U),
        S.DOWNLOAD_HELD,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "download", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "download"),
        ),
        ((S.DOWNLOAD_HELD, R.FORCED),),
        start={**SPENT_DEFERRED, "defer_until": NOW, "locks": LOCKED},
        after={"forced": "deferral limit", "deferred_total": 7200.0},
        policy=BOUNDED_GATED,
    ),
    Case(
        "timer/await-install/deadline",
        S.AWAIT_INSTALL_AUTH,
        ev.TimerFired("deadline", U),
        S.INSTALLING,
        (*_LEAVE, C.NotifyForced(U, "install", "deadline"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.FORCED),),
        start={"locks": LOCKED},  # past the deadline, locks and windows no longer hold it
        after={"forced": "deadline", "locks": LOCKED},
        report=Report(7, S.INSTALLING, R.FORCED, U, 11, 2560, "install: deadline"),
        policy=LATE_WINDOWED,
    ),
    Case(
        "timer/install-deferred/defer-at-deadline",
        S.INSTALL_DEFERRED,
        ev.TimerFired("defer", U),
        S.INSTALLING,
        # The deferral was cut to the deadline; its timer is the deadline's.
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "install", "deadline"),
            C.SendReports(),
            C.Install(U),
        ),
        ((S.INSTALLING, R.FORCED),),
        start={"defer_until": NOW},
        after={"forced": "deadline", "deferred_total": 600.0},
        policy=LATE,
    ),
    Case(
        "timer/await-install/grace-held-by-window",
        S.AWAIT_INSTALL_AUTH,
        ev.TimerFired("grace", U),
        S.INSTALL_HELD,
        (
            *_LEAVE,
            C.NotifyForced(U, "install", "unanswered"),
            C.SendReports(),
            C.CheckGates(U, "install"),
        ),
        ((S.INSTALL_HELD, R.FORCED),),
        after={"forced": "unanswered"},
        report=Report(7, S.INSTALL_HELD, R.FORCED, U, 11, 2560, "install: unanswered"),
        policy=PROCEED_WINDOWED,
    ),
    Case(
        "timer/install-deferred/defer-bound-spent-held",
        S.INSTALL_DEFERRED,
        ev.TimerFired("defer", U),
        S.INSTALL_HELD,
        (
            C.CancelTimer("defer"),
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "install"),
        ),
        ((S.INSTALL_HELD, R.FORCED),),
        start={**SPENT_DEFERRED, "defer_until": NOW, "locks": LOCKED},
        after={"forced": "deferral limit", "deferred_total": 7200.0},
        policy=BOUNDED,
    ),
    # Nobody answering waits by default, and never once a handler is registered.
    drop("timer/await-install/grace-waits", S.AWAIT_INSTALL_AUTH, ev.TimerFired("grace", U)),
    drop(
        "timer/await-download/grace-handler-present",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.TimerFired("grace", U),
        policy=PROCEED,
        handler=True,
    ),
    drop(
        "timer/await-download/deadline-not-yet",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.TimerFired("deadline", U),
        policy=DEADLINE,
    ),
    drop(
        "timer/install-deferred/grace-while-deferred",
        S.INSTALL_DEFERRED,
        ev.TimerFired("grace", U),
    ),
    # -- timer_fired: a held update is looked at again; the download's own timers ---------------
    Case(
        "timer/download-held/hold",
        S.DOWNLOAD_HELD,
        ev.TimerFired("hold", U),
        S.DOWNLOAD_HELD,
        (C.CheckGates(U, "download"),),
        start={"held": ("lock backup",), "locks": LOCKED},
        after={"held": ("lock backup",)},
        policy=GATED,
    ),
    Case(
        "timer/install-held/hold",
        S.INSTALL_HELD,
        ev.TimerFired("hold", U),
        S.INSTALL_HELD,
        (C.CheckGates(U, "install"),),
        start={"held": ("maintenance window",)},
        policy=WINDOWED,
    ),
    drop("timer/download-held/retry", S.DOWNLOAD_HELD, ev.TimerFired("retry", U)),
    drop("timer/install-held/deadline", S.INSTALL_HELD, ev.TimerFired("deadline", U)),
    drop("timer/install-held/stale", S.INSTALL_HELD, ev.TimerFired("hold", STALE)),
    Case(
        "timer/downloading/retry",
        S.DOWNLOADING,
        ev.TimerFired("retry", U),
        S.DOWNLOADING,
        (C.StartDownload(U),),
        start={"attempts": 1},
        after={"attempts": 1},
    ),
    drop("timer/download-deferred/retry", S.DOWNLOAD_DEFERRED, ev.TimerFired("retry", U)),
    drop("timer/install-deferred/retry", S.INSTALL_DEFERRED, ev.TimerFired("retry", U)),
    drop("timer/downloading/defer", S.DOWNLOADING, ev.TimerFired("defer", U)),
    drop("timer/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.TimerFired("deadline", STALE)),
    drop("timer/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.TimerFired("defer", STALE)),
    drop("timer/install-deferred/stale", S.INSTALL_DEFERRED, ev.TimerFired("defer", STALE)),
    drop("timer/downloading/stale", S.DOWNLOADING, ev.TimerFired("retry", STALE)),
    # -- gates_checked: the engine evaluated the conditions of a held update ------------------
    Case(
        "gates/download-held/open",
        S.DOWNLOAD_HELD,
        ev.GatesChecked(U),
        S.DOWNLOADING,
        (C.CancelTimer("hold"), C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
        start={"held": ("condition battery",)},
        after={"held": (), "download_started": NOW},
        report=Report(7, S.DOWNLOADING, R.INITIAL, U, 11, 0),
        policy=GATED_CONDITIONS,
    ),
    Case(
        "gates/install-held/open",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALLING,
        (C.CancelTimer("hold"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        start={"held": ("lock backup",)},  # released since
        after={"held": ()},
        report=Report(7, S.INSTALLING, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "gates/install-held/window-opened",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALLING,
        (C.CancelTimer("hold"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        start={"held": ("maintenance window",)},
        after={"held": ()},
        policy=OPEN_NOW,
    ),
    Case(
        "gates/install-held/deadline-passes-the-hold",
        S.INSTALL_HELD,
        ev.GatesChecked(U, ("battery",)),
        S.INSTALLING,
        # The deadline forces past the lock, the window and the failing condition: the start
        # is reported, then that it was forced, and the application is told.
        (
            C.CancelTimer("hold"),
            C.SendReports(),
            C.SendReports(),
            C.NotifyForced(U, "install", "deadline"),
            C.Install(U),
        ),
        ((S.INSTALLING, R.INITIAL), (S.INSTALLING, R.FORCED)),
        start={"locks": LOCKED, "held": ("maintenance window", "lock backup")},
        after={"held": (), "forced": "deadline", "locks": LOCKED},
        report=Report(8, S.INSTALLING, R.FORCED, U, 11, 2560, "install: deadline"),
        policy=replace(LATE_WINDOWED, conditions=("battery",)),
    ),
    Case(
        "gates/install-held/lock",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALL_HELD,
        # What holds it is reported, with the time it is looked at again.
        (C.SendReports(), C.StartTimer("hold", NOW + 600.0, U)),
        ((S.INSTALL_HELD, R.INITIAL),),
        start={"locks": LOCKED},
        after={"held": ("lock backup",)},
        report=Report(7, S.INSTALL_HELD, R.INITIAL, U, 11, 2560, "held: lock backup", 1_000_600),
    ),
    Case(
        "gates/install-held/window",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALL_HELD,
        (C.SendReports(), C.StartTimer("hold", OPENS, U)),
        ((S.INSTALL_HELD, R.INITIAL),),
        after={"held": ("maintenance window",)},
        report=Report(
            7, S.INSTALL_HELD, R.INITIAL, U, 11, 2560, "held: maintenance window", 1_044_000
        ),
        policy=WINDOWED,
    ),
    Case(
        "gates/install-held/window-until-deadline",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALL_HELD,
        # The deadline comes before the window opens: look again then.
        (C.SendReports(), C.StartTimer("hold", DUE, U)),
        ((S.INSTALL_HELD, R.INITIAL),),
        after={"held": ("maintenance window",)},
        report=Report(
            7, S.INSTALL_HELD, R.INITIAL, U, 11, 2560, "held: maintenance window", 1_003_600
        ),
        policy=DEADLINE_WINDOWED,
    ),
    Case(
        "gates/install-held/quiet-period",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALL_HELD,
        (C.SendReports(), C.StartTimer("hold", NOW - 600.0 + 86400.0, U)),
        ((S.INSTALL_HELD, R.INITIAL),),
        start={"provisioned_at": NOW - 600.0},
        after={"held": ("quiet period",)},
        report=Report(7, S.INSTALL_HELD, R.INITIAL, U, 11, 2560, "held: quiet period", 1_085_800),
        policy=QUIET,
    ),
    Case(
        "gates/install-held/condition",
        S.INSTALL_HELD,
        ev.GatesChecked(U, ("battery",)),
        S.INSTALL_HELD,
        (C.SendReports(), C.StartTimer("hold", NOW + 300.0, U)),
        ((S.INSTALL_HELD, R.INITIAL),),
        after={"held": ("condition battery",)},
        report=Report(
            7, S.INSTALL_HELD, R.INITIAL, U, 11, 2560, "held: condition battery", 1_000_300
        ),
        policy=CONDITIONS,
    ),
    Case(
        "gates/install-held/everything",
        S.INSTALL_HELD,
        ev.GatesChecked(U, ("battery", "network")),
        S.INSTALL_HELD,
        (C.SendReports(), C.StartTimer("hold", NOW + 300.0, U)),
        ((S.INSTALL_HELD, R.INITIAL),),
        start={"locks": LOCKED, "provisioned_at": NOW - 600.0},
        after={
            "held": (
                "quiet period",
                "maintenance window",
                "lock backup",
                "condition battery",
                "condition network",
            )
        },
        policy=replace(CONDITIONS, windows=WINDOWED.windows, quiet_period=86400.0),
    ),
    Case(
        "gates/install-held/lock-capped",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALL_HELD,
        # The clock stepped back: the lock is capped at max_lock_ttl from now (journaled), and
        # the update is looked at again when that ends.
        (C.StartTimer("hold", NOW + 86400.0, U),),
        start={"locks": (("backup", NOW + 10 * 86400.0),), "held": ("lock backup",)},
        after={"locks": (("backup", NOW + 86400.0),), "held": ("lock backup",)},
    ),
    Case(
        "gates/install-held/unchanged-not-reported-again",
        S.INSTALL_HELD,
        ev.GatesChecked(U),
        S.INSTALL_HELD,
        (C.StartTimer("hold", NOW + 600.0, U),),
        start={"locks": LOCKED, "held": ("lock backup",)},
        after={"held": ("lock backup",)},
    ),
    Case(
        "gates/download-held/lock",
        S.DOWNLOAD_HELD,
        ev.GatesChecked(U),
        S.DOWNLOAD_HELD,
        (C.SendReports(), C.StartTimer("hold", NOW + 600.0, U)),
        ((S.DOWNLOAD_HELD, R.INITIAL),),
        start={"locks": LOCKED},
        after={"held": ("lock backup",)},
        report=Report(7, S.DOWNLOAD_HELD, R.INITIAL, U, 11, 0, "held: lock backup", 1_000_600),
        policy=GATED,
    ),
    drop("gates/download-held/stale", S.DOWNLOAD_HELD, ev.GatesChecked(STALE)),
    drop("gates/install-held/stale", S.INSTALL_HELD, ev.GatesChecked(STALE)),
    # -- lock_taken: any local holder, in any state (journaled); a held update looks again ------
    Case(
        "lock/download-held/taken",
        S.DOWNLOAD_HELD,
        ev.LockTaken("backup", 600.0),
        S.DOWNLOAD_HELD,
        (C.CheckGates(U, "download"),),
        after={"locks": LOCKED},
        policy=GATED,
    ),
    Case(
        "lock/install-held/ttl-capped",
        S.INSTALL_HELD,
        ev.LockTaken("ui", 10.0**9),
        S.INSTALL_HELD,
        # A crashed holder cannot block updates forever: at most max_lock_ttl.
        (C.CheckGates(U, "install"),),
        after={"locks": (("ui", NOW + 86400.0),)},
    ),
    Case("lock/idle/taken", S.IDLE, ev.LockTaken("backup", 600.0), S.IDLE, after={"locks": LOCKED}),
    Case(
        "lock/idle/renewed",
        S.IDLE,
        ev.LockTaken("backup", 600.0),
        S.IDLE,
        start={"locks": (("backup", NOW + 5.0),)},
        after={"locks": LOCKED},
    ),
    Case(
        "lock/idle/expired-ones-dropped",
        S.IDLE,
        ev.LockTaken("backup", 600.0),
        S.IDLE,
        start={"locks": (("crashed", NOW - 1.0),)},
        after={"locks": LOCKED},
    ),
    Case(
        "lock/idle/renewed-when-full",
        S.IDLE,
        ev.LockTaken("ui", 60.0),
        S.IDLE,
        start={"locks": (("ui", NOW + 5.0),)},
        after={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    Case(
        "lock/idle/clock-stepped-back",
        S.IDLE,
        ev.LockTaken("ui", 60.0),
        S.IDLE,
        # The wall clock stepped back ten days (an RTC reset): a journaled lock now ends
        # further ahead than max_lock_ttl; it is capped, so a crashed holder still cannot block.
        start={"locks": (("backup", NOW + 10 * 86400.0),)},
        after={"locks": (("backup", NOW + 86400.0), ("ui", NOW + 60.0))},
    ),
    Case(
        "lock/idle/room-freed-by-expiry",
        S.IDLE,
        ev.LockTaken("backup", 600.0),
        S.IDLE,
        start={"locks": (("ui", NOW),)},
        after={"locks": LOCKED},
        policy=ONE_LOCK,
    ),
    Case(
        "lock/await-download/taken",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.LockTaken("backup", 600.0),
        S.AWAIT_DOWNLOAD_AUTH,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/download-deferred/taken",
        S.DOWNLOAD_DEFERRED,
        ev.LockTaken("backup", 600.0),
        S.DOWNLOAD_DEFERRED,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/await-install/taken",
        S.AWAIT_INSTALL_AUTH,
        ev.LockTaken("backup", 600.0),
        S.AWAIT_INSTALL_AUTH,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/install-deferred/taken",
        S.INSTALL_DEFERRED,
        ev.LockTaken("backup", 600.0),
        S.INSTALL_DEFERRED,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/downloading/taken",
        S.DOWNLOADING,
        ev.LockTaken("backup", 600.0),
        S.DOWNLOADING,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/verifying/taken",
        S.VERIFYING,
        ev.LockTaken("backup", 600.0),
        S.VERIFYING,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/installing/taken-too-late",
        S.INSTALLING,
        ev.LockTaken("backup", 600.0),
        S.INSTALLING,
        after={"locks": LOCKED},  # recorded; holds the next update
    ),
    Case(
        "lock/await-restart/taken",
        S.AWAIT_RESTART,
        ev.LockTaken("backup", 600.0),
        S.AWAIT_RESTART,
        after={"locks": LOCKED},  # too late to hold this restart; holds the next update
    ),
    Case(
        "lock/await-commit/taken",
        S.AWAIT_COMMIT,
        ev.LockTaken("backup", 600.0),
        S.AWAIT_COMMIT,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/rolling-back/taken",
        S.ROLLING_BACK,
        ev.LockTaken("backup", 600.0),
        S.ROLLING_BACK,
        after={"locks": LOCKED},
    ),
    Case(
        "lock/failed/taken",
        S.FAILED,
        ev.LockTaken("backup", 600.0),
        S.FAILED,
        after={"locks": LOCKED},
    ),
    # One lock more than max_locks is refused, in every state.
    drop(
        "lock/idle/full",
        S.IDLE,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/await-download/full",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/download-deferred/full",
        S.DOWNLOAD_DEFERRED,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/await-install/full",
        S.AWAIT_INSTALL_AUTH,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/install-deferred/full",
        S.INSTALL_DEFERRED,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/download-held/full",
        S.DOWNLOAD_HELD,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/install-held/full",
        S.INSTALL_HELD,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/downloading/full",
        S.DOWNLOADING,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/verifying/full",
        S.VERIFYING,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/installing/full",
        S.INSTALLING,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/await-restart/full",
        S.AWAIT_RESTART,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/await-commit/full",
        S.AWAIT_COMMIT,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/rolling-back/full",
        S.ROLLING_BACK,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    drop(
        "lock/failed/full",
        S.FAILED,
        ev.LockTaken("backup", 60.0),
        start={"locks": (("ui", NOW + 60.0),)},
        policy=ONE_LOCK,
    ),
    # -- lock_released: in any state; a held update looks again --------------------------------
    Case(
        "unlock/download-held",
        S.DOWNLOAD_HELD,
        ev.LockReleased("backup"),
        S.DOWNLOAD_HELD,
        (C.CheckGates(U, "download"),),
        start={"locks": LOCKED, "held": ("lock backup",)},
        after={"locks": (), "held": ("lock backup",)},  # until the gates are checked
        policy=GATED,
    ),
    Case(
        "unlock/install-held",
        S.INSTALL_HELD,
        ev.LockReleased("backup"),
        S.INSTALL_HELD,
        (C.CheckGates(U, "install"),),
        start={"locks": (*LOCKED, ("ui", NOW + 60.0)), "held": ("lock backup", "lock ui")},
        after={"locks": (("ui", NOW + 60.0),)},
    ),
    Case(
        "unlock/idle",
        S.IDLE,
        ev.LockReleased("backup"),
        S.IDLE,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/idle/clock-stepped-back",
        S.IDLE,
        ev.LockReleased("backup"),
        S.IDLE,
        # The other lock's journaled expiry lies past now + max_lock_ttl: capped.
        start={"locks": (*LOCKED, ("ui", NOW + 10 * 86400.0))},
        after={"locks": (("ui", NOW + 86400.0),)},
    ),
    Case(
        "unlock/idle/unknown-is-fine",
        S.IDLE,
        ev.LockReleased("nobody"),
        S.IDLE,
        start={"locks": LOCKED},
        after={"locks": LOCKED},
    ),
    Case(
        "unlock/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.LockReleased("backup"),
        S.AWAIT_DOWNLOAD_AUTH,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.LockReleased("backup"),
        S.DOWNLOAD_DEFERRED,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.LockReleased("backup"),
        S.AWAIT_INSTALL_AUTH,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/install-deferred",
        S.INSTALL_DEFERRED,
        ev.LockReleased("backup"),
        S.INSTALL_DEFERRED,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/downloading",
        S.DOWNLOADING,
        ev.LockReleased("backup"),
        S.DOWNLOADING,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/verifying",
        S.VERIFYING,
        ev.LockReleased("backup"),
        S.VERIFYING,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/installing",
        S.INSTALLING,
        ev.LockReleased("backup"),
        S.INSTALLING,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/await-restart",
        S.AWAIT_RESTART,
        ev.LockReleased("backup"),
        S.AWAIT_RESTART,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/await-commit",
        S.AWAIT_COMMIT,
        ev.LockReleased("backup"),
        S.AWAIT_COMMIT,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/rolling-back",
        S.ROLLING_BACK,
        ev.LockReleased("backup"),
        S.ROLLING_BACK,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    Case(
        "unlock/failed",
        S.FAILED,
        ev.LockReleased("backup"),
        S.FAILED,
        start={"locks": LOCKED},
        after={"locks": ()},
    ),
    # -- fragment_verified / fragments_invalid ---------------------------------------------
    # -- budgets, image change, resume modes (the download engine) --------------------------
    Case(
        "fragment/within-data-budget",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 0, 10_000),
        S.DOWNLOADING,
        (C.NotifyProgress(U, 1024, 2560),),
        start={"fetched": 50_000},
        after={"verified": b"\x01", "progress": 40, "fetched": 60_000},
        policy=BUDGETS,
    ),
    Case(
        "fragment/over-data-budget",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 0, 60_000),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.CancelTimer("budget"),
            C.NotifyComplete(
                U, R.DATA_BUDGET_EXCEEDED, "110000 bytes received, over the budget of 100000"
            ),
        ),
        ((S.FAILED, R.DATA_BUDGET_EXCEEDED),),
        start={"fetched": 50_000},
        after={"fetched": 110_000, "verified": b"\x00"},
        policy=BUDGETS,
        via="over_data_budget",
    ),
    Case(
        "timer/time-budget",
        S.DOWNLOADING,
        ev.TimerFired("budget", U),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.CancelTimer("budget"),
            C.NotifyComplete(U, R.TIME_BUDGET_EXCEEDED, "download took longer than 600 s"),
        ),
        ((S.FAILED, R.TIME_BUDGET_EXCEEDED),),
        policy=BUDGETS,
    ),
    Case(
        "authorized/download-arms-time-budget",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Authorized(U),
        S.DOWNLOADING,
        (*_LEAVE, C.SendReports(), C.StartTimer("budget", NOW + 600.0, U), C.StartDownload(U)),
        ((S.DOWNLOADING, R.AUTHORIZED),),
        after={"download_started": NOW},
        policy=BUDGETS,
    ),
    Case(
        "download-finished/complete-ends-time-budget",
        S.DOWNLOADING,
        ev.DownloadFinished(U, 512),
        S.VERIFYING,
        (C.SendReports(), C.CancelTimer("budget"), C.VerifyImage(U)),
        ((S.VERIFYING, R.INITIAL),),
        start={"verified": FULL, "download_started": NOW - 5},
        after={"fetched": 512},
        policy=BUDGETS,
    ),
    Case(
        "download-failed/image-changed-restarts-from-zero",
        S.DOWNLOADING,
        ev.DownloadFailed(U, ImageChanged("Size2 5000 differs"), 3000),
        S.DOWNLOADING,
        (C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
        start={"verified": b"\x03"},
        after={"attempts": 1, "verified": b"\x00", "fetched": 3000},
        via="image_changed",
    ),
    Case(
        "download-failed/image-changed-exhausted",
        S.DOWNLOADING,
        ev.DownloadFailed(U, ImageChanged("4.08")),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.INTEGRITY_FAILURE, "4.08")),
        ((S.FAILED, R.INTEGRITY_FAILURE),),
        start={"attempts": 2},
    ),
    Case(
        "restarted/downloading/resume-off",
        S.DOWNLOADING,
        ev.Restarted(),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(U, R.FAILED, "interrupted download, and resume is off"),
        ),
        ((S.FAILED, R.FAILED),),
        policy=replace(POLICY, resume="none"),
        via="resume_unsupported",
    ),
    Case(
        "restarted/downloading/restart-mode",
        S.DOWNLOADING,
        ev.Restarted(),
        S.DOWNLOADING,
        (C.StartDownload(U), C.SendReports()),
        start={"verified": b"\x03"},
        after={"verified": b"\x00", "restarts": 1},
        policy=replace(POLICY, resume="restart"),
    ),
    Case(
        "restarted/downloading/time-budget-rearmed",
        S.DOWNLOADING,
        ev.Restarted(),
        S.DOWNLOADING,
        (C.StartTimer("budget", NOW + 500.0, U), C.StartDownload(U), C.SendReports()),
        start={"download_started": NOW - 100.0},
        after={"restarts": 1},
        policy=BUDGETS,
    ),
    Case(
        "fragment/progress-resets-the-restart-count",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 2),
        S.DOWNLOADING,
        (),
        start={"restarts": 2},
        after={"verified": b"\x04", "restarts": 0},
    ),
    Case(
        "fragment/first-crosses-step",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 0),
        S.DOWNLOADING,
        (C.NotifyProgress(U, 1024, 2560),),
        after={"verified": b"\x01", "progress": 40},
    ),
    Case(
        "fragment/short-last-below-step",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 2),
        S.DOWNLOADING,
        (),
        after={"verified": b"\x04", "progress": 0},
    ),
    Case(
        # One fsync covered three fragments: one event, one journal write, every bit set.
        "fragment/several-in-one-event",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 1, also=(2, 0)),
        S.DOWNLOADING,
        (C.NotifyProgress(U, 2560, 2560),),
        after={"verified": FULL, "progress": 100},
    ),
    Case(
        "fragment/several-some-out-of-range",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 9, also=(2, -1)),
        S.DOWNLOADING,
        (),
        after={"verified": b"\x04", "progress": 0},
    ),
    Case(
        "fragment/completes",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 1),
        S.DOWNLOADING,
        (C.NotifyProgress(U, 2560, 2560),),
        start={"verified": b"\x05", "progress": 60},
        after={"verified": FULL, "progress": 100},
    ),
    Case(
        "fragment/again",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 0),
        S.DOWNLOADING,
        (),
        start={"verified": b"\x01", "progress": 40},
        after={"verified": b"\x01", "progress": 40},
    ),
    Case(
        "fragment/index-past-end",
        S.DOWNLOADING,
        ev.FragmentVerified(U, 3),
        S.DOWNLOADING,
        (),
        after={"verified": b"\x00"},
    ),
    Case(
        "fragment/negative-index",
        S.DOWNLOADING,
        ev.FragmentVerified(U, -1),
        S.DOWNLOADING,
        (),
        after={"verified": b"\x00"},
    ),
    drop("fragment/stale", S.DOWNLOADING, ev.FragmentVerified(STALE, 0)),
    Case(
        "fragments-invalid/clears",
        S.DOWNLOADING,
        ev.FragmentsInvalid(U, (0, 2, 9, -1)),
        S.DOWNLOADING,
        (),
        start={"verified": FULL},
        after={"verified": b"\x02"},
    ),
    drop("fragments-invalid/stale", S.DOWNLOADING, ev.FragmentsInvalid(STALE, (0,))),
    # -- download_finished -----------------------------------------------------------------
    Case(
        "download-finished/complete",
        S.DOWNLOADING,
        ev.DownloadFinished(U),
        S.VERIFYING,
        (C.SendReports(), C.VerifyImage(U)),
        ((S.VERIFYING, R.INITIAL),),
        start={"verified": FULL},
        report=Report(7, S.VERIFYING, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "download-finished/incomplete",
        S.DOWNLOADING,
        ev.DownloadFinished(U),
        S.DOWNLOADING,
        (C.StartTimer("retry", NOW + 1.0, U, 1.0),),
        start={"verified": b"\x03"},
        after={"attempts": 1, "verified": b"\x03"},
    ),
    Case(
        "download-finished/incomplete-again",
        S.DOWNLOADING,
        ev.DownloadFinished(U),
        S.DOWNLOADING,
        (C.StartTimer("retry", NOW + 2.0, U, 2.0),),
        start={"verified": b"\x03", "attempts": 1},
        after={"attempts": 2},
    ),
    Case(
        "download-finished/incomplete-exhausted",
        S.DOWNLOADING,
        ev.DownloadFinished(U),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(U, R.INTEGRITY_FAILURE, "download ended with 1 fragments missing"),
        ),
        ((S.FAILED, R.INTEGRITY_FAILURE),),
        start={"verified": b"\x03", "attempts": 2},
        after={"attempts": 2, "verified": b"\x03"},
    ),
    drop(
        "download-finished/stale",
        S.DOWNLOADING,
        ev.DownloadFinished(STALE),
        start={"verified": FULL},
    ),
    # -- download_failed --------------------------------------------------------------------
    Case(
        "download-failed/retryable",
        S.DOWNLOADING,
        ev.DownloadFailed(U, TransportError("timeout")),
        S.DOWNLOADING,
        (C.StartTimer("retry", NOW + 1.0, U, 1.0),),
        after={"attempts": 1},
        via="may_retry",
    ),
    Case(
        "download-failed/retryable-backoff",
        S.DOWNLOADING,
        ev.DownloadFailed(U, TransportError("timeout")),
        S.DOWNLOADING,
        (C.StartTimer("retry", NOW + 2.0, U, 2.0),),
        start={"attempts": 1},
        after={"attempts": 2},
        via="may_retry",
    ),
    # Issue 17 §3: a stall is waited out without counting an attempt: a 4.04 on the image
    # (for not_found_budget from the first one), a full disk (until there is room).
    Case(
        "download-failed/missing-paused",
        S.DOWNLOADING,
        ev.DownloadFailed(U, ResourceMissing("coap://fota.example/fw/11.bin", "4.04")),
        S.DOWNLOADING,
        (C.SendReports(), C.StartTimer("retry", NOW + 1.0, U, 1.0)),
        ((S.DOWNLOADING, R.INITIAL),),
        start={"attempts": 2},
        after={"attempts": 2},
        via="stalled",
    ),
    Case(
        "download-failed/disk-full-paused",
        S.DOWNLOADING,
        ev.DownloadFailed(U, DiskFull("candidate: No space left on device")),
        S.DOWNLOADING,
        (C.SendReports(), C.StartTimer("retry", NOW + 1.0, U, 1.0)),
        ((S.DOWNLOADING, R.INITIAL),),
        start={"attempts": 2},
        after={"attempts": 2},
        via="stalled",
    ),
    Case(
        "download-failed/missing-no-budget",
        S.DOWNLOADING,
        ev.DownloadFailed(U, ResourceMissing("coap://fota.example/fw/11.bin", "4.04")),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(
                U, R.INVALID_URI, "coap://fota.example/fw/11.bin: server answered 4.04"
            ),
        ),
        ((S.FAILED, R.INVALID_URI),),
        policy=replace(POLICY, not_found_budget=0.0),
    ),
    Case(
        "download-failed/no-space-before-the-first-fragment",
        S.DOWNLOADING,
        ev.DownloadFailed(U, NotEnoughSpace("image needs 9 more bytes")),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(U, R.NOT_ENOUGH_SPACE, "image needs 9 more bytes"),
        ),
        ((S.FAILED, R.NOT_ENOUGH_SPACE),),
    ),
    Case(
        "download-failed/retryable-exhausted",
        S.DOWNLOADING,
        ev.DownloadFailed(U, TransportError("timeout")),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.CONNECTION_LOST, "timeout")),
        ((S.FAILED, R.CONNECTION_LOST),),
        start={"attempts": 2, "verified": b"\x01"},
        after={"attempts": 2, "pending": PENDING.digest, "verified": b"\x01"},
        report=Report(7, S.FAILED, R.CONNECTION_LOST, U, 11, 1024, "timeout"),
    ),
    Case(
        "download-failed/permanent",
        S.DOWNLOADING,
        ev.DownloadFailed(U, PermanentServerError("coap://fota.example/fw/11.bin", "4.04")),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(
                U, R.INVALID_URI, "coap://fota.example/fw/11.bin: server answered 4.04"
            ),
        ),
        ((S.FAILED, R.INVALID_URI),),
        after={"attempts": 0},
    ),
    Case(
        "download-failed/storage",
        S.DOWNLOADING,
        ev.DownloadFailed(U, StorageError("disk full")),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.FAILED, "disk full")),
        ((S.FAILED, R.FAILED),),
    ),
    drop("download-failed/stale", S.DOWNLOADING, ev.DownloadFailed(STALE, TransportError("x"))),
    # -- image_checked: ask, or proceed (first install, impolite image, forcing rule) ----------
    Case(
        "image/ok/polite",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.AWAIT_INSTALL_AUTH,
        (C.SendReports(), C.AskInstallAuthorization(U)),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        report=Report(7, S.AWAIT_INSTALL_AUTH, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "image/ok/polite-timers-armed",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.AWAIT_INSTALL_AUTH,
        # The grace period counts from when the update was first seen, not from this question.
        (
            C.SendReports(),
            C.AskInstallAuthorization(U),
            C.StartTimer("deadline", DUE, U),
            C.StartTimer("grace", SEEN + 1800.0, U),
        ),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        policy=replace(DEADLINE, unanswered="proceed", unanswered_grace=1800.0),
    ),
    Case(
        "image/ok/first-install",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        (*_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        installed="none",
        report=Report(7, S.INSTALLING, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "image/ok/first-install-skips-holds",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        # An empty device has nothing to interrupt: no quiet period, window, lock or condition.
        (*_LEAVE, C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        installed="none",
        start={"locks": LOCKED, "provisioned_at": NOW - 600.0},
        policy=replace(CONDITIONS, windows=WINDOWED.windows, quiet_period=86400.0),
    ),
    Case(
        "image/ok/impolite",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        (*_LEAVE, C.Inform(U, "install"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        installed="impolite",
        report=Report(7, S.INSTALLING, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "image/ok/deadline-passed-forced",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        (*_LEAVE, C.NotifyForced(U, "install", "deadline"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.FORCED),),
        start={"locks": LOCKED},
        after={"forced": "deadline"},
        report=Report(7, S.INSTALLING, R.FORCED, U, 11, 2560, "install: deadline"),
        policy=LATE,
    ),
    Case(
        "image/ok/bound-spent-forced",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        # The download's deferrals used the whole bound: the install is not asked either.
        (*_LEAVE, C.NotifyForced(U, "install", "deferral limit"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.FORCED),),
        start=SPENT,
        after={"forced": "deferral limit"},
        policy=BOUNDED,
    ),
    Case(
        "image/ok/impolite-held-by-window",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALL_HELD,
        (*_LEAVE, C.Inform(U, "install"), C.SendReports(), C.CheckGates(U, "install")),
        ((S.INSTALL_HELD, R.INITIAL),),
        installed="impolite",
        report=Report(7, S.INSTALL_HELD, R.INITIAL, U, 11, 2560),
        policy=WINDOWED,
    ),
    Case(
        "image/ok/bound-spent-held-by-lock",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALL_HELD,
        (
            *_LEAVE,
            C.NotifyForced(U, "install", "deferral limit"),
            C.SendReports(),
            C.CheckGates(U, "install"),
        ),
        ((S.INSTALL_HELD, R.FORCED),),
        start={**SPENT, "locks": LOCKED},
        after={"forced": "deferral limit", "locks": LOCKED},
        report=Report(7, S.INSTALL_HELD, R.FORCED, U, 11, 2560, "install: deferral limit"),
        policy=BOUNDED,
    ),
    Case(
        "image/bad/refetch",
        S.VERIFYING,
        ev.ImageChecked(U, False),
        S.DOWNLOADING,
        (C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
        after={"attempts": 1, "verified": b"\x00"},
    ),
    Case(
        "image/bad/exhausted",
        S.VERIFYING,
        ev.ImageChecked(U, False),
        S.FAILED,
        (
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(U, R.INTEGRITY_FAILURE, "image digest mismatch"),
        ),
        ((S.FAILED, R.INTEGRITY_FAILURE),),
        start={"attempts": 2},
        after={"attempts": 2, "verified": FULL},
        report=Report(7, S.FAILED, R.INTEGRITY_FAILURE, U, 11, 2560, "image digest mismatch"),
    ),
    drop("image/stale", S.VERIFYING, ev.ImageChecked(STALE, True)),
    # -- install_finished: the installer returned ------------------------------------------
    Case(
        "install/ok",
        S.INSTALLING,
        ev.InstallFinished(U),
        S.AWAIT_COMMIT,
        # The new image runs now: its self-test must pass within self_test_deadline (300 s).
        (C.SendReports(), C.RunSelfTest(U)),
        ((S.AWAIT_COMMIT, R.INITIAL),),
        after={"commit_by": NOW + 300.0, "tested": False, "boot_id": ""},
        report=Report(7, S.AWAIT_COMMIT, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "install/ok-restart",
        S.INSTALLING,
        ev.InstallFinished(U, restart=True),
        S.AWAIT_RESTART,
        # The new image runs only after a restart (A/B slots): this boot is journaled, so that
        # the restart can be told from a crash of fota itself.
        (C.SendReports(), C.RequestRestart(U)),
        ((S.AWAIT_RESTART, R.INITIAL),),
        after={"boot_id": BOOT, "commit_by": None},
        report=Report(7, S.AWAIT_RESTART, R.INITIAL, U, 11, 2560, "restart required"),
    ),
    Case(
        "install/failed",
        S.INSTALLING,
        ev.InstallFinished(U, InstallError("boot slot busy")),
        S.ROLLING_BACK,
        # The failure is reported at once; the final report comes when the rollback ends.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"restarts": 1},
        after={"pending": PENDING.digest, "failure": "boot slot busy", "restarts": 0},
        report=Report(7, S.ROLLING_BACK, R.FAILED, U, 11, 2560, "boot slot busy"),
    ),
    Case(
        "install/failed-candidate-changed",
        S.INSTALLING,
        ev.InstallFinished(U, IntegrityError("candidate no longer matches"), restart=True),
        S.ROLLING_BACK,
        # An error wins over the restart flag; the error's own result code is reported.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.INTEGRITY_FAILURE),),
        after={"failure": "candidate no longer matches", "boot_id": ""},
    ),
    drop("install/stale", S.INSTALLING, ev.InstallFinished(STALE)),
    # -- boot_checked: after the restart the install asked for ------------------------------
    Case(
        "boot/ok",
        S.AWAIT_RESTART,
        ev.BootChecked(U, True),
        S.AWAIT_COMMIT,
        # The self-test deadline counts from the new image's start, not from the install.
        (C.SendReports(), C.RunSelfTest(U)),
        ((S.AWAIT_COMMIT, R.INITIAL),),
        start={"restarts": 1},
        after={"commit_by": NOW + 300.0, "tested": False, "boot_id": "", "restarts": 1},
        report=Report(7, S.AWAIT_COMMIT, R.INITIAL, U, 11, 2560),
    ),
    Case(
        "boot/failed",
        S.AWAIT_RESTART,
        ev.BootChecked(U, False, "the device runs the previous image"),
        S.ROLLING_BACK,
        # The bootloader fell back (or the restart never happened): roll back, with a restart
        # budget of its own.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"restarts": 1},
        after={
            "failure": "the new image did not start: the device runs the previous image",
            "restarts": 0,
            "boot_id": "",
        },
        report=Report(
            7,
            S.ROLLING_BACK,
            R.FAILED,
            U,
            11,
            2560,
            "the new image did not start: the device runs the previous image",
        ),
    ),
    Case(
        "boot/failed-no-detail",
        S.AWAIT_RESTART,
        ev.BootChecked(U, False),
        S.ROLLING_BACK,
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        after={"failure": "the new image did not start: no detail"},
    ),
    drop("boot/stale", S.AWAIT_RESTART, ev.BootChecked(STALE, True)),
    # -- self_test_finished: one attempt; retried until the self-test deadline ---------------
    Case(
        "self-test/ok",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, True),
        S.AWAIT_COMMIT,
        # Journaled as tested before the commit runs: after a crash the commit runs again,
        # not the self-test. No report: the commit's result is the final one.
        (C.CancelTimer("selftest"), C.Commit(U)),
        start={"attempts": 1, "restarts": 1},
        after={"tested": True, "commit_by": COMMIT_BY, "installed": INSTALLED_POLITE.digest},
        via="succeeded",
    ),
    Case(
        "self-test/retry",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, False, "no network"),
        S.AWAIT_COMMIT,
        # Four minutes are left: another attempt after self_test_interval (10 s).
        (C.StartTimer("selftest", NOW + 10.0, U),),
        after={"tested": False, "commit_by": COMMIT_BY, "failure": ""},
        via="before_commit_deadline",
    ),
    Case(
        "self-test/retry-at-deadline",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, False, "no network"),
        S.AWAIT_COMMIT,
        # Less than the interval is left: the last attempt runs at the deadline itself.
        (C.StartTimer("selftest", NOW + 4.0, U),),
        start={"commit_by": NOW + 4.0},
        via="before_commit_deadline",
    ),
    Case(
        "self-test/failed",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, False, "no network"),
        S.ROLLING_BACK,
        # The deadline is reached: no more attempts, and no retry timer left behind.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"commit_by": NOW},
        after={
            "installed": INSTALLED_POLITE.digest,
            "pending": PENDING.digest,
            "failure": "self-test failed: no network",
            "tested": False,
        },
        report=Report(7, S.ROLLING_BACK, R.FAILED, U, 11, 2560, "self-test failed: no network"),
    ),
    Case(
        "self-test/failed-no-deadline",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, False),
        S.ROLLING_BACK,
        # A journal without a self-test deadline (fota 0.1's AWAIT_COMMIT): no retries.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"commit_by": None},
        after={"failure": "self-test failed: no detail"},
    ),
    Case(
        "self-test/failed-clock-stepped-back",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, False, "no network"),
        S.ROLLING_BACK,
        # The wall clock went back to before the self-test began (no RTC, no time sync on
        # the new image): counted as past the deadline, or the attempts would never end.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"commit_by": NOW + 301.0},  # begun 1 s from now: NOW is before it
        after={"failure": "self-test failed: no network"},
    ),
    drop("self-test/stale", S.AWAIT_COMMIT, ev.SelfTestFinished(STALE, True)),
    Case(
        "timer/await-commit/selftest",
        S.AWAIT_COMMIT,
        ev.TimerFired("selftest", U),
        S.AWAIT_COMMIT,
        (C.RunSelfTest(U),),
        after={"commit_by": COMMIT_BY},
    ),
    drop("timer/await-commit/other", S.AWAIT_COMMIT, ev.TimerFired("retry", U)),
    drop("timer/await-commit/stale", S.AWAIT_COMMIT, ev.TimerFired("selftest", STALE)),
    # -- commit_finished: the new image is permanent, or the commit failed ------------------
    Case(
        "commit/ok",
        S.AWAIT_COMMIT,
        ev.CommitFinished(U),
        S.IDLE,
        # The update is over: the candidate goes, and the server is asked at once whether a
        # manifest came while the install was under way (announcements were dropped).
        (
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.SUCCESS),
            C.CheckAnnouncement(),
        ),
        ((S.IDLE, R.SUCCESS),),
        start={"attempts": 1, "restarts": 1, "tested": True},
        after={**_CLEARED, "installed": PENDING.digest},
        report=Report(7, S.IDLE, R.SUCCESS, U, 11, 2560),
    ),
    Case(
        "commit/failed",
        S.AWAIT_COMMIT,
        ev.CommitFinished(U, InstallError("bootloader environment is read-only")),
        S.ROLLING_BACK,
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"tested": True},
        after={
            "installed": INSTALLED_POLITE.digest,
            "tested": False,
            "failure": "commit failed: bootloader environment is read-only",
        },
        report=Report(
            7,
            S.ROLLING_BACK,
            R.FAILED,
            U,
            11,
            2560,
            "commit failed: bootloader environment is read-only",
        ),
    ),
    drop("commit/stale", S.AWAIT_COMMIT, ev.CommitFinished(STALE), start={"tested": True}),
    # -- rollback_finished: the final report says how the update ended ------------------------
    Case(
        "rollback/ok",
        S.ROLLING_BACK,
        ev.RollbackFinished(U),
        S.FAILED,
        # The failed update stays pending (to inspect) until a new one comes.
        (
            C.SendReports(),
            C.NotifyComplete(U, R.ROLLED_BACK, f"rolled back to version 1.10: {FAILURE}"),
            C.CheckAnnouncement(),
        ),
        ((S.FAILED, R.ROLLED_BACK),),
        start={"boot_id": EARLIER_BOOT},
        after={
            "pending": PENDING.digest,
            "installed": INSTALLED_POLITE.digest,
            "failure": FAILURE,
            "boot_id": "",
            "commit_by": None,
        },
        report=Report(
            7, S.FAILED, R.ROLLED_BACK, U, 11, 2560, f"rolled back to version 1.10: {FAILURE}"
        ),
        via="succeeded",
    ),
    Case(
        "rollback/ok/first-install",
        S.ROLLING_BACK,
        ev.RollbackFinished(U),
        S.FAILED,
        # No manifest for what ran before (an empty device, or a factory image without one).
        (
            C.SendReports(),
            C.NotifyComplete(U, R.ROLLED_BACK, f"rolled back to the previous image: {FAILURE}"),
            C.CheckAnnouncement(),
        ),
        ((S.FAILED, R.ROLLED_BACK),),
        installed="none",
        via="succeeded",
    ),
    Case(
        "rollback/restart",
        S.ROLLING_BACK,
        ev.RollbackFinished(U, restart=True),
        S.ROLLING_BACK,
        # The previous image runs after a restart: asked for, no report (no state change);
        # after the restart the rollback runs again (idempotent) and says it is done.
        (C.RequestRestart(U),),
        after={"boot_id": BOOT, "failure": FAILURE},
    ),
    Case(
        "rollback/failed",
        S.ROLLING_BACK,
        ev.RollbackFinished(U, InstallError("slot A unreadable")),
        S.FAILED,
        (
            C.SendReports(),
            C.NotifyComplete(
                U, R.ROLLBACK_FAILED, f"rollback failed (slot A unreadable): {FAILURE}"
            ),
            C.CheckAnnouncement(),
        ),
        ((S.FAILED, R.ROLLBACK_FAILED),),
        after={"pending": PENDING.digest, "installed": INSTALLED_POLITE.digest},
        report=Report(
            7,
            S.FAILED,
            R.ROLLBACK_FAILED,
            U,
            11,
            2560,
            f"rollback failed (slot A unreadable): {FAILURE}",
        ),
    ),
    Case(
        "rollback/failed-with-restart-flag",
        S.ROLLING_BACK,
        ev.RollbackFinished(U, InstallError("slot A unreadable"), restart=True),
        S.FAILED,
        # An error wins over the restart flag: nothing to restart into.
        (
            C.SendReports(),
            C.NotifyComplete(
                U, R.ROLLBACK_FAILED, f"rollback failed (slot A unreadable): {FAILURE}"
            ),
            C.CheckAnnouncement(),
        ),
        ((S.FAILED, R.ROLLBACK_FAILED),),
    ),
    drop("rollback/stale", S.ROLLING_BACK, ev.RollbackFinished(STALE)),
    # -- restarted: re-issue the restored state's work ---------------------------------------
    Case(
        "restarted/idle/first-start",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        # The device's very first start (no report ever made): the quiet period counts from now.
        (),
        installed="none",
        start={"provisioned_at": None, "report_seq": 0, "outbox": ()},
        after={"provisioned_at": NOW},
    ),
    Case(
        "restarted/idle/migrated-old-device",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        # A fota 0.1 journal (no provisioned_at) with reports made: no new device, its quiet
        # period is long over.
        (C.SendReports(),),
        start={"provisioned_at": None},
        after={"provisioned_at": 0.0},
        policy=QUIET,
    ),
    Case(
        "restarted/await-download/migrated-first-seen",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Restarted(),
        S.AWAIT_DOWNLOAD_AUTH,
        # A fota 0.1 journal does not say when the update was first seen: from now on.
        (C.AskDownloadAuthorization(U), C.SendReports()),
        start={"first_seen": None},
        after={"first_seen": NOW},
    ),
    Case(
        "restarted/await-install/migrated-first-seen-deadline",
        S.AWAIT_INSTALL_AUTH,
        ev.Restarted(),
        S.AWAIT_INSTALL_AUTH,
        # Seen from now on (filled before the timers are armed): the severity deadline is two
        # hours from now.
        (
            C.AskInstallAuthorization(U),
            C.StartTimer("deadline", NOW + 7200.0, U),
            C.SendReports(),
        ),
        start={"first_seen": None},
        after={"first_seen": NOW},
        policy=DEADLINE,
    ),
    # Past its deadline (the device was off when it came) an update is not asked about: the
    # deadline timer fires at once and forces it.
    Case(
        "restarted/await-install/past-deadline-not-asked",
        S.AWAIT_INSTALL_AUTH,
        ev.Restarted(),
        S.AWAIT_INSTALL_AUTH,
        (C.StartTimer("deadline", NOW, U), C.SendReports()),
        policy=LATE,
    ),
    Case(
        "restarted/await-download/past-deadline-not-asked",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Restarted(),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.StartTimer("deadline", NOW, U), C.StartTimer("grace", SEEN + 1800.0, U)),
        start={"outbox": ()},
        policy=replace(LATE, unanswered="proceed", unanswered_grace=1800.0),
    ),
    Case(
        "restarted/download-deferred/migrated-defer-since",
        S.DOWNLOAD_DEFERRED,
        ev.Restarted(),
        S.DOWNLOAD_DEFERRED,
        # A fota 0.1 deferral has no start: it counts toward the bound from now on.
        (C.StartTimer("defer", DEFER_UNTIL, U), C.SendReports()),
        start={"defer_since": None},
        after={"defer_since": NOW, "defer_until": DEFER_UNTIL, "deferred_total": 0.0},
    ),
    Case(
        "restarted/await-download/grace-rearmed",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Restarted(),
        S.AWAIT_DOWNLOAD_AUTH,
        # Timers do not survive a restart; the grace period still counts from first_seen.
        (
            C.AskDownloadAuthorization(U),
            C.StartTimer("grace", SEEN + 1800.0, U),
            C.SendReports(),
        ),
        after={"provisioned_at": PROVISIONED},
        policy=PROCEED,
    ),
    Case(
        "restarted/await-install/deadline-rearmed",
        S.AWAIT_INSTALL_AUTH,
        ev.Restarted(),
        S.AWAIT_INSTALL_AUTH,
        (C.AskInstallAuthorization(U), C.StartTimer("deadline", DUE, U), C.SendReports()),
        policy=DEADLINE,
    ),
    Case(
        "restarted/download-held",
        S.DOWNLOAD_HELD,
        ev.Restarted(),
        S.DOWNLOAD_HELD,
        (C.CheckGates(U, "download"), C.SendReports()),
        start={"held": ("lock backup",), "locks": LOCKED},
        after={"restarts": 0, "held": ("lock backup",)},
        policy=GATED,
    ),
    Case(
        "restarted/install-held",
        S.INSTALL_HELD,
        ev.Restarted(),
        S.INSTALL_HELD,
        (C.CheckGates(U, "install"), C.SendReports()),
        start={"restarts": 2},
        after={"restarts": 2},  # not an active state: its restarts are not counted
    ),
    Case(
        "restarted/idle/empty-outbox",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        # Nothing to do: the commit finished before IDLE was journaled (no commit again).
        (),
        start={"outbox": ()},
    ),
    Case(
        "restarted/idle",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        (C.SendReports(),),
    ),
    Case(
        "restarted/idle/empty-device",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        (C.SendReports(),),
        installed="none",
    ),
    Case(
        "restarted/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Restarted(),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.AskDownloadAuthorization(U), C.SendReports()),
        after={"restarts": 0},
    ),
    Case(
        "restarted/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Restarted(),
        S.DOWNLOAD_DEFERRED,
        (C.StartTimer("defer", DEFER_UNTIL, U), C.SendReports()),
        after={"restarts": 0, "defer_until": DEFER_UNTIL},
    ),
    Case(
        "restarted/download-deferred/no-deadline",
        S.DOWNLOAD_DEFERRED,
        ev.Restarted(),
        S.DOWNLOAD_DEFERRED,
        (C.StartTimer("defer", NOW, U), C.SendReports()),
        start={"defer_until": None},
    ),
    Case(
        "restarted/downloading",
        S.DOWNLOADING,
        ev.Restarted(),
        S.DOWNLOADING,
        (C.StartDownload(U), C.SendReports()),
        after={"restarts": 1},
    ),
    Case(
        "restarted/downloading/below-limit",
        S.DOWNLOADING,
        ev.Restarted(),
        S.DOWNLOADING,
        (C.StartDownload(U), C.SendReports()),
        start={"restarts": 1},
        after={"restarts": 2},
    ),
    Case(
        "restarted/verifying",
        S.VERIFYING,
        ev.Restarted(),
        S.VERIFYING,
        (C.VerifyImage(U), C.SendReports()),
        after={"restarts": 1},
    ),
    Case(
        "restarted/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Restarted(),
        S.AWAIT_INSTALL_AUTH,
        (C.AskInstallAuthorization(U), C.SendReports()),
        after={"restarts": 0},
    ),
    Case(
        "restarted/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Restarted(),
        S.INSTALL_DEFERRED,
        (C.StartTimer("defer", DEFER_UNTIL, U), C.SendReports()),
        after={"restarts": 0},
    ),
    Case(
        "restarted/installing",
        S.INSTALLING,
        ev.Restarted(),
        S.INSTALLING,
        (C.Install(U), C.SendReports()),
        after={"restarts": 1},
    ),
    Case(
        "restarted/await-restart/rebooted",
        S.AWAIT_RESTART,
        ev.Restarted(),
        S.AWAIT_RESTART,
        # Another boot than the one that asked: the restart happened; does the new image run?
        (C.CheckBoot(U), C.SendReports()),
        after={"restarts": 1, "boot_id": EARLIER_BOOT},
    ),
    Case(
        "restarted/await-restart/same-boot",
        S.AWAIT_RESTART,
        ev.Restarted(),
        S.AWAIT_RESTART,
        # Only fota restarted (a crash, an upgrade of fota itself): ask for the restart again.
        (C.RequestRestart(U), C.SendReports()),
        start={"boot_id": BOOT},
        after={"restarts": 1, "boot_id": BOOT},
    ),
    Case(
        "restarted/await-restart/boot-unknown",
        S.AWAIT_RESTART,
        ev.Restarted(),
        S.AWAIT_RESTART,
        # No boot id when the restart was asked for: nobody can tell, the installer is asked.
        (C.CheckBoot(U), C.SendReports()),
        start={"boot_id": ""},
        boot="",
    ),
    Case(
        "restarted/await-commit",
        S.AWAIT_COMMIT,
        ev.Restarted(),
        S.AWAIT_COMMIT,
        # The retry timer is gone with the restart: an attempt at once (the deadline stays).
        (C.RunSelfTest(U), C.SendReports()),
        after={"restarts": 1, "commit_by": COMMIT_BY},
    ),
    Case(
        "restarted/await-commit/tested",
        S.AWAIT_COMMIT,
        ev.Restarted(),
        S.AWAIT_COMMIT,
        # The self-test passed; the commit may have been cut short: commit again (idempotent).
        (C.Commit(U), C.SendReports()),
        start={"tested": True},
        after={"restarts": 1, "tested": True},
    ),
    Case(
        "restarted/rolling-back",
        S.ROLLING_BACK,
        ev.Restarted(),
        S.ROLLING_BACK,
        # After the restart the rollback asked for, or a crash: roll back again (idempotent).
        (C.Rollback(U), C.SendReports()),
        start={"boot_id": EARLIER_BOOT},
        after={"restarts": 1, "failure": FAILURE},
    ),
    Case(
        "restarted/failed",
        S.FAILED,
        ev.Restarted(),
        S.FAILED,
        # Nothing to do: the rollback finished before FAILED was journaled (no rollback again).
        (C.SendReports(),),
        start={"restarts": 2},
        after={"restarts": 2},
    ),
    Case(
        "restarted/await-download/limit-not-counted",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Restarted(),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.AskDownloadAuthorization(U), C.SendReports()),
        start={"restarts": 2},
        after={"restarts": 2},
    ),
    Case(
        "restarted/install-deferred/limit-not-counted",
        S.INSTALL_DEFERRED,
        ev.Restarted(),
        S.INSTALL_DEFERRED,
        (C.StartTimer("defer", DEFER_UNTIL, U), C.SendReports()),
        start={"restarts": 2},
        after={"restarts": 2},
    ),
    Case(
        "restarted/downloading/limit",
        S.DOWNLOADING,
        ev.Restarted(),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.FAILED, "restart limit 2 reached")),
        ((S.FAILED, R.FAILED),),
        start={"restarts": 2},
        after={"restarts": 2, "pending": PENDING.digest},
        report=Report(7, S.FAILED, R.FAILED, U, 11, 0, "restart limit 2 reached"),
    ),
    Case(
        "restarted/verifying/limit",
        S.VERIFYING,
        ev.Restarted(),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.FAILED, "restart limit 2 reached")),
        ((S.FAILED, R.FAILED),),
        start={"restarts": 2},
    ),
    # From the install on, a reboot loop rolls back (with a restart budget of its own).
    Case(
        "restarted/installing/limit",
        S.INSTALLING,
        ev.Restarted(),
        S.ROLLING_BACK,
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"restarts": 2},
        after={"restarts": 0, "failure": "restart limit 2 reached in INSTALLING"},
        report=Report(
            7, S.ROLLING_BACK, R.FAILED, U, 11, 2560, "restart limit 2 reached in INSTALLING"
        ),
    ),
    Case(
        "restarted/await-restart/limit",
        S.AWAIT_RESTART,
        ev.Restarted(),
        S.ROLLING_BACK,
        # The new image keeps restarting the device before fota can check it.
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"restarts": 2},
        after={
            "restarts": 0,
            "boot_id": "",
            "failure": "restart limit 2 reached in AWAIT_RESTART",
        },
    ),
    Case(
        "restarted/await-commit/limit",
        S.AWAIT_COMMIT,
        ev.Restarted(),
        S.ROLLING_BACK,
        (C.SendReports(), C.CancelTimer("selftest"), C.Rollback(U)),
        ((S.ROLLING_BACK, R.FAILED),),
        start={"restarts": 5},
        after={
            "restarts": 0,
            "tested": False,
            "failure": "restart limit 2 reached in AWAIT_COMMIT",
        },
    ),
    Case(
        "restarted/await-commit/limit-while-committing",
        S.AWAIT_COMMIT,
        ev.Restarted(),
        S.AWAIT_COMMIT,
        # The self-test passed: the commit may have dropped what a rollback needs, so it is
        # finished, however many restarts it took.
        (C.Commit(U), C.SendReports()),
        start={"restarts": 5, "tested": True},
        after={"restarts": 6, "tested": True},
    ),
    Case(
        "restarted/rolling-back/limit",
        S.ROLLING_BACK,
        ev.Restarted(),
        S.FAILED,
        # The rollback itself loops: give up; the device needs attention.
        (
            C.SendReports(),
            C.NotifyComplete(
                U, R.ROLLBACK_FAILED, f"rollback failed (restart limit 2 reached): {FAILURE}"
            ),
            C.CheckAnnouncement(),
        ),
        ((S.FAILED, R.ROLLBACK_FAILED),),
        start={"restarts": 2, "boot_id": EARLIER_BOOT},
        after={"restarts": 2, "boot_id": "", "pending": PENDING.digest},
        report=Report(
            7,
            S.FAILED,
            R.ROLLBACK_FAILED,
            U,
            11,
            2560,
            f"rollback failed (restart limit 2 reached): {FAILURE}",
        ),
    ),
    # -- pending_lost: in every state, the update whose manifest the journal could not load is
    # dropped; the journal reported it (no report here), nothing runs yet at a start. ------
    *(
        Case(
            f"pending-lost/{state.name.lower().replace('_', '-')}",
            state,
            ev.PendingLost("pending manifest invalid: update dropped"),
            S.IDLE,
            after={
                "pending": None,
                "manifest_uri": None,
                "verified": b"",
                "defer_until": None,
                "defer_reason": "",
                "boot_id": "",
                "commit_by": None,
                "failure": "",
                "first_seen": None,
                "outbox": (PRIOR,),
                "installed": INSTALLED_POLITE.digest,
            },
        )
        for state in State
    ),
    # -- report_delivered: in every state, removes the report from the durable outbox -------
    Case("delivered/idle", S.IDLE, ev.ReportDelivered(6), S.IDLE, after={"outbox": ()}),
    Case(
        "delivered/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.ReportDelivered(6),
        S.AWAIT_DOWNLOAD_AUTH,
        after={"outbox": ()},
    ),
    Case(
        "delivered/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.ReportDelivered(6),
        S.DOWNLOAD_DEFERRED,
        after={"outbox": ()},
    ),
    Case(
        "delivered/download-held",
        S.DOWNLOAD_HELD,
        ev.ReportDelivered(6),
        S.DOWNLOAD_HELD,
        after={"outbox": ()},
    ),
    Case(
        "delivered/install-held",
        S.INSTALL_HELD,
        ev.ReportDelivered(6),
        S.INSTALL_HELD,
        after={"outbox": ()},
    ),
    Case(
        "delivered/downloading",
        S.DOWNLOADING,
        ev.ReportDelivered(6),
        S.DOWNLOADING,
        after={"outbox": ()},
    ),
    Case(
        "delivered/verifying",
        S.VERIFYING,
        ev.ReportDelivered(6),
        S.VERIFYING,
        after={"outbox": ()},
    ),
    Case(
        "delivered/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.ReportDelivered(6),
        S.AWAIT_INSTALL_AUTH,
        after={"outbox": ()},
    ),
    Case(
        "delivered/install-deferred",
        S.INSTALL_DEFERRED,
        ev.ReportDelivered(6),
        S.INSTALL_DEFERRED,
        after={"outbox": ()},
    ),
    Case(
        "delivered/installing",
        S.INSTALLING,
        ev.ReportDelivered(6),
        S.INSTALLING,
        after={"outbox": ()},
    ),
    Case(
        "delivered/await-restart",
        S.AWAIT_RESTART,
        ev.ReportDelivered(6),
        S.AWAIT_RESTART,
        after={"outbox": ()},
    ),
    Case(
        "delivered/await-commit",
        S.AWAIT_COMMIT,
        ev.ReportDelivered(6),
        S.AWAIT_COMMIT,
        after={"outbox": ()},
    ),
    Case(
        "delivered/rolling-back",
        S.ROLLING_BACK,
        ev.ReportDelivered(6),
        S.ROLLING_BACK,
        after={"outbox": ()},
    ),
    Case("delivered/failed", S.FAILED, ev.ReportDelivered(6), S.FAILED, after={"outbox": ()}),
    Case(
        "delivered/one-of-two",
        S.DOWNLOADING,
        ev.ReportDelivered(5),
        S.DOWNLOADING,
        start={"outbox": (Report(5, S.IDLE, R.INITIAL), PRIOR)},
        after={"outbox": (PRIOR,), "report_seq": 7},
    ),
    Case(
        "delivered/unknown-sequence",
        S.IDLE,
        ev.ReportDelivered(99),
        S.IDLE,
        after={"outbox": (PRIOR,), "report_seq": 7},
    ),
    # -- keyset_applied: in every state, refusals are forgotten and a floor reset is taken ------
    *(
        Case(
            f"keyset/{state.name.lower()}/floor-reset",
            state,
            ev.KeysetApplied(2, 5),
            state,
            (C.SendReports(),),
            ((state, R.INITIAL),),
            start={"refused": (sha256(RAW_ROLLBACK),), "keyset_version": 1},
            after={"refused": (), "keyset_version": 2, "floor": 5},
            report=_floor_report(state),
        )
        for state in S
    ),
    # A keyset without a floor reset: refusals are judged again, nothing is reported.
    Case(
        "keyset/idle/no-floor",
        S.IDLE,
        ev.KeysetApplied(3),
        S.IDLE,
        start={"refused": (sha256(RAW_ROLLBACK),), "floor": 7, "keyset_version": 2},
        after={"refused": (), "keyset_version": 3, "floor": 7},
    ),
    # The stored keyset offered again at start (or an older one): nothing changes.
    Case(
        "keyset/downloading/not-newer",
        S.DOWNLOADING,
        ev.KeysetApplied(2, 0),
        S.DOWNLOADING,
        start={"refused": (sha256(RAW_ROLLBACK),), "keyset_version": 2},
        after={"refused": (sha256(RAW_ROLLBACK),), "keyset_version": 2, "floor": None},
    ),
    # -- announcements_stale: in every state, a report says so; the state does not change ---
    *(
        Case(
            f"stale/{state.name.lower()}",
            state,
            ev.AnnouncementsStale(3600.0, 1_700_000_000.0),
            state,
            (C.SendReports(),),
            ((state, R.INITIAL),),
            report=Report(
                7,
                state,
                R.INITIAL,
                U,
                11,
                2560 if state in _DOWNLOADED else 0,
                "stale: no fresh announcement for 3600 s",
            )
            if state not in (S.IDLE, S.FAILED)
            else None,
        )
        for state in S
    ),
)


# -- the table, run -----------------------------------------------------------------------------


def _param(case: Case) -> Any:
    """A case as a test parameter; a case that documents a product bug is a strict xfail."""
    if case.bug:
        mark = pytest.mark.xfail(strict=True, reason=f"product: {case.bug}")
        return pytest.param(case, id=case.id, marks=mark)
    return pytest.param(case, id=case.id)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_transition(case: Case) -> None:
    before = start_record(case.state, case.installed, case.pending, **case.start)
    driven = build(
        before,
        case.installed,
        case.policy,
        pending=case.pending,
        handler=case.handler,
        boot=case.boot,
    )
    model = driven.model
    pending_before, installed_before = model.pending, model.installed

    accepted = await driven.fire(case.event)

    assert accepted is case.accepted
    assert model.state is case.new_state
    assert model.record.state is model.state, "every persisted state is the machine's state"
    assert driven.take_commands() == list(case.commands)
    added = [r for r in model.record.outbox if r.sequence >= before.report_seq]
    assert [(r.state, r.result) for r in added] == list(case.reports)
    assert [r.sequence for r in added] == list(range(before.report_seq, model.record.report_seq))
    for name, value in case.after.items():
        assert getattr(model.record, name) == value, name
    if case.report is not None:
        assert added[case.report.sequence - before.report_seq] == case.report
    if not case.accepted:
        assert model.record == before
        assert model.pending is pending_before
        assert model.installed is installed_before
        assert model.handler_present is case.handler
    else:
        # The case covers the row it claims to (see test_cases_cover_every_row_and_source).
        row = TRANSITIONS[_row_for(case.event.trigger, case.state, case.new_state, case.via)]
        assert driven.last is not None and driven.last.row is row, "went through another row"
    if isinstance(case.event, ev.HandlerChanged):
        assert model.handler_present is case.event.present
    # The model's manifests agree with the digests the record persists.
    assert model.record.pending == (model.pending.digest if model.pending else None)
    assert model.record.installed == (model.installed.digest if model.installed else None)


async def test_commit_makes_the_update_the_installed_image() -> None:
    driven = build(start_record(S.AWAIT_COMMIT, "polite"), "polite")
    model = driven.model
    assert await driven.fire(ev.SelfTestFinished(U, True))
    assert model.installed is INSTALLED_POLITE  # not before the commit finished
    assert await driven.fire(ev.CommitFinished(U))
    assert model.installed is PENDING
    assert model.pending is None
    # The committed image is polite: the next update asks first.
    assert await driven.fire(fetched(NEW.raw))
    assert model.state is S.AWAIT_DOWNLOAD_AUTH


async def test_impolite_image_then_polite_one() -> None:
    # Microvisor's rule: an impolite running image installs its polite successor (PENDING) at
    # once; the successor, now running, makes the next update ask.
    driven = build(start_record(S.VERIFYING, "impolite"), "impolite")
    model = driven.model
    assert await driven.fire(ev.ImageChecked(U, True))
    assert _state(model) is S.INSTALLING
    assert await driven.fire(ev.InstallFinished(U))
    assert await driven.fire(ev.SelfTestFinished(U, True))
    assert await driven.fire(ev.CommitFinished(U))
    assert model.installed is PENDING
    assert await driven.fire(fetched(NEW.raw))
    assert _state(model) is S.AWAIT_DOWNLOAD_AUTH


async def test_install_with_restart_then_rollback_with_restart() -> None:
    # The whole way of an A/B install whose new image fails its self-test until the deadline:
    # restart into the new image, retries, rollback needing a restart of its own, one final
    # report.
    driven = build(start_record(S.INSTALLING, "polite"), "polite", boot=EARLIER_BOOT)
    model = driven.model
    assert await driven.fire(ev.InstallFinished(U, restart=True))
    assert driven.take_commands()[-1] == C.RequestRestart(U)
    model.boot_id = BOOT  # the device restarted
    assert await driven.fire(ev.Restarted())
    assert driven.take_commands()[0] == C.CheckBoot(U)
    assert await driven.fire(ev.BootChecked(U, True))
    assert _state(model) is S.AWAIT_COMMIT
    assert model.record.commit_by == NOW + 300.0
    assert await driven.fire(ev.SelfTestFinished(U, False, "no network"))
    assert _state(model) is S.AWAIT_COMMIT
    # ... until the deadline, five minutes later:
    assert await driven.fire(ev.SelfTestFinished(U, False, "no network"), now=NOW + 300.0)
    assert _state(model) is S.ROLLING_BACK
    assert await driven.fire(ev.RollbackFinished(U, restart=True))
    assert _state(model) is S.ROLLING_BACK
    driven.take_commands()
    assert await driven.fire(ev.Restarted())
    assert driven.take_commands()[0] == C.Rollback(U)
    assert await driven.fire(ev.RollbackFinished(U))
    assert _state(model) is S.FAILED
    assert model.installed is INSTALLED_POLITE
    final = (R.SUCCESS, R.ROLLED_BACK, R.ROLLBACK_FAILED)
    finals = [r for r in model.record.outbox if r.sequence > PRIOR.sequence and r.result in final]
    assert [(r.result, r.detail) for r in finals] == [
        (R.ROLLED_BACK, f"rolled back to version 1.10: {FAILURE}")
    ]


async def test_refused_manifest_is_not_fetched_again() -> None:
    driven = build(start_record(S.IDLE, "polite"), "polite")
    assert await driven.fire(fetched(RAW_ROLLBACK))
    driven.take_commands()
    again = ev.AnnouncementReceived(9, sha256(RAW_ROLLBACK), "coap://fota.example/m/9")
    assert not await driven.fire(again)
    assert driven.take_commands() == []


async def test_rejected_update_is_not_fetched_again() -> None:
    driven = build(start_record(S.AWAIT_DOWNLOAD_AUTH, "polite"), "polite")
    assert await driven.fire(ev.Rejected(U))
    driven.take_commands()
    assert not await driven.fire(ANNOUNCE_PENDING)
    assert await driven.fire(ANNOUNCE_NEW)
    assert driven.take_commands() == [C.FetchManifest(NEW_URI, NEW.digest)]


async def test_cancelled_update_is_not_fetched_again() -> None:
    driven = build(start_record(S.DOWNLOADING, "polite"), "polite")
    assert await driven.fire(CANCEL_PENDING)
    driven.take_commands()
    # The server keeps announcing the cancel, and may announce the withdrawn manifest again.
    assert not await driven.fire(CANCEL_PENDING)
    assert not await driven.fire(ANNOUNCE_PENDING)
    assert driven.take_commands() == []


async def test_refused_cancel_is_reported_once() -> None:
    driven = build(start_record(S.INSTALLING, "polite"), "polite")
    model = driven.model
    assert await driven.fire(CANCEL_PENDING)
    assert driven.take_commands() == [C.SendReports()]
    record = model.record
    # The cancel is announced again (observe, polls): still refused, not reported again.
    assert await driven.fire(CANCEL_PENDING)
    assert driven.take_commands() == []
    assert model.record == record


async def test_pending_manifest_fetched_again_changes_nothing() -> None:
    # Two announcements of the same manifest can each start a fetch before the first result is
    # handled (an observe notification and a poll): the second result must not restart the
    # update's clocks (its deadline counts from first_seen, its deferral bound from
    # deferred_total) nor tell the application its update was superseded.
    before = start_record(S.AWAIT_DOWNLOAD_AUTH, "polite", deferred_total=1200.0)
    driven = build(before, "polite", BOUNDED)
    model = driven.model
    await driven.fire(fetched(PENDING.raw, PENDING_URI))
    assert driven.take_commands() == []
    assert model.record == before


# -- meta-tests: the literal data matches and covers the product's table ------------------------


def _row_for(trigger: str, state: State, new_state: State, via: str | None = None) -> int:
    """Index of the TRANSITIONS row an accepted (trigger, state -> new_state) went through.

    Where several rows have that outcome, ``via`` names the condition of the row meant; without
    it, the row with the fewest conditions (the general one; the first in table order on a tie).
    ``test_transition`` checks that the row found is the row that fired.
    """
    rows = [
        i
        for i, t in enumerate(TRANSITIONS)
        if t.trigger == trigger
        and state in t.source
        and (t.dest is new_state or (t.dest is None and new_state is state))
    ]
    if via is not None:
        rows = [i for i in rows if via in TRANSITIONS[i].conditions]
    assert rows, (trigger, state, new_state, via)
    return min(rows, key=lambda i: (len(TRANSITIONS[i].conditions), i))


def _shadowed() -> set[tuple[int, State]]:
    """(row, state) pairs of the table that no event can reach (see SHADOWED)."""
    return {
        (i, s)
        for i, t in enumerate(TRANSITIONS)
        for s in t.source
        for e in TRANSITIONS[:i]
        if e.trigger == t.trigger
        and s in e.source
        and set(e.conditions) <= set(t.conditions)
        and set(e.unless) <= set(t.unless)
    }


def test_legal_pairs_match_the_table() -> None:
    from_table = {(s, t.trigger) for t in TRANSITIONS for s in t.source}
    literal = {(s, trig) for trig, states in LEGAL.items() for s in states}
    assert literal == from_table
    assert set(LEGAL) == set(triggers())


def test_shadowed_sources_are_the_known_ones() -> None:
    found = {(TRANSITIONS[i].trigger, TRANSITIONS[i].after, s) for i, s in _shadowed()}
    assert found == SHADOWED


def test_cases_cover_every_row_and_source() -> None:
    covered = {
        (_row_for(c.event.trigger, c.state, c.new_state, c.via), c.state)
        for c in CASES
        if c.accepted and not c.bug
    }
    wanted = {(i, s) for i, t in enumerate(TRANSITIONS) for s in t.source} - _shadowed()
    assert wanted - covered == set()


def _conditional() -> set[tuple[State, str]]:
    """(state, trigger) pairs whose rows all have conditions."""
    return {
        (s, trig)
        for trig, states in LEGAL.items()
        for s in states
        if all(t.conditions or t.unless for t in TRANSITIONS if t.trigger == trig and s in t.source)
    }


def test_cases_cover_every_fall_through() -> None:
    # A (state, trigger) pair whose rows all have conditions can drop an event: a case must
    # show that happening (unless its conditions are complementary, see EXHAUSTIVE).
    droppable = _conditional() - EXHAUSTIVE
    dropped = {(c.state, c.event.trigger) for c in CASES if not c.accepted and not c.bug}
    assert droppable - dropped == set()
    assert all((c.state, c.event.trigger) in droppable for c in CASES if not c.accepted)


def test_exhaustive_pairs_cannot_drop() -> None:
    # Each has a row taken unless X, and a row taken on X alone: every event takes one.
    assert EXHAUSTIVE.issubset(_conditional())
    for state, trig in EXHAUSTIVE:
        rows = [t for t in TRANSITIONS if t.trigger == trig and state in t.source]
        unless = {t.unless for t in rows if not t.conditions and len(t.unless) == 1}
        only = {t.conditions for t in rows if not t.unless and len(t.conditions) == 1}
        assert unless & only, (state, trig)


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


# -- every illegal (state, trigger) pair ---------------------------------------------------------

EVENT_FOR: dict[str, ev.Event] = {
    "announcement_received": ANNOUNCE_NEW,
    "manifest_fetched": fetched(NEW.raw),
    "authorized": ev.Authorized(U),
    "deferred": ev.Deferred(U, LATER),
    "rejected": ev.Rejected(U),
    "resume_requested": ev.ResumeRequested(),
    "handler_changed": ev.HandlerChanged(True),
    "timer_fired": ev.TimerFired("retry", U),
    "gates_checked": ev.GatesChecked(U),
    "lock_taken": ev.LockTaken("backup", 600.0),
    "lock_released": ev.LockReleased("backup"),
    "fragment_verified": ev.FragmentVerified(U, 0),
    "fragments_invalid": ev.FragmentsInvalid(U, (0,)),
    "download_finished": ev.DownloadFinished(U),
    "download_failed": ev.DownloadFailed(U, TransportError("timeout")),
    "image_checked": ev.ImageChecked(U, True),
    "install_finished": ev.InstallFinished(U),
    "boot_checked": ev.BootChecked(U, True),
    "self_test_finished": ev.SelfTestFinished(U, True),
    "commit_finished": ev.CommitFinished(U),
    "rollback_finished": ev.RollbackFinished(U),
    "pending_lost": ev.PendingLost("pending manifest missing: update dropped"),
    "restarted": ev.Restarted(),
    "report_delivered": ev.ReportDelivered(6),
    "keyset_applied": ev.KeysetApplied(2, 5),
    "announcements_stale": ev.AnnouncementsStale(3600.0),
}
"""For each trigger, an event about the current update, as the event that could be legal."""

ILLEGAL = [(s, trig) for s in State for trig in triggers() if s not in LEGAL.get(trig, frozenset())]


def test_illegal_pair_count() -> None:
    # 14 states and 26 triggers: 172 legal pairs, 192 illegal ones.
    assert (len(State), len(triggers())) == (14, 26)
    assert sum(map(len, LEGAL.values())) == 172
    assert len(ILLEGAL) == len(State) * len(triggers()) - sum(map(len, LEGAL.values())) == 192
    assert set(EVENT_FOR) == set(triggers())
    assert all(e.trigger == trig for trig, e in EVENT_FOR.items())


@pytest.mark.parametrize("installed", ["polite", "none"])
@pytest.mark.parametrize(("state", "trigger"), ILLEGAL, ids=[f"{s.name}-{t}" for s, t in ILLEGAL])
async def test_illegal_pair_changes_nothing(
    state: State, trigger: str, installed: Installed
) -> None:
    before = start_record(state, installed)
    driven = build(before, installed)
    model = driven.model
    pending_before = model.pending
    accepted = await driven.fire(EVENT_FOR[trigger])
    assert accepted is False
    assert model.state is state
    assert model.record == before
    assert model.record.state is model.state
    assert model.pending is pending_before
    assert driven.take_commands() == []
