"""Each fault of the test server's plan, and the client's correct reaction to it.

The faults are set through the pytest plugin's fixtures (``fota_faults`` is the running
server's plan), the way a device project's tests set them: duplicated and reordered responses
on the wire, truncated image and manifest blocks, a corrupted manifest, a cancel and a
superseding manifest announced part-way through a download, and a plan changed while the
download runs. Real client, real server, loopback UDP; waits are on reports and request hooks.

Where a test counts image requests it gives the client a 2 s ACK timeout: only a fault may
make the client ask for a block twice, not a slow CI machine.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fota import AutoAuthorize, Client, ResultCode, State
from fota.testing import FaultPlan, Published, RequestLog, UpdateServer
from fota.testing.pytest_plugin import Reports

KiB = 1024
pytestmark = pytest.mark.timeout(60)

Publish = Callable[..., Published]
StartClient = Callable[..., Awaitable[Client]]


def image_of(size: int, seed: int) -> bytes:
    """Reproducible image bytes."""
    return random.Random(seed).randbytes(size)


def installed(client: Client) -> bytes:
    """SHA-256 of what the client installed."""
    assert client.config.target is not None
    return hashlib.sha256(Path(client.config.target).read_bytes()).digest()


def offsets(server: UpdateServer, update: Published) -> list[int | None]:
    """Offsets of the update's image requests, in arrival order."""
    return [r.offset for r in server.image_requests(update.image_sha256)]


def blocks(size: int) -> list[int]:
    return list(range(0, size, KiB))


async def first_install(publish: Publish, start: StartClient, reports: Reports) -> Client:
    """An empty device installs 1.0 at once (nobody is asked), then waits for more."""
    v1 = publish("1.0", size=4 * KiB)
    client = await start(handler=AutoAuthorize())
    await reports.wait_for(v1, ResultCode.SUCCESS)
    return client


# -- responses duplicated and reordered on the wire ------------------------------------------


