"""`fota fetch`: the downloader on its own, as a user runs it (a real subprocess)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from fota.testing import RequestLog, UpdateServer

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024
FRAGMENT = 64 * 1024


async def run_fetch(*args: str) -> tuple[int, dict[str, object] | None, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        "--log-level",
        "warning",
        "fetch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode is not None
    result = json.loads(out) if proc.returncode == 0 else None
    return proc.returncode, result, err.decode()


async def test_fetch_verifies_the_digest(tmp_path: Path, server: UpdateServer) -> None:
    image = os.urandom(3 * MiB + 123)
    _, sha = server.store_image(image)
    out = tmp_path / "image.bin"
    uri = f"{server.uri}/fota/img/{sha.hex()}"
    code, result, err = await run_fetch(
        uri, "--out", str(out), "--sha256", sha.hex(), "--ack-timeout", "0.2"
    )
    assert code == 0, err
    assert result is not None and result["bytes"] == len(image) and result["sha256"] == sha.hex()
    assert out.read_bytes() == image
    assert not (tmp_path / "image.bin.part").exists()
    assert not (tmp_path / "image.bin.fota-fetch").exists()

    wrong = "00" * 32
    code, _, err = await run_fetch(
        uri, "--out", str(tmp_path / "other.bin"), "--sha256", wrong, "--ack-timeout", "0.2"
    )
    assert code == 2 and "IntegrityError" in err and "Traceback" not in err
    assert not (tmp_path / "other.bin").exists()


async def test_fetch_of_a_missing_resource_fails_at_once(
    tmp_path: Path, server: UpdateServer
) -> None:
    code, _, err = await run_fetch(
        f"{server.uri}/fota/img/{'ab' * 32}", "--out", str(tmp_path / "x"), "--ack-timeout", "0.2"
    )
    # A 4.04 is ResourceMissing (a PermanentServerError; fota.core.codes): `fota fetch` has
    # no update to wait for, so it still fails at once.
    assert code == 2 and "ResourceMissing" in err and "4.04" in err


async def test_fetch_resumes_after_kill_9(tmp_path: Path, server: UpdateServer) -> None:
    image = os.urandom(6 * MiB)
    _, sha = server.store_image(image)
    image_path = f"/fota/img/{sha.hex()}"
    uri = f"coap://127.0.0.1:{server.port}{image_path}"
    out = tmp_path / "image.bin"
    halfway = asyncio.Event()
    seen = 0

    def on_request(entry: RequestLog) -> None:
        nonlocal seen
        if entry.path == image_path:
            seen += 1
            if seen == len(image) // 1024 // 2:
                halfway.set()

    server.request_hook = on_request
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fota",
        "--log-level",
        "warning",
        "fetch",
        uri,
        "--out",
        str(out),
        "--ack-timeout",
        "0.2",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(halfway.wait(), 60)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert (tmp_path / "image.bin.fota-fetch").exists(), "the journal vouched for nothing"
    before = len(server.requests)

    code, result, err = await run_fetch(
        uri, "--out", str(out), "--sha256", sha.hex(), "--ack-timeout", "0.2"
    )
    assert code == 0, err
    assert result is not None
    resumed = result["resumed_fragments"]
    assert isinstance(resumed, int) and 1 <= resumed < len(image) // FRAGMENT
    assert hashlib.sha256(out.read_bytes()).digest() == sha
    refetched = {
        r.offset // FRAGMENT
        for r in server.requests[before:]
        if r.path == image_path and r.offset is not None
    }
    # A resumed fetch asks first for one block it holds (the witness: is it the same
    # resource?), which may lie in a vouched fragment; beyond it, only fragments not
    # vouched for are fetched.
    assert len(refetched) <= len(image) // FRAGMENT - resumed + 1


async def test_a_failed_attempt_is_resumed_by_the_next(
    tmp_path: Path, server: UpdateServer
) -> None:
    image = os.urandom(1024 * 1024)  # four 256 KiB fragments
    _, sha = server.store_image(image)
    # The server falls silent once half the image was served, until one block's 5 tries (the
    # default max_retransmit of 4, plus one) were all lost and the attempt ended; then it
    # answers again, and the second attempt resumes from the verified fragments.
    half = len(image) // 1024 // 2
    lost: dict[int | None, int] = {}

    def hook(request: RequestLog) -> None:
        if not request.path.endswith(sha.hex()):
            return
        if "lost" in request.faults:
            lost[request.offset] = lost.get(request.offset, 0) + 1
            if lost[request.offset] == 5:
                server.faults.lose(0)
        elif server.faults.seen == half and not lost:
            server.faults.lose(100)

    server.request_hook = hook
    out = tmp_path / "image.bin"
    code, result, err = await run_fetch(
        f"{server.uri}/fota/img/{sha.hex()}",
        "--out", str(out), "--sha256", sha.hex(),
        "--ack-timeout", "0.05", "--min-rto", "0.05", "--attempts", "3",
    )  # fmt: skip
    assert code == 0, err
    assert "attempt 1:" in err and "no answer for byte" in err and "resuming" in err
    assert result is not None
    resumed = result["resumed_fragments"]
    assert isinstance(resumed, int) and resumed >= 1  # the first half's
    assert out.read_bytes() == image
