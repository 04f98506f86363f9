"""Issue 18 §1: ``Machine.handle`` is the one entry to the core.

It owns the legal-pair check, the machine error, undoing a callback that raised, taking the
commands, and the notices the engine used to derive by diffing records. The engine and every
core harness go through it; nothing else builds a ``transitions`` machine.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from fota.core import commands as C
from fota.core import events as ev
from fota.core.machine import TRANSITIONS, Machine, Model
from fota.core.states import State
from tests.core.test_core_table import (
    ANNOUNCE_NEW,
    NEW,
    NEW_URI,
    NOW,
    PENDING,
    POLICY,
    TRUST,
    U,
    build,
    fetched,
    start_record,
)

S = State
ROOT = Path(__file__).resolve().parents[2]


def _state(model: Model) -> State:
    """The state now (a call: a type checker keeps no earlier answer)."""
    return model.state


async def test_an_illegal_pair_is_refused_with_the_reason_and_changes_nothing() -> None:
    driven = build(start_record(S.IDLE, "polite"), "polite")
    before = driven.model.record
    handled = await driven.machine.handle(ev.Authorized(U), NOW)
    assert not handled.accepted and handled.row is None
    assert handled.commands == () and handled.notices == ()
    assert "Authorized is not valid in state IDLE" in handled.refusal
    assert driven.model.record is before and driven.model.state is S.IDLE


async def test_a_callback_that_raises_leaves_the_model_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driven = build(start_record(S.AWAIT_DOWNLOAD_AUTH, "polite"), "polite")
    model = driven.model
    before, pending = model.record, model.pending

    def broken(e: Any) -> None:
        model.record = model.record.evolve(attempts=99)  # a change, then the bug
        raise RuntimeError("callback bug")

    # The row's first callback works, its second raises: nothing of either may remain.
    monkeypatch.setattr(model, "authorize", broken)
    with pytest.raises(RuntimeError, match="callback bug"):
        await driven.machine.handle(ev.Authorized(U), NOW)
    assert model.state is S.AWAIT_DOWNLOAD_AUTH
    assert model.record is before and model.pending is pending
    assert model.take_commands() == []


async def test_undo_puts_the_model_back_and_the_notices_come_again() -> None:
    # The engine undoes an event whose journal write failed; when the event is offered
    # again, the listeners must still hear about the update.
    model = Model(POLICY, TRUST, start_record(S.IDLE, "polite").evolve(pending=None))
    machine = Machine(model)
    first = await machine.handle(fetched(NEW.raw, NEW_URI), NOW)
    assert first.accepted and model.state is S.DOWNLOADING
    assert [n.kind for n in first.notices] == ["update_available", "state"]
    machine.undo(first)
    assert _state(model) is S.IDLE and model.record is first.before and model.pending is None
    again = await machine.handle(fetched(NEW.raw, NEW_URI), NOW)
    assert [n.kind for n in again.notices] == ["update_available", "state"]
    assert again.commands == first.commands


async def test_the_notices_are_the_core_s() -> None:
    driven = build(start_record(S.AWAIT_DOWNLOAD_AUTH, "polite"), "polite")
    machine = driven.machine
    # The first event after a start tells the pending update once (the engine's listeners
    # and the control socket learn of it), and the state it is in.
    restarted = await machine.handle(ev.Restarted(), NOW)
    assert [n.kind for n in restarted.notices] == ["update_available"]
    available = restarted.notices[0]
    assert available.update_id == U and available.fields["version"] == PENDING.body.version
    assert available.fields["installed_version"] is not None
    assert available.fields["polite"] is True
    # A deferral: the state, and the deferral with its end and reason.
    until = NOW + 600.0
    deferred = await machine.handle(ev.Deferred(U, until, "busy"), NOW)
    assert [(n.kind, dict(n.fields)) for n in deferred.notices] == [
        (
            "state",
            {"state": "DOWNLOAD_DEFERRED", "previous": "AWAIT_DOWNLOAD_AUTH", "version": "1.11"},
        ),
        ("deferred", {"step": "download", "until": until, "reason": "busy"}),
    ]
    # Asked again: the state, then the question (no update_available: the same update).
    resumed = await machine.handle(ev.ResumeRequested(), NOW)
    assert [n.kind for n in resumed.notices] == ["state", "authorization_needed"]
    asking = resumed.notices[1]
    assert asking.fields["step"] == "download" and asking.update_id == U
    assert driven.model.authorization_needed(NOW) == asking
    # A new update replaces it: told as available, once.
    announced = await machine.handle(ANNOUNCE_NEW, NOW)
    assert announced.notices == () and announced.commands == (C.FetchManifest(NEW_URI, NEW.digest),)
    superseding = await machine.handle(fetched(NEW.raw), NOW)
    assert [n.kind for n in superseding.notices][:1] == ["update_available"]
    assert superseding.notices[0].update_id == NEW.update_id


async def test_the_row_that_fired_is_named() -> None:
    driven = build(start_record(S.INSTALLING, "polite"), "polite")
    handled = await driven.machine.handle(ev.InstallFinished(U, restart=True), NOW)
    assert handled.row is not None and handled.row.dest is S.AWAIT_RESTART
    assert handled.row in TRANSITIONS
    # The row says it reports the restart; the commands keep the row's order.
    assert handled.row.after == ("report_restart", "request_restart")
    assert [type(c) for c in handled.commands] == [C.SendReports, C.RequestRestart]


def test_callbacks_do_not_ask_transitions_where_they_came_from() -> None:
    # Rows say what a callback needs (report_entry, report_restart); the state before the
    # event comes as ``source``. No callback reads transitions' EventData.transition.
    source = (ROOT / "fota" / "core" / "machine.py").read_text()
    reads = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "transition"
    ]
    assert reads == []


def test_only_the_core_builds_a_transitions_machine() -> None:
    builders = sorted(
        str(path.relative_to(ROOT))
        for folder in ("fota", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if "AsyncMachine(" in path.read_text() or "machine_kwargs" in path.read_text()
    )
    assert builders == ["fota/core/machine.py", "tests/core/test_core_machine.py"]
