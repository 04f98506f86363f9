"""Issue 17 §3, unit tier: the one table of response codes, and the core's stalls and revivals.

The code table is checked against the docs and against every path that classifies a code (the
raw UDP window fetcher, the TCP fetcher through it, and ``CoapTransport`` for reports, over a
real aiocoap server on loopback). The machine is driven as the engine drives it (see
``tests/core/test_core_table.py``): a 4.04 on the image is waited out for ``not_found_budget``
without counting attempts, a full disk pauses, and a failed update announced again resumes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
from aiocoap.numbers.codes import Code

from fota.core import codes
from fota.core import commands as C
from fota.core import events as ev
from fota.core.codes import Verdict
from fota.core.machine import Machine
from fota.core.policy import Policy, stall_delay
from fota.core.record import Record
from fota.core.states import State
from fota.errors import (
    DiskFull,
    ImageChanged,
    NotEnoughSpace,
    PermanentServerError,
    ResourceMissing,
    ResultCode,
    TransportError,
)
from fota.testing.server import bound_port
from fota.transport import BLOCK_SIZES, raise_for, szx
from fota.transport.coap import CoapTransport
from tests.core.test_core_table import PENDING, build

pytestmark = pytest.mark.timeout(30)

DOCS = Path(__file__).resolve().parents[2] / "docs"
POLICY = Policy(device_class="test-gw", retry_base=1.0, retry_cap=8.0, retry_jitter=0.0)
URI = "coap://fota.example/fw/11.bin"
U = PENDING.update_id


# -- the table -----------------------------------------------------------------------------------


def test_the_table_is_the_one_in_protocol_md() -> None:
    assert codes.table_markdown() in (DOCS / "protocol.md").read_text()


@pytest.mark.parametrize(
    ("code", "get", "report"),
    [
        ("2.05", Verdict.DATA, Verdict.RETRY),
        ("2.04", Verdict.RETRY, Verdict.ACK),
        ("2.01", Verdict.RETRY, Verdict.ACK),
        ("2.31", Verdict.RETRY, Verdict.RETRY),  # a half-done block-wise POST is no ack
        ("2.03", Verdict.DATA, Verdict.RETRY),
        ("4.00", Verdict.PERMANENT, Verdict.PERMANENT),
        ("4.01", Verdict.PERMANENT, Verdict.PERMANENT),
        ("4.02", Verdict.PERMANENT, Verdict.PERMANENT),
        ("4.03", Verdict.PERMANENT, Verdict.PERMANENT),
        ("4.04", Verdict.MISSING, Verdict.RETRY),
        ("4.05", Verdict.PERMANENT, Verdict.PERMANENT),
        ("4.08", Verdict.CHANGED, Verdict.RETRY),
        ("4.12", Verdict.RETRY, Verdict.RETRY),  # unknown client errors are not trusted
        ("4.29", Verdict.RETRY, Verdict.RETRY),
        ("5.00", Verdict.RETRY, Verdict.RETRY),
        ("5.03", Verdict.RETRY, Verdict.RETRY),
    ],
)
def test_each_code_means_one_thing(code: str, get: Verdict, report: Verdict) -> None:
    klass, detail = code.split(".")
    value = codes.code(int(klass), int(detail))
    assert codes.text(value) == code
    assert codes.for_get(value) is get
    assert codes.for_report(value) is report


def test_every_transport_raises_what_the_table_says() -> None:
    """One mapping from verdict to error for UDP (aiocoap, the window fetcher) and TCP."""

    def get(klass: int, detail: int) -> None:
        raise_for(URI, codes.code(klass, detail), codes.for_get(codes.code(klass, detail)))

    with pytest.raises(ResourceMissing, match=r"4\.04"):
        get(4, 4)
    for permanent in ((4, 1), (4, 2), (4, 5)):
        with pytest.raises(PermanentServerError) as info:
            get(*permanent)
        assert not isinstance(info.value, ResourceMissing)
    with pytest.raises(ImageChanged):
        get(4, 8)
    for transient in ((4, 29), (5, 0), (5, 3)):
        with pytest.raises(TransportError) as retry:
            get(*transient)  # retryable: the window fetcher leaves the block in flight
        assert type(retry.value) is TransportError, retry.value
    get(2, 5)  # data: returns
    raise_for(URI, codes.code(2, 4), codes.for_report(codes.code(2, 4)))  # an acknowledgement


def test_one_szx_for_every_transport() -> None:
    assert [szx(size) for size in BLOCK_SIZES] == list(range(7))
    for bad in (0, 8, 48, 2048, -16):
        with pytest.raises(ValueError, match=f"block_size {bad} must be a power of two"):
            szx(bad)


class _Answer(aiocoap.resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    def __init__(self) -> None:
        super().__init__()
        self.code: Any = Code.CHANGED

    async def render_post(self, request: Any) -> Any:
        return aiocoap.Message(code=self.code)


@pytest.fixture
async def report_server() -> AsyncIterator[tuple[str, _Answer]]:
    answer = _Answer()
    site = aiocoap.resource.Site()
    site.add_resource(["fota", "report", "dev1"], answer)
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        yield f"coap://127.0.0.1:{bound_port(ctx)}", answer
    finally:
        await ctx.shutdown()


async def test_a_report_is_acknowledged_only_by_2_01_and_2_04(
    report_server: tuple[str, _Answer],
) -> None:
    uri, answer = report_server
    transport = CoapTransport(uri, "dev1", ack_timeout=0.2, max_retransmit=1)
    try:
        for ack in (Code.CHANGED, Code.CREATED):
            answer.code = ack
            await transport.post_report(b"\xa0")
        # Not acknowledgements: sent again later (old code took any 2.xx, and dropped a
        # report the server answered 4.04 while it restarted).
        for again in (Code.CONTINUE, Code.CONTENT, Code.NOT_FOUND, Code.SERVICE_UNAVAILABLE):
            answer.code = again
            with pytest.raises(TransportError) as info:
                await transport.post_report(b"\xa0")
            assert not isinstance(info.value, PermanentServerError)
        answer.code = Code.BAD_REQUEST  # the server can never take it: dropped
        with pytest.raises(PermanentServerError):
            await transport.post_report(b"\xa0")
    finally:
        await transport.aclose()


# -- the core: stalls --------------------------------------------------------------------------


def test_stall_waits_double_from_base_to_cap() -> None:
    assert stall_delay(0.0, POLICY) == 1.0
    assert stall_delay(1.0, POLICY) == 1.0
    assert stall_delay(3.0, POLICY) == 3.0
    assert stall_delay(100.0, POLICY) == 8.0
    spread = replace(POLICY, retry_jitter=0.25)
    assert stall_delay(4.0, spread, 0.0) == 3.0 and stall_delay(4.0, spread, 1.0) == 5.0


def _downloading(policy: Policy, **fields: Any) -> Machine:
    record = Record(state=State.DOWNLOADING, pending=PENDING.digest, verified=b"\x00", **fields)
    return build(record, "polite", policy).machine


def _state(model: Any) -> State:
    """The model's state, read afresh (an assert on it does not narrow the next read)."""
    return State(model.state)


