"""End to end in one process: the real Client against the real UpdateServer over loopback CoAP."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import (
    Client,
    Decision,
    InvalidTransition,
    Manifest,
    ManifestError,
    ResultCode,
    State,
    Status,
)
from fota.core import manifest as mf
from fota.core.manifest import ManifestBody, kid_for
from fota.install import FileInstaller
from fota.install.base import Outcome, Progress
from fota.testing import ManualClock, Published, UpdateServer
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config

MiB = 1024 * 1024
pytestmark = pytest.mark.timeout(120)


def sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def installed(version: str) -> object:
    return lambda s: s.installed_version == version and s.reports_pending == 0


def reports_for(server: UpdateServer, update_id: str) -> list[tuple[State, ResultCode]]:
    return [(State(r[3]), ResultCode(r[4])) for r in server.reports if r.get(5) == update_id]


async def provision_v1(
    client: Client, server: UpdateServer, *, sequence: int = 1, polite: bool = True
) -> Published:
    v1 = server.publish(
        os.urandom(70_000), "1.0", device_class=DEVICE_CLASS, sequence=sequence, polite=polite
    )
    await client.wait_for(lambda s: s.installed_version == "1.0" and s.reports_pending == 0, 30)
    return v1


def idle_with(version: str):  # type: ignore[no-untyped-def]
    def check(s: Status) -> bool:
        return s.installed_version == version and s.state is State.IDLE and s.reports_pending == 0

    return check


async def test_polite_update_of_10_mib_end_to_end(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    handler = RecordingHandler()
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=handler) as client:
        v1 = await provision_v1(client, server)
        # The first install on an empty device is immediate: nobody was asked.
        assert handler.calls == [("complete", "SUCCESS")]
        assert sha(config.target) == v1.image_sha256  # type: ignore[arg-type]

        image = os.urandom(10 * MiB)
        v2 = server.publish(image, "2.0", device_class=DEVICE_CLASS)
        status = await client.wait_for(idle_with("2.0"), timeout=100)

    assert status.installed_sequence == v2.sequence
    assert sha(config.target) == hashlib.sha256(image).digest()  # type: ignore[arg-type]
    assert handler.calls[1:] == [
        ("download", v2.update_id),
        ("install", v2.update_id),
        ("complete", "SUCCESS"),
    ]
    # Progress about every 5 %, increasing, ending at the full size.
    done = [d for d, _ in handler.progress if _ == len(image)]
    assert done == sorted(done) and done[-1] == len(image) and len(done) >= 15
    assert reports_for(server, v2.update_id) == [
        (State.AWAIT_DOWNLOAD_AUTH, ResultCode.INITIAL),
        (State.DOWNLOADING, ResultCode.AUTHORIZED),
        (State.VERIFYING, ResultCode.INITIAL),
        (State.AWAIT_INSTALL_AUTH, ResultCode.INITIAL),
        (State.INSTALLING, ResultCode.AUTHORIZED),
        (State.AWAIT_COMMIT, ResultCode.INITIAL),
        (State.IDLE, ResultCode.SUCCESS),
    ]
    # Every block was fetched with explicit Block2 requests; a request the busy in-process
    # server answers after the (short, test) timeout is sent again, which is rare.
    offsets = [r.offset or 0 for r in server.image_requests(v2.image_sha256)]
    assert set(offsets) == set(range(0, len(image), 1024))
    assert len(offsets) - len(set(offsets)) <= len(image) // 1024 // 100
    # Report sequence numbers are unique and increasing.
    seqs = [r[2] for r in server.reports]
    assert seqs == sorted(set(seqs))


async def test_defer_then_resume_asks_again(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    handler = RecordingHandler(download=[Decision.defer(later, "busy until the shift ends")])
    async with Client(make_config(tmp_path, server, signing), handler=handler) as client:
        await provision_v1(client, server)
        v2 = server.publish(os.urandom(100_000), "2.0", device_class=DEVICE_CLASS)
        status = await client.wait_for(lambda s: s.state is State.DOWNLOAD_DEFERRED, 30)
        assert status.defer_until == pytest.approx(later.timestamp())
        report = await server.wait_for_report(lambda r: r[4] == ResultCode.DEFERRED)
        assert report[8] == "busy until the shift ends" and report[9] == int(later.timestamp())
        assert not server.image_requests(v2.image_sha256)

        await client.resume()
        step, info = await asyncio.wait_for(handler.asks.get(), 10)  # v2 first ask
        step, info = await asyncio.wait_for(handler.asks.get(), 10)  # asked again after resume
        assert (step, info.update_id) == ("download", v2.update_id)
        await client.wait_for(idle_with("2.0"), 30)
    assert [c for c in handler.calls if c[0] == "download"] == [("download", v2.update_id)] * 2


async def test_pending_answers_come_through_the_client_api(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    handler = RecordingHandler(download=[Decision.pending()], install=[Decision.pending()])
    async with Client(make_config(tmp_path, server, signing), handler=handler) as client:
        with pytest.raises(InvalidTransition):
            await client.authorize("0123456789abcdef")  # nothing waits in IDLE
        await provision_v1(client, server)
        v2 = server.publish(os.urandom(200_000), "2.0", device_class=DEVICE_CLASS)
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, 30)
        with pytest.raises(InvalidTransition, match="not valid"):
            await client.authorize("ffffffffffffffff")  # a stale or unknown update id
        with pytest.raises(InvalidTransition):
            await client.resume()  # nothing is deferred
        await client.authorize(v2.update_id)
        await client.wait_for(lambda s: s.state is State.AWAIT_INSTALL_AUTH, 30)
        assert client.status().verified_bytes == 200_000
        await client.authorize(v2.update_id)
        await client.wait_for(idle_with("2.0"), 30)


async def test_reject_is_reported_and_nothing_installed(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    handler = RecordingHandler(download=[Decision.reject("not on this site")])
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=handler) as client:
        v1 = await provision_v1(client, server)
        v2 = server.publish(os.urandom(100_000), "2.0", device_class=DEVICE_CLASS)
        report = await server.wait_for_report(lambda r: r[4] == ResultCode.REJECTED)
        assert report[5] == v2.update_id and report[8] == "not on this site"
        _, result, _ = await asyncio.wait_for(handler.completions.get(), 10)  # v1
        _, result, _ = await asyncio.wait_for(handler.completions.get(), 10)
        assert result is ResultCode.REJECTED
        status = await client.wait_for(idle_with("1.0"), 10)
        assert status.update_id is None
        # The same announcement again is not fetched again.
        manifest_fetches = sum(1 for r in server.requests if r.path.startswith("/fota/m/"))
        server.announce_raw(v2.raw, v2.sequence)
        server.publish(os.urandom(1000), "3.0", device_class=DEVICE_CLASS)  # proves we listen
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, 30)
    assert not server.image_requests(v2.image_sha256)
    assert sum(1 for r in server.requests if r.path.startswith("/fota/m/")) == manifest_fetches + 1
    assert sha(config.target) == v1.image_sha256  # type: ignore[arg-type]


async def test_defer_then_restart_asks_again(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    config = make_config(tmp_path, server, signing)
    soon = datetime.now(UTC) + timedelta(seconds=0.5)
    first = RecordingHandler(download=[Decision.defer(soon, "reboot pending")])
    async with Client(config, handler=first) as client:
        await provision_v1(client, server)
        v2 = server.publish(os.urandom(50_000), "2.0", device_class=DEVICE_CLASS)
        await client.wait_for(lambda s: s.state is State.DOWNLOAD_DEFERRED, 30)
    # A new process: the deferral is in the journal; when it is due the handler is asked again.
    second = RecordingHandler()
    async with Client(config, handler=second) as client:
        assert client.state is State.DOWNLOAD_DEFERRED
        step, info = await asyncio.wait_for(second.asks.get(), 10)
        assert (step, info.update_id) == ("download", v2.update_id)
        await client.wait_for(idle_with("2.0"), 30)


class CountingInstaller(FileInstaller):
    def __init__(self, target: Path) -> None:
        super().__init__(target)
        self.installs: list[str] = []

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        self.installs.append(manifest.body.version)
        return await super().install(candidate, manifest, progress)


async def test_corrupted_block_is_refetched_and_installed_once(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    # RFC 7252's fixed timing: the counts below are the fault's, not a busy machine's.
    config = dataclasses.replace(make_config(tmp_path, server, signing), retransmission="rfc7252")
    installer = CountingInstaller(config.target)  # type: ignore[arg-type]
    image = os.urandom(512 * 1024)
    server.faults.corrupt(100)  # block 100 lies in fragment 1 (64 KiB fragments of 1 KiB blocks)
    async with Client(config, installer=installer) as client:
        published = server.publish(image, "1.0", device_class=DEVICE_CLASS)
        await client.wait_for(idle_with("1.0"), 30)
    assert installer.installs == ["1.0"]
    assert sha(config.target) == hashlib.sha256(image).digest()  # type: ignore[arg-type]
    offsets = [r.offset for r in server.image_requests(published.image_sha256)]
    fragment_1 = list(range(64 * 1024, 128 * 1024, 1024))
    assert sorted(o for o in offsets if o is not None and 64 * 1024 <= o < 128 * 1024) == sorted(
        fragment_1 * 2
    ), "exactly the corrupted fragment is fetched twice"
    assert len(offsets) == len(image) // 1024 + len(fragment_1)
    assert server.faults.corrupt_blocks == {100: 0}


class FullDiskOnce(FileInstaller):
    """Its first commit meets a full disk, as a command installer writing its manifest did."""

    def __init__(self, target: Path) -> None:
        super().__init__(target)
        self.commits = 0

    async def commit(self, manifest: Manifest) -> None:
        self.commits += 1
        if self.commits == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().commit(manifest)


async def test_a_full_disk_when_the_commit_starts_is_waited_out(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """Found by chaos (issue 17): the disk full for a second as the commit started made the
    update fail, and the rollback that followed too: ROLLBACK_FAILED, for a transient fault."""
    config = make_config(tmp_path, server, signing, journal_retry=0.05)
    installer = FullDiskOnce(config.target)  # type: ignore[arg-type]
    async with Client(config, installer=installer) as client:
        published = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        await client.wait_for(idle_with("1.0"), 30)
    assert installer.commits == 2
    finals = [r[4] for r in server.reports if r.get(5) == published.update_id]
    assert finals[-1] == ResultCode.SUCCESS and ResultCode.ROLLBACK_FAILED not in finals


# -- refused manifests ----------------------------------------------------------------------


def body_for(published: Published, signing: Signing, **changes: object) -> ManifestBody:
    return dataclasses.replace(mf.verify(published.raw, signing.trust).body, **changes)  # type: ignore[arg-type]


def _bad_manifest(case: str, server: UpdateServer, signing: Signing) -> tuple[bytes, int]:
    """Return (raw manifest bytes, announced sequence) for a refusal case."""
    good = server.make_manifest(os.urandom(5000), "9.9", device_class=DEVICE_CLASS, sequence=50)
    other = ed25519.Ed25519PrivateKey.generate()
    if case == "bad_signature":  # right kid, wrong key
        return mf.sign(body_for(good, signing), other, signing.kid), 50
    if case == "unknown_key":
        return mf.sign(body_for(good, signing), other, kid_for(other.public_key())), 50
    if case == "rollback_lower":
        return mf.sign(body_for(good, signing, sequence=5), signing.key, signing.kid), 5
    if case == "rollback_replay":  # the installed sequence again, other content
        return mf.sign(body_for(good, signing, sequence=10), signing.key, signing.kid), 10
    if case == "wrong_device_class":
        return mf.sign(
            body_for(good, signing, device_class="other-gw"), signing.key, signing.kid
        ), 50
    if case == "malformed_truncated":
        return good.raw[: len(good.raw) // 2], 50
    if case == "malformed_not_cbor":
        return b"\xff\x00 not a manifest", 50
    if case == "oversize":
        return cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"\x00" * 400_000, b""])), 50
    raise AssertionError(case)


REFUSALS = {
    "bad_signature": (ResultCode.BAD_SIGNATURE, "signature"),
    "unknown_key": (ResultCode.UNKNOWN_KEY, "kid"),
    "rollback_lower": (ResultCode.ROLLBACK, "sequence"),
    "rollback_replay": (ResultCode.ROLLBACK, "sequence"),
    "wrong_device_class": (ResultCode.WRONG_DEVICE_CLASS, "device_class"),
    "malformed_truncated": (ResultCode.MALFORMED, "cose_sign1"),
    "malformed_not_cbor": (ResultCode.MALFORMED, "cose_sign1"),
    "oversize": (ResultCode.OVERSIZE, "bytes"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_refused_manifest_is_reported_and_no_image_byte_requested(
    case: str, tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    result, field_name = REFUSALS[case]
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=RecordingHandler()) as client:
        v1 = await provision_v1(client, server, sequence=10)
        raw, sequence = _bad_manifest(case, server, signing)
        image_requests_before = len([r for r in server.requests if r.path.startswith("/fota/img/")])
        digest = server.announce_raw(raw, sequence)
        report = await server.wait_for_report(lambda r: r[4] == result, timeout=30)
        assert report[5] == mf.update_id_of(digest)
        assert f"manifest {field_name}:" in report[8]
        status = client.status()
        assert status.state is State.IDLE and status.installed_version == "1.0"
    image_requests = [r for r in server.requests if r.path.startswith("/fota/img/")]
    assert len(image_requests) == image_requests_before, "no image byte requested"
    assert sha(config.target) == v1.image_sha256  # type: ignore[arg-type]
    # The typed error the client reported is the one the verifier raises.
    with pytest.raises(ManifestError) as info:
        mf.accept(
            raw,
            signing.trust,
            device_class=DEVICE_CLASS,
            installed=mf.verify(v1.raw, signing.trust),
        )
    assert info.value.result is result and info.value.field == field_name


async def test_download_resumes_across_a_server_restart(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """Block2 is served statelessly from disk: a new server process on the same files and port
    answers the client's next requests, and the ETag (from the image digest) is unchanged."""
    config = make_config(tmp_path, server, signing, observe_refresh=2.0)
    image = os.urandom(2 * MiB)
    published = server.make_manifest(image, "1.0", device_class=DEVICE_CLASS)
    path = f"/fota/img/{published.image_sha256.hex()}"
    halfway = asyncio.Event()
    server.request_hook = lambda r: halfway.set() if r.path == path and r.offset == MiB else None
    async with Client(config) as client:
        server.announce_raw(published.raw, published.sequence)
        await asyncio.wait_for(halfway.wait(), 60)
        await server.stop()
        served_before = len(server.image_requests(published.image_sha256))
        async with UpdateServer(server.root, signing.key, signing.kid, port=server.port) as again:
            again.announce_raw(published.raw, published.sequence)
            await client.wait_for(idle_with("1.0"), 90)
            resumed = again.image_requests(published.image_sha256)
            # The old observation died with the old server; the silent one is re-registered
            # (observe_refresh), so a new announcement still arrives.
            again.publish(os.urandom(1000), "2.0", device_class=DEVICE_CLASS, sequence=2)
            await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, 30)
    assert sha(config.target) == published.image_sha256  # type: ignore[arg-type]
    assert resumed and min(r.offset or 0 for r in resumed) >= MiB - 64 * 1024
    assert served_before + len(resumed) < 2 * len(image) // 1024


