"""Tier 1: the core state machine as a table, ``state + event -> state + commands``.

The expected behaviour is written out below as data (``CASES`` and ``LEGAL``), not derived from
``fota.core.machine.TRANSITIONS``: a change to the table in the product must be matched by a
deliberate change here. Meta-tests check that the data covers every row (and every source state
of every row) of ``TRANSITIONS``, every conditional row's fall-through, and every illegal
``(state, trigger)`` pair.

The machine is built exactly as :class:`fota.engine.Engine` builds it, with real Ed25519-signed
manifests, a real :class:`~fota.core.policy.Policy` and a real trust store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from transitions.core import MachineError
from transitions.extensions.asyncio import AsyncMachine

from fota.core import commands as C
from fota.core import events as ev
from fota.core.machine import TRANSITIONS, Model, transitions_kwargs, triggers
from fota.core.manifest import (
    MAX_MANIFEST_BYTES,
    Component,
    Manifest,
    ManifestBody,
    TrustStore,
    kid_for,
    sign,
    update_id_of,
    verify,
)
from fota.core.policy import Policy
from fota.core.record import Record, Report
from fota.core.states import State
from fota.errors import (
    ImageChanged,
    InstallError,
    PermanentServerError,
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
NOW = 1_000_000.0
DEFER_UNTIL = 1_003_600.0
"""The deferral a record in a *_DEFERRED state starts with."""
LATER = 1_007_200.75
"""A new deferral (fractional on purpose: reports carry whole seconds)."""
STALE = "00000000deadbeef"
"""An update id that is never the current one."""


def _body(
    sequence: int,
    *,
    size: int,
    polite: bool = True,
    device_class: str = DEVICE_CLASS,
    fragment_size: int = 1024,
) -> ManifestBody:
    count = max(1, -(-size // max(1, fragment_size)))
    return ManifestBody(
        sequence=sequence,
        component=Component.FIRMWARE,
        version=f"1.{sequence}",
        device_class=device_class,
        image_size=size,
        image_sha256=hashlib.sha256(b"image %d" % sequence).digest(),
        image_uri=f"/fw/{sequence}.bin",
        fragment_size=fragment_size,
        fragment_sha256=tuple(hashlib.sha256(bytes([i])).digest() for i in range(count)),
        polite=polite,
    )


def _signed(body: ManifestBody, key: ed25519.Ed25519PrivateKey = KEY, kid: bytes = KID) -> bytes:
    return sign(body, key, kid)


def _manifest(body: ManifestBody) -> Manifest:
    return verify(_signed(body), TRUST)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


INSTALLED_POLITE = _manifest(_body(10, size=4096, polite=True))
INSTALLED_IMPOLITE = _manifest(_body(10, size=4096, polite=False))
PENDING = _manifest(_body(11, size=2560))  # 3 fragments; the last one is 512 bytes
PENDING_URI = "coap://fota.example/m/11"
U = PENDING.update_id
NEW = _manifest(_body(12, size=1500))  # 2 fragments
NEW_URI = "coap://fota.example/m/12"
N = NEW.update_id

RAW_BAD_SIGNATURE = _signed(_body(12, size=1500), OTHER_KEY, KID)
RAW_UNKNOWN_KEY = _signed(_body(12, size=1500), OTHER_KEY, OTHER_KID)
RAW_ROLLBACK = _signed(_body(9, size=1500))
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


# -- the machine, built as the engine builds it ------------------------------------------------


_DOWNLOADED = (S.VERIFYING, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED, S.INSTALLING, S.AWAIT_COMMIT)


def start_record(state: State, installed: Installed, **overrides: Any) -> Record:
    """A realistic record in ``state``: PENDING is the update unless the state is IDLE."""
    inst = INSTALLED[installed]
    base = Record(
        state=state,
        installed=inst.digest if inst is not None else None,
        report_seq=7,
        outbox=(PRIOR,),
    )
    if state is not S.IDLE:
        verified = b"\x00"  # waiting for or doing the download
        if state in _DOWNLOADED:
            verified = FULL
        elif state is S.FAILED:
            verified = b"\x03"  # failed part-way
        base = base.evolve(pending=PENDING.digest, manifest_uri=PENDING_URI, verified=verified)
    if state in (S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED):
        base = base.evolve(defer_until=DEFER_UNTIL, defer_reason="busy")
    return base.evolve(**overrides)


def build(record: Record, installed: Installed, policy: Policy = POLICY) -> Model:
    """A Model restored from ``record`` inside an AsyncMachine configured like the engine's."""
    model = Model(
        policy,
        TRUST,
        record,
        pending=PENDING if record.pending is not None else None,
        installed=INSTALLED[installed],
    )
    AsyncMachine(
        model=model,
        states=State,
        transitions=transitions_kwargs(),
        initial=record.state,
        auto_transitions=False,
        send_event=True,
        queued=False,
        after_state_change="sync_state",
    )
    assert model.state is record.state
    return model


