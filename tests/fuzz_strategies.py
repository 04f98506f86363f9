"""Hostile inputs and the properties they must not break (issue 8, "hostile input, no crash").

Shared by the seeded CI set (``tests/integration/test_fuzz.py``) and the long run
(``bench/fuzz.py``).
Each :class:`Target` pairs a hypothesis strategy with a check. The property is the same for
every target: whatever the input, the code under test returns a valid value or raises a
:class:`fota.errors.FotaError` subclass (the decoders that promise "None for garbage" return
None), never another exception, never a hang; the journal loader leaves the files as they
were, or as its documented recovery says.

Inputs are random bytes and structure-aware: valid encodings mutated (bit flips, byte edits,
truncation, duplicated slices, huge length headers), maps and arrays with fields swapped for
values of other types, huge integers (past 2**64 and past Python's 4300-digit ``str`` limit),
deep nesting, and, for CoAP, datagrams built option by option.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import strategies as st

from fota.app.control import protocol as proto
from fota.app.control.client import ControlClient
from fota.core import events as ev
from fota.core import manifest as mf
from fota.core.machine import Machine, Model
from fota.core.policy import Policy
from fota.core.record import Record, Report
from fota.core.report import (
    MAX_DETAIL,
    MAX_DEVICE_ID,
    MAX_UINT,
    MAX_UNTIL,
    ReceivedReport,
    ReportError,
    decode_report,
)
from fota.core.states import State
from fota.core.uri import check_uri_reference, resolve
from fota.download import Layout, _Assembly
from fota.errors import (
    ControlError,
    FotaError,
    ImageChanged,
    IntegrityError,
    JournalError,
    ManifestError,
    PermanentServerError,
    ResultCode,
    StorageError,
    TransportError,
)
from fota.fileops import FileOps
from fota.journal import QUARANTINE_DIR, RECORD_NAME, Journal
from fota.transport import Announcement, Block, truncated, wire
from fota.transport.coap import CoapTransport
from fota.transport.window import WindowFetcher

T = TypeVar("T")

# -- the harness: deadlines and a loop -----------------------------------------------------------

HANG_SECONDS = 5.0
"""CPU seconds one check may spend before it counts as a hang (hypothesis' deadline, 1 s of
wall time, reports the slow ones; this stops the endless ones)."""
ASYNC_SECONDS = 5.0
"""Wall seconds an asynchronous check may take."""


class Hang(Exception):
    """A check did not finish: the property's "never a hang" broke."""


