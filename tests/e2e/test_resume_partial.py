"""Issue 17 §6: blocks of unfinished fragments survive a stop, and a restart does not ask again.

The downloader writes each page of a fragment as it fills and notes, with every journaled
fragment, which pages of the still incomplete fragments that fsync covered (``partial``).
These tests stop downloads at deterministic points (a count of blocks, a server condition),
resume them from the note, and count at a real server what was asked for again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cbor2
import pytest
from structlog.testing import capture_logs

from fota.core import events as ev
from fota.core.record import bitmap_new, bitmap_set
from fota.download import (
    CHUNK,
    UNIT,
    Downloader,
    Layout,
    decode_runs,
    encode_runs,
)
from fota.fetch import FRAGMENT as FETCH_FRAGMENT
from fota.fetch import fetch
from fota.fileops import FileOps
from fota.testing import RequestLog, UpdateServer
from fota.transport import Block, BlockFetcher
from fota.transport.window import WindowFetcher

pytestmark = pytest.mark.timeout(120)
KiB = 1024
MiB = 1024 * KiB
FRAGMENT = 64 * KiB


def layout_of(image: bytes, fragment: int = FRAGMENT) -> Layout:
    digests = tuple(
        hashlib.sha256(image[i : i + fragment]).digest() for i in range(0, len(image), fragment)
    )
    return Layout("u1", len(image), fragment, digests)


class Stopping:
    """A fetcher factory whose fetchers call ``after(n)`` for the n-th block handed over."""

    def __init__(self, after: Callable[[int], None] | None = None) -> None:
        self.after = after
        self.blocks = 0

    def __call__(self, uri: str, *, window: int, block_size: int) -> BlockFetcher:
        inner = WindowFetcher.for_uri(
            uri, window=window, block_size=block_size, timeout=0.1, max_tries=8, min_rto=0.02
        )
        return _Counted(inner, self)


class _Counted:
    def __init__(self, inner: WindowFetcher, owner: Stopping) -> None:
        self.inner, self.owner = inner, owner

    def want(self, offset: int, length: int) -> None:
        self.inner.want(offset, length)

    async def run(self, plan: Iterator[tuple[int, int]], on_block: Callable[[Block], None]) -> None:
        def counted(block: Block) -> None:
            on_block(block)
            self.owner.blocks += 1
            if self.owner.after is not None:
                self.owner.after(self.owner.blocks)

        await self.inner.run(plan, counted)


def overlaps(offset: int, size: int, runs: list[tuple[int, int]]) -> bool:
    return any(offset < o + n and o < offset + size for o, n in runs)


async def stopped_download(
    server: UpdateServer, candidate: Path, image: bytes, stop_after: int
) -> tuple[list[ev.Event], str]:
    """Download with seeded loss at the server and cancel after ``stop_after`` blocks."""
    _, sha = server.store_image(image)
    uri = f"{server.uri}/fota/img/{sha.hex()}"
    server.faults.seed = 17
    server.faults.lose(10)
    events: list[ev.Event] = []
    loop = asyncio.get_running_loop()
    reached = asyncio.Event()

    def after(n: int) -> None:
        if n == stop_after:
            loop.call_soon_threadsafe(reached.set)

    downloader = Downloader(Stopping(after), FileOps(), candidate, events.append, window=16)
    task = asyncio.create_task(downloader.fetch(layout_of(image), uri, b"\x00" * 4))
    await asyncio.wait_for(reached.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    server.faults.lose(0)
    return events, uri


def journal_at_last_note(events: list[ev.Event], count: int) -> tuple[bytes, bytes]:
    """``(verified, partial)`` as the journal held them after the last event with a note:
    what a kill -9 right after that journal write leaves."""
    verified = bitmap_new(count)
    note = b""
    for event in events:
        if isinstance(event, ev.FragmentVerified):
            for index in event.indexes:
                verified = bitmap_set(verified, index)
            if event.partial:
                note, kept = event.partial, verified
    assert note, "no journaled fragment carried a note of partial fragments"
    return kept, note


async def test_resume_asks_for_no_block_the_journal_named(
    tmp_path: Path, server: UpdateServer
) -> None:
    image = os.urandom(2 * MiB)
    layout = layout_of(image)
    candidate = tmp_path / "candidate.bin"
    events, uri = await stopped_download(server, candidate, image, stop_after=1200)
    verified, note = journal_at_last_note(events, layout.count)
    runs = decode_runs(note, layout)
    assert runs and all(o % UNIT == 0 and n % UNIT == 0 for o, n in runs)

    before = len(server.requests)
    done: list[ev.Event] = []
    downloader = Downloader(Stopping(), FileOps(), candidate, done.append, window=16)
    await downloader.fetch(layout, uri, verified, partial=note)

    assert isinstance(done[-1], ev.DownloadFinished), done[-1]
    assert candidate.read_bytes() == image
    assert downloader.resumed == sum(n for _, n in runs)
    again = [
        (r.offset, r.block_size)
        for r in server.requests[before:]
        if r.path.startswith("/fota/img/") and r.offset is not None and r.block_size
    ]
    named = [(o, s) for o, s in again if overlaps(o, s, runs)]
    assert named == [], f"blocks the journal named were asked again: {named[:5]}"


async def test_a_corrupt_byte_in_a_resumed_run_costs_that_fragment_only(
    tmp_path: Path, server: UpdateServer
) -> None:
    image = os.urandom(2 * MiB)
    layout = layout_of(image)
    candidate = tmp_path / "candidate.bin"
    events, uri = await stopped_download(server, candidate, image, stop_after=1200)
    verified, note = journal_at_last_note(events, layout.count)
    runs = decode_runs(note, layout)
    # Damage one byte in the middle of the longest run, on disk.
    offset, length = max(runs, key=lambda r: r[1])
    damaged = offset + length // 2
    with open(candidate, "r+b") as f:
        f.seek(damaged)
        byte = f.read(1)
        f.seek(damaged)
        f.write(bytes([byte[0] ^ 0x20]))
    index = damaged // FRAGMENT

    before = len(server.requests)
    done: list[ev.Event] = []
    downloader = Downloader(Stopping(), FileOps(), candidate, done.append, window=16)
    with capture_logs() as logs:
        await downloader.fetch(layout, uri, verified, partial=note)

    assert isinstance(done[-1], ev.DownloadFinished), done[-1]
    assert candidate.read_bytes() == image
    assert [e["fragment"] for e in logs if e["event"] == "fragment_corrupt"] == [index]
    asked = {
        r.offset
        for r in server.requests[before:]
        if r.path.startswith("/fota/img/") and r.offset is not None
    }
    # The damaged fragment was fetched again whole; no other run was asked for.
    start = index * FRAGMENT
    assert set(range(start, start + FRAGMENT, 1024)) <= asked
    other = [(o, n) for o, n in runs if o // FRAGMENT != index]
    assert not [o for o in asked if overlaps(o, 1024, other)]


async def test_pages_are_noted_while_every_open_fragment_waits_for_a_retry(
    tmp_path: Path, server: UpdateServer
) -> None:
    """Under loss every open fragment waits for a lost block while the window goes on, and no
    fragment completes for a while: the pages written meanwhile are noted all the same, a
    fragment's worth at a time (before, only at the next completion: a kill cost them all)."""
    image = os.urandom(1 * MiB)
    layout = layout_of(image)
    _, sha = server.store_image(image)
    image_path = f"/fota/img/{sha.hex()}"
    uri = f"{server.uri}{image_path}"
    stuck = range(1, 7)
    # The first block of fragments 1..6 comes back cut short 7 times (the fetcher tries 8):
    # those fragments stay open while the window moves on through all of them.
    for fragment in stuck:
        server.faults.truncate(fragment * FRAGMENT // 1024, times=7, keep=100)
    far = asyncio.Event()

    def on_request(entry: RequestLog) -> None:
        if entry.path == image_path and (entry.offset or 0) >= 7 * FRAGMENT:
            far.set()

    server.request_hook = on_request
    events: list[ev.Event] = []
    downloader = Downloader(Stopping(), FileOps(), tmp_path / "c.bin", events.append, window=16)
    task = asyncio.create_task(downloader.fetch(layout, uri, bitmap_new(layout.count)))
    await asyncio.wait_for(far.wait(), 60)
    task.cancel()  # the events so far are what a kill -9 now would leave journaled
    with pytest.raises(asyncio.CancelledError):
        await task

    answered = {
        r.offset
        for r in server.requests
        if r.path == image_path and r.offset is not None and not r.faults
    }
    assert all(b * FRAGMENT not in answered for b in stuck), "a stuck fragment completed"
    verified, note = journal_at_last_note(events, layout.count)
    held = decode_runs(note, layout) + [
        layout.span(i) for i in range(layout.count) if verified[i >> 3] & (1 << (i & 7))
    ]
    lost = [o for o in answered if not overlaps(o, 1024, held)]
    # At most a fragment's worth of pages since the last note (fsync_every=1), the pages the
    # stuck blocks keep unfilled and a window of answers on their way (before: all six open
    # fragments).
    bound = FRAGMENT + (len(stuck) + 1) * CHUNK + 16 * KiB
    assert len(lost) * KiB <= bound, f"{len(lost)} KiB answered and not noted"
    repeated = [e.index for e in events if isinstance(e, ev.FragmentVerified)]
    assert set(repeated) == {0}, repeated  # only fragment 0 completed; notes repeat it


class CountingOps(FileOps):
    """Real file operations that count the candidate's fsyncs and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.fsyncs = 0
        self.written: list[tuple[int, int]] = []  # (offset, length) of each pwrite

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        super().fsync(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self.written.append((offset, len(data)))
        super().pwrite(fd, data, offset)


async def test_a_lossy_download_syncs_once_per_fragment_of_bytes_written(
    tmp_path: Path, server: UpdateServer
) -> None:
    """Each sync is an fsync and a journal write: under loss they follow the bytes written,
    one per ``fsync_every`` fragments' worth, not one per completion plus one per fragment's
    worth of pages of open fragments (before: 1.110 bytes written per image byte at 5 %)."""
    image = os.urandom(1 * MiB)
    layout = layout_of(image)
    _, sha = server.store_image(image)
    uri = f"{server.uri}/fota/img/{sha.hex()}"
    # Fragments 1..6 stay open while the window goes on: their pages are noted long before
    # their last block comes, so their completions add a page or two each.
    for fragment in range(1, 7):
        server.faults.truncate(fragment * FRAGMENT // 1024, times=7, keep=100)
    events: list[ev.Event] = []
    ops = CountingOps()
    downloader = Downloader(Stopping(), ops, tmp_path / "c.bin", events.append, window=16)
    await downloader.fetch(layout, uri, bitmap_new(layout.count))

    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    assert (tmp_path / "c.bin").read_bytes() == image
    verified = [i for e in events if isinstance(e, ev.FragmentVerified) for i in e.indexes]
    assert set(verified) == set(range(layout.count))
    # 16 fragments' worth written: 16 syncs, one more for the tail at the end.
    assert ops.fsyncs <= layout.count + 1, ops.fsyncs


def test_the_note_is_bounded_and_keeps_the_longest_runs() -> None:
    runs = [(i * 8192, 4096 + (i % 3) * 16) for i in range(200)]
    note = encode_runs(runs)
    kept = cbor2.loads(note)
    assert len(kept) == 64 and len(note) < 1024
    assert all(n == 4096 + 32 for _, n in kept)
    assert kept == sorted(kept)
    layout = Layout("u", 4 * MiB, FRAGMENT, None)
    # Doubtful runs are left out: unaligned, outside the image, of the wrong type.
    bad = cbor2.dumps([[8, 16], [0, 15], [4 * MiB - 16, 32], [True, 16], [-16, 32], [16, 32]])
    assert decode_runs(bad, layout) == [(16, 32)]
    assert decode_runs(b"\xff\x00", layout) == []
    # A run is cut at fragment boundaries.
    assert decode_runs(cbor2.dumps([[FRAGMENT - 32, 64]]), layout) == [
        (FRAGMENT - 32, 32),
        (FRAGMENT, 32),
    ]


# -- fota fetch ---------------------------------------------------------------------------


async def test_fetch_killed_mid_transfer_re_asks_at_most_two_fragments(
    tmp_path: Path, server: UpdateServer
) -> None:
    image = os.urandom(8 * MiB)
    _, sha = server.store_image(image)
    image_path = f"/fota/img/{sha.hex()}"
    uri = f"{server.uri}{image_path}"
    out = tmp_path / "image.bin"
    state = tmp_path / "image.bin.fota-fetch"
    # The first block of each of the first four fragments comes back cut short several times:
    # those fragments stay incomplete while the window goes on (as a lost block does).
    for fragment in range(4):
        server.faults.truncate(fragment * FETCH_FRAGMENT // 1024, times=4, keep=100)
    far = asyncio.Event()

    def on_request(entry: RequestLog) -> None:
        if entry.path == image_path and (entry.offset or 0) >= 9 * FETCH_FRAGMENT:
            far.set()

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
        "0.5",
        "--min-rto",
        "0.5",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(far.wait(), 60)
        # Wait (on server progress, not on time) until the journal vouches for a fragment
        # past the stuck ones: its note then names their pages.
        while not _journal_done(state, 4):
            far.clear()
            await asyncio.wait_for(far.wait(), 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    await _resume_asks_little_again(server, image_path, out, image, sha)


async def test_fetch_notes_pages_before_any_fragment_is_done(
    tmp_path: Path, server: UpdateServer
) -> None:
    """The first fragments all wait for a retry: the journal names their pages anyway (before,
    nothing was journaled until a fragment was done, and a kill cost the whole run)."""
    image = os.urandom(4 * MiB)
    _, sha = server.store_image(image)
    image_path = f"/fota/img/{sha.hex()}"
    uri = f"{server.uri}{image_path}"
    out = tmp_path / "image.bin"
    state = tmp_path / "image.bin.fota-fetch"
    # The second block of each of the first six fragments comes back cut short 4 times (the
    # fetcher tries 5), so none of them is done for seconds while the window goes on.
    for fragment in range(6):
        server.faults.truncate(fragment * FETCH_FRAGMENT // 1024 + 1, times=4, keep=100)
    journaled = asyncio.Event()

    def on_request(entry: RequestLog) -> None:
        if entry.path == image_path and state.exists():
            journaled.set()

    server.request_hook = on_request
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fota", "--log-level", "warning", "fetch", uri, "--out", str(out),
        "--ack-timeout", "0.5", "--min-rto", "0.5",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.wait_for(journaled.wait(), 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    saved = cbor2.loads(state.read_bytes())
    assert not any(saved["done"]), "a fragment was done: the stuck blocks came through"
    assert decode_runs(saved["partial"], Layout("fetch", len(image), FETCH_FRAGMENT, None))
    await _resume_asks_little_again(server, image_path, out, image, sha)


async def _resume_asks_little_again(
    server: UpdateServer, image_path: str, out: Path, image: bytes, sha: bytes
) -> None:
    """After a killed `fota fetch`: resume it in-process, check the image, and count the
    blocks answered before that were asked for again (at most two fragments' worth)."""
    answered = {
        r.offset
        for r in server.requests
        if r.path == image_path and r.offset is not None and not r.faults
    }
    before = len(server.requests)

    result = await fetch(f"{server.uri}{image_path}", out, sha256=sha, ack_timeout=0.2)

    assert result.sha256 == sha and out.read_bytes() == image
    again = [
        r.offset
        for r in server.requests[before:]
        if r.path == image_path and r.offset is not None and r.offset in answered
    ]
    assert len(again) * 1024 <= 2 * FETCH_FRAGMENT, f"{len(again)} KiB asked again"


def _journal_done(path: Path, index: int) -> bool:
    try:
        done = cbor2.loads(path.read_bytes())["done"]
    except (FileNotFoundError, ValueError, KeyError, EOFError, cbor2.CBORDecodeError):
        return False
    return any(done[i >> 3] & (1 << (i & 7)) for i in range(index, len(done) * 8))


async def test_fetch_starts_over_when_the_resource_is_another(
    tmp_path: Path, server: UpdateServer
) -> None:
    image = os.urandom(1 * MiB)
    _, sha = server.store_image(image)
    uri = f"{server.uri}/fota/img/{sha.hex()}"
    out = tmp_path / "image.bin"
    # A previous fetch of this URI vouched for fragment 0, but the bytes it wrote are of
    # another resource of the same size (the file behind the URI was replaced): same URI,
    # same size, same ETag as far as the journal knows.
    probe: list[Block] = []
    await WindowFetcher.for_uri(uri, timeout=0.2).run(iter([(0, 1024)]), probe.append)
    other = os.urandom(len(image))
    (tmp_path / "image.bin.part").write_bytes(other)
    done = bitmap_set(bitmap_new(4), 0)
    partial = encode_runs([(FETCH_FRAGMENT, 8192)])
    state = {"uri": uri, "size": len(image), "etag": probe[0].etag, "done": done}
    (tmp_path / "image.bin.fota-fetch").write_bytes(cbor2.dumps({**state, "partial": partial}))

    with capture_logs() as logs:
        result = await fetch(uri, out, sha256=sha, ack_timeout=0.2)

    assert out.read_bytes() == image and result.sha256 == sha
    assert [e["event"] for e in logs if e["event"] == "fetch_journal_dropped"] == [
        "fetch_journal_dropped"
    ]


async def test_fetch_starts_over_when_the_size_changed(
    tmp_path: Path, server: UpdateServer
) -> None:
    image = os.urandom(1 * MiB)
    _, sha = server.store_image(image)
    uri = f"{server.uri}/fota/img/{sha.hex()}"
    out = tmp_path / "image.bin"
    size = len(image) + 4096
    (tmp_path / "image.bin.part").write_bytes(os.urandom(size))
    state = {"uri": uri, "size": size, "etag": None, "done": b"\x01", "partial": b""}
    (tmp_path / "image.bin.fota-fetch").write_bytes(cbor2.dumps(state))
    requests_before = len(server.requests)

    with capture_logs() as logs:
        result = await fetch(uri, out, sha256=sha, ack_timeout=0.2)

    assert out.read_bytes() == image and result.sha256 == sha and result.resumed_fragments == 0
    dropped = [e for e in logs if e["event"] == "fetch_journal_dropped"]
    assert len(dropped) == 1 and "Size2" in dropped[0]["reason"]
    # A resumed fetch starts its window at once: the first request was not a lone probe of
    # block 0 but the witness, the last block the journal vouched for.
    first = next(r for r in server.requests[requests_before:] if r.path.startswith("/fota/img/"))
    assert first.offset == FETCH_FRAGMENT - 1024


async def test_one_fsync_is_one_event_for_every_fragment_it_covers(
    tmp_path: Path, server: UpdateServer
) -> None:
    """The journal writes once per event: a sync that covers four fragments is one
    ``FragmentVerified`` naming all four (before: four events, four 4 KiB journal writes)."""
    image = os.urandom(1 * MiB)
    layout = layout_of(image)
    _, sha = server.store_image(image)
    events: list[ev.Event] = []
    downloader = Downloader(
        Stopping(), FileOps(), tmp_path / "c.bin", events.append, window=16, fsync_every=4
    )
    await downloader.fetch(layout, f"{server.uri}/fota/img/{sha.hex()}", bitmap_new(layout.count))

    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    vouched = [e for e in events if isinstance(e, ev.FragmentVerified)]
    assert sorted(i for e in vouched for i in e.indexes) == list(range(layout.count))
    assert len(vouched) <= layout.count // 4 + 1, [e.indexes for e in vouched]
    assert all(len(set(e.indexes)) == len(e.indexes) for e in vouched)
    assert sum(e.fetched for e in vouched) + events[-1].fetched >= len(image)


async def test_a_restart_does_not_write_again_the_pages_already_on_disk(
    tmp_path: Path, server: UpdateServer
) -> None:
    """Pages a killed run wrote but never noted are fetched again (nothing vouches for them)
    but compared before they are written: equal ones are not written, so a kill costs no
    second write of them (before: 10 kills in 10 MiB at 5 % loss rewrote 0.06 of it)."""
    image = os.urandom(256 * KiB)
    layout = layout_of(image)
    _, sha = server.store_image(image)
    candidate = tmp_path / "c.bin"
    # What a kill leaves: every byte on disk, then one page damaged, and nothing journaled.
    damaged = bytearray(image)
    damaged[70 * KiB] ^= 0xFF
    candidate.write_bytes(damaged)
    events: list[ev.Event] = []
    ops = CountingOps()
    downloader = Downloader(Stopping(), ops, candidate, events.append, window=16)
    await downloader.fetch(layout, f"{server.uri}/fota/img/{sha.hex()}", bitmap_new(layout.count))

    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    assert candidate.read_bytes() == image
    assert ops.written == [(68 * KiB, CHUNK)], ops.written  # only the damaged page


def _write_bytes() -> int:
    """Bytes this process caused to be written to storage, counted when pages are dirtied."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


async def test_a_restart_dirties_only_the_pages_it_writes(
    tmp_path: Path, server: UpdateServer
) -> None:
    """A restart reads the candidate (re-checks, resumed runs, page comparisons) where it is
    about to write. With readahead those reads filled the cache with large folios, holes
    included, and each 4 KiB write then dirtied (and wrote back) a whole folio: 8.9 times the
    bytes written for a candidate half on disk (Linux 6.18, ext4). Counted by the kernel at
    dirtying time (``/proc/self/io``), so not a timing."""
    image = os.urandom(4 * MiB)
    layout = layout_of(image)
    _, sha = server.store_image(image)
    candidate = tmp_path / "c.bin"
    with candidate.open("wb") as f:  # the first half on disk, the rest a hole
        f.write(image[: len(image) // 2])
        f.truncate(len(image))
        os.fsync(f.fileno())
    events: list[ev.Event] = []
    ops = CountingOps()
    downloader = Downloader(Stopping(), ops, candidate, events.append, window=16)
    before = _write_bytes()
    await downloader.fetch(layout, f"{server.uri}/fota/img/{sha.hex()}", bitmap_new(layout.count))
    dirtied = _write_bytes() - before

    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    assert candidate.read_bytes() == image
    written = sum(n for _, n in ops.written)
    assert written == len(image) // 2  # the half on disk compared equal, not written
    # Slack for what else this process writes meanwhile (captured log lines).
    assert dirtied <= written * 1.2 + 256 * KiB, (dirtied, written)
