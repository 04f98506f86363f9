"""Hostile input, no crash (issue 8): the seeded CI set of the fuzz targets.

Each target of ``tests/fuzz_strategies.py`` runs a fixed number of derandomized cases (the same
inputs on every run and machine): the manifest decoder, the status-report decoder, the control
socket's request parser and its client's reader, the journal loader on real files, and the CoAP
paths (raw datagrams, the windowed fetcher with and without a socket, announcements,
``fetch_block``, the fragment assembly). ``bench/fuzz.py`` runs the same properties with
100 000 cases and more. The ``@example`` inputs are the crashes the fuzzing found, kept as
regressions.
"""

from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings

from fota.app.control import protocol as proto
from fota.core.record import SCHEMA, Record, Report
from fota.core.report import MAX_REPORT_BYTES, ReceivedReport, ReportError, decode_report
from fota.core.states import State
from fota.errors import (
    ControlError,
    FotaError,
    JournalError,
    PermanentServerError,
    ResultCode,
)
from fota.journal import RECORD_NAME
from fota.transport import Block, wire
from fota.transport.coap import CoapTransport
from tests import fuzz_strategies as fs

CI = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=1),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
_CASES = {t.name: t.ci_cases for t in fs.TARGETS}


def ci(name: str) -> settings:
    return settings(CI, max_examples=_CASES[name])


# -- the crashes found, as inputs ----------------------------------------------------------------

HUGE = fs.Huge(1, 4400, decimal=True)
"""10**4400: ``str`` and ``repr`` of it (or of a list holding it) raise ValueError."""


def body_with(changes: dict[Any, Any]) -> bytes:
    """The valid manifest body with ``changes`` (key: value), encoded."""
    return fs.dumps({**fs.BODY_MAP, **changes})


def signed_body(changes: dict[Any, Any]) -> bytes:
    """A manifest signed by a trusted key whose body has ``changes``: decode_body runs."""
    return fs.sign_payload(body_with(changes))


ALG_HUGE = fs.dumps(cbor2.CBORTag(18, [fs.dumps({1: [HUGE], 4: fs.KID_ED}), {}, b"\xa0", b"sig"]))
"""ValueError from ``show(alg)``, before any signature check: reachable by anyone."""
BAD_URIS = ("coap://[x/m", "coap://h:x/m", "coap://h:99999/m")
"""urlsplit raised ValueError ("Invalid IPv6 URL"); the port ones were accepted, and raised
in ``WindowFetcher.for_uri`` and aiocoap when the image was fetched."""


def _record_with(**fields: Any) -> fs.JournalCase:
    """A record with a right CRC whose fields (by index) are of another type."""
    names = [f.name for f in dataclasses.fields(Record)]  # the body's order
    items = list(fs._RECORD_ITEMS)
    for name, value in fields.items():
        items[names.index(name)] = value
    return fs.JournalCase({RECORD_NAME: fs._envelope(SCHEMA, items, True, 0)})


