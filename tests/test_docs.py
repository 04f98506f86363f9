"""The docs say what the code does."""

from __future__ import annotations

from pathlib import Path

from fota.core.machine import table_markdown

DOCS = Path(__file__).parent.parent / "docs"


def test_state_machine_doc_embeds_the_current_table() -> None:
    assert table_markdown() in (DOCS / "state-machine.md").read_text()
