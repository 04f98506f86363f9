"""The test server's record of the devices it has seen (what ``fota server`` shows live)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fota import AutoAuthorize, Client, ResultCode, State
from fota.testing import DeviceSeen, Published, UpdateServer
from fota.testing.pytest_plugin import Reports


async def test_server_records_each_device_it_has_seen(
    fota_server: UpdateServer,
    fota_publish: Callable[..., Published],
    fota_client: Callable[..., Awaitable[Client]],
    fota_reports: Reports,
) -> None:
    changes: list[DeviceSeen] = []
    fota_server.device_hook = lambda seen: changes.append(
        DeviceSeen(**{f: getattr(seen, f) for f in seen.__dataclass_fields__})
    )
    v1 = fota_publish("1.0", size=8 * 1024)
    await fota_client(handler=AutoAuthorize())
    await fota_client("dev2", handler=AutoAuthorize())
    await fota_reports.wait_for(v1, ResultCode.SUCCESS)
    await Reports(fota_server, "dev2").wait_for(v1, ResultCode.SUCCESS)

    assert set(fota_server.devices) == {"dev1", "dev2"}
    one = fota_server.devices["dev1"]
    assert one.observing == 1  # its announcement observation is registered
    assert one.address.startswith("127.0.0.1:")
    assert one.reports == len(fota_reports.of())
    assert one.state is not None and one.result is not None
    assert (State(one.state), ResultCode(one.result)) == (State.IDLE, ResultCode.SUCCESS)
    assert one.update_id == v1.update_id and one.verified == 8 * 1024
    assert one.first_seen <= one.last_seen
    # The hook saw the observation first, then every report's state, in order.
    mine = [c for c in changes if c.device == "dev1"]
    assert mine[0].observing == 1 and mine[0].state is None
    assert [c.reports for c in mine if c.reports] == list(range(1, one.reports + 1))


async def test_a_polling_device_is_told_at_its_first_request(
    fota_server: UpdateServer, fota_client: Callable[..., Awaitable[Client]]
) -> None:
    first = asyncio.get_running_loop().create_future()

    def hook(seen: DeviceSeen) -> None:
        if not first.done():
            first.set_result((seen.device, seen.observing, seen.reports))

    fota_server.device_hook = hook
    await fota_client("sleepy", poll_interval=3600.0)  # nothing announced: it never reports
    assert await asyncio.wait_for(first, 10) == ("sleepy", 0, 0)
    assert fota_server.devices["sleepy"].observing == 0


async def test_the_server_checks_each_report_against_the_report_rule(
    fota_server: UpdateServer,
) -> None:
    import aiocoap
    import cbor2
    from aiocoap.numbers.codes import Code

    good = {1: "dev1", 2: 0, 3: 0, 4: 0}
    cases = [
        (good, Code.CHANGED, None),
        ({**good, 1: "dev2", 2: 1}, Code.BAD_REQUEST, "posted to 'dev1'"),
        ({1: "dev1", 2: "zero", 3: 0, 4: 0}, Code.BAD_REQUEST, "report"),
        ({**good, 2: 2, 99: 1}, Code.BAD_REQUEST, "report"),
    ]
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for body, code, why in cases:
            msg = aiocoap.Message(
                code=Code.POST, uri=f"{fota_server.uri}/fota/report/dev1", payload=cbor2.dumps(body)
            )
            response = await ctx.request(msg).response
            assert response.code == code, (body, response.code, response.payload)
            if why is not None:
                assert why in response.payload.decode()
    finally:
        await ctx.shutdown()
    assert [r[2] for r in fota_server.reports] == [0], "only the good one was recorded"
    assert len(fota_server.bad_reports) == 3