def _answers(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _response(code: int, options: list[tuple[int, bytes]], token: bytes = b"tk") -> bytes:
    return fs.datagram(1, code, 1, token, fs.encode_options(options), b"", None)


def _announcement(body: dict[int, Any]) -> bytes:
    return fs.datagram(1, 0x45, 1, b"tk", fs.encode_options([(12, b"\x3c")]), fs.dumps(body), None)


@ci("manifest_accept")
@given(fs.manifest_cases())
@example((ALG_HUGE, None))
@example((signed_body({(HUGE,): 1}), None))  # ValueError from show(key)
@example((signed_body({2: 2**64}), None))  # a bignum sequence was accepted
@example((signed_body({8: BAD_URIS[0]}), None))
@example((signed_body({8: BAD_URIS[1]}), None))
@example((signed_body({8: BAD_URIS[2]}), None))
def test_manifest_accept(case: tuple[bytes, Any]) -> None:
    fs.check_manifest(case)


@ci("manifest_decode_body")
@given(fs.body_cases())
@example((body_with({(HUGE,): 1}), 1 << 30))
@example((body_with({3: [HUGE]}), 1 << 30))
@example((body_with({8: BAD_URIS[0]}), 1 << 30))
def test_manifest_decode_body(case: tuple[bytes, int]) -> None:
    fs.check_decode_body(case)


@ci("cbor_loads_exact")
@given(fs.HOSTILE_CBOR)
def test_cbor_loads_exact(raw: bytes) -> None:
    fs.check_loads_exact(raw)


@ci("report_decode")
@given(fs.report_cases())
def test_report_decode(case: tuple[bytes, Any]) -> None:
    fs.check_report(case)


@ci("control_parse_request")
@given(fs.REQUEST_LINES)
def test_control_parse_request(line: bytes) -> None:
    fs.check_parse_request(line)


@ci("control_client_answers")
@given(fs.daemon_lines())
@example(("hello", _answers(b'{"id":1,"ok":false,"error":"nope"}')))  # AttributeError
@example(("hello", _answers(b'{"id":[1],"ok":true}')))  # TypeError: the reader died
@example(("hello", _answers(b"[" * 3000 + b"]" * 3000)))  # RecursionError: the reader died
@example(("authorize", _answers(b'{"id":1,"ok":true,"result":{}}')))  # KeyError
@example(("inhibit", _answers(b'{"id":1,"ok":true,"result":{"expires":"soon"}}')))
@example(("defer", _answers(b'{"id":1,"ok":true,"result":{"until":1e999}}')))
@example(("hello", _answers(b'{"event":["progress"]}')))
def test_control_client_answers(case: tuple[str, bytes]) -> None:
    fs.check_control_client(case)


@ci("journal_load")
@given(fs.journal_cases())
@example(_record_with(pending=5))  # AttributeError: 'int' object has no attribute 'hex'
@example(_record_with(installed="ab"))
@example(_record_with(verified=7))  # loaded as is; the downloader indexed it later
@example(_record_with(tested="no"))  # loaded as True: bool("no")
@example(_record_with(deferred_total="1e3"))  # loaded as 1000.0: float("1e3")
@example(_record_with(locks=[["backup"]]))
@example(_record_with(outbox=[[1, 2]]))
@example(_record_with(defer_until=float("nan")))
def test_journal_load(case: fs.JournalCase) -> None:
    fs.check_journal(case)


@ci("coap_wire_decode")
@given(fs.DATAGRAMS.map(lambda d: (d, False)) | fs.DATAGRAMS.map(lambda d: (d, True)))
@example((_response(0xA3, [(wire.OPT_MAX_AGE, b"\xff" * 200)]), False))
@example((_response(0x45, [(wire.OPT_SIZE2, b"\xff" * 9)]), False))
def test_coap_wire_decode(case: tuple[bytes, bool]) -> None:
    fs.check_wire_decode(case)


@ci("window_fetcher_handle")
@given(fs.window_cases())
# OverflowError: float() of a 1600-bit Max-Age, from the 5.03 pause.
@example(
    fs.WindowCase(1024, [0], [], [(0, _response(0xA3, [(14, b"\xff" * 200)], fs.PLACEHOLDER))])
)
def test_window_fetcher_handle(case: fs.WindowCase) -> None:
    fs.check_window(case)


@ci("window_fetcher_udp")
@given(fs.server_cases())
@example(fs.ServerCase(fs.IMAGE, [[b"busy"]], 16))  # 5.03 Max-Age 0 forever: asked forever
def test_window_fetcher_udp(case: fs.ServerCase) -> None:
    fs.check_window_socket(case)


@ci("coap_announcement")
@given(fs.announcement_responses())
@example(_announcement({1: 3, 3: "coap://[x/m"}))  # ValueError out of the watcher: it died
@example(_announcement({1: 3, 3: "coap://h:99999/m"}))  # MalformedUrlError at the fetch
@example(_announcement({1: 3, 2: b"short"}))  # accepted a 5-byte digest
@example(_announcement({1: True}))  # accepted true as a sequence number
@example(_announcement({1: 3, 3: "\x7f"}))
def test_coap_announcement(data: bytes) -> None:
    fs.check_announcement(data)


@ci("coap_fetch_block")
@given(fs.fetch_cases())
# ValueError: str() of the block number of an 1800-byte Block2, in the "truncated" message
@example(fs.FetchCase([_response(0x45, [(wire.OPT_BLOCK2, b"\xff" * 1800)])], 0, 16, 0))
@example(fs.FetchCase([_response(0x45, [(wire.OPT_BLOCK2, b"\xff" * 300)])], 0, 16, 0))
@example(fs.FetchCase([_response(0x45, [(23, b"\x08"), (28, b"\xff" * 1800)])], 0, 16, 0))
@example(fs.FetchCase([_response(0x45, [(23, b"\x0f")])], 0, 1024, 0))  # SZX 7 over UDP
def test_coap_fetch_block(case: fs.FetchCase) -> None:
    fs.check_fetch_block(case)


@ci("download_assembly")
@given(fs.assembly_cases())
@example(fs.AssemblyCase(fs.IMAGE, 1024, [0], [Block(0, fs.IMAGE[:16], True, 10**4400)]))
def test_download_assembly(case: fs.AssemblyCase) -> None:
    fs.check_assembly(case)


# -- decode_report: the unit tests ---------------------------------------------------------------

GOOD = ReceivedReport(
    "gw-0042",
    Report(
        sequence=12,
        state=State.DOWNLOAD_DEFERRED,
        result=ResultCode.DEFERRED,
        update_id="0123456789abcdef",
        manifest_sequence=9,
        verified_bytes=4096,
        detail="battery low",
        until=1_900_000_000,
    ),
)
GOOD_MAP: dict[int, Any] = cbor2.loads(GOOD.report.to_cbor(GOOD.device_id))


def test_decode_report_round_trips_what_the_client_encodes() -> None:
    assert decode_report(GOOD.report.to_cbor(GOOD.device_id)) == GOOD
    minimal = Report(0, State.IDLE, ResultCode.INITIAL)
    assert decode_report(minimal.to_cbor("d")) == ReceivedReport("d", minimal)


def test_decode_report_takes_an_explicit_empty_detail_as_none_given() -> None:
    assert decode_report(cbor2.dumps({**GOOD_MAP, 8: ""})).report.detail == ""


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({1: "a" * 65}, "device_id", "at most 64"),
        ({1: ""}, "device_id", "1..64"),
        ({1: "a/b"}, "device_id", "without '/'"),
        ({1: b"gw"}, "device_id", "expected text"),
        ({2: -1}, "sequence", "unsigned integer up to"),
        ({2: 2**64}, "sequence", str(2**64 - 1)),
        ({2: True}, "sequence", "unsigned integer"),
        ({2: 1.0}, "sequence", "unsigned integer"),
        ({3: 4}, "state", "is not one of"),
        ({4: 3}, "result", "is not one of"),
        ({4: None}, "result", "unsigned integer"),
        ({5: ""}, "update_id", "printable"),
        ({5: "a" * 65}, "update_id", "at most 64"),
        ({5: "ab\n"}, "update_id", "printable"),
        ({6: "9"}, "manifest_sequence", "unsigned integer"),
        ({7: -5}, "verified_bytes", "unsigned integer"),
        ({8: "x" * 201}, "detail", "at most 200"),
        ({8: None}, "detail", "expected text"),
        ({9: 2**40}, "until", str(2**40 - 1)),
        ({10: -1}, "attempt", "unsigned integer"),
        ({11: 1}, "key 11", "1..10"),
        ({"1": "gw"}, "key '1'", "1..10"),
    ],
)
def test_decode_report_names_the_field_and_the_limit(
    changes: dict[Any, Any], field: str, says: str
) -> None:
    with pytest.raises(ReportError) as caught:
        decode_report(cbor2.dumps({**GOOD_MAP, **changes}))
    assert caught.value.field == field and says in str(caught.value)
    assert caught.value.result is ResultCode.MALFORMED and isinstance(caught.value, FotaError)


