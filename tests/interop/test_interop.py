"""Peers we did not write: libcoap's coap-client-notls against fota's test server.

It fetches the announcement, manifest and image block-wise (sizes 16, 256 and 1024) and
observes the announcement. The other direction (fota's downloader against libcoap's
coap-server-notls and aiocoap-fileserver) is in tests/interop/test_download_faults.py.

These tests need Debian's libcoap3-bin; scripts/test installs it. When it is missing they
FAIL (not skip), so CI cannot go green without the peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import cbor2
import pytest

from fota.testing import UpdateServer
from tests.conftest import DEVICE_CLASS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def coap_client() -> str:
    path = shutil.which("coap-client-notls")
    assert path, "coap-client-notls is missing: apt-get install libcoap3-bin (scripts/test does)"
    return path


async def fetch(uri: str, out: Path, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        coap_client(),
        "-m",
        "get",
        "-B",
        "60",
        *args,
        "-o",
        str(out),
        uri,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, stderr.decode()


@pytest.mark.parametrize("block_size", [16, 256, 1024])
async def test_coap_client_fetches_manifest_and_image_from_fota_server(
    tmp_path: Path, server: UpdateServer, block_size: int
) -> None:
    image = os.urandom(200_000 if block_size > 16 else 20_000)
    published = server.publish(image, "1.0", device_class=DEVICE_CLASS)
    ann = tmp_path / "ann.cbor"
    await fetch(f"{server.uri}/fota/ann/dev-libcoap", ann)
    body = cbor2.loads(ann.read_bytes())
    assert body[1] == published.sequence and body[2] == published.digest

    manifest = tmp_path / "m.cose"
    await fetch(f"{server.uri}/fota/m/{published.digest.hex()}", manifest, "-b", str(block_size))
    assert manifest.read_bytes() == published.raw

    out = tmp_path / "img.bin"
    await fetch(f"{server.uri}/fota/img/{published.image_sha256.hex()}", out, "-b", str(block_size))
    assert hashlib.sha256(out.read_bytes()).digest() == published.image_sha256
    sizes = {r.block_size for r in server.image_requests(published.image_sha256)}
    assert sizes == {block_size}


async def test_observe_notifications_reach_coap_client(server: UpdateServer) -> None:
    registered = asyncio.Event()
    device = "dev-observer"
    server.request_hook = lambda r: registered.set() if r.path == f"/fota/ann/{device}" else None
    proc = await asyncio.create_subprocess_exec(
        coap_client(),
        "-s",
        "60",  # observe for up to a minute; the test ends it once it has what it needs
        "-B",
        "60",
        "-w",
        f"{server.uri}/fota/ann/{device}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(registered.wait(), 30)  # its registration reached the server
        seen = b""

        async def until_notified(digest: bytes) -> None:
            nonlocal seen
            while digest not in seen:
                chunk = await proc.stdout.read(4096)  # type: ignore[union-attr]
                assert chunk, f"coap-client-notls ended: {seen!r}"
                seen += chunk

        # Two changes, one after the other (observe may fold changes that come together into
        # one notification of the latest): each reaches the observer, which registered once
        # and then only listens (coap-client -s sends no further requests).
        for version in ("1.0", "1.1"):
            published = server.publish(os.urandom(2000), version, device_class=DEVICE_CLASS)
            await asyncio.wait_for(until_notified(published.digest), 30)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
