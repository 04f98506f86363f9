"""The journal record and the status report, and their CBOR encodings (pure; no files here).

The record is small on purpose: the manifests are files of their own, written once, and the
record names them by digest. Bitmaps hold one bit per fragment.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import cbor2

from fota.core.states import State
from fota.core.text import show
from fota.errors import JournalError, ResultCode

SCHEMA = 3
_V1_FIELDS = 16
"""Schema 1 (fota 0.1) had the first 16 fields."""
_V2_FIELDS = 28
"""Schema 2 had 16 to 28 fields (fields were appended), ``refused`` and ``cancelled`` one
digest each."""
_APPENDED: tuple[Any, ...] = (
    None,
    0.0,
    None,
    "",
    [],
    None,
    [],
    [],
    "",
    None,
    False,
    "",
    [],
    0,
    None,
    None,
    "",
    b"",
    0,
    None,
    None,
)
"""Encoded defaults of the fields after the first 16, in order. Fields are only ever appended:
a record written by an earlier version lacks some of these, and they take their defaults."""
_REFUSED, _CANCELLED = 4, 22
"""Positions of the fields that schema 3 turned from one digest into a list of them."""

MAX_REMEMBERED = 32
"""Most manifest identities kept in each of ``refused``, ``rejected`` and ``cancelled``; the
oldest is dropped first. Bounded so the record stays small whatever a server announces."""


def remember(entries: tuple[bytes, ...], digest: bytes) -> tuple[bytes, ...]:
    """``entries`` with ``digest`` as the newest, at most :data:`MAX_REMEMBERED` (oldest out)."""
    return (*(d for d in entries if d != digest), digest)[-MAX_REMEMBERED:]


@dataclass(frozen=True, slots=True)
class Report:
    """One status report waiting in the durable outbox (CDDL ``report`` in docs/protocol.md)."""

    sequence: int
    state: State
    result: ResultCode
    update_id: str | None = None
    manifest_sequence: int | None = None
    verified_bytes: int | None = None
    detail: str = ""
    until: int | None = None
    attempt: int = 0
    """The update's attempt (``Record.revived`` when queued): 0 for the first, +1 each time
    the failed update was retried on an announcement of it. Sent as key 10 when not 0."""

    def to_cbor(self, device_id: str) -> bytes:
        """Encode the report for the server, omitting absent optional fields."""
        body: dict[int, Any] = {
            1: device_id,
            2: self.sequence,
            3: self.state.value,
            4: int(self.result),
        }
        optional = (
            (5, self.update_id),
            (6, self.manifest_sequence),
            (7, self.verified_bytes),
            (8, self.detail or None),
            (9, self.until),
            (10, self.attempt or None),
        )
        body.update((k, v) for k, v in optional if v is not None)
        return cbor2.dumps(body)

    def _to_list(self) -> list[Any]:
        return [
            self.sequence,
            self.state.value,
            int(self.result),
            self.update_id,
            self.manifest_sequence,
            self.verified_bytes,
            self.detail,
            self.until,
            self.attempt,
        ]

    @classmethod
    def _from_list(cls, items: Any) -> Report:
        # A report queued by an earlier version has no attempt (appended): it was the first.
        if isinstance(items, list) and len(items) == len(_REPORT_FIELDS) - 1:
            items = [*items, 0]
        if not isinstance(items, list) or len(items) != len(_REPORT_FIELDS):
            raise JournalError(
                f"journal record: outbox: a report is an array of {len(_REPORT_FIELDS)} fields"
            )
        _check_fields("outbox report", _REPORT_FIELDS, items)
        seq, state, result, uid, mseq, vbytes, detail, until, attempt = items
        return cls(seq, State(state), ResultCode(result), uid, mseq, vbytes, detail, until, attempt)


PROGRESS_RESULTS = frozenset(
    {ResultCode.INITIAL, ResultCode.DEFERRED, ResultCode.AUTHORIZED, ResultCode.FORCED}
)
"""Results of a progress report (a step reached, a decision, a deferral): only the newest of
an update is worth sending. Every other result is final (an outcome, a refusal, a recovery)
and is never dropped."""
COALESCE_FROM = 8
"""Queued reports from which progress reports are coalesced: below it (a server that answers)
every report is sent; at it, the server is away and only the newest step of an update is."""


def queue_report(outbox: tuple[Report, ...], report: Report) -> tuple[Report, ...]:
    """``outbox`` with ``report`` appended; progress reports coalesced once it backs up.

    When :data:`COALESCE_FROM` reports or more wait, a new report about an update
    (``update_id``; None, reports about no update, counts as one) replaces that update's
    queued progress reports: the server learns the newest step, not every step it missed
    while away. Final reports are never dropped. So the outbox holds the final reports not
    yet acknowledged, plus fewer than :data:`COALESCE_FROM` progress reports, plus at most one
    per update (docs/journal.md, "Bounds"). Sequence numbers of replaced reports are not
    reused: the server sees the gap.
    """
    if len(outbox) < COALESCE_FROM:
        return (*outbox, report)
    kept = tuple(
        r for r in outbox if not (r.result in PROGRESS_RESULTS and r.update_id == report.update_id)
    )
    return (*kept, report)


# The field checks of docs/journal.md's CDDL. A record with a valid CRC can still be of another
# schema (a downgrade, a bug, a hand-edited file): nothing reaches the engine unchecked.
_Check = tuple[str, Callable[[Any], bool], str]


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 64


def _is_time(value: Any) -> bool:
    # float / int in the CDDL; NaN and infinities compare false with every deadline.
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -(1 << 63) <= value < 1 << 64


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_of(kind: type) -> Callable[[Any], bool]:
    return lambda value: type(value) is kind


def _is_list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _is_digests(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_REMEMBERED
        and all(type(item) is bytes and 1 <= len(item) <= 64 for item in value)
    )


def _is_lock(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2 and type(value[0]) is str and _is_time(value[1])
    )


_STATES = frozenset(s.value for s in State)
_RESULTS = frozenset(int(r) for r in ResultCode)
_UINT = "an unsigned integer below 2**64"
_TIME = "a finite number of seconds (float or int)"
_DIGESTS = f"an array of at most {MAX_REMEMBERED} digests (1..64 bytes each)"
MAX_PARTIAL = 1024
"""Most bytes of ``partial`` (the downloader notes at most 64 runs, about 700 bytes)."""
_PARTIAL = f"bytes, at most {MAX_PARTIAL}"


def _is_reserved(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_uint(v) for v in value)
        and value[0] < value[1]
    )


_REPORT_FIELDS: tuple[_Check, ...] = (
    ("sequence", _is_uint, _UINT),
    ("state", lambda v: _is_uint(v) and v in _STATES, "a state code"),
    ("result", lambda v: _is_uint(v) and v in _RESULTS, "a result code"),
    ("update_id", _optional(_is_of(str)), "text or null"),
    ("manifest_sequence", _optional(_is_uint), f"null or {_UINT}"),
    ("verified_bytes", _optional(_is_uint), f"null or {_UINT}"),
    ("detail", _is_of(str), "text"),
    ("until", _optional(_is_uint), f"null or {_UINT}"),
    ("attempt", _is_uint, _UINT),
)

_RECORD_FIELDS: tuple[_Check, ...] = (
    ("state", lambda v: _is_uint(v) and v in _STATES, "a state code"),
    ("pending", _optional(_is_of(bytes)), "bytes or null"),
    ("manifest_uri", _optional(_is_of(str)), "text or null"),
    ("installed", _optional(_is_of(bytes)), "bytes or null"),
    ("refused", _is_digests, _DIGESTS),
    ("verified", _is_of(bytes), "bytes"),
    ("etag", _optional(_is_of(bytes)), "bytes or null"),
    ("defer_until", _optional(_is_time), f"null or {_TIME}"),
    ("defer_reason", _is_of(str), "text"),
    ("attempts", _is_uint, _UINT),
    ("restarts", _is_uint, _UINT),
    ("progress", _is_uint, _UINT),
    ("report_seq", _is_uint, _UINT),
    ("outbox", lambda v: isinstance(v, list), "an array of reports"),
    ("fetched", _is_uint, _UINT),
    ("download_started", _optional(_is_time), f"null or {_TIME}"),
    ("first_seen", _optional(_is_time), f"null or {_TIME}"),
    ("deferred_total", _is_time, _TIME),
    ("defer_since", _optional(_is_time), f"null or {_TIME}"),
    ("forced", _is_of(str), "text"),
    ("locks", _is_list_of(_is_lock), "an array of [name, expires-at]"),
    ("provisioned_at", _optional(_is_time), f"null or {_TIME}"),
    ("cancelled", _is_digests, _DIGESTS),
    ("held", _is_list_of(_is_of(str)), "an array of text"),
    ("boot_id", _is_of(str), "text"),
    ("commit_by", _optional(_is_time), f"null or {_TIME}"),
    ("tested", _is_of(bool), "true or false"),
    ("failure", _is_of(str), "text"),
    ("rejected", _is_digests, _DIGESTS),
    ("keyset_version", _is_uint, _UINT),
    ("floor", _optional(_is_uint), f"null or {_UINT}"),
    ("installed_sequence", _optional(_is_uint), f"null or {_UINT}"),
    ("recovered", _is_of(str), "text"),
    ("partial", lambda v: type(v) is bytes and len(v) <= MAX_PARTIAL, _PARTIAL),
    ("revived", _is_uint, _UINT),
    ("reserved", _optional(_is_reserved), "null or [uint, uint], the first below the second"),
    ("floor_identity", _optional(_is_of(bytes)), "bytes or null"),
)


def _check_fields(what: str, checks: tuple[_Check, ...], items: list[Any]) -> None:
    for (name, check, expected), value in zip(checks, items, strict=True):
        if not check(value):
            raise JournalError(
                f"journal record: {what} {name}: expected {expected}, got {show(value)}"
            )


@dataclass(frozen=True, slots=True)
class Record:
    """Everything the client must remember across a power cut.

    Attributes:
        state: the machine's state; journaled before any effect of entering it.
        pending: digest of the pending manifest (its bytes are a file of their own).
        manifest_uri: where the pending manifest came from; relative image URIs resolve
            against it.
        installed: digest of the running image's manifest; it decides politeness.
        refused: identities of the manifests refused (a check failed), oldest first, at most
            :data:`MAX_REMEMBERED`: an announcement of one is not fetched again. Cleared when a
            keyset is applied (new keys or a new floor may make one acceptable).
        verified: fragment bitmap; a bit is set only after the fragment's bytes were fsynced and
            matched the signed digest.
        etag: the image ETag last seen (a hint only; fragment digests decide).
        defer_until: wall-clock time the current deferral ends.
        defer_reason: the application's reason for it.
        attempts: download attempts of the pending update that failed.
        restarts: process restarts during the pending update (breaks reboot loops).
        progress: last progress step the application was told, in percent.
        report_seq: sequence number of the next report.
        outbox: reports not yet acknowledged by the server.
        fetched: bytes received for the pending update (the data budget).
        download_started: wall-clock time its download first started (the time budget).
        first_seen: wall-clock time the pending update was adopted (severity deadlines count
            from it).
        deferred_total: seconds the pending update was deferred, over every ended deferral
            (across restarts); the current deferral counts from ``defer_since``.
        defer_since: when the current deferral started.
        forced: the rule that forced the pending update past the application ("" if none).
        locks: inhibitor locks as ``(name, expires_at)``.
        provisioned_at: wall-clock time of the first start (the quiet period counts from it).
        cancelled: identities of the manifests the server cancelled (not fetched again),
            oldest first, at most :data:`MAX_REMEMBERED`.
        held: what held the pending update when last reported (reported again on change).
        boot_id: the boot during which the installer asked for a restart ("" if none asked);
            a restart happened when the engine reports another.
        commit_by: wall-clock deadline for the self-test to pass; past it, roll back.
        tested: the self-test passed; the commit runs (again, after a crash).
        failure: why the update is being rolled back (for the final report).
        rejected: identities of the updates the application rejected, oldest first, at most
            :data:`MAX_REMEMBERED`: never asked about again. Kept apart from ``refused`` so
            that a server announcing many bad manifests cannot push a rejection out (only
            manifests that verify can be rejected).
        keyset_version: version of the last keyset whose effects the record holds (a keyset
            stored but not yet noted here is applied again at start).
        floor: the anti-rollback floor a root keyset set (``floor-reset``); while not None it
            replaces the running image's sequence number, until the next update commits.
        installed_sequence: the sequence number of the manifest ``installed`` names (the
            journal keeps it in step), so that losing that manifest does not lower the
            anti-rollback floor: a recovery makes it the ``floor``.
        recovered: what the last recovery of unreadable state did ("" if none; docs/journal.md,
            "Recovery"); shown by ``fota status`` until the next update commits. While the
            running image's manifest is unknown after one, the application decides updates.
        partial: the pages of fragments not yet verified that are in the candidate and were
            fsynced: a CBOR list of ``[offset, length]`` runs (b"": none), from the last
            ``FragmentVerified``. A restart reads them back instead of fetching them; the
            fragment digests still decide. Cleared when the download ends or starts over.
        revived: times the pending update, failed before its install, was retried on an
            announcement of it: its attempt number, which its reports carry (report key 10),
            so the server tells the final report of each attempt apart (docs/protocol.md,
            "Reports").
        reserved: ``(first, end)``: report sequence numbers the numbering skips (None: none).
            When ``report_seq`` reaches ``first`` it continues at ``end``. A fall back to the
            previous generation sets it: the generation replayed numbers its reports as the
            lost one did (so the server, de-duplicating by sequence, takes a replayed report
            for the one it has), and the recovery's report takes a number above everything
            the lost generation could have used (docs/journal.md, "Recovery").
        floor_identity: the identity of the stored manifest whose sequence number became
            ``floor`` when no generation of the record could be read (None: none). It may be
            taken at the floor: it was the running image's or the pending update's, and taking
            the newest manifest the device ever had again is no rollback, while refusing it
            would strand a pending update until it is signed again.
    """

    state: State = State.IDLE
    pending: bytes | None = None
    manifest_uri: str | None = None
    installed: bytes | None = None
    refused: tuple[bytes, ...] = field(default=())
    verified: bytes = b""
    etag: bytes | None = None
    defer_until: float | None = None
    defer_reason: str = ""
    attempts: int = 0
    restarts: int = 0
    progress: int = 0
    report_seq: int = 0
    outbox: tuple[Report, ...] = field(default=())
    fetched: int = 0
    download_started: float | None = None
    first_seen: float | None = None
    deferred_total: float = 0.0
    defer_since: float | None = None
    forced: str = ""
    locks: tuple[tuple[str, float], ...] = field(default=())
    provisioned_at: float | None = None
    cancelled: tuple[bytes, ...] = field(default=())
    held: tuple[str, ...] = field(default=())
    boot_id: str = ""
    commit_by: float | None = None
    tested: bool = False
    failure: str = ""
    rejected: tuple[bytes, ...] = field(default=())
    keyset_version: int = 0
    floor: int | None = None
    installed_sequence: int | None = None
    recovered: str = ""
    partial: bytes = b""
    revived: int = 0
    reserved: tuple[int, int] | None = None
    floor_identity: bytes | None = None

    def to_bytes(self) -> bytes:
        """Encode as ``[schema, body, crc32(body)]`` so a bit flip is caught on load.

        The body is the fields in the order of :data:`_RECORD_FIELDS` (the CDDL in
        docs/journal.md), each through its entry of :data:`_WIRE`.
        """
        body = cbor2.dumps(
            [_WIRE.get(name, _AS_IS)[0](getattr(self, name)) for name in _RECORD_NAMES]
        )
        return cbor2.dumps([SCHEMA, body, zlib.crc32(body)])

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        """Decode a record; any damage raises :class:`~fota.errors.JournalError`."""
        try:
            schema, body, crc = cbor2.loads(data)
        except Exception as exc:  # hostile or truncated bytes: cbor2 raises several types
            raise JournalError(f"journal record: not a [schema, body, crc] array ({exc})") from exc
        if type(schema) is not int or schema not in (1, 2, SCHEMA):
            raise JournalError(
                f"journal record: schema {show(schema)}, this version reads 1..{SCHEMA}"
            )
        if not isinstance(body, bytes) or zlib.crc32(body) != crc:
            raise JournalError("journal record: checksum mismatch (damaged file)")
        try:
            items = cbor2.loads(body)
        except Exception as exc:  # the CRC matched: bytes of another encoder, not a bit flip
            raise JournalError(f"journal record: body is not CBOR ({show(str(exc), 80)})") from exc
        if not isinstance(items, list):
            raise JournalError("journal record: body is not an array")
        if schema == 1:
            items = items[:_V1_FIELDS]
        if schema < 3:
            items = _from_v2(items)
        if _V1_FIELDS <= len(items) < _V1_FIELDS + len(_APPENDED):
            items = [*items, *_APPENDED[len(items) - _V1_FIELDS :]]
        if len(items) != len(_RECORD_FIELDS):
            raise JournalError(
                f"journal record: body has {len(items)} fields; schema {schema} has"
                f" {_V1_FIELDS}..{len(_RECORD_FIELDS)}"
            )
        _check_fields("field", _RECORD_FIELDS, items)
        try:
            return cls(
                **{
                    name: _WIRE.get(name, _AS_IS)[1](value)
                    for name, value in zip(_RECORD_NAMES, items, strict=True)
                }
            )
        except JournalError:
            raise
        except Exception as exc:  # the checks above should leave nothing here; keep it typed
            raise JournalError(f"journal record: bad body ({show(str(exc), 80)})") from exc

    def evolve(self, **changes: Any) -> Record:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    def without_update(self) -> Record:
        """This record with every field of the pending update (:data:`UPDATE_FIELDS`) reset."""
        return replace(self, **_UPDATE_DEFAULTS)


_RECORD_NAMES = tuple(name for name, _, _ in _RECORD_FIELDS)
if tuple(f.name for f in fields(Record)) != _RECORD_NAMES:  # not an assert: kept under -O
    raise ImportError("fota.core.record: _RECORD_FIELDS must list Record's fields, in order")


def _as_is(value: Any) -> Any:
    return value


_AS_IS = (_as_is, _as_is)
_WIRE: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    # field: (to the CBOR body, from it once checked); the others go as they are.
    "state": (lambda s: s.value, State),
    "refused": (list, tuple),
    "outbox": (
        lambda reports: [r._to_list() for r in reports],
        lambda items: tuple(Report._from_list(r) for r in items),
    ),
    "deferred_total": (_as_is, float),
    "locks": (
        lambda locks: [list(lock) for lock in locks],
        lambda items: tuple((str(name), float(until)) for name, until in items),
    ),
    "cancelled": (list, tuple),
    "held": (list, tuple),
    "rejected": (list, tuple),
    "reserved": (
        lambda r: None if r is None else list(r),
        lambda v: None if v is None else (v[0], v[1]),
    ),
}
"""How the fields that are not CBOR as they are cross the wire (tuples go as arrays)."""

UPDATE_FIELDS = frozenset(
    {
        "pending",
        "manifest_uri",
        "fetched",
        "download_started",
        "verified",
        "partial",
        "etag",
        "defer_until",
        "defer_reason",
        "attempts",
        "restarts",
        "progress",
        "first_seen",
        "deferred_total",
        "defer_since",
        "forced",
        "held",
        "boot_id",
        "commit_by",
        "tested",
        "failure",
        "revived",
    }
)
"""The fields that belong to the pending update: :meth:`Record.without_update` resets them."""
_UPDATE_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Record) if f.name in UPDATE_FIELDS
}
if MISSING in _UPDATE_DEFAULTS.values() or len(_UPDATE_DEFAULTS) != len(UPDATE_FIELDS):
    raise ImportError("fota.core.record: every UPDATE_FIELDS field needs a plain default")


def _from_v2(items: list[Any]) -> list[Any]:
    """A schema 1 or 2 body as schema 3: its single digests become lists.

    The one ``refused`` digest of schema 2 may have been a rejection (both were kept there):
    it becomes a rejection, never asked about again either way. A value of the wrong type is
    left in place for the field checks to name.

    Raises:
        JournalError: the body has more or fewer fields than schema 2 had.
    """
    if not _V1_FIELDS <= len(items) <= _V2_FIELDS:
        raise JournalError(
            f"journal record: body has {len(items)} fields; schema 2 has {_V1_FIELDS}..{_V2_FIELDS}"
        )
    items = [*items, *_APPENDED[len(items) - _V1_FIELDS : _V2_FIELDS - _V1_FIELDS]]
    refused, cancelled = items[_REFUSED], items[_CANCELLED]
    if refused is None or type(refused) is bytes:
        items[_REFUSED] = []
        items.append([] if refused is None else [refused])
    if cancelled is None or type(cancelled) is bytes:
        items[_CANCELLED] = [] if cancelled is None else [cancelled]
    return items


def take_report_seq(record: Record) -> tuple[int, Record]:
    """The sequence number of the next report, and ``record`` with it taken.

    The numbering rises by one and jumps over ``record.reserved`` (then forgotten).
    """
    seq, following = record.report_seq, record.report_seq + 1
    if record.reserved is not None and following >= record.reserved[0]:
        return seq, record.evolve(report_seq=max(following, record.reserved[1]), reserved=None)
    return seq, record.evolve(report_seq=following)


def bitmap_new(count: int) -> bytes:
    """An all-clear bitmap for ``count`` fragments."""
    return bytes((count + 7) // 8)


def bitmap_get(bitmap: bytes, index: int) -> bool:
    """Whether bit ``index`` is set."""
    return bool(bitmap[index >> 3] & (1 << (index & 7)))


def bitmap_set(bitmap: bytes, index: int, value: bool = True) -> bytes:
    """Return ``bitmap`` with bit ``index`` set to ``value``."""
    out = bytearray(bitmap)
    if value:
        out[index >> 3] |= 1 << (index & 7)
    else:
        out[index >> 3] &= ~(1 << (index & 7)) & 0xFF
    return bytes(out)


def bitmap_count(bitmap: bytes) -> int:
    """Number of set bits."""
    return sum(bin(b).count("1") for b in bitmap)
