r"""The control socket's message protocol (docs/control.md): JSON lines over a Unix socket.

Each message is one JSON object on one line (UTF-8, ``\n``-terminated). A client sends
requests ``{"id": 7, "op": "defer", "for": 3600, "reason": "shift"}``; the daemon answers each
with ``{"id": 7, "ok": true, "result": {...}}`` or ``{"id": 7, "ok": false, "error": {"code":
..., "message": ...}}``, in order. After ``subscribe``, event objects ``{"event": "progress",
...}`` (no ``id``) arrive between the answers.

This module only checks and shapes messages; it does no I/O, so it is tested without sockets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fota.errors import ControlError
from fota.notices import KINDS

EVENTS = (*KINDS, "stopping")
"""Every event a connection may subscribe to: the client's notices and the daemon's own."""

LONGEST = 10 * 366 * 86400.0
"""Longest duration (``for``, ``ttl``) accepted, seconds: ten years is "forever" enough."""

LATEST = 253402300799.0
"""Latest instant accepted (9999-12-31T23:59:59Z): later ones have no datetime."""
PROTOCOL = 1
"""Version of this protocol, sent by ``hello``; bumped only for incompatible changes."""

MAX_MESSAGE = 65536
"""Default longest message line, bytes (the daemon's ``[control] max_message``)."""

MAX_TEXT = 256
"""Longest reason text, characters."""

MAX_ID = 64
"""Longest string request id, characters."""

ERROR_CODES = (
    "bad_json",  # not a JSON object on one line
    "bad_request",  # a missing, unknown or mistyped field (the message names it)
    "unknown_op",
    "too_large",  # longer than max_message: the connection is closed after this answer
    "incomplete",  # end of input in the middle of a message
    "busy",  # too many connections: closed after this answer
    "timeout",  # no complete message within request_timeout: closed after this answer
    "idle",  # silent for idle_timeout without a subscription: closed after this answer
    "invalid_state",  # nothing waits for this answer (fota.InvalidTransition)
    "refused",  # a politeness or lock rule refused it (fota.PolicyError)
    "journal",  # the state could not be saved; try again
    "internal",  # a bug in fota; the daemon logged it
)


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request: its ``op``, its echoed ``id`` and its arguments."""

    op: str
    id: int | str | None
    args: Mapping[str, Any]


def _text(name: str, limit: int = MAX_TEXT) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ControlError("bad_request", f"{name}: expected a string, got {_show(value)}")
        if len(value) > limit:
            raise ControlError("bad_request", f"{name}: {len(value)} characters, at most {limit}")
        if not value.isprintable():
            raise ControlError("bad_request", f"{name}: control characters are not allowed")
        return value

    return check


def _number(name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ControlError("bad_request", f"{name}: expected a number, got {_show(value)}")
        if not math.isfinite(value) or not 0 < value <= LONGEST:
            raise ControlError(
                "bad_request", f"{name}: {value} must be a positive number up to {LONGEST:g}"
            )
        return float(value)

    return check


def _instant(value: Any) -> float:
    """``until``: epoch seconds, or ISO 8601 with a zone."""
    if isinstance(value, bool):
        raise ControlError("bad_request", "until: expected ISO 8601 or epoch seconds, got a bool")
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 < value <= LATEST:
            raise ControlError("bad_request", f"until: {value} is not an instant up to {LATEST:g}")
        return float(value)
    if not isinstance(value, str) or len(value) > 64:
        raise ControlError(
            "bad_request", f"until: expected ISO 8601 or epoch seconds, got {_show(value)}"
        )
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ControlError("bad_request", f"until: {value!r} is not ISO 8601") from None
    if when.tzinfo is None:
        raise ControlError("bad_request", f"until: {value!r} has no time zone (add Z for UTC)")
    try:
        return when.timestamp()
    except (OverflowError, ValueError):  # year 1 or 9999 shifted out of range by its zone
        raise ControlError("bad_request", f"until: {value!r} is out of range") from None


def _bool(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ControlError("bad_request", f"{name}: expected true or false, got {_show(value)}")
        return value

    return check


def _kinds(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ControlError("bad_request", "events: expected a list of event names")
    # EVENTS, not KINDS: "stopping" is the daemon's own event, not a client notice.
    unknown = sorted(set(value) - set(EVENTS))
    if unknown:
        raise ControlError("bad_request", f"events: unknown {unknown}; known: {', '.join(EVENTS)}")
    return tuple(value)


_UPDATE_ID = _text("update_id", 64)

OPS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "hello": {},
    "status": {},
    "subscribe": {"events": _kinds, "answers": _bool("answers")},
    "unsubscribe": {},
    "authorize": {"update_id": _UPDATE_ID},
    "reject": {"update_id": _UPDATE_ID, "reason": _text("reason")},
    "defer": {
        "update_id": _UPDATE_ID,
        "until": _instant,
        "for": _number("for"),
        "reason": _text("reason"),
    },
    "resume": {},
    "check": {},
    "inhibit": {"name": _text("name", 64), "ttl": _number("ttl")},
    "release": {"name": _text("name", 64)},
}
"""Every operation and the arguments it takes (all optional unless :data:`REQUIRED` says)."""

REQUIRED: dict[str, tuple[str, ...]] = {"inhibit": ("name", "ttl"), "release": ("name",)}


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except RecursionError:  # parsed just under the stack's limit, dumped a few frames deeper
        return f"a nested {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def parse_request(line: bytes) -> Request:
    """Check one request line.

    Raises:
        ControlError: ``bad_json``, ``bad_request`` or ``unknown_op``, naming the field; its
            ``request_id`` is the request's ``id`` when that was valid.
    """
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError("bad_json", f"not JSON: {exc}") from None
    except RecursionError:  # [[[[...: valid JSON nested deeper than Python's stack
        raise ControlError("bad_json", "not JSON this server reads: nested too deeply") from None
    if not isinstance(message, dict):
        raise ControlError("bad_json", f"expected a JSON object, got {type(message).__name__}")
    rid = message.pop("id", None)
    if not (
        rid is None
        or (isinstance(rid, int) and not isinstance(rid, bool))
        or (isinstance(rid, str) and len(rid) <= MAX_ID)
    ):
        raise ControlError("bad_request", f"id: expected an integer or a string, got {_show(rid)}")
    try:
        op = message.pop("op", None)
        if not isinstance(op, str):
            raise ControlError("bad_request", f"op: expected a string, got {_show(op)}")
        schema = OPS.get(op)
        if schema is None:
            raise ControlError("unknown_op", f"op: {op[:40]!r} is unknown; known: {', '.join(OPS)}")
        args: dict[str, Any] = {}
        for key, value in message.items():
            check = schema.get(key)
            if check is None:
                known = ", ".join(schema) or "none"
                raise ControlError(
                    "bad_request", f"{op}: unknown field {key[:40]!r} (known: {known})"
                )
            args[key] = check(value)
        for key in REQUIRED.get(op, ()):
            if key not in args:
                raise ControlError("bad_request", f"{op}: {key} is required")
        if op == "defer" and ("until" in args) == ("for" in args):
            raise ControlError("bad_request", "defer: give exactly one of until and for")
    except ControlError as exc:
        exc.request_id = rid  # answered with the id it came with, when it had a valid one
        raise
    return Request(op, rid, args)


def answer(rid: int | str | None, result: Mapping[str, Any]) -> bytes:
    """A success answer line."""
    return encode({"id": rid, "ok": True, "result": dict(result)})


def failure(rid: int | str | None, code: str, message: str) -> bytes:
    """An error answer line."""
    return encode({"id": rid, "ok": False, "error": {"code": code, "message": message}})


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as a line (compact JSON; ``ensure_ascii`` keeps it one line of ASCII)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
