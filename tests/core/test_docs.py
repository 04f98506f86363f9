"""The docs say what the code does."""

from __future__ import annotations

from pathlib import Path

import pytest

from fota.core.machine import table_markdown

DOCS = Path(__file__).parents[2] / "docs"


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
        refused=(hashlib.sha256(b"r").digest(), hashlib.sha256(b"r2").digest()),
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
    installing = full.evolve(
        state=State.ROLLING_BACK,
        first_seen=1794990000.0,
        deferred_total=3600.0,
        forced="deadline",
        locks=(("backup", 1795003600.0),),
        provisioned_at=1790000000,
        cancelled=(hashlib.sha256(b"c").digest(),),
        held=("lock backup",),
        boot_id="0c5d2b4e-77a1-4b9e-9d7e-3f4b1a2c5d6e",
        commit_by=1795000300.0,
        tested=True,
        failure="self-test failed: exit status 1",
        rejected=(hashlib.sha256(b"j").digest(),),
        keyset_version=3,
        floor=2**64 - 1,
    )
    for record in (empty, full, installing):
        data = record.to_bytes()
        schema.validate_cbor(data)
        body = cbor2.loads(data)[1]
        pycddl.Schema("root = journal-body\n" + cddl_blocks("journal.md")).validate_cbor(body)
        assert Record.from_bytes(data) == record


def test_installers_doc_lists_every_crash_point() -> None:
    from fota.crashpoints import POINTS

    text = (DOCS / "installers.md").read_text()
    for name, meaning in POINTS.items():
        assert f"| `{name}` | {meaning} |" in text, name


def test_archive_recipe_cddl_matches_a_cbor_recipe() -> None:
    import cbor2
    import pycddl

    schema = pycddl.Schema("root = recipe\n" + cddl_blocks("installers.md"))
    recipe = {
        "format": 1,
        "before": ["systemctl", "stop", "app"],
        "timeout": 60,
        "files": [{"source": "payload/app.py", "target": "bin/app.py", "mode": 0o755}],
        "packages": [{"manager": "pip", "names": ["wheels/dep-1.0-py3-none-any.whl"]}],
    }
    schema.validate_cbor(cbor2.dumps(recipe))
    with pytest.raises(pycddl.ValidationError):
        schema.validate_cbor(
            cbor2.dumps({**recipe, "packages": [{"manager": "brew", "names": ["x"]}]})
        )
