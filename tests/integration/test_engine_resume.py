"""Engine tier: fakes for the network and the installer, the real journal; crash at every step.

For every k, the engine handling a polite update is stopped after its k-th event (its child
tasks cancelled mid-flight, the journal left as it was), and a new engine on the same state
directory must finish the update: the right bytes installed, reports numbered without gaps or
repeats, and the application asked again where an answer was lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from fota import AutoAuthorize, Config, Manifest, TrustStore
from fota.core import manifest as mf
from fota.core.manifest import Component, ManifestBody
from fota.core.states import State
from fota.engine import Engine
from fota.install.base import DONE, Outcome, Progress
from fota.journal import Journal
from fota.transport import Announcement, Block, SequentialFetcher
from tests.conftest import DEVICE_CLASS, Signing

BASE = "coap://fake"
FRAGMENT = 4096


class FakeTransport:
    """In-memory server: an announcement, manifests and images by URI, a report log."""

    def __init__(self) -> None:
        self.resources: dict[str, bytes] = {}
        self.current: Announcement | None = None
        self.changed = asyncio.Event()
        self.reports: list[dict[int, Any]] = []
        self.blocks: list[int] = []

    def publish(self, signing: Signing, image: bytes, version: str, sequence: int) -> Manifest:
        sha = hashlib.sha256(image).digest()
        frags = tuple(
            hashlib.sha256(image[i : i + FRAGMENT]).digest() for i in range(0, len(image), FRAGMENT)
        )
        body = ManifestBody(
            sequence,
            Component.FIRMWARE,
            version,
            DEVICE_CLASS,
            len(image),
            sha,
            f"../img/{sha.hex()}",
            FRAGMENT,
            frags,
        )
        raw = mf.sign(body, signing.key, signing.kid)
        manifest = mf.verify(raw, signing.trust)
        self.resources[f"{BASE}/fota/img/{sha.hex()}"] = image
        self.resources[f"{BASE}/fota/m/{manifest.digest.hex()}"] = raw
        self.current = Announcement(
            sequence, manifest.digest, f"{BASE}/fota/m/{manifest.digest.hex()}"
        )
        self.changed.set()
        return manifest

    async def announcements(self) -> AsyncIterator[Announcement]:
        while True:
            self.changed.clear()
            if self.current is not None:
                yield self.current
            await self.changed.wait()

    def check_now(self) -> None:
        pass  # the fake yields every change at once anyway

    async def fetch(self, uri: str, *, limit: int) -> bytes:
        return self.resources[uri][: limit + 1]

    def block_fetcher(self, uri: str, *, window: int, block_size: int) -> SequentialFetcher:
        return SequentialFetcher(self, uri, block_size)

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        data = self.resources[uri]
        self.blocks.append(offset)
        chunk = data[offset : offset + block_size]
        return Block(offset, chunk, offset + len(chunk) < len(data), len(data), b"etag")

    async def post_report(self, body: bytes) -> None:
        self.reports.append(cbor2.loads(body))

    async def aclose(self) -> None:
        pass


class MemoryInstaller:
    def __init__(self) -> None:
        self.installed: bytes | None = None
        self.installs: list[str] = []
        self.commits: list[str] = []

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        self.installs.append(manifest.body.version)
        data = await asyncio.to_thread(candidate.read_bytes)
        self.installed = data[: manifest.body.image_size]
        return DONE

    async def booted(self, manifest: Manifest) -> bool:
        raise AssertionError("no restart expected")

    async def commit(self, manifest: Manifest) -> None:
        self.commits.append(manifest.body.version)

    async def rollback(self, manifest: Manifest) -> Outcome:
        raise AssertionError("no rollback expected")


def config(tmp: Path, trust: TrustStore) -> Config:
    return Config(server=BASE, device_id="d", device_class=DEVICE_CLASS, state_dir=tmp, trust=trust)


def engine(tmp: Path, signing: Signing, net: FakeTransport, inst: MemoryInstaller) -> Engine:
    return Engine(
        config(tmp, signing.trust),
        transport=net,
        journal=Journal(tmp, signing.trust),
        installer=inst,
        handler=AutoAuthorize(),
    )


def finished(version: str):  # type: ignore[no-untyped-def]
    def check(model) -> bool:  # type: ignore[no-untyped-def]
        return (
            model.installed is not None
            and model.installed.body.version == version
            and model.state is State.IDLE
            and not model.record.outbox
        )

    return check


async def run_v1(tmp: Path, signing: Signing, net: FakeTransport, inst: MemoryInstaller) -> None:
    e = engine(tmp, signing, net, inst)
    await e.start()
    net.publish(signing, os.urandom(5000), "1.0", 1)
    await e.wait_for(finished("1.0"), 10)
    await e.aclose()


async def count_v2_events(tmp: Path, signing: Signing) -> int:
    net, inst = FakeTransport(), MemoryInstaller()
    await run_v1(tmp, signing, net, inst)
    e = engine(tmp, signing, net, inst)
    await e.start()
    net.publish(signing, os.urandom(5 * FRAGMENT - 100), "2.0", 2)
    await e.wait_for(finished("2.0"), 10)
    await e.aclose()
    return e.handled


async def test_crash_after_every_event_resumes_to_the_same_result(
    tmp_path: Path, signing: Signing
) -> None:
    total = await count_v2_events(tmp_path / "count", signing)
    assert total >= 20
    for k in range(1, total):
        tmp = tmp_path / f"k{k}"
        net, inst = FakeTransport(), MemoryInstaller()
        await run_v1(tmp, signing, net, inst)
        first = engine(tmp, signing, net, inst)
        await first.start()
        image = os.urandom(5 * FRAGMENT - 100)
        manifest = net.publish(signing, image, "2.0", 2)
        await first.wait_for(lambda _, e=first, k=k: e.handled >= k, 10)  # type: ignore[misc]
        await first.aclose()  # the crash: tasks cancelled wherever they were
        crashed_in = first.model.state if first.model else None

        second = engine(tmp, signing, net, inst)
        await second.start()
        await second.wait_for(finished("2.0"), 10)
        await second.aclose()

        assert inst.installed == image, f"k={k} crashed in {crashed_in}"
        assert inst.installs.count("2.0") >= 1 and inst.commits.count("2.0") >= 1
        seqs = [int(r[2]) for r in net.reports]
        # At least once: a report whose acknowledgement was lost is sent again, same number.
        assert sorted(set(seqs)) == list(range(len(set(seqs)))), f"k={k}: gaps in {seqs}"
        v2 = [r for r in net.reports if r.get(5) == manifest.update_id]
        assert v2[-1][3] == State.IDLE.value and v2[-1][4] == 1


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not cbor at all"])
async def test_damaged_journal_starts_and_reports_the_recovery(
    tmp_path: Path, signing: Signing, garbage: bytes
) -> None:
    """Issue 17 §2: a damaged journal is moved aside and reported; it never stops the start."""
    from fota import ResultCode

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "journal.cbor").write_bytes(garbage)
    e = engine(tmp_path, signing, FakeTransport(), MemoryInstaller())
    await e.start()
    try:
        assert e.model is not None and e.model.record.recovered
        assert [r.result for r in e.model.record.outbox] == [ResultCode.STATE_RECOVERED]
        assert [p.name.split("-", 1)[1] for p in (tmp_path / "quarantine").iterdir()] == [
            "journal.cbor"
        ]
    finally:
        await e.aclose()
