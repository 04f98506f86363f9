"""Issue 18 §2: one retry policy.

Every retry of the engine, its child tasks and the transport's announcement watch waits
``fota.core.policy.backoff``: a base doubling to a cap, spread by a jitter the caller draws
from its own random source. Before, six places each had their own loop (three with no jitter
at all: report delivery, the restart command, the journal's pause), so a fleet that lost its
server or its disk together came back together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from fota import effects as effects_mod
from fota import supervision
from fota.core import policy
from fota.journal import Journal
from fota.transport import coap
from fota.transport.coap import CoapTransport
from tests.conftest import Signing
from tests.integration.test_engine_resume import FakeTransport, config
from tests.integration.test_supervision import make_engine

pytestmark = pytest.mark.timeout(60)


def test_backoff_doubles_to_its_cap_and_spreads_by_the_draw() -> None:
    assert [policy.backoff(n, 1.0, 5.0, 0.5, 0.25) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert policy.backoff(1, 2.0, 8.0, 0.0, 0.25) == 1.5
    assert policy.backoff(1, 2.0, 8.0, 0.999999, 0.25) == pytest.approx(2.5)
    assert policy.backoff(10_000, 1.0, 60.0, 0.5, 0.1) == 60.0  # no overflow
    p = policy.Policy("gw")
    assert policy.retry_delay(3, p, 0.1) == policy.backoff(
        3, p.retry_base, p.retry_cap, 0.1, p.retry_jitter
    )


class Spy:
    """Records every call of ``policy.backoff`` (delegating to it); wakes waiters."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[float, float, float, float]] = []
        self.changed = asyncio.Event()
        real = policy.backoff

        def spy(attempt: int, base: float, cap: float, draw: float, jitter: float) -> float:
            self.calls.append((base, cap, draw, jitter))
            self.changed.set()
            return real(attempt, base, cap, draw, jitter) * 1e-4  # keep the test quick

        monkeypatch.setattr(policy, "backoff", spy)
        monkeypatch.setattr(coap, "backoff", spy)

    async def until(self, count: int) -> None:
        while len(self.calls) < count:
            self.changed.clear()
            await self.changed.wait()


def _draws_differ(calls: list[tuple[float, float, float, float]]) -> bool:
    draws = [draw for _, _, draw, _ in calls]
    return all(0 <= d < 1 for d in draws) and len(set(draws)) == len(draws)


async def test_report_retries_and_journal_pauses_draw_their_jitter(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    engine = make_engine(tmp_path, signing, FakeTransport(), Journal(tmp_path, signing.trust))
    engine.effects._report_backoff(1)
    engine.effects._report_backoff(7)
    engine.effects.journal_pause()  # the engine's pause before an event is offered again
    engine.effects.journal_pause()  # and an installer step's on a full disk: the same call
    cap = engine.config.report_retry_cap
    jitter = engine.config.retry_jitter
    assert [(b, c, j) for b, c, _, j in spy.calls] == [
        (effects_mod.REPORT_RETRY, cap, jitter),
        (effects_mod.REPORT_RETRY, cap, jitter),
        (engine.config.journal_retry, engine.config.journal_retry, jitter),
        (engine.config.journal_retry, engine.config.journal_retry, jitter),
    ]
    assert _draws_differ(spy.calls)


async def test_a_crashing_long_lived_task_restarts_after_the_backoff(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    engine = make_engine(tmp_path, signing, FakeTransport(), Journal(tmp_path, signing.trust))
    crashes = 0

    async def crashing() -> None:
        nonlocal crashes
        crashes += 1
        if crashes <= 3:
            raise ValueError("bug")

    await engine.tasks.restarting("test", crashing)
    assert crashes == 4
    bounds = (supervision.SUPERVISE_RETRY, supervision.SUPERVISE_RETRY_CAP)
    assert [(b, c) for b, c, _, _ in spy.calls] == [bounds] * 3
    assert _draws_differ(spy.calls)


async def test_a_failing_restart_command_is_run_again_after_the_backoff(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    cfg = dataclasses.replace(config(tmp_path, signing.trust), restart_command=["false"])
    net = FakeTransport()
    manifest = net.publish(signing, b"x" * 100, "1.0", 1)
    effects = effects_mod.Effects(
        cfg,
        transport=net,
        journal=Journal(tmp_path, signing.trust),
        installer=Any,  # type: ignore[arg-type]  # not used by the restart
        trust=Any,  # type: ignore[arg-type]
        rng=random.Random(),
        self_test=None,
        conditions={},
    )
    task = asyncio.create_task(effects.request_restart(manifest))
    try:
        await spy.until(3)
    finally:
        task.cancel()
    bounds = (effects_mod.RESTART_RETRY, effects_mod.RESTART_RETRY_CAP)
    assert [(b, c) for b, c, _, _ in spy.calls[:3]] == [bounds] * 3
    assert _draws_differ(spy.calls[:3])


def test_the_observe_backoff_and_the_poll_interval_are_the_same_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    real = policy.backoff

    def spy(*args: Any) -> float:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(coap, "backoff", spy)
    transport = CoapTransport("coap://127.0.0.1:1", "d", backoff_base=1.0, backoff_cap=8.0)
    transport._backoff(3)
    coap.poll_delay(60.0, 0.2, random.Random(1))
    assert [(a[0], a[1], a[2], a[4]) for a in calls] == [(3, 1.0, 8.0, 0.1), (1, 60.0, 60.0, 0.2)]
    # The poll interval is drawn as before (one uniform draw over interval * (1 +/- jitter)).
    drawn = 60.0 * random.Random(1).uniform(0.8, 1.2)
    assert coap.poll_delay(60.0, 0.2, random.Random(1)) == pytest.approx(drawn, rel=1e-12)
