"""`fota run` killed with SIGKILL at 20 seeded moments of one download; every restart resumes.

After each kill the journal says which fragments were verified. The next run must not fetch
any of those again, and what it fetches again of the rest is bounded: blocks of fragments that
were not complete at the kill, plus at most a window of blocks in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
from pathlib import Path

import pytest

from fota import ResultCode
from fota.core.record import Record, bitmap_get
from fota.keys import save_keypair
from fota.testing import RequestLog, UpdateServer
from tests.conftest import DEVICE_CLASS, Signing
from tests.e2e.test_e2e_kill import start_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
MiB = 1024 * 1024
FRAGMENT = 64 * 1024
WINDOW = 16  # fota run's default Config.window
KILLS = 20


async def test_twenty_kills_each_restart_resumes(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    trust_pem = save_keypair(signing.key, tmp_path / "signing.key")
    image = os.urandom(4 * MiB)
    published = server.publish(image, "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT)
    image_path = f"/fota/img/{published.image_sha256.hex()}"
    fragments = len(image) // FRAGMENT
    rng = random.Random(2026_11_22)
    target = asyncio.Event()
    budget = 0
    requested: list[int] = []

    def on_request(entry: RequestLog) -> None:
        if entry.path == image_path and entry.offset is not None:
            requested.append(entry.offset)
            if len(requested) >= budget:
                target.set()

    server.request_hook = on_request
    journal = tmp_path / "state" / "journal.cbor"
    verified_before: set[int] = set()
    kills = 0
    while kills < KILLS:
        # The next kill comes 20-120 block requests into this run (seeded).
        budget = len(requested) + rng.randint(20, 120)
        target.clear()
        start = len(requested)
        proc = await start_client(tmp_path, server, trust_pem)
        try:
            await asyncio.wait_for(target.wait(), 60)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        kills += 1
        this_run = requested[start:]
        # Nothing the journal vouched for before this run was fetched in it.
        again = [o for o in this_run if o // FRAGMENT in verified_before]
        assert again == [], f"kill {kills}: refetched verified fragments {sorted(set(again))[:5]}"
        record = Record.from_bytes(journal.read_bytes())
        verified = {i for i in range(fragments) if bitmap_get(record.verified, i)}
        assert verified >= verified_before, "the journal never forgets a verified fragment"
        # Refetched in this run from before: only blocks of fragments not verified back then,
        # and of those at most a window beyond what this run completed.
        earlier = set(requested[:start])
        refetched = [o for o in this_run if o in earlier]
        touched = {o // FRAGMENT for o in refetched}
        assert len(refetched) * 1024 <= len(touched) * FRAGMENT + WINDOW * 1024
        verified_before = verified
        if len(verified) == fragments:
            break
    assert kills >= 10, f"the download finished after only {kills} kills"

    final = await start_client(tmp_path, server, trust_pem)
    try:
        await server.wait_for_report(
            lambda r: r.get(5) == published.update_id and r[4] == ResultCode.SUCCESS, timeout=120
        )
    finally:
        final.send_signal(signal.SIGTERM)
        assert await final.wait() == 0
    assert (
        hashlib.sha256((tmp_path / "firmware.bin").read_bytes()).digest() == published.image_sha256
    )