@pytest.mark.parametrize("fresh_mid", [False, True], ids=["same-message-id", "new-message-id"])
async def test_duplicated_responses_are_ignored(
    fresh_mid: bool,
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    fota_faults.duplicate(100, fresh_mid=fresh_mid)
    image = image_of(128 * KiB, 1)
    update = fota_publish("1.0", image)
    # No retransmission sooner than 2 s: CoCoA would bring the timeout down to the loopback's
    # round trip, and a loaded machine's pause would then ask for a block again (a timeout,
    # not the duplicated answers this is about).
    client = await fota_client(handler=AutoAuthorize(), ack_timeout=2.0, min_rto=2.0)
    await fota_reports.wait_for(update, ResultCode.SUCCESS)

    assert installed(client) == update.image_sha256
    # Every answer went out twice, and the copies made the client ask for nothing again.
    asked = offsets(fota_server, update)
    assert sorted(o for o in asked if o is not None) == blocks(len(image))
    assert fota_server.duplicated == len(asked)
    # Nor counted twice: progress never passed the image size.
    verified = [r[7] for r in fota_server.reports_for("dev1") if isinstance(r.get(7), int)]
    assert verified and max(verified) == len(image)
    fota_reports.assert_final(update, ResultCode.SUCCESS)
    fota_reports.assert_no_duplicates()


async def test_reordered_responses_are_reassembled(
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    fota_faults.reorder(50)
    image = image_of(256 * KiB, 2)
    update = fota_publish("1.0", image)
    client = await fota_client(handler=AutoAuthorize(), ack_timeout=2.0)
    await fota_reports.wait_for(update, ResultCode.SUCCESS)

    assert fota_server.reordered > 20, "answers left the server out of request order"
    assert installed(client) == update.image_sha256
    asked = offsets(fota_server, update)
    assert sorted(o for o in asked if o is not None) == blocks(len(image)), (
        "out-of-order answers are placed by their own offsets, nothing is asked twice"
    )
    fota_reports.assert_final(update, ResultCode.SUCCESS)


# -- truncated blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["middle", "last"])
async def test_truncated_image_block_is_asked_again(
    where: str,
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    image = image_of(96 * KiB + 500, 3)  # the last block has 500 bytes
    block = 70 if where == "middle" else len(image) // KiB
    fota_faults.truncate(block)
    update = fota_publish("1.0", image)
    client = await fota_client(handler=AutoAuthorize(), ack_timeout=1.0)
    await fota_reports.wait_for(update, ResultCode.SUCCESS)

    assert installed(client) == update.image_sha256
    requests = fota_server.image_requests(update.image_sha256)
    cut = [r for r in requests if "truncated" in r.faults]
    assert [r.offset for r in cut] == [block * KiB], "the plan cut exactly that block"
    # That block was asked again. Taken as it came, it would leave a hole (middle) or an
    # early end (last), and its whole 64 KiB fragment, or the image, would be fetched again:
    # 64 requests more at least. A loaded machine may also retransmit a few blocks whose
    # answers were late (the timer's repeats, not the plan's), so those are not counted.
    asked = [r.offset for r in requests if r.offset is not None]
    assert sorted(set(asked)) == blocks(len(image))
    assert asked.count(block * KiB) >= 2, "the cut block was asked again"
    assert len(asked) - len(set(asked)) < 64, "no fragment was fetched again"
    fota_reports.assert_final(update, ResultCode.SUCCESS)
    assert fota_faults.truncate_blocks == {block: 0}


@pytest.mark.parametrize("where", ["first", "last"])
async def test_truncated_manifest_block_is_fetched_again(
    where: str,
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    # 1 KiB fragments: 64 fragment digests make a manifest of three 1 KiB blocks.
    update = fota_publish("1.0", size=64 * KiB, fragment_size=KiB)
    size = (fota_server.root / "m" / update.digest.hex()).stat().st_size
    assert size > 2 * KiB
    fota_faults.truncate(0 if where == "first" else size // KiB, manifest=True)
    client = await fota_client(handler=AutoAuthorize())
    await fota_reports.wait_for(update, ResultCode.SUCCESS)

    assert installed(client) == update.image_sha256
    manifest = [r for r in fota_server.requests if r.path == f"/fota/m/{update.digest.hex()}"]
    cut = [r for r in manifest if "truncated" in r.faults]
    assert len(cut) == 1
    assert [r.offset for r in manifest].count(cut[0].offset) == 2, "fetched again once"
    fota_reports.assert_final(update, ResultCode.SUCCESS)


async def test_corrupted_manifest_is_fetched_again_not_refused(
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    # A flipped byte: the manifest's digest is not the announced one. The bytes are never
    # judged (no BAD_SIGNATURE report); they are fetched again.
    fota_faults.corrupt(0, manifest=True)
    update = fota_publish("1.0", size=8 * KiB)
    client = await fota_client(handler=AutoAuthorize())
    await fota_reports.wait_for(update, ResultCode.SUCCESS)

    assert installed(client) == update.image_sha256
    fetches = [r for r in fota_server.requests if r.path == f"/fota/m/{update.digest.hex()}"]
    assert [r.faults for r in fetches] == [("corrupt",), ()]
    fota_reports.assert_final(update, ResultCode.SUCCESS)
    assert fota_reports.results(update)[0] is ResultCode.INITIAL


# -- announcements part-way through a download -----------------------------------------------


async def test_cancel_during_download_stops_it_and_keeps_the_running_image(
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    client = await first_install(fota_publish, fota_client, fota_reports)
    before = installed(client)
    # Answers one at a time, 2 ms apart: 512 blocks take about a second, so the cancel lands
    # while most of the image is still to come.
    fota_faults.throttle(0.002).cancel_after(100)
    image = image_of(512 * KiB, 4)
    v2 = fota_publish("2.0", image)
    await fota_reports.wait_for(v2, ResultCode.CANCELLED)
    await client.wait_for(lambda s: s.state is State.IDLE and s.update_id is None, 30)

    asked = offsets(fota_server, v2)
    marked = [r for r in fota_server.image_requests(v2.image_sha256) if "cancelled" in r.faults]
    assert len(marked) == 1 and asked.index(marked[0].offset) == 100
    assert len(asked) < len(image) // KiB, "the client stopped asking"
    assert fota_server.announcements["*"] == {1: fota_server.announcements["*"][1], 4: v2.digest}
    status = client.status()
    assert status.installed_version == "1.0" and installed(client) == before
    states = [r.state for r in fota_reports.of(v2)]
    assert State.INSTALLING not in states, "no byte of a withdrawn update was installed"
    fota_reports.assert_final(v2, ResultCode.CANCELLED)
    fota_reports.assert_no_duplicates()


async def test_superseding_manifest_during_download_replaces_it(
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
    fota_device_class: str,
) -> None:
    client = await first_install(fota_publish, fota_client, fota_reports)
    fota_faults.throttle(0.002)
    image2 = image_of(512 * KiB, 5)
    v2 = fota_publish("2.0", image2)
    image3 = image_of(64 * KiB, 6)
    v3 = fota_server.make_manifest(image3, "3.0", device_class=fota_device_class)
    # No await since the publish: the client has not asked for a block yet.
    fota_faults.supersede_after(100, v3)
    await fota_reports.wait_for(v3, ResultCode.SUCCESS)

    assert installed(client) == v3.image_sha256 == hashlib.sha256(image3).digest()
    assert client.status().installed_version == "3.0"
    assert len(offsets(fota_server, v2)) < len(image2) // KiB, "2.0's download was dropped"
    fota_reports.assert_final(v2, ResultCode.SUPERSEDED)
    assert State.INSTALLING not in [r.state for r in fota_reports.of(v2)]
    fota_reports.assert_in_order(v3, ResultCode.INITIAL, ResultCode.SUCCESS)
    fota_reports.assert_final(v3, ResultCode.SUCCESS)
    fota_reports.assert_no_duplicates()


# -- a plan changed while the client runs ----------------------------------------------------


async def test_faults_set_at_run_time_apply_from_then_on(
    fota_server: UpdateServer,
    fota_faults: FaultPlan,
    fota_publish: Publish,
    fota_client: StartClient,
    fota_reports: Reports,
) -> None:
    # From the 50th image request on, every answer is sent twice and one block is cut short:
    # set from the server's request hook, while the download runs.
    def switch(request: RequestLog) -> None:
        if request.path.startswith("/fota/img/") and fota_faults.seen == 50:
            fota_faults.duplicate(100).truncate(90)

    fota_server.request_hook = switch
    image = image_of(128 * KiB, 7)
    update = fota_publish("1.0", image)
    client = await fota_client(handler=AutoAuthorize(), ack_timeout=2.0)
    await fota_reports.wait_for(update, ResultCode.SUCCESS)

    assert installed(client) == update.image_sha256
    requests = fota_server.image_requests(update.image_sha256)
    duplicated = ["duplicated" in r.faults for r in requests]
    assert not any(duplicated[:50]) and all(duplicated[51:])
    assert [r.offset for r in requests if "truncated" in r.faults] == [90 * KiB]
    fota_reports.assert_final(update, ResultCode.SUCCESS)


def test_fault_plan_refuses_out_of_range_settings() -> None:
    plan = FaultPlan()
    with pytest.raises(ValueError, match="duplicate percent 101"):
        plan.duplicate(101)
    with pytest.raises(ValueError, match="hold 0"):
        plan.reorder(10, hold=0)
    with pytest.raises(ValueError, match="truncate times 0"):
        plan.truncate(3, times=0)
    with pytest.raises(ValueError, match="cancel after -1 requests"):
        plan.cancel_after(-1)