@contextlib.contextmanager
def watchdog(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds`` of process CPU time.

    ITIMER_VIRTUAL, not ITIMER_REAL: pytest-timeout owns SIGALRM. Outside the main thread
    (where signals cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hang(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s of CPU")

    previous = signal.signal(signal.SIGVTALRM, hang)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


_loop: asyncio.AbstractEventLoop | None = None


def run_async(make: Callable[[], Awaitable[T]], seconds: float = ASYNC_SECONDS) -> T:
    """Run a coroutine on one loop reused across examples (a new loop per example is slow)."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()

    async def bounded() -> T:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await make()
        except TimeoutError:
            if deadline.expired():
                raise Hang(f"not done after {seconds} s") from None
            raise

    return _loop.run_until_complete(bounded())


def expect_typed(exc: BaseException, *allowed: type[FotaError]) -> None:
    """Fail unless ``exc`` is one of ``allowed`` (default: any FotaError) with a short message.

    A message that names the field and the limit is a line, not a dump of the input.
    """
    kinds = allowed or (FotaError,)
    if not isinstance(exc, kinds):
        raise AssertionError(f"{type(exc).__name__} escaped: {exc!r:.300}") from exc
    assert len(str(exc)) <= 600, f"message of {len(str(exc))} characters: {str(exc)[:200]}"


# -- generic strategies --------------------------------------------------------------------------


@dataclass(frozen=True)
class Huge:
    """An integer too large to print (hypothesis prints examples): encoded as the integer.

    ``repr`` of ``10**4400`` raises ValueError (Python's 4300-digit limit) in hypothesis'
    reports too, so huge values travel wrapped and become integers only inside :func:`dumps`.
    """

    sign: int
    bits: int
    decimal: bool = False

    @property
    def value(self) -> int:
        return self.sign * (10**self.bits if self.decimal else 1 << self.bits)

    def __repr__(self) -> str:
        base = f"10**{self.bits}" if self.decimal else f"2**{self.bits}"
        return f"{'-' if self.sign < 0 else ''}{base}"


_HUGE_INTS = st.sampled_from(
    [
        Huge(1, 100),
        Huge(-1, 100),
        Huge(1, 4400, decimal=True),  # str() of it raises ValueError (Python's digit limit)
        Huge(-1, 4400, decimal=True),
        Huge(1, 20000),
    ]
) | st.sampled_from([2**64 - 1, 2**64, -(2**64), -(2**64) - 1])
_EDGE_INTS = st.sampled_from(
    [0, 1, -1, 7, 23, 24, 255, 256, 1023, 1024, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**63]
)
INTS = st.integers(-(2**70), 2**70) | _EDGE_INTS | _HUGE_INTS
FLOATS = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324])
_LONG_TEXT = st.builds(
    lambda unit, count: unit * count,
    st.sampled_from(["a", "é", "€", "\U0001f600", "\x00", "\n", "\u202e", "/", "%"]),
    st.integers(0, 320),
)
URIS = st.sampled_from(
    [
        "coap://[x/m",  # urllib: "Invalid IPv6 URL"
        "coap://h:x/m",  # a port that is not a number: raises when read
        "coap://h:99999/m",
        "//h:-1/m",
        "coap://[::1",
        "coap://h/%ff%fe",  # not UTF-8 once unquoted
        "coap://h/a%00b",
        "http://h/m",
        "coap+tcp://[::1]:0/x",
        "coap://:61616/x",
        "../img/x",
        "/fota/m/" + "a" * 250,
        "a\x7f",
    ]
)
"""URI references that pass a length check and break something behind it."""
TEXT = st.text(max_size=70) | _LONG_TEXT | URIS
BYTES = st.binary(max_size=70) | st.builds(bytes, st.sampled_from([0, 1, 31, 32, 33, 64, 65]))
TAG_NUMBERS = (
    st.sampled_from(
        [
            0,
            1,
            2,
            3,
            4,
            5,
            18,
            21,
            24,
            25,
            28,
            29,
            30,
            32,
            35,
            36,
            37,
            256,
            258,
            259,
            260,
            261,
            55799,
        ]
    )
    | st.sampled_from([2**32, 2**64 - 1])
    | st.integers(0, 300)
)
_KEY_LEAVES = st.none() | st.booleans() | INTS | TEXT | BYTES | FLOATS
_HUGE_IN_LIST = st.lists(_HUGE_INTS, min_size=1, max_size=2)
"""``repr`` of a list holding a 4400-digit integer raises too, not only ``str`` of it."""


def _map_key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


CBOR_VALUES: st.SearchStrategy[Any] = st.recursive(
    _KEY_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            _KEY_LEAVES | st.lists(_KEY_LEAVES, max_size=2).map(tuple), inner, max_size=5
        )
        | st.builds(cbor2.CBORTag, TAG_NUMBERS, inner)
    ),
    max_leaves=12,
)
"""Anything cbor2 encodes: every major type, semantic tags, huge integers, odd map keys."""


def _encode_huge(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if not isinstance(value, Huge):
        raise TypeError(f"cannot encode {type(value).__name__}")
    encoder.encode(value.value)


def dumps(value: Any) -> bytes:
    """cbor2.dumps (with :class:`Huge` as integers), or CBOR ``undefined`` when it cannot."""
    try:
        return cbor2.dumps(value, default=_encode_huge)
    except Exception:  # e.g. a tag number past 2**64 - 1: the generator's problem, not ours
        return b"\xf7"


def _nest(opener: bytes, depth: int, leaf: bytes) -> bytes:
    return opener * depth + leaf


DEEP_CBOR = st.builds(
    _nest,
    st.sampled_from([b"\x81", b"\xa1\x00", b"\xd8\x18", b"\x9f", b"\xc6", b"\xbf\x00", b"\xd2"]),
    st.integers(1, 3000),
    st.sampled_from([b"\x00", b"", b"\xff", b"\xa0"]),
)
"""Nesting deeper than cbor2's limit (400) and Python's stack, indefinite and tagged."""


def _huge_header(major: int, length: int, rest: bytes) -> bytes:
    return bytes([major << 5 | 27]) + length.to_bytes(8, "big") + rest


HUGE_HEADERS = st.builds(
    _huge_header,
    st.integers(0, 7),
    st.sampled_from([2**31, 2**32, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
    st.binary(max_size=24),
)
"""A byte string, array or map that claims up to 2**64 - 1 bytes or items."""

HOSTILE_CBOR = st.one_of(
    st.binary(max_size=300),
    CBOR_VALUES.map(dumps),
    DEEP_CBOR,
    HUGE_HEADERS,
)
"""Bytes that are CBOR, nearly CBOR, or not."""

_EDIT_OPS = ("flip", "set", "insert", "delete", "duplicate", "cut", "huge", "swap")


def apply_edits(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """Apply byte-level edits to ``data`` (positions are taken modulo its length)."""
    out = bytearray(data)
    for op, pos, value in edits:
        i = pos % (len(out) + 1)
        if op == "insert":
            out.insert(i, value)
        elif op == "cut":
            del out[i:]
        elif op == "huge" and i < len(out):
            # The item at i gets a header that claims 2**64 - 1 bytes or items.
            out[i : i + 1] = bytes([(out[i] & 0xE0) | 27]) + b"\xff" * 8
        elif i < len(out):
            if op == "flip":
                out[i] ^= 1 << (value % 8)
            elif op == "set":
                out[i] = value
            elif op == "delete":
                del out[i]
            elif op == "duplicate":
                out[i:i] = out[i : i + 1 + value % 32]
            elif op == "swap":
                j = (i + 1 + value) % len(out)
                out[i], out[j] = out[j], out[i]
    return bytes(out)


EDITS = st.lists(
    st.tuples(st.sampled_from(_EDIT_OPS), st.integers(0, 1 << 20), st.integers(0, 255)),
    min_size=1,
    max_size=8,
)


def mutations(*valid: bytes) -> st.SearchStrategy[bytes]:
    """One of ``valid``, edited."""
    return st.builds(apply_edits, st.sampled_from(valid), EDITS)


def swapped(base: dict[Any, Any], keys: list[Any]) -> st.SearchStrategy[dict[Any, Any]]:
    """``base`` with some keys removed and some set to any value (other keys included)."""
    odd_keys = st.sampled_from(
        [0, -1, 15, 999, 1000, 65535, 65536, 2**64, "1", b"\x01", True, (Huge(1, 4400, True),)]
    )

    def build(changes: dict[Any, Any], drop: set[Any]) -> dict[Any, Any]:
        out = {k: v for k, v in base.items() if k not in drop}
        out.update(changes)
        return out

    return st.builds(
        build,
        st.dictionaries(st.sampled_from(keys) | odd_keys, CBOR_VALUES | _HUGE_IN_LIST, max_size=4),
        st.sets(st.sampled_from(sorted(base, key=repr)), max_size=3),
    )


# -- manifests -----------------------------------------------------------------------------------

ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
EC_KEY = ec.derive_private_key(0x1234_5678_9ABC_DEF0, ec.SECP256R1())
KID_ED, KID_EC = b"fuzz-ed25519", b"fuzz-p256"
TRUST = mf.TrustStore({KID_ED: ED_KEY.public_key(), KID_EC: EC_KEY.public_key()})
DEVICE_CLASS = "fuzz-gw"
IMAGE = bytes(range(256)) * 10 + b"tail"
FRAGMENT = 1024
MAX_IMAGE = 1 << 30


def manifest_body(**changes: Any) -> mf.ManifestBody:
    """A valid body for :data:`IMAGE`, with ``changes``."""
    frags = tuple(
        hashlib.sha256(IMAGE[i : i + FRAGMENT]).digest() for i in range(0, len(IMAGE), FRAGMENT)
    )
    fields: dict[str, Any] = {
        "sequence": 9,
        "component": mf.Component.FIRMWARE,
        "version": "9.0",
        "device_class": DEVICE_CLASS,
        "image_size": len(IMAGE),
        "image_sha256": hashlib.sha256(IMAGE).digest(),
        "image_uri": f"../img/{hashlib.sha256(IMAGE).hexdigest()}",
        "fragment_size": FRAGMENT,
        "fragment_sha256": frags,
        "severity": mf.Severity.MANDATORY,
        "max_deferral": 3600,
        **changes,
    }
    return mf.ManifestBody(**fields)


INSTALLED = mf.verify(mf.sign(manifest_body(sequence=5, version="5.0"), ED_KEY, KID_ED), TRUST)
GOOD_BODIES = (manifest_body(), manifest_body(deadline=1_900_000_000, polite=False))
GOOD_MANIFESTS = {
    mf.sign(GOOD_BODIES[0], ED_KEY, KID_ED): GOOD_BODIES[0],
    mf.sign(GOOD_BODIES[1], EC_KEY, KID_EC): GOOD_BODIES[1],
}
BODY_MAP: dict[int, Any] = cbor2.loads(GOOD_BODIES[1].to_cbor())


def sign_payload(payload: bytes, ec_key: bool = False, header: Any = None) -> bytes:
    """A COSE_Sign1 over any payload bytes, signed by a trusted key (reaches decode_body)."""
    kid = KID_EC if ec_key else KID_ED
    protected = dumps(
        header if header is not None else {1: mf.ALG_ES256 if ec_key else mf.ALG_EDDSA, 4: kid}
    )
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    if ec_key:
        r, s = decode_dss_signature(EC_KEY.sign(to_sign, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = ED_KEY.sign(to_sign)
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))


_BODY_PAYLOADS = st.one_of(
    swapped(BODY_MAP, list(range(1, 15))).map(dumps),
    mutations(*(b.to_cbor() for b in GOOD_BODIES)),
    HOSTILE_CBOR,
)
"""Manifest payloads: the valid body with fields swapped, mutated, or anything."""

_HEADERS = st.one_of(
    st.fixed_dictionaries(
        {
            1: st.sampled_from([mf.ALG_EDDSA, mf.ALG_ES256]) | CBOR_VALUES | _HUGE_IN_LIST,
            4: st.sampled_from([KID_ED, KID_EC, b"", b"x" * 65]) | CBOR_VALUES | _HUGE_IN_LIST,
        }
    ),
    CBOR_VALUES,
)


@st.composite
def _cose_structures(draw: st.DrawFn) -> bytes:
    """COSE_Sign1 with any part of the wrong type, size or tag."""
    protected = draw(
        st.one_of(st.just(dumps({1: mf.ALG_EDDSA, 4: KID_ED})), _HEADERS.map(dumps), CBOR_VALUES)
    )
    unprotected: Any = draw(st.just({}) | CBOR_VALUES)
    payload = draw(_BODY_PAYLOADS | CBOR_VALUES)
    signature = draw(st.binary(max_size=100) | CBOR_VALUES)
    parts = [protected, unprotected, payload, signature]
    parts = parts[: draw(st.integers(0, 4))] + draw(st.lists(CBOR_VALUES, max_size=2))
    if draw(st.booleans()):
        parts = [protected, unprotected, payload, signature]
    tag = draw(st.sampled_from([18, 18, 18, 98, 17, 55799]))
    return dumps(cbor2.CBORTag(tag, parts))


@st.composite
def _signed_bodies(draw: st.DrawFn) -> bytes:
    """Bodies of any shape behind a valid signature: every check of decode_body runs."""
    payload = draw(_BODY_PAYLOADS)
    ec_key = draw(st.booleans())
    header = draw(st.none() | _HEADERS) if draw(st.integers(0, 9)) == 0 else None
    return sign_payload(payload, ec_key, header)


def manifest_cases() -> st.SearchStrategy[tuple[bytes, mf.ManifestBody | None]]:
    """Raw manifest bytes and, for mutated valid ones, the body a passing verify must give."""
    mutated = st.sampled_from(sorted(GOOD_MANIFESTS)).flatmap(
        lambda raw: st.tuples(mutations(raw), st.just(GOOD_MANIFESTS[raw]))
    )
    return st.one_of(
        mutated,
        st.tuples(_signed_bodies(), st.none()),
        st.tuples(_cose_structures(), st.none()),
        st.tuples(HOSTILE_CBOR, st.none()),
        st.tuples(HOSTILE_CBOR.map(lambda b: b"\xd2\x84" + b), st.none()),  # past the header
    )


def expect_manifest_error(exc: BaseException) -> None:
    """A refusal: a ManifestError of a known kind, naming a field."""
    expect_typed(exc, ManifestError)
    assert isinstance(exc, ManifestError)
    assert exc.kind in ManifestError._RESULTS and exc.result == ManifestError._RESULTS[exc.kind]
    assert exc.field and str(exc).startswith("manifest ")


def check_body(body: mf.ManifestBody, max_image_size: int = MAX_IMAGE) -> None:
    """Every limit of docs/protocol.md holds for a body that was accepted."""
    for value in (body.sequence, body.image_size, body.fragment_size, body.max_deferral):
        assert type(value) is int and 0 <= value <= MAX_UINT
    for text in (body.version, body.device_class):
        assert 1 <= len(text.encode()) <= mf.MAX_TEXT and text.isprintable()
    assert body.image_size <= max_image_size
    assert 0 < body.fragment_size <= mf.MAX_FRAGMENT_SIZE
    assert body.fragment_size % mf.FRAGMENT_UNIT == 0
    count = max(1, math.ceil(body.image_size / body.fragment_size))
    assert len(body.fragment_sha256) == count <= mf.MAX_FRAGMENTS
    assert all(type(d) is bytes and len(d) == 32 for d in body.fragment_sha256)
    assert len(body.image_sha256) == 32
    assert check_uri_reference(body.image_uri) is None
    resolve("coap://[::1]:61616/fota/m/x", body.image_uri)
    assert body.deadline is None or 0 <= body.deadline < 1 << 40
    assert type(body.polite) is bool


def check_manifest(case: tuple[bytes, mf.ManifestBody | None]) -> None:
    """``accept`` (what the engine runs on fetched bytes) and ``inspect`` (the CLI's)."""
    raw, expected = case
    with watchdog():
        try:
            manifest = mf.accept(
                raw, TRUST, device_class=DEVICE_CLASS, installed=INSTALLED, max_image_size=MAX_IMAGE
            )
        except Exception as exc:
            expect_manifest_error(exc)
        else:
            check_body(manifest.body)
            assert manifest.raw == raw and manifest.digest == mf.envelope_id(raw)
            assert manifest.body.device_class == DEVICE_CLASS
            assert manifest.body.sequence > INSTALLED.body.sequence
            if expected is not None:
                # The signature covers the payload: edits outside it (the unprotected map)
                # may still verify, but never with another body.
                assert manifest.body == expected
            # With an update pending (sequence 9): only its own bytes, or a higher number.
            try:
                again = mf.accept(
                    raw, TRUST, device_class=DEVICE_CLASS, installed=INSTALLED, pending=PENDING
                )
            except Exception as exc:
                expect_manifest_error(exc)
                assert isinstance(exc, ManifestError) and exc.kind == "rollback"
            else:
                assert again.digest == PENDING.digest or again.body.sequence > 9
        try:
            info = mf.inspect(raw)
        except Exception as exc:
            expect_manifest_error(exc)
        else:
            json.dumps(info)  # `fota manifest inspect` prints it


def body_cases() -> st.SearchStrategy[tuple[bytes, int]]:
    """Manifest payloads (no signature in the way) and an image size limit."""
    return st.tuples(
        _BODY_PAYLOADS, st.sampled_from([0, 1024, len(IMAGE), MAX_IMAGE, 1 << 62]) | st.integers(0)
    )


def check_decode_body(case: tuple[bytes, int]) -> None:
    """``decode_body`` on any payload: a checked body or a ManifestError."""
    payload, limit = case
    with watchdog():
        try:
            body = mf.decode_body(payload, max_image_size=limit)
        except Exception as exc:
            expect_manifest_error(exc)
        else:
            check_body(body, limit)


def check_loads_exact(raw: bytes) -> None:
    """``loads_exact`` keeps its documented contract: a value, or ValueError / cbor2's errors.

    (It is not a fota API boundary; ``_loads`` turns these into ManifestError.)
    """
    with watchdog(), contextlib.suppress(ValueError, cbor2.CBORError):
        mf.loads_exact(raw)


# -- status reports ------------------------------------------------------------------------------

_STATE_CODES = [s.value for s in State]
_RESULT_CODES = [int(r) for r in ResultCode]


@st.composite
def valid_reports(draw: st.DrawFn) -> ReceivedReport:
    """Reports a fota client could send (within every limit)."""
    uint = st.integers(0, MAX_UINT)
    device = draw(st.text(min_size=1, max_size=MAX_DEVICE_ID).filter(lambda s: "/" not in s))
    report = Report(
        sequence=draw(uint),
        state=State(draw(st.sampled_from(_STATE_CODES))),
        result=ResultCode(draw(st.sampled_from(_RESULT_CODES))),
        update_id=draw(st.none() | st.text("0123456789abcdef", min_size=16, max_size=16)),
        manifest_sequence=draw(st.none() | uint),
        verified_bytes=draw(st.none() | uint),
        detail=draw(st.text(max_size=MAX_DETAIL)),
        until=draw(st.none() | st.integers(0, MAX_UNTIL)),
        attempt=draw(uint),
    )
    return ReceivedReport(device, report)


_GOOD_REPORT = ReceivedReport(
    "gw-0042",
    Report(12, State.DOWNLOAD_DEFERRED, ResultCode.DEFERRED, "0123456789abcdef", 9, 4096, "x", 7),
)
_REPORT_MAP: dict[int, Any] = cbor2.loads(_GOOD_REPORT.report.to_cbor(_GOOD_REPORT.device_id))


def report_cases() -> st.SearchStrategy[tuple[bytes, ReceivedReport | None]]:
    """Encoded reports and, for valid ones, what they must decode to."""
    valid = valid_reports().map(lambda r: (r.report.to_cbor(r.device_id), r))
    good = _GOOD_REPORT.report.to_cbor(_GOOD_REPORT.device_id)
    return st.one_of(
        valid,
        st.tuples(mutations(good), st.none()),
        st.tuples(swapped(_REPORT_MAP, list(range(1, 10))).map(dumps), st.none()),
        st.tuples(HOSTILE_CBOR, st.none()),
    )


def check_report(case: tuple[bytes, ReceivedReport | None]) -> None:
    """``decode_report``: a report within every limit, or a ReportError naming the field."""
    raw, expected = case
    with watchdog():
        try:
            got = decode_report(raw)
        except Exception as exc:
            expect_typed(exc, ReportError)
            assert isinstance(exc, ReportError) and exc.field
            assert expected is None, f"a valid report was refused: {exc}"
            return
    if expected is not None:
        assert got == expected
    r = got.report
    assert 1 <= len(got.device_id) <= MAX_DEVICE_ID and "/" not in got.device_id
    assert isinstance(r.state, State) and isinstance(r.result, ResultCode)
    for value in (r.sequence, r.manifest_sequence, r.verified_bytes):
        assert value is None or (type(value) is int and 0 <= value <= MAX_UINT)
    assert r.until is None or 0 <= r.until <= MAX_UNTIL
    assert len(r.detail) <= MAX_DETAIL
    # Whatever passes is what a client would have encoded: it survives a round trip.
    assert decode_report(r.to_cbor(got.device_id)) == got


# -- control socket ------------------------------------------------------------------------------

_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 10**300, 2**63, 253402300799, 253402300800, 315360000, 315360001])
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
    | st.sampled_from(["2030-01-01T00:00:00Z", "2030-01-01T00:00:00", "9999-12-31T23:59:59-01:00"])
    | st.sampled_from(["0001-01-01T00:00:00+01:00", "", "status", "progress", "x" * 65])
)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
_ARG_NAMES = sorted({name for schema in proto.OPS.values() for name in schema})


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """A request object: a known op or not, its arguments of any type, any id."""
    message: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        message["op"] = draw(st.sampled_from(sorted(proto.OPS)) | JSON_VALUES)
    if draw(st.booleans()):
        message["id"] = draw(JSON_VALUES)
    names = st.sampled_from(_ARG_NAMES) | TEXT
    message.update(draw(st.dictionaries(names, JSON_VALUES, max_size=4)))
    text = json.dumps(message, allow_nan=draw(st.booleans()))
    return text.encode()


def _deep_json(depth: int, opener: str, inner: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (f'{{"op":"reject","reason":{opener * depth}{inner}{closer * depth}}}').encode()


_LITERALS = st.sampled_from(
    [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0", b"1" * 5000, b'"\\ud800"', b"\xff"]
).map(lambda v: b'{"op":"defer","for":' + v + b"}")
_VALID_LINES = (
    b'{"id":7,"op":"defer","for":3600,"reason":"shift"}',
    b'{"id":"a","op":"defer","until":"2030-01-01T00:00:00Z","update_id":"0123456789abcdef"}',
    b'{"op":"inhibit","name":"backup","ttl":600}',
    b'{"op":"subscribe","events":["progress","state"],"answers":true}',
)

REQUEST_LINES = st.one_of(
    _requests(),
    mutations(*_VALID_LINES),
    st.binary(max_size=200),
    st.builds(_deep_json, st.integers(1, 3000), st.sampled_from(["[", '{"a":']), st.just("1")),
    _LITERALS,
)


def check_parse_request(line: bytes) -> None:
    """``parse_request``: a checked Request or a ControlError with a documented code.

    The daemon answers either way, echoing the id: the answer must encode too.
    """
    with watchdog():
        try:
            request = proto.parse_request(line)
        except Exception as exc:
            expect_typed(exc, ControlError)
            assert isinstance(exc, ControlError) and exc.code in proto.ERROR_CODES
            proto.failure(exc.request_id, exc.code, str(exc))
            return
        proto.answer(request.id, {})
    schema = proto.OPS[request.op]
    assert set(request.args) <= set(schema)
    assert all(key in request.args for key in proto.REQUIRED.get(request.op, ()))
    for name in ("for", "ttl", "until"):
        if name in request.args:
            value = request.args[name]
            assert type(value) is float and math.isfinite(value)
    for name in ("reason", "name", "update_id"):
        if name in request.args:
            assert isinstance(request.args[name], str) and request.args[name].isprintable()


class _Writer:
    """The half of a stream the control client writes to; the daemon never reads it here."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def _answer_line(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


@st.composite
def daemon_lines(draw: st.DrawFn) -> tuple[str, bytes]:
    """An operation the client sends, and what a hostile daemon writes back."""
    op = draw(st.sampled_from(["hello", "authorize", "reject", "defer", "inhibit", "resume"]))
    answer = st.fixed_dictionaries(
        {},
        optional={
            "id": st.sampled_from([1, 1, 2, True, "1", None, [1], {"a": 1}]) | JSON_VALUES,
            "ok": st.booleans() | JSON_VALUES,
            "result": st.fixed_dictionaries(
                {},
                optional={
                    "update_id": JSON_VALUES,
                    "until": JSON_VALUES,
                    "expires": JSON_VALUES,
                },
            )
            | JSON_VALUES,
            "error": st.fixed_dictionaries(
                {}, optional={"code": JSON_VALUES, "message": JSON_VALUES}
            )
            | JSON_VALUES,
            "event": st.sampled_from(["progress", "state"]) | JSON_VALUES,
        },
    )
    line = st.one_of(
        answer.map(_answer_line),
        st.binary(max_size=120).map(lambda b: b + b"\n"),
        st.builds(lambda d: b"[" * d + b"]" * d + b"\n", st.integers(1, 3000)),
        st.builds(
            lambda d: b'{"id":1,"ok":false,"error":' + b"[" * d + b"]" * d + b"}\n",
            st.integers(900, 1100),
        ),
        st.just(b"x" * 5000 + b"\n"),  # past the client's line limit below
    )
    lines = draw(st.lists(line, max_size=5))
    return op, b"".join(lines) + draw(st.sampled_from([b"", b"{", b"\n"]))


async def _control_round(op: str, data: bytes) -> None:
    client = ControlClient("/nonexistent/fota.sock", timeout=2.0, max_message=4096)
    reader = asyncio.StreamReader(limit=client.max_message)
    reader.feed_data(data)
    reader.feed_eof()
    client._reader = reader
    client._writer = _Writer()  # type: ignore[assignment]
    client._task = asyncio.create_task(client._read_loop())
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "hello": client.hello,
        "authorize": client.authorize,
        "reject": lambda: client.reject(reason="no"),
        "defer": lambda: client.defer(seconds=60.0),
        "inhibit": lambda: client.inhibit("backup", 60.0),
        "resume": client.resume,
    }
    kinds: dict[str, type | tuple[type, ...]] = {
        "hello": dict,
        "authorize": str,
        "reject": str,
        "defer": (float, type(None)),
    }
    try:
        result = await calls[op]()
    except Exception as exc:
        expect_typed(exc, ControlError)
    else:
        expected = kinds.get(op, float if op == "inhibit" else type(None))
        assert isinstance(result, expected), f"{op} returned {result!r:.80}"
    # The reader ends at EOF whatever it read (it must not die of it), and then the events
    # end: only objects with an event name come out before.
    task = client._task
    assert task is not None
    await asyncio.wait([task], timeout=2.0)
    assert task.done(), "the reader did not end at EOF"
    assert task.exception() is None, f"the reader died: {task.exception()!r}"
    while True:
        try:
            event = await client.next_event(timeout=1.0)
        except ControlError:
            break
        assert isinstance(event, dict) and isinstance(event["event"], str)
    await client.aclose()


def check_control_client(case: tuple[str, bytes]) -> None:
    """``ControlClient`` reading a hostile daemon: typed results or ControlError, and the
    reader task lives to the end of the stream."""
    op, data = case
    run_async(lambda: _control_round(op, data))


# -- the journal loader --------------------------------------------------------------------------

PENDING = mf.verify(next(iter(GOOD_MANIFESTS)), TRUST)
VALID_RECORD = Record(
    state=State.INSTALL_DEFERRED,
    pending=PENDING.digest,
    manifest_uri="coap://[::1]:61616/fota/m/abc",
    installed=INSTALLED.digest,
    refused=(hashlib.sha256(b"refused").digest(),),
    verified=b"\x07",
    etag=b"\x01\x02",
    defer_until=1_900_000_000.5,
    defer_reason="battery low",
    attempts=2,
    restarts=1,
    progress=75,
    report_seq=12,
    outbox=(
        Report(10, State.INSTALL_DEFERRED, ResultCode.DEFERRED, "0123456789abcdef", 9, 3, "x", 7),
        Report(11, State.FAILED, ResultCode.MALFORMED),
    ),
    fetched=4096,
    download_started=1_800_000_000.0,
    first_seen=1_800_000_000,
    deferred_total=120.5,
    locks=(("backup", 1_900_000_000.0),),
    held=("lock backup",),
    boot_id="b00t",
    commit_by=None,
    tested=False,
    failure="",
)
VALID_RECORD_BYTES = VALID_RECORD.to_bytes()
_RECORD_ITEMS: list[Any] = cbor2.loads(cbor2.loads(VALID_RECORD_BYTES)[1])


def _envelope(schema: Any, items: Any, good_crc: bool, crc: Any) -> bytes:
    body = items if isinstance(items, bytes) else dumps(items)
    return dumps([schema, body, zlib.crc32(body) if good_crc else crc])


def _replace_items(changes: dict[int, Any], length: int | None) -> list[Any]:
    items = list(_RECORD_ITEMS)
    for index, value in changes.items():
        if index < len(items):
            items[index] = value
    return items if length is None else items[:length]


_WRONG_FIELDS = st.sampled_from(
    [
        [[1, 2]],  # an outbox report of two fields
        [[0, 99, 1, None, None, None, "", None]],  # a report with an unknown state
        [[-1, 0, 0, None, None, None, "", None]],
        [["backup"]],  # a lock without expiry
        [["backup", math.nan]],
        [[b"backup", 1.0]],
    ]
)
WRONG_SCHEMA_RECORDS = st.one_of(
    # The common case: schema 2, every field there, one or two of another type or range.
    st.builds(
        _envelope,
        st.just(2),
        st.builds(
            _replace_items,
            st.dictionaries(
                st.integers(0, 27), CBOR_VALUES | _WRONG_FIELDS, min_size=1, max_size=2
            ),
            st.none(),
        ),
        st.just(True),
        st.just(0),
    ),
    # Any schema number, length or body, with a right or wrong CRC.
    st.builds(
        _envelope,
        st.sampled_from([1, 2]) | CBOR_VALUES,
        st.one_of(
            st.builds(
                _replace_items,
                st.dictionaries(st.integers(0, 29), CBOR_VALUES | _WRONG_FIELDS, max_size=4),
                st.none() | st.integers(0, 31),
            ),
            CBOR_VALUES,
            HOSTILE_CBOR,
        ),
        st.booleans(),
        CBOR_VALUES,
    ),
)
"""Records whose CRC is right over a body of another shape (what a bit flip cannot make)."""


@dataclass
class JournalCase:
    """The files of a state directory before a load."""

    files: dict[str, bytes] = field(default_factory=dict)


def _name_digest(raw: bytes, legacy: bool) -> bytes:
    """How a record names a manifest: its identity, or (a journal written before issue 16
    §3, which load() moves to the identity) the SHA-256 of its bytes."""
    return (None if legacy else mf.envelope_id(raw)) or hashlib.sha256(raw).digest()


def _manifest_name(raw: bytes, legacy: bool = True) -> str:
    return f"manifest-{_name_digest(raw, legacy).hex()}.cose"


_MANIFEST_FILES = st.one_of(
    st.just(PENDING.raw),
    mutations(PENDING.raw),
    _signed_bodies(),
    st.binary(max_size=200),
)


@st.composite
def journal_cases(draw: st.DrawFn) -> JournalCase:
    """A state directory: a record (damaged, of another schema, or naming hostile manifests),
    the manifest files it names (valid, damaged, missing), orphans and temp files."""
    files: dict[str, bytes] = {}
    kind = draw(st.sampled_from(["mutated", "schema", "hostile", "names", "valid"]))
    if kind == "names":
        # A valid record naming manifests whose bytes are hostile: verify runs on them.
        pending = draw(st.none() | _MANIFEST_FILES)
        installed = draw(st.none() | st.just(INSTALLED.raw) | _MANIFEST_FILES)
        legacy = draw(st.booleans())
        record = Record(
            state=State.DOWNLOADING,
            pending=_name_digest(pending, legacy) if pending is not None else None,
            installed=_name_digest(installed, legacy) if installed is not None else None,
        )
        for raw in (pending, installed):
            if raw is not None:
                files[_manifest_name(raw, legacy)] = raw
        files[RECORD_NAME] = record.to_bytes()
    else:
        files[RECORD_NAME] = draw(
            {
                "mutated": mutations(VALID_RECORD_BYTES),
                "schema": WRONG_SCHEMA_RECORDS,
                "hostile": HOSTILE_CBOR,
                "valid": st.just(VALID_RECORD_BYTES),
            }[kind]
        )
        for raw in (PENDING.raw, INSTALLED.raw):
            which = draw(st.sampled_from(["valid", "valid", "missing", "damaged", "swapped"]))
            name = _manifest_name(raw, legacy=False)  # VALID_RECORD names identities
            if which == "valid":
                files[name] = raw
            elif which == "damaged":
                files[name] = draw(mutations(raw))
            elif which == "swapped":  # a valid manifest under another's name
                files[name] = INSTALLED.raw if raw == PENDING.raw else PENDING.raw
    if draw(st.booleans()):
        files["manifest-" + "ab" * 32 + ".cose"] = b"orphan"
    if draw(st.booleans()):
        files[f".{RECORD_NAME}.tmp"] = draw(st.binary(max_size=40))
    files["candidate.bin"] = b"candidate bytes"
    if draw(st.integers(0, 9)) == 0:
        files.pop(RECORD_NAME)
    return JournalCase(files)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != QUARANTINE_DIR}


def check_record_types(record: Record) -> None:
    """A loaded record has the CDDL's types (docs/journal.md), not whatever the file held."""
    assert isinstance(record.state, State)
    for digest in (record.pending, record.installed):
        assert digest is None or type(digest) is bytes
    for digests in (record.refused, record.rejected, record.cancelled):
        assert type(digests) is tuple and all(type(d) is bytes for d in digests)
    assert record.etag is None or type(record.etag) is bytes
    assert type(record.verified) is bytes
    assert record.manifest_uri is None or type(record.manifest_uri) is str
    for text in (record.defer_reason, record.forced, record.boot_id, record.failure):
        assert type(text) is str
    for count in (record.attempts, record.restarts, record.progress, record.report_seq):
        assert type(count) is int and 0 <= count <= MAX_UINT
    assert type(record.fetched) is int and record.fetched >= 0
    for when in (
        record.defer_until,
        record.download_started,
        record.first_seen,
        record.defer_since,
        record.provisioned_at,
        record.commit_by,
    ):
        assert when is None or (type(when) in (int, float) and math.isfinite(when))
    assert type(record.deferred_total) is float and math.isfinite(record.deferred_total)
    assert type(record.tested) is bool
    assert all(type(n) is str and type(t) is float for n, t in record.locks)
    assert all(type(h) is str for h in record.held)
    for report in record.outbox:
        assert isinstance(report.state, State) and isinstance(report.result, ResultCode)
        assert type(report.sequence) is int and type(report.detail) is str


def check_journal(case: JournalCase) -> None:
    """``Journal.load`` on real files: a checked record, or JournalError and nothing changed.

    On success only the documented sweep happened: orphan manifests (those the returned
    record does not name) and temp files are removed; everything else is byte for byte as it
    was, the record file included (a load never rewrites it) -- unless the load recovered
    from damage (issue 17 §2): then every damaged file is in the quarantine byte for byte, the
    recovery is the last report, and the record saved after it loads again without a recovery.
    A pending manifest that could not be loaded is dropped by the machine (``PendingLost``,
    issue 18 §2), as the engine does before anything else: the record it then saves is the
    one that loads again as it is.
    """
    with tempfile.TemporaryDirectory(prefix="fota-fuzz-") as tmp, watchdog():
        state = Path(tmp) / "state"
        state.mkdir()
        for name, data in case.files.items():
            (state / name).write_bytes(data)
        before = _snapshot(state)
        journal = Journal(state, TRUST)
        try:
            loaded = journal.load()
        except Exception as exc:
            expect_typed(exc, JournalError)
            assert _snapshot(state) == before, "a failed load changed the files"
            return
        record = loaded.record
        check_record_types(record)
        if loaded.pending_lost:
            assert loaded.pending is None and record.pending is not None
            model = Model(Policy("fuzz-gw"), TRUST, record, installed=loaded.installed)
            handled = asyncio.run(Machine(model).handle(ev.PendingLost(loaded.pending_lost), 0.0))
            assert handled.accepted and model.record.pending is None
            assert model.record.state is State.IDLE
            journal.save(model.record, (None, loaded.installed))
            record = model.record
        if loaded.recovered:
            assert record.outbox[-1].result is ResultCode.STATE_RECOVERED
            assert record.recovered == loaded.recovered
            moved = state / QUARANTINE_DIR  # absent when nothing was there to move
            for path in moved.iterdir() if moved.exists() else ():
                name = path.name.split("-", 1)[1]
                assert before[name] == path.read_bytes(), f"{name} changed on its way aside"
            again = Journal(state, TRUST).load()
            assert again.recovered == "" and again.record == record
            return
        if loaded.pending_lost:  # its key was revoked: dropped without a recovery
            again = Journal(state, TRUST).load()
            assert again.pending_lost == "" and again.record == record
            return
        keep = {f"manifest-{d.hex()}.cose" for d in (record.pending, record.installed) if d}
        # A journal from before issue 16 §3 keeps its old names until the next save.
        keep |= {_manifest_name(m.raw) for m in (loaded.pending, loaded.installed) if m}
        expected = {
            name: data
            for name, data in before.items()
            if not (name.startswith("manifest-") and name.endswith(".cose") and name not in keep)
            and not (name.startswith(".") and name.endswith(".tmp"))
        }
        assert _snapshot(state) == expected
        for manifest, digest in (
            (loaded.pending, record.pending),
            (loaded.installed, record.installed),
        ):
            assert (manifest is None) == (digest is None)
            if manifest is not None:
                assert manifest.digest == digest


# -- CoAP datagrams ------------------------------------------------------------------------------


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, min(value - 269, 0xFFFF).to_bytes(2, "big")


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """Options in number order, delta-encoded (numbers past the encodable range are capped)."""
    out = bytearray()
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        delta = min(number - last, 269 + 0xFFFF)
        last += delta
        d, dx = _ext(delta)
        n, nx = _ext(len(value))
        out += bytes([(d << 4) | n]) + dx + nx + value
    return bytes(out)


def datagram(
    mtype: int, code: int, mid: int, token: bytes, options: bytes, payload: bytes, tkl: int | None
) -> bytes:
    """A CoAP message; ``tkl`` may lie about the token's length."""
    first = (1 << 6) | (mtype << 4) | (len(token) if tkl is None else tkl)
    return (
        bytes([first, code, mid >> 8, mid & 0xFF])
        + token
        + options
        + (b"\xff" + payload if payload else b"")
    )


def _uint_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _block2(num: int, more: bool, szx: int) -> bytes:
    return _uint_bytes((num << 4) | (int(more) << 3) | szx)


_UINT_VALUES = st.sampled_from([0, 1, len(IMAGE), 2**32 - 1, 2**40, 2**64 - 1]) | st.integers(0)
_OPTION_VALUES = st.one_of(
    _UINT_VALUES.map(_uint_bytes),
    st.binary(max_size=20),
    st.integers(0, 300).map(lambda n: b"\xff" * n),  # a 300-byte Size2 or Max-Age
)
OPTION_NUMBERS = st.sampled_from(
    [
        wire.OPT_ETAG,
        12,  # Content-Format
        wire.OPT_MAX_AGE,
        wire.OPT_BLOCK2,
        27,  # Block1
        wire.OPT_SIZE2,
        60,  # Size1
        6,  # Observe
        wire.OPT_URI_PATH,
        1,  # If-Match
        9,  # reserved (critical, unknown)
        2049,
        65000,
    ]
) | st.integers(0, 70000)
CODES = st.sampled_from(
    [
        0x45,
        0x45,
        0x45,
        0x44,
        0x41,
        0x5F,
        0x80,
        0x84,
        0x88,
        0x8F,
        0x8D,
        0xA0,
        0xA3,
        0xA3,
        0xA4,
        0x01,
        0,
    ]
) | st.integers(0, 255)


@st.composite
def block2_options(draw: st.DrawFn, offset: int = 0, size: int = 1024) -> bytes:
    """A Block2 value: right for ``offset`` at ``size``, or any number, flag and SZX."""
    if draw(st.booleans()):
        szx = max(0, min(6, size.bit_length() - 5))
        return _block2(offset // size, draw(st.booleans()), szx)
    return _block2(draw(st.integers(0, 2**20 - 1)), draw(st.booleans()), draw(st.integers(0, 7)))


@st.composite
def coap_response(
    draw: st.DrawFn, token: bytes, offset: int = 0, size: int = 1024, payload: bytes = b""
) -> bytes:
    """A response datagram to the request ``token`` for ``offset``, mostly almost right."""
    options: list[tuple[int, bytes]] = []
    # Past the RFCs' 3 (Block2) and 4 (Size2) bytes: aiocoap decodes any length, and an
    # 1800-byte one is an integer that str() refuses.
    overlong = st.sampled_from([4, 5, 9, 40, 300, 1800]).map(lambda n: b"\xff" * n)
    if draw(st.integers(0, 3)):
        block2 = block2_options(offset, size)
        options.append(
            (wire.OPT_BLOCK2, draw(block2 | overlong if draw(st.integers(0, 9)) == 0 else block2))
        )
    if draw(st.booleans()):
        size2 = draw(st.sampled_from([len(IMAGE), 0, 2**32 - 1]) | _UINT_VALUES)
        value = draw(overlong) if draw(st.integers(0, 5)) == 0 else _uint_bytes(size2 % 2**64)
        options.append((wire.OPT_SIZE2, value))
    if draw(st.booleans()):
        options.append(
            (12, draw(st.sampled_from([b"", b"\x2a", b"\x3c", b"\x12", b"\x01\x02\x03"])))
        )
    if draw(st.integers(0, 3)) == 0:
        options.append((wire.OPT_MAX_AGE, draw(_OPTION_VALUES)))
    if draw(st.integers(0, 3)) == 0:
        options.append((wire.OPT_ETAG, draw(st.binary(max_size=12))))
    options += draw(st.lists(st.tuples(OPTION_NUMBERS, _OPTION_VALUES), max_size=3))
    body = draw(
        st.one_of(
            st.just(payload),
            st.builds(lambda n: payload[:n], st.integers(0, max(0, len(payload)))),
            st.binary(max_size=size + 16),
        )
    )
    raw = datagram(
        draw(st.sampled_from([1, 1, 0, 2, 3])),
        draw(CODES),
        draw(st.integers(0, 0xFFFF)),
        token,
        encode_options(options),
        body,
        draw(st.none() | st.integers(0, 15)) if draw(st.integers(0, 9)) == 0 else None,
    )
    if draw(st.integers(0, 9)) == 0:
        raw = apply_edits(raw, draw(EDITS))
    return raw


DATAGRAMS = st.one_of(
    st.binary(max_size=1500),
    coap_response(b"\x01\x02\x03\x00\x00\x00\x00\x00", 0, 1024, IMAGE[:1024]),
    st.builds(
        lambda token, opts, payload: datagram(
            1, 0x45, 1, token, encode_options(opts), payload, None
        ),
        st.binary(max_size=8),
        st.lists(st.tuples(OPTION_NUMBERS, _OPTION_VALUES), max_size=8),
        st.binary(max_size=64),
    ),
)


def check_wire_decode(case: tuple[bytes, bool]) -> None:
    """``wire.decode``: None for anything malformed; a Response within the RFCs' limits."""
    data, bert = case
    with watchdog():
        response = wire.decode(data, bert=bert)
    if response is None:
        return
    assert len(response.token) <= 8
    assert response.mtype in (0, 1, 2, 3) and 0 <= response.code <= 255
    if response.block2 is not None:
        num, more, szx = response.block2
        assert 0 <= num < 2**20 and isinstance(more, bool) and 0 <= szx <= (7 if bert else 6)
    for value in (response.size2, response.max_age):
        assert value is None or 0 <= value < 2**32
    float(response.max_age or 0)  # the windowed fetcher turns it into a pause


# -- the windowed fetcher, without a socket ------------------------------------------------------


class FakeSocket:
    """Collects what a fetcher sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


@dataclass
class WindowCase:
    """A fetcher's state (block size, requests in flight, the rest of its plan) and answers.

    Each answer names the request in flight whose token it carries (by index), or None for a
    token of its own: the real token is spliced in at check time, so the cases do not depend
    on how the fetcher builds its tokens.
    """

    block_size: int
    flights: list[int]
    plan: list[tuple[int, int]]
    datagrams: list[tuple[int | None, bytes]]


PLACEHOLDER = b"\x00" * 8
"""The token answers are built with; replaced by a request's real token (same length)."""


def with_token(data: bytes, token: bytes) -> bytes:
    """``data`` with ``token`` in place of an 8-byte token, when it has one."""
    if len(data) >= 12 and data[0] & 0x0F == 8 and len(token) == 8:
        return data[:4] + token + data[12:]
    return data


@st.composite
def window_cases(draw: st.DrawFn) -> WindowCase:
    """Answers to requests in flight: right tokens with wrong blocks, codes, sizes and options."""
    size = draw(st.sampled_from([16, 64, 256, 1024]))
    flights = sorted(
        set(draw(st.lists(st.integers(0, 8).map(lambda i: i * size), min_size=1, max_size=4)))
    )
    datagrams: list[tuple[int | None, bytes]] = []
    for _ in range(draw(st.integers(1, 6))):
        which = draw(st.none() | st.integers(0, len(flights) - 1))
        offset = flights[which] if which is not None else draw(st.integers(0, 2**40 - 1))
        token = PLACEHOLDER if which is not None else draw(st.binary(max_size=8))
        answer = coap_response(token, offset, size, IMAGE[offset : offset + size])
        datagrams.append((which, draw(answer | st.binary(max_size=60))))
    # The plan is the downloader's (fragment spans), not the server's: aligned offsets.
    plan = draw(
        st.lists(
            st.tuples(st.integers(0, 4).map(lambda i: i * 1024), st.integers(0, 4096)), max_size=3
        )
    )
    return WindowCase(size, flights, plan, datagrams)


def check_window(case: WindowCase) -> None:
    """``WindowFetcher._received`` / ``_handle`` / ``_check`` / ``_fill``: blocks that are what
    their options say, or a FotaError (TransportError, PermanentServerError, ImageChanged)."""
    fetcher = WindowFetcher(
        "127.0.0.1", 9, ("img",), window=8, block_size=case.block_size, timeout=0.05, max_tries=3
    )
    sock = FakeSocket()
    fetcher._sock = sock  # type: ignore[assignment]
    fetcher._plan = iter(case.plan)
    now = time.monotonic()
    tokens = []
    for offset in case.flights:
        fetcher._send(offset, case.block_size, 1, now)
        tokens.append(sock.sent[-1][4 : 4 + (sock.sent[-1][0] & 0x0F)])
    blocks: list[Block] = []
    with watchdog():
        try:
            for which, data in case.datagrams:
                if which is not None:
                    data = with_token(data, tokens[which])
                fetcher._received(sock, data, blocks.append)  # type: ignore[arg-type]
                fetcher._check(now)
                fetcher._fill(now)
            for later in (60.0, 3600.0, 7200.0):  # every deadline past: resend, then give up
                fetcher._check(now + later)
        except Exception as exc:
            expect_typed(exc, TransportError, PermanentServerError, ImageChanged)
    assert math.isfinite(fetcher._paused_until)
    for block in blocks:
        assert block.offset in case.flights or block.offset == 0
        if block.more:
            assert len(block.data) in (16, 32, 64, 128, 256, 512, 1024)
            assert block.offset % len(block.data) == 0
        elif block.size2 is not None:
            assert not truncated(block.data, False, block.offset, 1024, block.size2)
    for message in sock.sent:
        assert wire.decode(message) is not None  # what it sends is CoAP


# -- the windowed fetcher against a hostile UDP server -------------------------------------------


@dataclass
class ServerCase:
    """How a hostile server answers each request (by index), and the image it pretends to serve."""

    image: bytes
    answers: list[list[bytes]]  # per request: datagrams built for its token, or [] for silence
    block_size: int


@st.composite
def server_cases(draw: st.DrawFn) -> ServerCase:
    """Per request: the right block, a wrong one, garbage, silence, duplicates, 5.03, ..."""
    image = draw(st.sampled_from([IMAGE, IMAGE[:100], b"", IMAGE * 2]))
    size = draw(st.sampled_from([16, 256, 1024]))
    answers = draw(
        st.lists(
            st.lists(
                st.sampled_from(["good", "fuzz", "garbage", "dup", "busy", "short"]), max_size=2
            ),
            min_size=1,
            max_size=12,
        )
    )
    # Turned into datagrams by the server, which knows each request's token and offset; the
    # fuzzed ones are drawn here, for a placeholder token replaced there.
    fuzzed = [draw(coap_response(b"\x00" * 8, 0, size, image[:size])) for _ in range(3)]
    plan: list[list[bytes]] = []
    for kinds in answers:
        plan.append(
            [k.encode() if k != "fuzz" else b"fuzz:" + fuzzed[len(plan) % 3] for k in kinds]
        )
    return ServerCase(image, plan, size)


def _serve(sock: socket.socket, case: ServerCase, stop: threading.Event) -> None:
    count = 0
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        except OSError:
            return
        request = wire.decode(data)
        if request is None or request.block2 is None:
            continue
        num, _, szx = request.block2
        size = 1 << (szx + 4)
        offset = num * size
        chunk = case.image[offset : offset + size]
        more = offset + size < len(case.image)
        kinds = case.answers[count % len(case.answers)]
        count += 1
        for kind in kinds:
            if kind.startswith(b"fuzz:"):
                raw = bytearray(kind[5:])
                tkl = raw[0] & 0x0F
                if tkl == 8 and len(raw) >= 12:
                    raw[4:12] = request.token  # the fuzzed answer, to this request
                out = bytes(raw)
            elif kind == b"garbage":
                out = b"\x40\x45\x00"
            else:
                options = [
                    (wire.OPT_BLOCK2, _block2(num, more, szx)),
                    (wire.OPT_SIZE2, _uint_bytes(len(case.image))),
                ]
                payload = chunk[: len(chunk) // 2] if kind == b"short" else chunk
                code = 0xA3 if kind == b"busy" else 0x45
                if kind == b"busy":
                    options = [(wire.OPT_MAX_AGE, b"\x00")]  # "come back in 0 s"
                out = datagram(
                    1, code, request.mid, request.token, encode_options(options), payload, None
                )
            with contextlib.suppress(OSError):
                sock.sendto(out, peer)
                if kind == b"dup":
                    sock.sendto(out, peer)


async def _fetch_from(case: ServerCase) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.02)
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(server, case, stop), daemon=True)
    thread.start()
    fetcher = WindowFetcher(
        "127.0.0.1",
        server.getsockname()[1],
        ("img",),
        window=4,
        block_size=case.block_size,
        timeout=0.02,
        max_tries=2,
    )
    blocks: list[Block] = []
    length = max(1, len(case.image))
    try:
        async with asyncio.timeout(1.0):
            await fetcher.run(iter([(0, length)]), blocks.append)
    except TimeoutError:
        # Only a pause the server asked for (5.03 with Max-Age) may outlast the deadline.
        assert fetcher._paused_until > time.monotonic(), "the transfer hung"
    except Exception as exc:
        expect_typed(exc, TransportError, PermanentServerError, ImageChanged)
    finally:
        stop.set()
        thread.join()
        server.close()
    for block in blocks:
        if block.more:
            assert block.offset % len(block.data) == 0


def check_window_socket(case: ServerCase) -> None:
    """``WindowFetcher.run`` over real loopback UDP against a hostile server."""
    run_async(lambda: _fetch_from(case), seconds=10.0)


# -- aiocoap responses: announcements and fetch_block --------------------------------------------

_ANNOUNCE_BASE = "coap://127.0.0.1:61616"
_GOOD_ANNOUNCEMENT = {1: 9, 2: PENDING.digest, 3: f"../m/{PENDING.digest.hex()}"}


def _transport() -> CoapTransport:
    return CoapTransport(_ANNOUNCE_BASE, "dev1")


def _message(data: bytes) -> Any:
    """The aiocoap message a datagram decodes to, or None when aiocoap itself drops it."""
    try:
        return aiocoap.Message.decode(data)
    except Exception:  # aiocoap's parser refuses it before anything of ours runs
        return None


@st.composite
def announcement_responses(draw: st.DrawFn) -> bytes:
    """Announcement responses: payloads valid, swapped or hostile; codes and formats of any kind."""
    payload = draw(
        st.one_of(
            st.just(dumps(_GOOD_ANNOUNCEMENT)),
            swapped(_GOOD_ANNOUNCEMENT | {4: PENDING.digest}, [1, 2, 3, 4]).map(dumps),
            st.fixed_dictionaries(
                {
                    1: INTS,
                    3: TEXT
                    | st.sampled_from(["coap://[x/", "coap://h:x/m", "//h:99999/m", "http://h/m"]),
                }
            ).map(dumps),
            mutations(dumps(_GOOD_ANNOUNCEMENT)),
            HOSTILE_CBOR,
        )
    )
    options: list[tuple[int, bytes]] = []
    if draw(st.integers(0, 3)):
        options.append(
            (12, draw(st.sampled_from([b"\x3c", b"", b"\x2a", b"\x12", b"\x01\x02\x03"])))
        )
    options += draw(st.lists(st.tuples(OPTION_NUMBERS, _OPTION_VALUES), max_size=2))
    code = draw(st.just(0x45) | CODES)
    return datagram(1, code, 1, b"tk", encode_options(options), payload, None)


def check_announcement(data: bytes) -> None:
    """``CoapTransport._decode_announcement``: a usable Announcement or None, never a raise
    (the watcher must survive any server)."""
    message = _message(data)
    if message is None:
        return
    with watchdog():
        ann = _transport()._decode_announcement(message)
    if ann is None:
        return
    assert isinstance(ann, Announcement)
    assert type(ann.sequence) is int and 0 <= ann.sequence <= MAX_UINT
    for digest in (ann.manifest_digest, ann.cancel):
        assert digest is None or (type(digest) is bytes and len(digest) == 32)
    if ann.manifest_uri is not None:
        assert check_uri_reference(ann.manifest_uri) is None


@dataclass
class FetchCase:
    """Responses a server gives to successive block requests, and what is asked."""

    responses: list[bytes]
    offset: int
    block_size: int
    limit: int


@st.composite
def fetch_cases(draw: st.DrawFn) -> FetchCase:
    """Block responses with any code, Block2, Size2 (up to 2**64 - 1), format and payload."""
    size = draw(st.sampled_from([16, 64, 256, 1024]))
    offset = draw(st.integers(0, 8)) * size
    responses = [
        draw(coap_response(b"tk", offset + i * size, size, IMAGE[offset + i * size :][:size]))
        for i in range(draw(st.integers(1, 6)))
    ]
    return FetchCase(
        responses, offset, size, draw(st.sampled_from([0, 100, 4096, mf.MAX_MANIFEST_BYTES]))
    )


async def _fetch_round(case: FetchCase) -> None:
    transport = _transport()
    messages = [m for m in map(_message, case.responses) if m is not None]

    def script() -> Callable[..., Awaitable[Any]]:
        pending = iter(messages)

        async def request(uri: str, **options: Any) -> Any:
            message = next(pending, None)
            if message is None:
                raise TransportError(f"{uri}: no answer (the script ran out)")
            return message

        return request

    uri = f"{_ANNOUNCE_BASE}/fota/img/x"
    transport._request = script()  # type: ignore[method-assign,assignment]
    try:
        block = await transport.fetch_block(uri, case.offset, case.block_size)
    except Exception as exc:
        expect_typed(exc, TransportError, PermanentServerError, ImageChanged)
    else:
        assert type(block.data) is bytes
        if block.more:
            assert block.offset % len(block.data) == 0
        elif block.size2 is not None:
            assert block.offset + len(block.data) >= block.size2
    transport._request = script()  # type: ignore[method-assign,assignment]
    try:
        data = await transport.fetch(uri, limit=case.limit)
    except Exception as exc:
        expect_typed(exc, TransportError, PermanentServerError, ImageChanged)
    else:
        assert type(data) is bytes and len(data) <= case.limit + 2048 * len(messages)


def check_fetch_block(case: FetchCase) -> None:
    """``CoapTransport.fetch_block`` and ``fetch`` classify every response: a Block (bytes)
    that is what its options say, or a FotaError."""
    run_async(lambda: _fetch_round(case))


# -- the fragment assembly -----------------------------------------------------------------------


@dataclass
class AssemblyCase:
    """An image, its layout, and the blocks a fetcher hands over."""

    image: bytes
    fragment_size: int
    wanted: list[int]
    blocks: list[Block]


@st.composite
def assembly_cases(draw: st.DrawFn) -> AssemblyCase:
    """Blocks with offsets past the end, huge or wrong Size2, wrong data, any flags."""
    image = draw(st.sampled_from([IMAGE, IMAGE[:1], IMAGE[:1024], IMAGE * 3]))
    frag = draw(st.sampled_from([1024, 2048]))
    count = max(1, -(-len(image) // frag))
    wanted = sorted(set(draw(st.lists(st.integers(0, count - 1), min_size=1))))
    blocks = []
    for _ in range(draw(st.integers(1, 12))):
        size = draw(st.sampled_from([16, 256, 1024, 4096]))
        offset = draw(
            st.integers(0, len(image) // 16).map(lambda u: u * 16)
            | st.sampled_from([len(image), len(image) + 16, 2**40, 2**64])
        )
        data = draw(
            st.just(image[offset : offset + size])
            | st.binary(max_size=size)
            | st.just(image[offset : offset + size // 2])
        )
        size2 = draw(st.sampled_from([None, None, len(image), 0, 2**32 - 1]) | _UINT_VALUES)
        more = draw(st.booleans()) if draw(st.booleans()) else offset + len(data) < len(image)
        etag = draw(st.none() | st.binary(max_size=8))
        blocks.append(Block(offset, data, more, size2, etag))
    return AssemblyCase(image, frag, wanted, blocks)


class _Fetcher:
    def __init__(self) -> None:
        self.wanted: list[tuple[int, int]] = []

    def want(self, offset: int, length: int) -> None:
        self.wanted.append((offset, length))

    async def run(self, plan: Iterator[tuple[int, int]], on_block: Callable[[Block], None]) -> None:
        raise AssertionError("not used")


async def _assemble(case: AssemblyCase, path: Path) -> None:
    digests = tuple(
        hashlib.sha256(case.image[i : i + case.fragment_size]).digest()
        for i in range(0, max(1, len(case.image)), case.fragment_size)
    )
    layout = Layout("fuzz", len(case.image), case.fragment_size, digests)
    events: list[ev.Event] = []
    ops = FileOps()
    fd = ops.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, len(case.image))
        assembly = _Assembly(layout, fd, ops, events.append, _Fetcher(), case.wanted, 2)
        try:
            for block in case.blocks:
                assembly.on_block(block)
        except Exception as exc:
            expect_typed(exc, ImageChanged, IntegrityError, StorageError)
        finally:
            await assembly.finish()
        await asyncio.sleep(0)  # the vouching events arrive through call_soon_threadsafe
        on_disk = os.pread(fd, len(case.image), 0)
    finally:
        ops.close(fd)
    # No byte is vouched for that does not match its signed digest.
    for event in events:
        assert isinstance(event, ev.FragmentVerified)
        for index in event.indexes:
            assert index in case.wanted
            start, length = layout.span(index)
            assert on_disk[start : start + length] == case.image[start : start + length]


def check_assembly(case: AssemblyCase) -> None:
    """``_Assembly.on_block`` with odd blocks: ImageChanged / IntegrityError or verified bytes."""
    with tempfile.TemporaryDirectory(prefix="fota-fuzz-") as tmp:
        run_async(lambda: _assemble(case, Path(tmp) / "candidate.bin"))


# -- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A fuzz target: inputs, the property, and its share of cases."""

    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    ci_cases: int
    """Cases in the seeded CI set."""
    weight: float = 1.0
    """Share of the long run's cases, relative to the others (slow targets get less)."""


TARGETS: tuple[Target, ...] = (
    Target("manifest_accept", manifest_cases(), check_manifest, 600),
    Target("manifest_decode_body", body_cases(), check_decode_body, 500),
    Target("cbor_loads_exact", HOSTILE_CBOR, check_loads_exact, 300),
    Target("report_decode", report_cases(), check_report, 800),
    Target("control_parse_request", REQUEST_LINES, check_parse_request, 800),
    Target("control_client_answers", daemon_lines(), check_control_client, 300, 0.5),
    Target("journal_load", journal_cases(), check_journal, 400, 0.5),
    Target("coap_wire_decode", st.tuples(DATAGRAMS, st.booleans()), check_wire_decode, 800),
    Target("window_fetcher_handle", window_cases(), check_window, 500),
    Target("window_fetcher_udp", server_cases(), check_window_socket, 25, 0.05),
    Target("coap_announcement", announcement_responses(), check_announcement, 500),
    Target("coap_fetch_block", fetch_cases(), check_fetch_block, 400),
    Target("download_assembly", assembly_cases(), check_assembly, 300, 0.5),
)
"""Every target, in the order the CI set and the long run run them."""