@pytest.mark.parametrize("key", [1, 2, 3, 4])
def test_decode_report_requires_keys_1_to_4(key: int) -> None:
    body = {k: v for k, v in GOOD_MAP.items() if k != key}
    with pytest.raises(ReportError, match=r"missing|characters"):
        decode_report(cbor2.dumps(body))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xa1\x02",  # truncated
        cbor2.dumps(GOOD_MAP) + b"\x00",  # bytes after the map
        b"\xa2\x02\x01\x02\x02",  # a duplicate key: which sequence is it?
        cbor2.dumps([GOOD_MAP]),
        b"\x81" * 5000,
    ],
)
def test_decode_report_refuses_what_is_not_one_cbor_map(raw: bytes) -> None:
    with pytest.raises(ReportError) as caught:
        decode_report(raw)
    assert caught.value.field == "bytes"


def test_decode_report_checks_the_size_before_decoding() -> None:
    raw = cbor2.dumps({**GOOD_MAP, 8: "x" * MAX_REPORT_BYTES})
    with pytest.raises(ReportError, match=f"limit of {MAX_REPORT_BYTES}"):
        decode_report(raw)


def test_the_largest_report_a_client_sends_fits() -> None:
    largest = Report(
        sequence=2**64 - 1,
        state=State.ROLLING_BACK,
        result=ResultCode.ROLLBACK_FAILED,
        update_id="f" * 16,
        manifest_sequence=2**64 - 1,
        verified_bytes=2**64 - 1,
        detail="\U0001f600" * 200,  # 4 UTF-8 bytes each
        until=2**40 - 1,
    )
    raw = largest.to_cbor("\U0001f600" * 64)
    assert len(raw) <= MAX_REPORT_BYTES
    assert decode_report(raw).report == largest


