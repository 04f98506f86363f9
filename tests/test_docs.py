"""The docs say what the code does."""

from __future__ import annotations

from pathlib import Path

from fota.core.machine import table_markdown

DOCS = Path(__file__).parent.parent / "docs"


def test_state_machine_doc_embeds_the_current_table() -> None:
    assert table_markdown() in (DOCS / "state-machine.md").read_text()


def cddl_blocks(name: str) -> str:
    text = (DOCS / name).read_text()
    return "\n".join(part.split("```", 1)[0] for part in text.split("```cddl\n")[1:])


def test_journal_records_match_the_documented_cddl() -> None:
    import hashlib

    import cbor2
    import pycddl

    from fota.core.record import Record, Report, bitmap_set
    from fota.core.states import State
    from fota.errors import ResultCode

    schema = pycddl.Schema(cddl_blocks("journal.md"))
    empty = Record()
    full = Record(
        state=State.DOWNLOAD_DEFERRED,
        pending=hashlib.sha256(b"p").digest(),
        manifest_uri="coap://h/fota/m/ab",
        installed=hashlib.sha256(b"i").digest(),
        refused=hashlib.sha256(b"r").digest(),
        verified=bitmap_set(bytes(3), 17),
        etag=b"12345678",
        defer_until=1795000000.5,
        defer_reason="busy",
        attempts=2,
        restarts=1,
        progress=35,
        report_seq=9,
        outbox=(
            Report(7, State.AWAIT_DOWNLOAD_AUTH, ResultCode.INITIAL, "ab" * 8, 3, 0),
            Report(8, State.DOWNLOAD_DEFERRED, ResultCode.DEFERRED, "ab" * 8, 3, 0, "busy", 17),
        ),
    )
    for record in (empty, full):
        data = record.to_bytes()
        schema.validate_cbor(data)
        body = cbor2.loads(data)[1]
        pycddl.Schema("root = journal-body\n" + cddl_blocks("journal.md")).validate_cbor(body)
        assert Record.from_bytes(data) == record