async def fire(model: Model, event: ev.Event) -> bool:
    """Trigger as the engine does; an illegal or dropped event returns False."""
    try:
        return bool(await model.trigger(event.trigger, event=event, now=NOW))
    except MachineError:
        return False


# -- the expected table --------------------------------------------------------------------------

LEGAL: dict[str, frozenset[State]] = {
    "announcement_received": frozenset({S.IDLE, S.FAILED}),
    "manifest_fetched": frozenset({S.IDLE, S.FAILED}),
    "authorized": frozenset(
        {S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED}
    ),
    "deferred": frozenset(
        {S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED}
    ),
    "rejected": frozenset(
        {S.AWAIT_DOWNLOAD_AUTH, S.DOWNLOAD_DEFERRED, S.AWAIT_INSTALL_AUTH, S.INSTALL_DEFERRED}
    ),
    "resume_requested": frozenset({S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED}),
    "timer_fired": frozenset({S.DOWNLOAD_DEFERRED, S.INSTALL_DEFERRED, S.DOWNLOADING}),
    "fragment_verified": frozenset({S.DOWNLOADING}),
    "fragments_invalid": frozenset({S.DOWNLOADING}),
    "download_finished": frozenset({S.DOWNLOADING}),
    "download_failed": frozenset({S.DOWNLOADING}),
    "image_checked": frozenset({S.VERIFYING}),
    "install_finished": frozenset({S.INSTALLING}),
    "self_test_finished": frozenset({S.AWAIT_COMMIT}),
    "restarted": frozenset(State),
    "report_delivered": frozenset(State),
}
"""Every (state, trigger) pair that has a row in the table; all others are illegal."""


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
        report: the exact last report appended, for key transitions.
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
    via: str | None = None
    """The condition that tells this row from others with the same outcome (see _row_for)."""


BUDGETS = replace(POLICY, max_download_bytes=100_000, max_download_time=600.0)
"""A policy with both download budgets set."""


def drop(
    id: str,
    state: State,
    event: ev.Event,
    installed: Installed = "polite",
    start: dict[str, Any] | None = None,
) -> Case:
    """A legal (state, trigger) pair whose conditions fail: the event changes nothing."""
    return Case(id, state, event, state, installed=installed, start=start or {}, accepted=False)


_FAIL = (C.StopDownload(), C.CancelTimer("retry"))
"""What ``fail`` always emits after its report."""
_CLEARED: dict[str, Any] = {
    "pending": None,
    "manifest_uri": None,
    "verified": b"",
    "defer_until": None,
    "defer_reason": "",
    "attempts": 0,
    "restarts": 0,
    "progress": 0,
}

