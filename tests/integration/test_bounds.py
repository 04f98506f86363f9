"""Issue 17 §5: nothing grows with the number of updates.

The durable report outbox coalesces progress reports (the newest per update is kept, a final
report is never dropped), and ``CoapTransport``'s per-URI cache of resolved remotes keeps the
most recently used few. Real journal and engine with a fake network for the outbox; the real
transport against the real test server on 127.0.0.1:0 for the cache. No sleeps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from fota import AutoAuthorize, ResultCode
from fota import effects as effects_mod
from fota.core.machine import Model
from fota.core.record import COALESCE_FROM, PROGRESS_RESULTS, Report, queue_report
from fota.core.states import State
from fota.engine import Engine
from fota.errors import FotaError
from fota.journal import Journal
from fota.testing import UpdateServer
from fota.transport.coap import MAX_REMOTES, CoapTransport
from tests.conftest import Signing
from tests.integration.test_engine_resume import MemoryInstaller, config
from tests.integration.test_supervision import ReportsFailFirst

pytestmark = pytest.mark.timeout(60)


def report(seq: int, result: ResultCode, uid: str | None = "u1") -> Report:
    return Report(seq, State.DOWNLOADING, result, uid)


def test_a_short_outbox_keeps_every_report() -> None:
    # A server that answers: every step reaches it.
    outbox: tuple[Report, ...] = ()
    for seq in range(COALESCE_FROM):
        outbox = queue_report(outbox, report(seq, ResultCode.INITIAL))
    assert [r.sequence for r in outbox] == list(range(COALESCE_FROM))


def test_progress_reports_are_coalesced_per_update_and_finals_kept() -> None:
    finals = tuple(report(s, ResultCode.SUCCESS, f"done{s}") for s in range(COALESCE_FROM))
    outbox = finals
    for seq in range(100, 200):
        outbox = queue_report(outbox, report(seq, ResultCode.INITIAL))
        outbox = queue_report(outbox, report(1000 + seq, ResultCode.INITIAL, "u2"))
    assert outbox == (
        *finals,
        report(199, ResultCode.INITIAL),
        report(1199, ResultCode.INITIAL, "u2"),
    )
    outbox = queue_report(outbox, report(200, ResultCode.DEFERRED))
    outbox = queue_report(outbox, report(201, ResultCode.FAILED))
    # The final report replaces u1's progress; u2's stays; nothing final is ever dropped.
    assert [r.sequence for r in outbox] == [*range(COALESCE_FROM), 1199, 201]
    for seq in range(202, 300):
        outbox = queue_report(outbox, report(seq, ResultCode.SUPERSEDED, f"old{seq}"))
        outbox = queue_report(outbox, report(seq + 1000, ResultCode.INITIAL, None))
    assert len([r for r in outbox if r.result not in PROGRESS_RESULTS]) == COALESCE_FROM + 1 + 98
    assert [r.sequence for r in outbox if r.update_id is None] == [1299]


def installed(version: str):  # type: ignore[no-untyped-def]
    def check(model: Model) -> bool:
        return (
            model.installed is not None
            and model.installed.body.version == version
            and model.state is State.IDLE
        )

    return check


async def test_outbox_stays_bounded_while_the_report_server_is_away(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: every step of every update queued a report that stayed until acknowledged,
    # so a device whose report server was away for a year grew its journal without end.
    monkeypatch.setattr(effects_mod, "REPORT_RETRY", 0.001)
    net = ReportsFailFirst(failures=1 << 30)  # never acknowledged
    engine = Engine(
        dataclasses.replace(config(tmp_path, signing.trust), report_retry_cap=0.01),
        transport=net,
        journal=Journal(tmp_path, signing.trust),
        installer=MemoryInstaller(),
        handler=AutoAuthorize(),
    )
    await engine.start()
    try:
        for n in range(1, 5):
            net.publish(signing, os.urandom(3000 + n), f"{n}.0", n)
            await engine.wait_for(installed(f"{n}.0"), 30)
        assert engine.model is not None
        outbox = engine.model.record.outbox
    finally:
        await engine.aclose()
    assert [r.result for r in outbox if r.result not in PROGRESS_RESULTS] == [
        ResultCode.SUCCESS
    ] * 4
    # Every step of four updates was queued (more than twenty reports): fewer than
    # COALESCE_FROM progress reports are left, plus at most one per update.
    progress = [r.update_id for r in outbox if r.result in PROGRESS_RESULTS]
    assert len(progress) < COALESCE_FROM + 4
    assert outbox[-1].sequence >= 20
    # The journal on disk says the same (the bound is what is stored, not only in memory).
    assert Journal(tmp_path, signing.trust).load().record.outbox == outbox


async def test_the_per_uri_cache_keeps_only_the_recent_remotes(
    fota_server: UpdateServer,
) -> None:
    # Before: one entry per URI ever requested (each manifest, each image): 250 sequential
    # updates, +2.7 MiB.
    transport = CoapTransport(fota_server.uri, "dev1", ack_timeout=1.0)
    hot = f"{fota_server.uri}/fota/m/{'0' * 64}"
    try:
        for i in range(3 * MAX_REMOTES):
            for uri in (hot, f"{fota_server.uri}/fota/m/{i + 1:064x}"):
                with pytest.raises(FotaError):  # 4.04: no such manifest; answered all the same
                    await transport.fetch(uri, limit=1024)
            assert len(transport._remotes) <= MAX_REMOTES
    finally:
        await transport.aclose()
    # Least recently used out: the URI asked every time is still cached, the old ones are not.
    assert hot in transport._remotes
    assert f"{fota_server.uri}/fota/m/{1:064x}" not in transport._remotes
    assert len(transport._remotes) == MAX_REMOTES