async def test_a_404_is_waited_out_for_the_budget_without_counting_attempts() -> None:
    policy = replace(POLICY, not_found_budget=20.0, max_attempts=2)
    machine = _downloading(policy)
    model = machine.model
    missing = ev.DownloadFailed(U, ResourceMissing(URI, "4.04"))
    now, timers, paused = 1000.0, [], set()
    while model.state is State.DOWNLOADING and now < 1100:
        handled = await machine.handle(missing, now)
        assert handled.accepted
        paused |= {r.sequence for r in model.record.outbox if "download paused" in r.detail}
        commands = handled.commands
        timers += [c.at - now for c in commands if isinstance(c, C.StartTimer)]
        if model.state is State.DOWNLOADING:
            retry = commands[-1]
            assert isinstance(retry, C.StartTimer)
            now = retry.at  # the retry timer fires; the image is still missing
    # Waits of 1, 1, 2, 4, 8 (capped), then the last try when the budget ends (20 s).
    assert timers == [1.0, 1.0, 2.0, 4.0, 8.0, 4.0]
    assert model.state is State.FAILED and now == 1020.0
    assert model.record.attempts == 0, "a stall is not a failed attempt"
    final = model.record.outbox[-1]
    assert final.result is ResultCode.INVALID_URI and "4.04" in final.detail
    assert len(paused) == 1, "the pause is reported once"


async def test_a_verified_fragment_starts_a_new_budget() -> None:
    policy = replace(POLICY, not_found_budget=5.0)
    machine = _downloading(policy)
    model = machine.model
    missing = ev.DownloadFailed(U, ResourceMissing(URI, "4.04"))
    assert (await machine.handle(missing, 0.0)).accepted
    assert (await machine.handle(ev.FragmentVerified(U, 0, 1024), 4.0)).accepted
    # 6 s after the first 4.04, 2 s after progress
    assert (await machine.handle(missing, 6.0)).accepted
    assert model.state is State.DOWNLOADING


