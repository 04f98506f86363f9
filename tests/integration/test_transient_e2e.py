"""Issue 17 §3, end to end: transient faults are transient.

A real :class:`~fota.Client` against the real test server on loopback: a 4.04 window on the
image mid-download is waited out and the download resumes; a failed update announced again
resumes from its verified fragments (the image bytes the server sends after the failure are
only the unverified ones); a manifest refused for a local setting (``allowed_origins``) is
fetched again once the setting is fixed; a full disk (a real tmpfs) pauses the download until
space returns. Nothing sleeps: the tests wait on client states, server reports, request hooks
and the client's own log events; timings are shortened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import subprocess
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from fota import AutoAuthorize, Client, Config, ResultCode, State, Status
from fota.testing import RequestLog, UpdateServer
from fota.testing.pytest_plugin import Reports
from tests.conftest import DEVICE_CLASS, Signing, make_config
from tests.integration.test_limits import SIGNING, _with_image_uri

KiB = 1024
FRAGMENT = 16 * KiB
pytestmark = pytest.mark.timeout(60)


def image_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def served(requests: list[RequestLog]) -> int:
    """Image bytes the server sent (answers that carried data; 4.04s carry none)."""
    return sum(
        r.block_size or 0 for r in requests if "missing" not in r.faults and "lost" not in r.faults
    )


def fast(config: Config, **kw: Any) -> Config:
    """Shortened timings: retries within tens of milliseconds, capped low."""
    return dataclasses.replace(config, retry_base=0.02, retry_cap=0.2, retry_jitter=0.1, **kw)


def done(status: Status) -> bool:
    return status.state is State.IDLE and status.installed_version == "1.0"


def after_requests(count: int, act: Callable[[], object]) -> Callable[[RequestLog], None]:
    """A request hook that runs ``act`` once, when the ``count``-th image request arrives."""
    seen = 0

    def hook(entry: RequestLog) -> None:
        nonlocal seen
        if entry.path.startswith("/fota/img/"):
            seen += 1
            if seen == count:
                act()

    return hook


@contextlib.contextmanager
def log_event(name: str) -> Iterator[asyncio.Event]:
    """An event set when fota logs ``name`` (structlog's processors, put back after)."""
    seen = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hook(logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        if os.environ.get("DEBUG_LOGS"):
            print("LOG", event)
        if event.get("event") == name:
            loop.call_soon_threadsafe(seen.set)
        raise structlog.DropEvent

    before = structlog.get_config()["processors"]
    structlog.configure(processors=[hook])
    try:
        yield seen
    finally:
        structlog.configure(processors=before)


# -- a 4.04 window on the image ----------------------------------------------------------------


async def test_a_404_window_mid_download_is_waited_out_and_resumes(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    image = image_of(256 * KiB, 1)
    published = server.make_manifest(
        image, "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    # A server restarted and refilling its files: the image answers 4.04 for a while, from
    # the 100th block on.
    server.request_hook = after_requests(100, lambda: server.faults.missing(published.image_sha256))
    config = fast(make_config(tmp_path, server, signing), not_found_budget=30.0)
    reports = Reports(server, "dev1")
    async with Client(config) as client:
        server.announce_raw(published.raw, published.sequence)
        status = await client.wait_for(lambda s: bool(s.paused), 20)
        assert "4.04" in status.paused and status.state is State.DOWNLOADING
        assert status.verified_bytes > 0
        before = len(server.image_requests(published.image_sha256))
        server.faults.missing_images.discard(published.image_sha256.hex())  # refilled
        await client.wait_for(done, 30)
        assert client.status().paused == ""
    requests = server.image_requests(published.image_sha256)
    assert sum("missing" in r.faults for r in requests[before:]) <= 8, "no retry storm"
    reports.assert_final(published, ResultCode.SUCCESS)
    assert config.target is not None
    assert hashlib.sha256(config.target.read_bytes()).digest() == published.image_sha256
    # Resumed, not restarted: at most the fragments in memory when the 4.04s began (the
    # window spans two) and the window's blocks in flight were fetched twice.
    assert served(requests) <= len(image) + 2 * FRAGMENT + 8 * KiB


# -- a failed update announced again --------------------------------------------------------------


async def test_a_failed_update_announced_again_resumes_from_its_verified_fragments(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    image = image_of(256 * KiB, 2)
    published = server.make_manifest(
        image, "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    server.request_hook = after_requests(100, lambda: server.faults.missing(published.image_sha256))
    # No budget: the first 4.04 fails the update (the behaviour of a server gone for good).
    config = fast(make_config(tmp_path, server, signing), not_found_budget=0.0)
    reports = Reports(server, "dev1")
    async with Client(config) as client:
        server.announce_raw(published.raw, published.sequence)
        failed = await reports.wait_for(published, ResultCode.INVALID_URI)
        assert State(failed.state) is State.FAILED
        status = await client.wait_for(lambda s: s.state is State.FAILED, 10)
        verified = status.verified_bytes
        assert 0 < verified < len(image)
        before = len(server.image_requests(published.image_sha256))
        server.faults.missing_images.discard(published.image_sha256.hex())
        server.announce_raw(published.raw, published.sequence)  # the same manifest, again
        await client.wait_for(done, 30)
    after = server.image_requests(published.image_sha256)[before:]
    # Only the fragments not yet verified were asked for (each block once, but for a
    # retransmission): nothing verified before the failure was fetched again.
    assert len({r.offset for r in after}) * KiB == len(image) - verified
    assert config.target is not None
    assert hashlib.sha256(config.target.read_bytes()).digest() == published.image_sha256


# -- a refusal caused by a local setting ------------------------------------------------------


async def test_a_manifest_refused_by_allowed_origins_is_fetched_once_the_setting_is_fixed(
    tmp_path: Path,
) -> None:
    async with (
        UpdateServer(tmp_path / "srv", SIGNING.key, SIGNING.kid) as server,
        UpdateServer(tmp_path / "mirror", SIGNING.key, SIGNING.kid) as mirror,
    ):
        reports = Reports(server, "dev1")
        image = os.urandom(8192)
        _, digest = mirror.store_image(image)
        body_uri = f"{mirror.uri}/fota/img/{digest.hex()}"
        v1 = _with_image_uri(
            server, server.make_manifest(image, "1.0", device_class=DEVICE_CLASS), body_uri
        )
        config = make_config(tmp_path, server, SIGNING)
        async with Client(config, handler=AutoAuthorize()) as client:
            server.announce_raw(v1.raw, v1.sequence)
            refused = await reports.wait_for(v1, ResultCode.INVALID_URI)
            assert "is not on an allowed origin" in refused.detail
            shown = await client.wait_for(lambda s: bool(s.last_refusal), 10)
            assert v1.update_id in shown.last_refusal
            assert "local setting allowed_origins" in shown.last_refusal
        assert not mirror.requests
        # The operator fixes the setting and restarts the daemon; the server announces
        # nothing new (the same manifest is still its announcement).
        fixed = dataclasses.replace(config, allowed_origins=[mirror.uri])
        async with Client(fixed, handler=AutoAuthorize()) as client:
            await client.wait_for(done, 30)
        await reports.wait_for(v1, ResultCode.SUCCESS)
        assert mirror.image_requests(digest)


# -- a full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``where`` (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        check=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["umount", "-l", str(where)],
            check=True,
            stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; return the filler."""
    filler = directory / "filler"
    chunk = bytes(64 * KiB)
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:  # the last partial chunk, byte-size pieces down to nothing
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


async def test_a_full_disk_pauses_the_download_and_it_resumes_when_space_returns(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    image = image_of(512 * KiB, 3)
    published = server.make_manifest(
        image, "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    with tmpfs(tmp_path / "fs", 2 << 20) as fs:
        config = fast(
            dataclasses.replace(make_config(tmp_path, server, signing), state_dir=fs / "state")
        )
        (tmp_path / "dev1").mkdir()  # the target's directory (not on the tmpfs)
        fillers: list[Path] = []
        # Part-way through the download, something else fills the disk.
        server.request_hook = after_requests(150, lambda: fillers.append(fill(fs)))
        reports = Reports(server, "dev1")
        with log_event("candidate_disk_full") as disk_full:
            async with Client(config) as client:
                server.announce_raw(published.raw, published.sequence)
                await asyncio.wait_for(disk_full.wait(), 30)
                assert fillers and client.status().state is State.DOWNLOADING
                fillers[0].unlink()  # space returns
                await client.wait_for(done, 40)
        reports.assert_final(published, ResultCode.SUCCESS)
        requests = server.image_requests(published.image_sha256)
        # Resumed from the verified fragments: little was fetched twice.
        assert served(requests) <= len(image) + 3 * FRAGMENT
    assert config.target is not None
    assert hashlib.sha256(config.target.read_bytes()).digest() == published.image_sha256


def test_the_helpers_see_what_they_claim(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", 256 * KiB) as fs:
        filler = fill(fs)
        st = os.statvfs(fs)
        assert st.f_bavail == 0 and filler.stat().st_size > 200 * KiB
        with pytest.raises(OSError) as info:
            (fs / "more").write_bytes(b"x" * 8192)
        assert info.value.errno == 28  # ENOSPC, what the downloader's pause is about
