"""The one table of CoAP response codes: what each answer means to fota (pure; no I/O).

Every path that looks at a response code asks here: ``fota.transport.coap`` (manifests,
keysets, announcements, reports, images over OSCORE), ``fota.transport.window`` (images over
plain UDP) and ``fota.transport.tcp`` (images over ``coap+tcp://``). docs/protocol.md renders
the table (:func:`table_markdown`; ``tests/integration/test_transient.py`` compares the two).

Theory of operation:

* "Permanent" is rare. Every resource fota fetches is pinned by a signed digest (the manifest
  by the announcement, the image by the manifest), so a 4.04 on it says "not here yet" or "not
  here for a moment" (a server restarted and refilling its files) far more often than "gone
  for good": it is :data:`MISSING`, retried with back-off up to ``Config.not_found_budget``
  before an update fails. Only answers that say the request itself is wrong (4.00, 4.02, 4.05,
  4.06, 4.13, 4.15) or that the server refuses this client (4.01, 4.03) are permanent.
* A report is acknowledged only by 2.01 Created or 2.04 Changed. Any other 2.xx (2.31
  Continue above all: a block-wise transfer half done) is not an acknowledgement, and the
  report is sent again.
* A code not in the table is judged by its class: 2.xx like 2.05 for a GET, 4.xx and 5.xx as
  transient. An unknown client error is retried, not trusted to be permanent.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    """What an answer means to the request it answers."""

    DATA = "data"
    """A GET's content: use it."""
    ACK = "ack"
    """A report's acknowledgement: drop it from the outbox."""
    RETRY = "retry"
    """Transient: back off and ask again (``TransportError``)."""
    MISSING = "missing"
    """The digest-addressed resource is not there now: retry for ``not_found_budget``
    (``ResourceMissing``)."""
    CHANGED = "changed"
    """The image changed under the transfer: restart it (``ImageChanged``)."""
    PERMANENT = "permanent"
    """The request can never succeed as sent: stop (``PermanentServerError``)."""


def code(klass: int, detail: int) -> int:
    """The code byte of ``klass.detail`` (``code(4, 4)`` is 4.04)."""
    return klass << 5 | detail


def text(value: int) -> str:
    """``4.04`` style text for a code byte."""
    return f"{value >> 5}.{value & 0x1F:02d}"


_R, _M, _P = Verdict.RETRY, Verdict.MISSING, Verdict.PERMANENT

TABLE: tuple[tuple[int, str, Verdict, Verdict], ...] = (
    (code(2, 1), "Created", _R, Verdict.ACK),
    (code(2, 4), "Changed", _R, Verdict.ACK),
    (code(2, 5), "Content", Verdict.DATA, _R),
    (code(2, 31), "Continue", _R, _R),
    (code(4, 0), "Bad Request", _P, _P),
    (code(4, 1), "Unauthorized", _P, _P),
    (code(4, 2), "Bad Option", _P, _P),
    (code(4, 3), "Forbidden", _P, _P),
    (code(4, 4), "Not Found", _M, _R),
    (code(4, 5), "Method Not Allowed", _P, _P),
    (code(4, 6), "Not Acceptable", _P, _P),
    (code(4, 8), "Request Entity Incomplete", Verdict.CHANGED, _R),
    (code(4, 13), "Request Entity Too Large", _P, _P),
    (code(4, 15), "Unsupported Content-Format", _P, _P),
    (code(4, 29), "Too Many Requests", _R, _R),
    (code(5, 3), "Service Unavailable", _R, _R),
)
"""``(code, name, answer to a GET, answer to a report POST)``. Codes not listed: see
:func:`for_get` and :func:`for_report`. A report's 4.04 is retried rather than the report
dropped: a server that restarts answers it before its resources are back, and a dropped final
report never reaches it."""

_GET = {row[0]: row[2] for row in TABLE}
_REPORT = {row[0]: row[3] for row in TABLE}


def for_get(value: int) -> Verdict:
    """What an answer to a GET (announcement, manifest, keyset, image block) means."""
    found = _GET.get(value)
    if found is not None:
        return found
    return Verdict.DATA if value >> 5 == 2 else Verdict.RETRY


def for_report(value: int) -> Verdict:
    """What an answer to a report POST means (only 2.01 and 2.04 acknowledge it)."""
    return _REPORT.get(value, Verdict.RETRY)


def table_markdown() -> str:
    """The table as Markdown (docs/protocol.md embeds it; a test compares)."""
    rows = ["| code | name | answer to a GET | answer to a report |", "|---|---|---|---|"]
    rows += [f"| {text(c)} | {name} | {g.value} | {r.value} |" for c, name, g, r in TABLE]
    rows.append("| other 2.xx | | data | retry |")
    rows.append("| other 4.xx, 5.xx | | retry | retry |")
    return "\n".join(rows)