async def test_data_budget_exceeded_fails_the_update_with_its_own_code(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    config = make_config(tmp_path, server, signing, max_download_bytes=300_000)
    handler = RecordingHandler()
    async with Client(config, handler=handler) as client:
        published = server.publish(os.urandom(1 * MiB), "1.0", device_class=DEVICE_CLASS)
        report = await server.wait_for_report(
            lambda r: r[4] == ResultCode.DATA_BUDGET_EXCEEDED, timeout=30
        )
        status = await client.wait_for(lambda s: s.state is State.FAILED, 10)
        _, result, detail = await asyncio.wait_for(handler.completions.get(), 10)
    assert report[5] == published.update_id and "over the budget of 300000" in report[8]
    assert result is ResultCode.DATA_BUDGET_EXCEEDED and "300000" in detail
    assert status.installed_version is None and not config.target.exists()  # type: ignore[union-attr]
    # The download stops itself at the first block over the budget: beyond it, at most the
    # window's requests already sent (not a fragment's worth: the core hears of bytes only per
    # verified fragment, so waiting for it let a busy machine fetch far past the budget).
    fetched = 1024 * len(server.image_requests(published.image_sha256))
    assert fetched <= 300_000 + 1024 + config.window * 1024


async def test_a_retry_is_not_stretched_by_a_wall_clock_stepped_back(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """Found by chaos (issue 17): the wall clock stepped back an hour (an RTC corrected)
    while a download waited to retry a 4.04: its retry, a wall-clock instant, was an hour
    away, and the update sat in DOWNLOADING. A back-off also runs on the monotonic clock."""
    clock = ManualClock()  # stands still unless told: only the monotonic clock moves
    config = make_config(tmp_path, server, signing)
    image = os.urandom(4096)
    server.faults.missing(hashlib.sha256(image).digest())
    async with Client(config, clock=clock) as client:
        published = server.publish(image, "1.0", device_class=DEVICE_CLASS)
        await server.wait_for_report(
            lambda r: r.get(5) == published.update_id and "paused" in r.get(8, "")
        )
        clock.advance(-3600)
        server.faults.missing_images.clear()
        await client.wait_for(idle_with("1.0"), 30)
    finals = [r[4] for r in server.reports if r.get(5) == published.update_id]
    assert finals[-1] == ResultCode.SUCCESS