CASES: tuple[Case, ...] = (
    # -- announcement_received ------------------------------------------------------------
    Case(
        "announce/idle/new",
        S.IDLE,
        ev.AnnouncementReceived(12, NEW.digest, NEW_URI),
        S.IDLE,
        (C.FetchManifest(NEW_URI, NEW.digest),),
    ),
    Case(
        "announce/failed/new",
        S.FAILED,
        ev.AnnouncementReceived(12, NEW.digest, NEW_URI),
        S.FAILED,
        (C.FetchManifest(NEW_URI, NEW.digest),),
    ),
    drop(
        "announce/idle/installed",
        S.IDLE,
        ev.AnnouncementReceived(10, INSTALLED_POLITE.digest, "coap://fota.example/m/10"),
    ),
    drop(
        "announce/failed/pending",
        S.FAILED,
        ev.AnnouncementReceived(11, PENDING.digest, PENDING_URI),
    ),
    drop(
        "announce/idle/refused",
        S.IDLE,
        ev.AnnouncementReceived(12, NEW.digest, NEW_URI),
        start={"refused": NEW.digest},
    ),
    drop("announce/idle/no-manifest", S.IDLE, ev.AnnouncementReceived(12, None, None)),
    drop("announce/idle/no-uri", S.IDLE, ev.AnnouncementReceived(12, NEW.digest, None)),
    # -- manifest_fetched: start at once (first install / impolite image) or ask ----------
    Case(
        "fetched/idle/first-install",
        S.IDLE,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="none",
        after={"pending": NEW.digest, "manifest_uri": NEW_URI, "verified": b"\x00"},
        report=Report(7, S.DOWNLOADING, R.INITIAL, N, 12, 0),
    ),
    Case(
        "fetched/idle/impolite",
        S.IDLE,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="impolite",
        after={"pending": NEW.digest, "manifest_uri": NEW_URI, "verified": b"\x00"},
    ),
    Case(
        "fetched/idle/polite",
        S.IDLE,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after={"pending": NEW.digest, "manifest_uri": NEW_URI, "verified": b"\x00"},
        report=Report(7, S.AWAIT_DOWNLOAD_AUTH, R.INITIAL, N, 12, 0),
    ),
    Case(
        "fetched/failed/polite",
        S.FAILED,
        fetched(NEW.raw),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.DiscardCandidate(), C.SendReports(), C.AskDownloadAuthorization(N)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        start={"attempts": 2, "restarts": 1, "progress": 50},
        after={
            "pending": NEW.digest,
            "manifest_uri": NEW_URI,
            "verified": b"\x00",
            "attempts": 0,
            "restarts": 0,
            "progress": 0,
        },
    ),
    Case(
        "fetched/failed/first-install",
        S.FAILED,
        fetched(NEW.raw),
        S.DOWNLOADING,
        (C.DiscardCandidate(), C.SendReports(), C.StartDownload(N)),
        ((S.DOWNLOADING, R.INITIAL),),
        installed="none",
        after={"pending": NEW.digest, "verified": b"\x00"},
    ),
    # -- manifest_fetched: refused, one case per result code ------------------------------
    Case(
        "fetched/idle/refused-bad-signature",
        S.IDLE,
        fetched(RAW_BAD_SIGNATURE),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.BAD_SIGNATURE),),
        after={"refused": sha256(RAW_BAD_SIGNATURE), "pending": None},
        report=Report(
            7,
            S.IDLE,
            R.BAD_SIGNATURE,
            update_id_of(sha256(RAW_BAD_SIGNATURE)),
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
        after={"refused": sha256(RAW_UNKNOWN_KEY)},
    ),
    Case(
        "fetched/idle/refused-rollback",
        S.IDLE,
        fetched(RAW_ROLLBACK),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.ROLLBACK),),
        after={"refused": sha256(RAW_ROLLBACK)},
    ),
    Case(
        "fetched/idle/refused-wrong-device-class",
        S.IDLE,
        fetched(RAW_WRONG_CLASS),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.WRONG_DEVICE_CLASS),),
        installed="none",
        after={"refused": sha256(RAW_WRONG_CLASS)},
    ),
    Case(
        "fetched/idle/refused-oversize-image",
        S.IDLE,
        fetched(RAW_OVERSIZE_IMAGE),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.OVERSIZE),),
        after={"refused": sha256(RAW_OVERSIZE_IMAGE)},
    ),
    Case(
        "fetched/idle/refused-cut-off",
        S.IDLE,
        ev.ManifestFetched(raw=RAW_CUT_OFF, uri=NEW_URI, digest=NEW.digest),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.OVERSIZE),),
        installed="none",
        after={"refused": NEW.digest},
    ),
    Case(
        "fetched/idle/refused-malformed",
        S.IDLE,
        fetched(RAW_MALFORMED),
        S.IDLE,
        (C.SendReports(),),
        ((S.IDLE, R.MALFORMED),),
        after={"refused": sha256(RAW_MALFORMED)},
    ),
    Case(
        "fetched/failed/refused-rollback",
        S.FAILED,
        fetched(RAW_ROLLBACK),
        S.FAILED,
        (C.SendReports(),),
        ((S.FAILED, R.ROLLBACK),),
        after={"refused": sha256(RAW_ROLLBACK), "pending": PENDING.digest, "verified": b"\x03"},
        report=Report(
            7,
            S.FAILED,
            R.ROLLBACK,
            update_id_of(sha256(RAW_ROLLBACK)),
            detail="manifest sequence: 9 is not greater than 10 (replay or downgrade)",
        ),
    ),
    # -- authorized ------------------------------------------------------------------------
    Case(
        "authorized/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Authorized(U),
        S.DOWNLOADING,
        (C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
    ),
    Case(
        "authorized/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Authorized(U),
        S.DOWNLOADING,
        (C.CancelTimer("defer"), C.SendReports(), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
        after={"defer_until": None, "defer_reason": ""},
    ),
    Case(
        "authorized/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Authorized(U),
        S.INSTALLING,
        (C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
    ),
    Case(
        "authorized/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Authorized(U),
        S.INSTALLING,
        (C.CancelTimer("defer"), C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        after={"defer_until": None, "defer_reason": ""},
    ),
    drop("authorized/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.Authorized(STALE)),
    drop("authorized/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.Authorized(STALE)),
    drop("authorized/await-install/stale", S.AWAIT_INSTALL_AUTH, ev.Authorized(STALE)),
    drop("authorized/install-deferred/stale", S.INSTALL_DEFERRED, ev.Authorized(STALE)),
    # -- deferred ---------------------------------------------------------------------------
    Case(
        "deferred/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOAD_DEFERRED,
        (C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        after={"defer_until": LATER, "defer_reason": "night"},
        report=Report(7, S.DOWNLOAD_DEFERRED, R.DEFERRED, U, 11, 0, "night", 1_007_200),
    ),
    Case(
        "deferred/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Deferred(U, LATER, "night"),
        S.DOWNLOAD_DEFERRED,
        (C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.DOWNLOAD_DEFERRED, R.DEFERRED),),
        after={"defer_until": LATER, "defer_reason": "night"},
    ),
    Case(
        "deferred/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Deferred(U, LATER, "night"),
        S.INSTALL_DEFERRED,
        (C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.INSTALL_DEFERRED, R.DEFERRED),),
        after={"defer_until": LATER, "defer_reason": "night"},
        report=Report(7, S.INSTALL_DEFERRED, R.DEFERRED, U, 11, 2560, "night", 1_007_200),
    ),
    Case(
        "deferred/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Deferred(U, LATER, "night"),
        S.INSTALL_DEFERRED,
        (C.SendReports(), C.StartTimer("defer", LATER, U)),
        ((S.INSTALL_DEFERRED, R.DEFERRED),),
        after={"defer_until": LATER, "defer_reason": "night"},
    ),
    drop("deferred/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.Deferred(STALE, LATER)),
    drop("deferred/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.Deferred(STALE, LATER)),
    drop("deferred/await-install/stale", S.AWAIT_INSTALL_AUTH, ev.Deferred(STALE, LATER)),
    drop("deferred/install-deferred/stale", S.INSTALL_DEFERRED, ev.Deferred(STALE, LATER)),
    # -- rejected ---------------------------------------------------------------------------
    Case(
        "rejected/await-download",
        S.AWAIT_DOWNLOAD_AUTH,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "refused": PENDING.digest},
        report=Report(7, S.IDLE, R.REJECTED, U, 11, 0, "not wanted"),
    ),
    Case(
        "rejected/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            C.CancelTimer("defer"),
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "refused": PENDING.digest},
    ),
    Case(
        "rejected/await-install",
        S.AWAIT_INSTALL_AUTH,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "refused": PENDING.digest},
        report=Report(7, S.IDLE, R.REJECTED, U, 11, 2560, "not wanted"),
    ),
    Case(
        "rejected/install-deferred",
        S.INSTALL_DEFERRED,
        ev.Rejected(U, "not wanted"),
        S.IDLE,
        (
            C.CancelTimer("defer"),
            C.SendReports(),
            C.DiscardCandidate(),
            C.NotifyComplete(U, R.REJECTED, "not wanted"),
        ),
        ((S.IDLE, R.REJECTED),),
        after={**_CLEARED, "refused": PENDING.digest},
    ),
    drop("rejected/await-download/stale", S.AWAIT_DOWNLOAD_AUTH, ev.Rejected(STALE)),
    drop("rejected/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.Rejected(STALE)),
    drop("rejected/await-install/stale", S.AWAIT_INSTALL_AUTH, ev.Rejected(STALE)),
    drop("rejected/install-deferred/stale", S.INSTALL_DEFERRED, ev.Rejected(STALE)),
    # -- resume_requested -----------------------------------------------------------------
    Case(
        "resume/download-deferred",
        S.DOWNLOAD_DEFERRED,
        ev.ResumeRequested(),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.CancelTimer("defer"), C.SendReports(), C.AskDownloadAuthorization(U)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": ""},
    ),
    Case(
        "resume/install-deferred",
        S.INSTALL_DEFERRED,
        ev.ResumeRequested(),
        S.AWAIT_INSTALL_AUTH,
        (C.CancelTimer("defer"), C.SendReports(), C.AskInstallAuthorization(U)),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": ""},
    ),
    # -- timer_fired ------------------------------------------------------------------------
    Case(
        "timer/download-deferred/defer",
        S.DOWNLOAD_DEFERRED,
        ev.TimerFired("defer", U),
        S.AWAIT_DOWNLOAD_AUTH,
        (C.CancelTimer("defer"), C.SendReports(), C.AskDownloadAuthorization(U)),
        ((S.AWAIT_DOWNLOAD_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": ""},
    ),
    Case(
        "timer/install-deferred/defer",
        S.INSTALL_DEFERRED,
        ev.TimerFired("defer", U),
        S.AWAIT_INSTALL_AUTH,
        (C.CancelTimer("defer"), C.SendReports(), C.AskInstallAuthorization(U)),
        ((S.AWAIT_INSTALL_AUTH, R.INITIAL),),
        after={"defer_until": None, "defer_reason": ""},
    ),
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
    drop("timer/download-deferred/stale", S.DOWNLOAD_DEFERRED, ev.TimerFired("defer", STALE)),
    drop("timer/install-deferred/stale", S.INSTALL_DEFERRED, ev.TimerFired("defer", STALE)),
    drop("timer/downloading/stale", S.DOWNLOADING, ev.TimerFired("retry", STALE)),
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
        (C.SendReports(), C.StartTimer("budget", NOW + 600.0, U), C.StartDownload(U)),
        ((S.DOWNLOADING, R.INITIAL),),
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
        (C.StartTimer("retry", NOW + 1.0, U),),
        start={"verified": b"\x03"},
        after={"attempts": 1, "verified": b"\x03"},
    ),
    Case(
        "download-finished/incomplete-again",
        S.DOWNLOADING,
        ev.DownloadFinished(U),
        S.DOWNLOADING,
        (C.StartTimer("retry", NOW + 2.0, U),),
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
        (C.StartTimer("retry", NOW + 1.0, U),),
        after={"attempts": 1},
    ),
    Case(
        "download-failed/retryable-backoff",
        S.DOWNLOADING,
        ev.DownloadFailed(U, TransportError("timeout")),
        S.DOWNLOADING,
        (C.StartTimer("retry", NOW + 2.0, U),),
        start={"attempts": 1},
        after={"attempts": 2},
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
    # -- image_checked ----------------------------------------------------------------------
    Case(
        "image/ok/first-install",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        (C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        installed="none",
    ),
    Case(
        "image/ok/impolite",
        S.VERIFYING,
        ev.ImageChecked(U, True),
        S.INSTALLING,
        (C.SendReports(), C.Install(U)),
        ((S.INSTALLING, R.INITIAL),),
        installed="impolite",
    ),
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
    # -- install_finished -------------------------------------------------------------------
    Case(
        "install/ok",
        S.INSTALLING,
        ev.InstallFinished(U),
        S.AWAIT_COMMIT,
        (C.SendReports(), C.RunSelfTest(U)),
        ((S.AWAIT_COMMIT, R.INITIAL),),
    ),
    Case(
        "install/failed",
        S.INSTALLING,
        ev.InstallFinished(U, InstallError("boot slot busy")),
        S.FAILED,
        (
            C.Rollback(U),
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(U, R.FAILED, "boot slot busy"),
        ),
        ((S.FAILED, R.FAILED),),
        after={"pending": PENDING.digest},
    ),
    drop("install/stale", S.INSTALLING, ev.InstallFinished(STALE)),
    # -- self_test_finished -----------------------------------------------------------------
    Case(
        "self-test/ok-commits",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, True),
        S.IDLE,
        (C.SendReports(), C.Commit(U), C.NotifyComplete(U, R.SUCCESS)),
        ((S.IDLE, R.SUCCESS),),
        start={"attempts": 1, "restarts": 1},
        after={**_CLEARED, "installed": PENDING.digest},
        report=Report(7, S.IDLE, R.SUCCESS, U, 11, 2560),
    ),
    Case(
        "self-test/failed",
        S.AWAIT_COMMIT,
        ev.SelfTestFinished(U, False, "no network"),
        S.FAILED,
        (
            C.Rollback(U),
            C.SendReports(),
            *_FAIL,
            C.NotifyComplete(U, R.FAILED, "self-test failed: no network"),
        ),
        ((S.FAILED, R.FAILED),),
        after={"installed": INSTALLED_POLITE.digest, "pending": PENDING.digest},
        report=Report(7, S.FAILED, R.FAILED, U, 11, 2560, "self-test failed: no network"),
    ),
    drop("self-test/stale", S.AWAIT_COMMIT, ev.SelfTestFinished(STALE, True)),
    # -- restarted: re-issue the restored state's work ---------------------------------------
    Case(
        "restarted/idle/empty-outbox",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        (C.Commit(INSTALLED_POLITE.update_id),),  # commit again: a crash may have cut it short
        start={"outbox": ()},
    ),
    Case(
        "restarted/idle",
        S.IDLE,
        ev.Restarted(),
        S.IDLE,
        (C.Commit(INSTALLED_POLITE.update_id), C.SendReports()),
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
        "restarted/await-commit",
        S.AWAIT_COMMIT,
        ev.Restarted(),
        S.AWAIT_COMMIT,
        (C.RunSelfTest(U), C.SendReports()),
        after={"restarts": 1},
    ),
    Case(
        "restarted/failed",
        S.FAILED,
        ev.Restarted(),
        S.FAILED,
        (C.Rollback(U), C.SendReports()),  # roll back again: a crash may have cut it short
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
    Case(
        "restarted/installing/limit",
        S.INSTALLING,
        ev.Restarted(),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.FAILED, "restart limit 2 reached")),
        ((S.FAILED, R.FAILED),),
        start={"restarts": 2},
    ),
    Case(
        "restarted/await-commit/limit",
        S.AWAIT_COMMIT,
        ev.Restarted(),
        S.FAILED,
        (C.SendReports(), *_FAIL, C.NotifyComplete(U, R.FAILED, "restart limit 2 reached")),
        ((S.FAILED, R.FAILED),),
        start={"restarts": 5},
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
        "delivered/await-commit",
        S.AWAIT_COMMIT,
        ev.ReportDelivered(6),
        S.AWAIT_COMMIT,
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
)


# -- the table, run -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_transition(case: Case) -> None:
    before = start_record(case.state, case.installed, **case.start)
    model = build(before, case.installed, case.policy)
    pending_before, installed_before = model.pending, model.installed

    accepted = await fire(model, case.event)

    assert accepted is case.accepted
    assert model.state is case.new_state
    assert model.record.state is model.state, "every persisted state is the machine's state"
    assert model.take_commands() == list(case.commands)
    added = [r for r in model.record.outbox if r.sequence >= before.report_seq]
    assert [(r.state, r.result) for r in added] == list(case.reports)
    assert [r.sequence for r in added] == list(range(before.report_seq, model.record.report_seq))
    for name, value in case.after.items():
        assert getattr(model.record, name) == value, name
    if case.report is not None:
        assert added[-1] == case.report
    if not case.accepted:
        assert model.record == before
        assert model.pending is pending_before
        assert model.installed is installed_before
    # The model's manifests agree with the digests the record persists.
    assert model.record.pending == (model.pending.digest if model.pending else None)
    assert model.record.installed == (model.installed.digest if model.installed else None)


async def test_commit_makes_the_update_the_installed_image() -> None:
    model = build(start_record(S.AWAIT_COMMIT, "polite"), "polite")
    assert await fire(model, ev.SelfTestFinished(U, True))
    assert model.installed is PENDING
    assert model.pending is None
    # The committed image is polite: the next update asks first.
    assert await fire(model, fetched(NEW.raw))
    assert model.state is S.AWAIT_DOWNLOAD_AUTH


async def test_refused_manifest_is_not_fetched_again() -> None:
    model = build(start_record(S.IDLE, "polite"), "polite")
    assert await fire(model, fetched(RAW_ROLLBACK))
    model.take_commands()
    again = ev.AnnouncementReceived(9, sha256(RAW_ROLLBACK), "coap://fota.example/m/9")
    assert not await fire(model, again)
    assert model.take_commands() == []


async def test_rejected_update_is_not_fetched_again() -> None:
    model = build(start_record(S.AWAIT_DOWNLOAD_AUTH, "polite"), "polite")
    assert await fire(model, ev.Rejected(U))
    model.take_commands()
    assert not await fire(model, ev.AnnouncementReceived(11, PENDING.digest, PENDING_URI))
    assert await fire(model, ev.AnnouncementReceived(12, NEW.digest, NEW_URI))
    assert model.take_commands() == [C.FetchManifest(NEW_URI, NEW.digest)]


# -- meta-tests: the literal data matches and covers the product's table ------------------------


def _row_for(trigger: str, state: State, new_state: State, via: str | None = None) -> int:
    """Index of the TRANSITIONS row an accepted (trigger, state -> new_state) went through.

    Where several rows have that outcome, ``via`` names the condition of the row meant; without
    it, the row with the fewest conditions (the general one; the first in table order on a tie).
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


def test_legal_pairs_match_the_table() -> None:
    from_table = {(s, t.trigger) for t in TRANSITIONS for s in t.source}
    literal = {(s, trig) for trig, states in LEGAL.items() for s in states}
    assert literal == from_table
    assert set(LEGAL) == set(triggers())


def test_cases_cover_every_row_and_source() -> None:
    covered = {
        (_row_for(c.event.trigger, c.state, c.new_state, c.via), c.state)
        for c in CASES
        if c.accepted
    }
    wanted = {(i, s) for i, t in enumerate(TRANSITIONS) for s in t.source}
    assert wanted - covered == set()


def test_cases_cover_every_fall_through() -> None:
    # A (state, trigger) pair whose rows all have conditions can drop an event: a case must
    # show that happening.
    droppable = {
        (s, trig)
        for trig, states in LEGAL.items()
        for s in states
        if all(t.conditions or t.unless for t in TRANSITIONS if t.trigger == trig and s in t.source)
    }
    dropped = {(c.state, c.event.trigger) for c in CASES if not c.accepted}
    assert droppable - dropped == set()
    assert all((c.state, c.event.trigger) in droppable for c in CASES if not c.accepted)


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


# -- every illegal (state, trigger) pair ---------------------------------------------------------

EVENT_FOR: dict[str, ev.Event] = {
    "announcement_received": ev.AnnouncementReceived(12, NEW.digest, NEW_URI),
    "manifest_fetched": fetched(NEW.raw),
    "authorized": ev.Authorized(U),
    "deferred": ev.Deferred(U, LATER),
    "rejected": ev.Rejected(U),
    "resume_requested": ev.ResumeRequested(),
    "timer_fired": ev.TimerFired("retry", U),
    "fragment_verified": ev.FragmentVerified(U, 0),
    "fragments_invalid": ev.FragmentsInvalid(U, (0,)),
    "download_finished": ev.DownloadFinished(U),
    "download_failed": ev.DownloadFailed(U, TransportError("timeout")),
    "image_checked": ev.ImageChecked(U, True),
    "install_finished": ev.InstallFinished(U),
    "self_test_finished": ev.SelfTestFinished(U, True),
    "restarted": ev.Restarted(),
    "report_delivered": ev.ReportDelivered(6),
}
"""For each trigger, an event about the current update, as the event that could be legal."""

ILLEGAL = [(s, trig) for s in State for trig in triggers() if s not in LEGAL.get(trig, frozenset())]


def test_illegal_pair_count() -> None:
    assert len(ILLEGAL) == len(State) * len(triggers()) - sum(map(len, LEGAL.values()))
    assert set(EVENT_FOR) == set(triggers())
    assert all(e.trigger == trig for trig, e in EVENT_FOR.items())


@pytest.mark.parametrize("installed", ["polite", "none"])
@pytest.mark.parametrize(("state", "trigger"), ILLEGAL, ids=[f"{s.name}-{t}" for s, t in ILLEGAL])
async def test_illegal_pair_changes_nothing(
    state: State, trigger: str, installed: Installed
) -> None:
    before = start_record(state, installed)
    model = build(before, installed)
    pending_before = model.pending
    event = EVENT_FOR[trigger]
    try:
        accepted = await model.trigger(event.trigger, event=event, now=NOW)
    except MachineError:
        accepted = False
    assert accepted is False
    assert model.state is state
    assert model.record == before
    assert model.record.state is model.state
    assert model.pending is pending_before
    assert model.take_commands() == []