async def test_a_full_disk_pauses_without_a_budget() -> None:
    machine = _downloading(replace(POLICY, not_found_budget=0.0))
    model = machine.model
    assert (await machine.handle(ev.DownloadFailed(U, DiskFull("candidate: ENOSPC")), 0.0)).accepted
    # Still no room when the retry checks the free space: still paused, however long.
    no_room = ev.DownloadFailed(U, NotEnoughSpace("needs 9 more"))
    for now in (1.0, 10_000.0, 1e6):
        assert (await machine.handle(no_room, now)).accepted
        assert model.state is State.DOWNLOADING
    assert model.record.attempts == 0


async def test_no_space_before_the_first_fragment_still_fails() -> None:
    machine = _downloading(POLICY)
    model = machine.model
    no_room = ev.DownloadFailed(U, NotEnoughSpace("needs 9 more"))
    assert (await machine.handle(no_room, 0.0)).accepted
    assert model.state is State.FAILED
    assert model.record.outbox[-1].result is ResultCode.NOT_ENOUGH_SPACE


# -- the core: a failed update announced again -------------------------------------------------


async def test_a_failed_update_announced_again_resumes_with_back_off() -> None:
    policy = replace(POLICY, not_found_budget=0.0)
    machine = _downloading(policy, attempts=0)
    model = machine.model
    model.record = model.record.evolve(verified=b"\x01")
    announce = ev.AnnouncementReceived(11, PENDING.digest, "coap://fota.example/m/11")
    missing = ev.DownloadFailed(U, ResourceMissing(URI, "4.04"))
    assert (await machine.handle(missing, 0.0)).accepted
    assert model.state is State.FAILED
    # The first announcement after the failure retries at once, from the verified fragment.
    assert (await machine.handle(announce, 0.0)).accepted
    assert _state(model) is State.DOWNLOADING and model.record.verified == b"\x01"
    assert "retrying from 1 verified" in model.record.outbox[-1].detail
    # It fails again: the next announcement retries only after retry_base (1 s), then 2 s.
    assert (await machine.handle(missing, 10.0)).accepted
    assert not (await machine.handle(announce, 10.5)).accepted
    assert (await machine.handle(announce, 11.0)).accepted
    assert (await machine.handle(missing, 20.0)).accepted
    assert not (await machine.handle(announce, 21.5)).accepted
    assert (await machine.handle(announce, 22.0)).accepted


async def test_an_update_that_failed_from_its_install_on_is_not_retried() -> None:
    record = Record(
        state=State.FAILED, pending=PENDING.digest, verified=b"\x07", failure="self-test failed"
    )
    machine = build(record, "polite", POLICY).machine
    model = machine.model
    announce = ev.AnnouncementReceived(11, PENDING.digest, "coap://fota.example/m/11")
    assert not (await machine.handle(announce, 0.0)).accepted
    assert model.state is State.FAILED


def test_one_image_path_for_the_client_and_fota_fetch() -> None:
    """`CoapTransport.block_fetcher` and `fota fetch` pick the fetcher in one place, and a
    setting means the same on both: the window fetcher gets ACK_TIMEOUT and MAX_RETRANSMIT."""
    from fota.transport.image import ImageSettings, image_fetcher
    from fota.transport.tcp import TcpFetcher
    from fota.transport.window import WindowFetcher

    settings = ImageSettings(ack_timeout=0.5, max_retransmit=2, min_rto=0.1)
    # Only parsed, never bound or sent to.
    udp = image_fetcher("coap://127.0.0.1:61617/a/b", window=4, block_size=256, settings=settings)
    assert isinstance(udp, WindowFetcher)
    assert (udp.host, udp.port, udp.path) == ("127.0.0.1", 61617, ("a", "b"))
    assert (udp.block_size, udp.max_tries) == (256, 3)
    tcp = image_fetcher("coap+tcp://[::1]:61616/i", window=4, block_size=256, settings=settings)
    assert isinstance(tcp, TcpFetcher)
    for bad, why in (
        ("http://h/x", "coap:// only"),
        ("coap://h:99999/x", "malformed port"),
        ("coap://h/a/../x", "not requested"),
        ("coap+tcp:///x", "not a coap\\+tcp:// URI"),
    ):
        with pytest.raises(PermanentServerError, match=why):
            image_fetcher(bad, window=4, block_size=256, settings=settings)
