"""Decoding status reports: the server's side of CDDL ``report`` in docs/protocol.md.

The client only encodes reports (:meth:`fota.core.record.Report.to_cbor`). A server decodes
them with :func:`decode_report`, which checks every field against the CDDL and against the
limits the client itself keeps, so a report that passes is one a fota client could have sent.
Whatever the bytes, it returns a :class:`ReceivedReport` or raises :class:`ReportError` naming
the field and the limit, never a cbor2 error. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fota.core.manifest import loads_exact
from fota.core.record import Report
from fota.core.states import State
from fota.core.text import show
from fota.errors import FotaError, ResultCode

MAX_REPORT_BYTES = 2048
"""Largest encoded report accepted, checked before decoding. The largest a client sends is
about 1.1 KiB (a 64-character device id and a 200-character detail, 4 UTF-8 bytes each)."""
MAX_DEVICE_ID = 64
"""Characters, as ``Config.device_id`` allows (and no ``/``)."""
MAX_UPDATE_ID = 64
"""Characters, as the control protocol's ``update_id`` allows (fota sends 16 hex digits)."""
MAX_DETAIL = 200
"""Characters: the client cuts a report's detail to this."""
MAX_UINT = (1 << 64) - 1
"""A CBOR uint (major type 0); a bignum is not one."""
MAX_UNTIL = (1 << 40) - 1
"""Latest ``until``, epoch seconds: the bound of a manifest's deadline."""

_STATES = {s.value: s for s in State}
_RESULTS = {int(r): r for r in ResultCode}
_KEYS = range(1, 11)
_NAMES = {
    1: "device_id",
    2: "sequence",
    3: "state",
    4: "result",
    5: "update_id",
    6: "manifest_sequence",
    7: "verified_bytes",
    8: "detail",
    9: "until",
    10: "attempt",
}


class ReportError(FotaError):
    """A status report was refused (a server answers 4.00 Bad Request).

    Attributes:
        field: the report field at fault (``bytes`` for the encoding as a whole).
    """

    result = ResultCode.MALFORMED

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"report {field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    """A decoded status report and the device that sent it.

    Attributes:
        device_id: key 1, the sender's device id.
        report: keys 2..10, as the client's durable outbox held them.
    """

    device_id: str
    report: Report


def _uint(body: dict[int, Any], key: int, limit: int = MAX_UINT) -> int | None:
    if key not in body:
        return None
    value = body[key]
    # bool is an int in Python; CBOR true is not a uint.
    if type(value) is not int or not 0 <= value <= limit:
        raise ReportError(_NAMES[key], f"expected an unsigned integer up to {limit}")
    return value


def _text(body: dict[int, Any], key: int, limit: int) -> str | None:
    if key not in body:
        return None  # the CDDL has no null: an optional field is absent or of its type
    value = body[key]
    if not isinstance(value, str):
        raise ReportError(_NAMES[key], "expected text")
    if len(value) > limit:
        raise ReportError(_NAMES[key], f"{len(value)} characters, at most {limit}")
    return value


def _code(body: dict[int, Any], key: int, codes: dict[int, Any]) -> Any:
    value = _uint(body, key)
    if value is None:
        raise ReportError(_NAMES[key], "missing")
    if value not in codes:
        raise ReportError(_NAMES[key], f"{value} is not one of {sorted(codes)}")
    return codes[value]


def decode_report(raw: bytes) -> ReceivedReport:
    """Decode and check one status report as a server receives it.

    Args:
        raw: the POST payload (CBOR).

    Returns:
        The sender's device id and the report.

    Raises:
        ReportError: not exactly one CBOR map of the ``report`` rule (unknown or duplicate
            keys, a missing or mistyped field, a text or number past its limit); the error
            names the field and the limit.
    """
    if len(raw) > MAX_REPORT_BYTES:
        raise ReportError("bytes", f"{len(raw)} bytes exceeds the limit of {MAX_REPORT_BYTES}")
    try:
        body = loads_exact(raw)
    except Exception as exc:  # cbor2 raises several types on hostile input; all mean "malformed"
        raise ReportError("bytes", f"not one CBOR item ({show(str(exc), 80)})") from exc
    if not isinstance(body, dict):
        raise ReportError("bytes", "expected a CBOR map")
    for key in body:
        if type(key) is not int or key not in _KEYS:
            raise ReportError(f"key {show(key)}", "keys are the integers 1..10")
    device_id = _text(body, 1, MAX_DEVICE_ID)
    if not device_id or "/" in device_id:
        raise ReportError("device_id", f"expected 1..{MAX_DEVICE_ID} characters without '/'")
    sequence = _uint(body, 2)
    if sequence is None:
        raise ReportError("sequence", "missing")
    update_id = _text(body, 5, MAX_UPDATE_ID)
    if update_id is not None and not (update_id and update_id.isprintable()):
        raise ReportError("update_id", f"expected 1..{MAX_UPDATE_ID} printable characters")
    report = Report(
        sequence=sequence,
        state=_code(body, 3, _STATES),
        result=_code(body, 4, _RESULTS),
        update_id=update_id,
        manifest_sequence=_uint(body, 6),
        verified_bytes=_uint(body, 7),
        # The client leaves an empty detail out; both spellings decode the same.
        detail=_text(body, 8, MAX_DETAIL) or "",
        until=_uint(body, 9, MAX_UNTIL),
        # Absent: the update's first attempt (a client sends it only from the first retry).
        attempt=_uint(body, 10) or 0,
    )
    return ReceivedReport(device_id, report)