# -- the journal record: another schema with a valid CRC ----------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("pending", 5, "bytes or null"),
        ("verified", 7, "bytes"),
        ("attempts", -1, "unsigned integer"),
        ("attempts", True, "unsigned integer"),
        ("state", 4, "a state code"),
        ("defer_until", float("inf"), "finite"),
        ("tested", "no", "true or false"),
        ("locks", [["backup"]], "[name, expires-at]"),
        ("held", [1], "array of text"),
    ],
)
def test_a_record_of_another_schema_names_the_field(field: str, value: Any, says: str) -> None:
    data = _record_with(**{field: value}).files[RECORD_NAME]
    with pytest.raises(JournalError) as caught:
        Record.from_bytes(data)
    assert f"field {field}: expected" in str(caught.value) and says in str(caught.value)


def test_a_report_of_another_schema_in_the_outbox_names_it() -> None:
    data = _record_with(outbox=[[1, 0, 0, None, None, None, 5, None]]).files[RECORD_NAME]
    with pytest.raises(JournalError, match="outbox report detail: expected text"):
        Record.from_bytes(data)


# -- regressions that need a stack, a socket or a context ----------------------------------------


def test_parse_request_near_the_recursion_limit_is_bad_json_or_bad_request() -> None:
    """JSON parsed a few frames under the limit used to raise RecursionError when the error
    message dumped it again (deeper): which depth does it depends on the caller's stack."""
    limit = sys.getrecursionlimit()
    for depth in range(limit - 400, limit + 5):
        line = b'{"op":"reject","reason":' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(ControlError) as caught:
            proto.parse_request(line)
        assert caught.value.code in ("bad_json", "bad_request")
        proto.failure(caught.value.request_id, caught.value.code, str(caught.value))


async def test_a_malformed_uri_from_the_server_is_a_permanent_error_not_aiocoaps() -> None:
    """aiocoap's MalformedUrlError (a ValueError) escaped fetch_block and fetch."""
    transport = CoapTransport("coap://127.0.0.1:9", "dev1")
    try:
        for uri in ("coap://127.0.0.1:99999/m", "coap://127.0.0.1/%ff%fe"):
            with pytest.raises(PermanentServerError, match="malformed URI"):
                await transport.fetch_block(uri, 0, 1024)
            with pytest.raises(PermanentServerError):
                await transport.fetch(uri, limit=10)
    finally:
        await transport.aclose()


def test_an_announcement_of_another_content_format_is_ignored() -> None:
    good = {1: 3, 2: bytes(32), 3: "../m/x"}
    for cf, usable in ((b"\x3c", True), (b"", False), (b"\x2a", False), (None, True)):
        options = [] if cf is None else [(12, cf)]
        data = fs.datagram(1, 0x45, 1, b"tk", fs.encode_options(options), fs.dumps(good), None)
        ann = CoapTransport("coap://h", "d")._decode_announcement(fs._message(data))
        assert (ann is not None) == usable, cf


def test_every_target_has_a_ci_test() -> None:
    tests = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    assert {t.name for t in fs.TARGETS} <= tests
