"""`fota run` as a real subprocess: kill -9 in the middle of a download, restart, finish."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
from pathlib import Path

import cbor2
import pytest

from fota import ResultCode, State
from fota.core.record import Record, bitmap_get
from fota.keys import save_keypair
from fota.testing import RequestLog, UpdateServer
from tests.conftest import ACK_TIMEOUT, DEVICE_CLASS, Signing

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
MiB = 1024 * 1024
FRAGMENT = 64 * 1024


async def start_client(
    tmp_path: Path, server: UpdateServer, trust_pem: Path
) -> asyncio.subprocess.Process:
    log = open(tmp_path / "client.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fota",
            "run",
            "--server",
            server.uri,
            "--state-dir",
            str(tmp_path / "state"),
            "--trust",
            str(trust_pem),
            "--target",
            str(tmp_path / "firmware.bin"),
            "--device-id",
            "gw-kill",
            "--device-class",
            DEVICE_CLASS,
            "--ack-timeout",
            str(ACK_TIMEOUT),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    finally:
        log.close()


async def test_kill_9_mid_download_resumes_without_refetching_verified_fragments(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    trust_pem = save_keypair(signing.key, tmp_path / "signing.key")
    image = os.urandom(10 * MiB)
    published = server.publish(image, "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT)
    image_path = f"/fota/img/{published.image_sha256.hex()}"
    blocks = len(image) // 1024
    # A seeded moment between 20 % and 80 % of the download.
    kill_at = int(blocks * random.Random(20261122).uniform(0.2, 0.8))
    reached = asyncio.Event()
    seen = 0

    def on_request(entry: RequestLog) -> None:
        nonlocal seen
        if entry.path == image_path:
            seen += 1
            if seen >= kill_at:
                reached.set()

    server.request_hook = on_request
    first = await start_client(tmp_path, server, trust_pem)
    await asyncio.wait_for(reached.wait(), 120)
    first.send_signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL

    # What the journal vouched for at the moment of the kill.
    record = Record.from_bytes((tmp_path / "state" / "journal.cbor").read_bytes())
    fragments = len(image) // FRAGMENT
    verified = {i for i in range(fragments) if bitmap_get(record.verified, i)}
    assert record.state is State.DOWNLOADING
    assert 1 <= len(verified) < fragments, f"{len(verified)} of {fragments} verified at the kill"
    requests_before_restart = len(server.requests)

    second = await start_client(tmp_path, server, trust_pem)
    try:
        await server.wait_for_report(
            lambda r: r.get(5) == published.update_id and r[4] == ResultCode.SUCCESS, timeout=150
        )
    finally:
        second.send_signal(signal.SIGTERM)
        code = await second.wait()
    assert code == 0, "SIGTERM stops the client gracefully"

    assert (
        hashlib.sha256((tmp_path / "firmware.bin").read_bytes()).digest() == published.image_sha256
    )
    refetched = [
        r.offset
        for r in server.requests[requests_before_restart:]
        if r.path == image_path and r.offset is not None and r.offset // FRAGMENT in verified
    ]
    assert refetched == [], "verified fragments were fetched again after the restart"
    # Everything not verified was fetched after the restart, but for the pages of partial
    # fragments the journal named (issue 17 §6: read back from the candidate instead).
    after = {r.offset for r in server.requests[requests_before_restart:] if r.path == image_path}
    missing = [i for i in range(fragments) if i not in verified]
    named = cbor2.loads(record.partial) if record.partial else []
    held = {o for start, n in named for o in range(start, start + n, 1024)}
    expected = {o for i in missing for o in range(i * FRAGMENT, (i + 1) * FRAGMENT, 1024)}
    assert after == expected - held
