"""The fragment downloader: a child task of the engine that reports only through events.

Theory of operation:

* Before fetching, fragments the journal vouches for are re-read and re-hashed: bytes on disk
  are not trusted just because a record says so (a cheap read, once per download start).
* The remaining fragments are handed to the transport's :class:`~fota.transport.BlockFetcher`
  as byte ranges; blocks come back in any order and land in a per-fragment buffer at their
  offset. Memory is bounded by the fragments with blocks in flight, not by the image.
* Blocks go to the candidate as they arrive, a page (:data:`CHUNK`) at a time: a page is
  written with one ``pwrite`` once all its bytes are in the fragment's buffer, so each byte is
  written once and no page is dirtied twice. The buffer is kept for hashing: a complete
  fragment costs no second write.
* A complete fragment is hashed against its signed digest. Once ``fsync_every`` fragments'
  worth of bytes were written since the last sync (and at the end) the candidate is fsynced in
  a worker thread while blocks keep arriving, and only then is ``FragmentVerified`` emitted for
  the fragments it completed (write-ahead order: the journal marks a fragment after its bytes
  are durable). A fragment that fails its digest is asked for again, whole.
* Partial fragments survive a kill (issue 17 §6): when a sync is submitted, the pages written
  so far of the fragments still incomplete are noted (``partial``: a CBOR list of
  ``[offset, length]`` runs, at most :data:`MAX_RUNS`), and the ``FragmentVerified`` event
  emitted after that fsync carries the note to the journal, in the record write that happens
  anyway. No extra file, no extra fsync. A restart reads those runs back from the candidate
  into the fragment buffers and asks only for the rest; the fragment digest still decides (a
  fragment that fails after a resume is fetched again, whole).
* The sync is due on bytes written, not on fragments completed: completions alone would
  leave those pages unnoted for as long as a lost block waits for its retries while the window
  goes on (at 5 % loss a kill cost up to 2.2 fragments). Counting every page written, whether
  it completed a fragment or not, makes one sync (one fsync, one journal write) per
  ``fsync_every`` fragments' worth of bytes, lossy link or not. When no fragment completed
  since the last sync, the last fragment verified (by this run, or re-checked on disk before
  it) is vouched for again (``FragmentVerified`` repeats its index; the journal only marks it
  again) and the event carries the new note (``fota fetch`` passes ``noted`` and journals the
  note itself, also before any fragment is done).
  A kill then costs at most about that many pages, plus the blocks of pages a lost block
  leaves unfilled, plus what arrives during one fsync and journal write.
* Only fragment-level events reach the state machine, never one per block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cbor2
import structlog

from fota.core import events as ev
from fota.core.record import bitmap_get
from fota.core.text import show
from fota.errors import (
    DataBudgetExceeded,
    DiskFull,
    FotaError,
    ImageChanged,
    IntegrityError,
    NotEnoughSpace,
    StorageError,
)
from fota.fileops import FileOps
from fota.transport import Block, BlockFetcher

if TYPE_CHECKING:  # the fetch path must not import cryptography just for a type
    from fota.core.manifest import Manifest

log = structlog.get_logger(__name__)

FetcherFactory = Callable[..., BlockFetcher]
"""``factory(uri, window=W, block_size=N)``, e.g. ``Transport.block_fetcher``."""

FRAGMENT_TRIES = 3
"""Times one fragment may fail its digest in one download run before the run fails."""
UNIT = 16
"""Smallest CoAP block; received bytes are tracked in these units."""
CHUNK = 4096
"""Bytes written to the candidate at once (a page, aligned in the image): a page written
whole, once, is never dirtied twice (a 1 KiB write per block would rewrite a page that an
fsync cleaned in between)."""
ALIGN = 1024
"""Ranges asked for when a partial fragment resumes start and end on this boundary (or the
fragment's): every fetcher turns them into whole blocks (BERT over TCP counts in 1 KiB)."""
MAX_RUNS = 64
"""Most ``[offset, length]`` runs of partial fragments noted per snapshot (about 10 bytes
each: the journal record grows by at most ~700 bytes). The longest runs are kept; a run left
out is only fetched again."""

Runs = list[tuple[int, int]]
"""Byte runs ``(offset, length)`` of the image held in the candidate."""


def encode_runs(runs: Runs) -> bytes:
    """The ``partial`` note: a CBOR list of ``[offset, length]``, b"" for none.

    At most :data:`MAX_RUNS` runs, the longest ones (dropping a run is always safe).
    """
    if not runs:
        return b""
    if len(runs) > MAX_RUNS:
        runs = sorted(sorted(runs, key=lambda r: -r[1])[:MAX_RUNS])
    return cbor2.dumps([[offset, length] for offset, length in runs])


def decode_runs(data: bytes, layout: Layout) -> Runs:
    """The usable runs of a ``partial`` note; anything doubtful is left out (fetched again).

    A run must lie inside the image and start on a :data:`UNIT` boundary and end on one (or at
    the image's end); runs are cut at fragment boundaries. Never raises: a damaged note costs
    only a re-fetch.
    """
    if not data:
        return []
    try:
        items = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on damaged bytes
        log.warning("partial_runs_ignored", update_id=layout.update_id, error=str(exc))
        return []
    if not isinstance(items, list):
        return []
    runs: Runs = []
    for item in items[:MAX_RUNS]:
        if not (isinstance(item, list) and len(item) == 2):
            continue
        offset, length = item
        if type(offset) is not int or type(length) is not int:
            continue
        end = offset + length
        if offset < 0 or length <= 0 or end > layout.image_size or offset % UNIT:
            continue
        if end % UNIT and end != layout.image_size:
            continue
        while offset < end:  # one run per fragment it touches
            cut = min(end, (offset // layout.fragment_size + 1) * layout.fragment_size)
            runs.append((offset, cut - offset))
            offset = cut
    return runs


@dataclass(frozen=True, slots=True)
class Layout:
    """How an image is cut into fragments, and the digest each must match.

    Attributes:
        update_id: names the download in events and logs.
        image_size: bytes.
        fragment_size: bytes per fragment (a multiple of 1024; the last may be shorter).
        digests: SHA-256 of every fragment; None when there are none to check (``fota fetch``
            without a manifest: only the whole image's digest is checked, at the end).
    """

    update_id: str
    image_size: int
    fragment_size: int
    digests: tuple[bytes, ...] | None

    @classmethod
    def of(cls, manifest: Manifest) -> Layout:
        """The layout a signed manifest declares."""
        body = manifest.body
        return cls(manifest.update_id, body.image_size, body.fragment_size, body.fragment_sha256)

    @property
    def count(self) -> int:
        """Number of fragments."""
        return max(1, -(-self.image_size // self.fragment_size))

    def span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of fragment ``index``."""
        offset = index * self.fragment_size
        return offset, min(self.fragment_size, self.image_size - offset)

    def matches(self, index: int, data: bytes | bytearray) -> bool:
        """Whether fragment ``index`` has the signed digest (always, without digests)."""
        return self.digests is None or hashlib.sha256(data).digest() == self.digests[index]


def _recheck(fd: int, layout: Layout, verified: bytes) -> list[int]:
    bad = []
    for index in range(layout.count):
        if not bitmap_get(verified, index):
            continue
        offset, length = layout.span(index)
        if not layout.matches(index, os.pread(fd, length, offset)):
            bad.append(index)
    return bad


class _Assembly:
    """Puts blocks into fragment buffers, writes whole pages, verifies and syncs fragments."""

    def __init__(
        self,
        layout: Layout,
        fd: int,
        ops: FileOps,
        emit: Callable[[ev.Event], None],
        fetcher: BlockFetcher,
        wanted: list[int],
        fsync_every: int,
        budget: tuple[int, int] | None = None,
        align: int = ALIGN,
        noted: Callable[[bytes], None] | None = None,
        vouched: int | None = None,
        compare: bool = False,
    ) -> None:
        self.m = layout
        # A run that starts with bytes in the candidate (a restart) reads each page before
        # writing it: one a killed run wrote but never noted is fetched again but not
        # written again (at 5 % loss, 10 kills in 10 MiB rewrote about 0.06 of the image).
        self.compare = compare
        self.noted = noted
        self.budget = budget
        self.total = 0  # bytes received in this run (duplicates and corrupt blocks too)
        self.fd = fd
        self.ops = ops
        self.emit = emit
        self.fetcher = fetcher
        self.wanted = set(wanted)
        self.fsync_every = max(1, fsync_every)
        self.size = layout.image_size
        self.frag = layout.fragment_size
        self.align = max(ALIGN, align)
        self.buffers: dict[int, bytearray] = {}
        self.masks: dict[int, bytearray] = {}  # per UNIT: received
        self.pages: dict[int, bytearray] = {}  # per CHUNK of the fragment: written
        self.missing: dict[int, int] = {}  # units of 16 bytes still missing per fragment
        self.tries: dict[int, int] = {}
        self.unsynced: list[tuple[int, int]] = []  # (fragment, bytes received for it)
        self.received = 0  # bytes received and not yet reported in an event
        self.resumed = 0  # bytes of partial fragments read back from the candidate
        self.sync_error: OSError | None = None
        self.syncs: list[concurrent.futures.Future[None]] = []
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fota-fsync")
        self.etag: bytes | None = None
        self.loop = asyncio.get_running_loop()
        self.stopped_partial = b""  # the note of a sync after the transfer stopped early
        self.unsynced_bytes = 0  # bytes of pages written since the last sync was submitted
        # Each sync costs an fsync and a journal write (a 4 KiB block at least): one per
        # fsync_every fragments' worth of bytes written. Before (a sync per completed fragment
        # and another per fragment's worth of pages of incomplete ones) `fota run` wrote 1.110
        # bytes per image byte at 5 % loss (`bench/resume.py`, no kills).
        self.sync_after = self.frag * self.fsync_every
        # The last fragment verified and synced (by this run, or checked on disk before it).
        self.vouched = vouched

    def plan(self) -> Iterator[tuple[int, int]]:
        for index in sorted(self.wanted):
            if index not in self.wanted:
                continue  # completed meanwhile (a large BERT block brought it)
            mask = self.masks.get(index)
            if mask is None:
                yield self.m.span(index)
                continue
            # A resumed partial fragment: only its holes, widened to whole blocks.
            start, length = self.m.span(index)
            end = start + length
            wide: list[tuple[int, int]] = []
            for lo, hi in _holes(mask):
                a = start + (lo * UNIT) // self.align * self.align
                b = min(end, start + -(-(hi * UNIT) // self.align) * self.align)
                if wide and a <= wide[-1][1]:
                    wide[-1] = (wide[-1][0], max(b, wide[-1][1]))  # one block, asked once
                else:
                    wide.append((a, b))
            for a, b in wide:
                yield a, b - a

    def _buffer(self, index: int) -> tuple[bytearray, bytearray, int]:
        start, length = self.m.span(index)
        buffer = self.buffers.get(index)
        if buffer is None:
            buffer = self.buffers[index] = bytearray(length)
            self.masks[index] = bytearray((length + UNIT - 1) // UNIT)
            self.pages[index] = bytearray(self._page_count(start, length))
            self.missing[index] = len(self.masks[index])
        return buffer, self.masks[index], start

    @staticmethod
    def _page_count(start: int, length: int) -> int:
        return (start + length - 1) // CHUNK - start // CHUNK + 1

    @staticmethod
    def _page_bounds(start: int, length: int, k: int) -> tuple[int, int]:
        """Fragment-relative ``[a, b)`` of the fragment's ``k``-th page (cut to the fragment)."""
        page = start // CHUNK + k
        return max(page * CHUNK, start) - start, min((page + 1) * CHUNK - start, length)

    @staticmethod
    def _filled(mask: bytearray, a: int, b: int) -> bool:
        """Every byte of ``[a, b)`` is in the buffer (``mask`` counts :data:`UNIT` s)."""
        return 0 not in mask[a // UNIT : (b + UNIT - 1) // UNIT]

    def resume(self, runs: Runs) -> None:
        """Read runs of partial fragments back from the candidate (a worker thread's job).

        Only fragments still wanted take them; their pages count as written. A fragment that
        the runs complete is checked at once, like one whose last block just came.
        """
        for offset, length in runs:
            index = offset // self.frag
            if index not in self.wanted:
                continue
            data = os.pread(self.fd, length, offset)
            if len(data) != length:
                continue  # a candidate shorter than the note: fetch it again
            buffer, mask, start = self._buffer(index)
            rel = offset - start
            first, last = rel // UNIT, (rel + length + UNIT - 1) // UNIT
            new = mask.count(0, first, last)
            if not new:
                continue
            buffer[rel : rel + length] = data
            mask[first:last] = b"\x01" * (last - first)
            self.missing[index] -= new
            self.resumed += length
        for index, pages in self.pages.items():
            # A page all of whose bytes came from the runs is on disk; one they cover in part
            # is written (again, with the same bytes) when it fills.
            start, length = self.m.span(index)
            mask = self.masks[index]
            for k in range(len(pages)):
                pages[k] = self._filled(mask, *self._page_bounds(start, length, k))
        for index in [i for i, m in self.missing.items() if m == 0]:
            self._complete(index, self.m.span(index)[0])
        if self.unsynced_bytes >= self.sync_after:
            self.note()

    def on_block(self, block: Block) -> None:
        if block.size2 is not None and block.size2 != self.size:
            # show(): a fetcher that does not bound Size2 could hand over a 5000-digit one.
            raise ImageChanged(
                f"Size2 {show(block.size2)} differs from the manifest's image_size {self.size}"
            )
        if block.etag is not None and block.etag != self.etag:
            if self.etag is not None:
                # Only a hint: some servers (libcoap's among them) change it every transfer.
                log.info("etag_changed", update_id=self.m.update_id, offset=block.offset)
            self.etag = block.etag
        if self.sync_error is not None:
            raise storage_error(f"candidate fsync failed: {self.sync_error}", self.sync_error)
        offset, data = block.offset, block.data
        self.received += len(data)
        self.total += len(data)
        if self.budget is not None and self.budget[0] + self.total > self.budget[1]:
            # Stop asking now; the window fetcher would go on while the verified fragments'
            # events are still on their way to the core.
            raise DataBudgetExceeded(
                f"{self.budget[0] + self.total} bytes received, over the budget of {self.budget[1]}"
            )
        if offset >= self.size:
            return
        data = data[: self.size - offset]
        if not data:
            raise IntegrityError(f"image ends at byte {offset}; the manifest says {self.size}")
        if not block.more and offset + len(data) < self.size:
            raise IntegrityError(
                f"image ends at byte {offset + len(data)}; the manifest says {self.size}"
            )
        # A large block (BERT) may span fragments: hand each fragment its part.
        view = memoryview(data)
        while view:
            cut = self.frag - offset % self.frag
            self._piece(offset, view[:cut])
            offset, view = offset + cut, view[cut:]

    def _piece(self, offset: int, data: memoryview | bytes) -> None:
        index = offset // self.frag
        if index not in self.wanted:
            return  # a late duplicate of a fragment already done
        buffer, mask, start = self._buffer(index)
        rel = offset - start
        # Track 16-byte units, so duplicates and blocks of a changed size count exactly once.
        first, last = rel // UNIT, (rel + len(data) + UNIT - 1) // UNIT
        new = mask.count(0, first, last)
        if not new:
            return
        buffer[rel : rel + len(data)] = data
        mask[first:last] = b"\x01" * (last - first)
        self.missing[index] -= new
        if self.missing[index] == 0:
            self._complete(index, start)
        else:
            self._write_pages(index, start, offset, offset + len(data))
        if self.unsynced_bytes >= self.sync_after:
            self.note()

    def _write_pages(self, index: int, start: int, lo: int, hi: int) -> None:
        """Write the pages of ``[lo, hi)`` whose bytes are all in the buffer, once each."""
        buffer, mask, pages = self.buffers[index], self.masks[index], self.pages[index]
        base = start // CHUNK
        for k in range(lo // CHUNK - base, (hi - 1) // CHUNK - base + 1):
            if pages[k]:
                continue
            a, b = self._page_bounds(start, len(buffer), k)
            if not self._filled(mask, a, b):
                continue
            try:
                data = bytes(buffer[a:b])
                if not (self.compare and os.pread(self.fd, b - a, start + a) == data):
                    self.ops.pwrite(self.fd, data, start + a)
            except OSError as exc:
                raise storage_error(f"candidate: {exc}", exc) from exc
            pages[k] = 1
            self.unsynced_bytes += b - a

    def _complete(self, index: int, start: int) -> None:
        buffer = self.buffers[index]
        ok = self.m.matches(index, buffer)
        if ok:
            # The pages still unwritten, the last one among them, go only after the digest
            # matched: a fragment that fits one page never reaches the disk when corrupt.
            self._write_pages(index, start, start, start + len(buffer))
        del self.buffers[index], self.masks[index], self.missing[index], self.pages[index]
        if not ok:
            tries = self.tries[index] = self.tries.get(index, 0) + 1
            log.warning("fragment_corrupt", update_id=self.m.update_id, fragment=index, tries=tries)
            if tries >= FRAGMENT_TRIES:
                raise IntegrityError(f"fragment {index} failed its digest {tries} times in a row")
            self.fetcher.want(start, len(buffer))
            return
        self.wanted.discard(index)
        self.vouched = index
        self.unsynced.append((index, self.received))
        self.received = 0

    def partial(self) -> bytes:
        """The note of the pages written so far of the fragments still incomplete.

        Called where the pages are written (the transfer's thread) before the fsync that
        will cover them is submitted: every run it names is durable once that fsync is done.
        """
        runs: Runs = []
        for index, pages in self.pages.items():
            start, length = self.m.span(index)
            page = 0
            while page < len(pages):
                if not pages[page]:
                    page += 1
                    continue
                first = page
                while page < len(pages) and pages[page]:
                    page += 1
                lo = self._page_bounds(start, length, first)[0]
                hi = self._page_bounds(start, length, page - 1)[1]
                runs.append((start + lo, hi - lo))
        return encode_runs(sorted(runs))

    def sync(self) -> None:
        """Sync the candidate in the sync thread, then vouch for the fragments it covered.

        One sync thread per download keeps the syncs, and so the events, in order; the
        transfer goes on meanwhile. The events carry the note of the partial fragments
        taken now, which the same fsync makes durable.
        """
        if not self.unsynced:
            return
        covered, self.unsynced = self.unsynced, []
        self.unsynced_bytes = 0
        self._submit(covered)

    def note(self) -> None:
        """The sync due once ``fsync_every`` fragments' worth of bytes were written.

        With fragments waiting to be synced it is their sync. With a ``noted`` callback, it is
        called (on the event loop) with the note after the fsync. Otherwise the last fragment
        verified (by this run, or re-checked on disk before it started) is vouched for again
        after the fsync, its event carrying the new note (and the bytes received since the last
        event); with none verified yet, nothing can carry a note and the pages wait for the
        first completion.
        """
        if self.unsynced:
            self.sync()
            return
        covered: list[tuple[int, int]] = []
        if self.noted is None:
            if self.vouched is None:
                return
            covered, self.received = [(self.vouched, self.received)], 0
        self.unsynced_bytes = 0
        self._submit(covered)

    def _submit(self, covered: list[tuple[int, int]]) -> None:
        # Syncs that ended well are forgotten (the list stays as short as the syncs in
        # progress); a failed one stays for finish() to raise.
        self.syncs = [f for f in self.syncs if not f.done() or f.exception() is not None]
        self.syncs.append(self.executor.submit(self._sync_and_vouch, covered, self.partial()))

    def _sync_and_vouch(self, covered: list[tuple[int, int]], partial: bytes) -> None:
        if self.sync_error is not None:
            return  # after a failed fsync nothing is vouched for (Linux may forget the error)
        try:
            self.ops.fsync(self.fd)
        except OSError as exc:
            self.sync_error = exc
            raise
        if covered:
            # One event per fsync: the journal writes once for all the fragments it covered.
            *also, (index, _) = covered
            fetched = sum(n for _, n in covered)
            event = ev.FragmentVerified(
                self.m.update_id, index, fetched, partial, tuple(i for i, _ in also)
            )
            self.loop.call_soon_threadsafe(self.emit, event)
        elif self.noted is not None:
            self.loop.call_soon_threadsafe(self.noted, partial)

    def _sync_partial(self, partial: bytes) -> None:
        if self.sync_error is None:
            self.ops.fsync(self.fd)
            self.stopped_partial = partial

    async def finish(self, stopped: bool = False) -> None:
        """Sync what is left and wait for every sync (its error, if any, is raised).

        ``stopped``: the transfer ended early (an error or a cancellation); the pages of the
        partial fragments are synced too and their note kept in :attr:`stopped_partial`.
        """
        try:
            self.sync()
            if stopped and self.pages:
                self.syncs.append(self.executor.submit(self._sync_partial, self.partial()))
            for future in self.syncs:
                await asyncio.wrap_future(future)
        finally:
            self.executor.shutdown(wait=True)


def _holes(mask: bytearray) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` unit ranges of ``mask`` that are still 0."""
    at, count = 0, len(mask)
    while at < count:
        lo = mask.find(0, at)
        if lo < 0:
            return
        hi = mask.find(1, lo)
        hi = count if hi < 0 else hi
        yield lo, hi
        at = hi


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Errors of a full file system (or quota): the download pauses until there is room."""


def no_readahead(fd: int) -> None:
    """Read only the pages asked for from the candidate, none ahead of them.

    Readahead fills the page cache ahead of a read with large folios (up to the device's
    ``read_ahead_kb``, 8 MiB here), the holes of a sparse candidate included. A page written
    later into such a folio dirties all of it, and writeback writes all of it: a restart's
    re-checks and page comparisons made the candidate's writes 3 to 9 times its bytes
    (``/proc/<pid>/io`` ``write_bytes``, Linux 6.18, ext4). Without readahead the cache holds
    the pages read, and a 4 KiB write dirties 4 KiB.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # only advice: a file system may not take it
            advise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def storage_error(message: str, exc: OSError) -> StorageError:
    """The fota error for a failed candidate write: :class:`DiskFull` when the disk is full."""
    return DiskFull(message) if exc.errno in NO_SPACE else StorageError(message)


def available_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write in the file system holding ``path``.

    ``f_bavail``, not ``f_bfree``: the blocks reserved for root are not ours to fill, even
    when fota runs as root (the system needs them when the disk is full).
    """
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Downloader:
    """Fetches the missing fragments of one update into the candidate file.

    Args:
        fetchers: makes the block fetcher for an image URI (``Transport.block_fetcher``).
        ops: file operations (shared with the journal so tests see one ordered log).
        candidate: path of the candidate file.
        emit: puts an event into the engine's inbox.
        block_size: CoAP block size asked for (the server may answer smaller).
        window: most block requests in flight.
        fsync_every: fsync the candidate every this many fragments' worth of bytes written
            (and at the end); each fsync is one ``FragmentVerified`` for what it covered.
        free_space: bytes free for an unprivileged writer in the file system holding a path
            (injectable: tests, or a device whose storage needs its own probe).
        reserve: bytes that must stay free after the image (logs, the journal, the OS).
        noted: called on the event loop with a note of partial fragments made durable by a
            sync that vouched for no fragment (``fota fetch`` journals it; without it such a
            note rides on a repeated ``FragmentVerified`` of the last fragment verified).
    """

    def __init__(
        self,
        fetchers: FetcherFactory,
        ops: FileOps,
        candidate: Path,
        emit: Callable[[ev.Event], None],
        *,
        block_size: int = 1024,
        window: int = 8,
        fsync_every: int = 1,
        free_space: Callable[[Path], int] | None = None,
        reserve: int = 0,
        noted: Callable[[bytes], None] | None = None,
    ) -> None:
        self.noted = noted
        self.free_space = free_space or available_bytes
        self.reserve = reserve
        self.fetchers = fetchers
        self.ops = ops
        self.candidate = candidate
        self.emit = emit
        self.block_size = block_size
        self.window = window
        self.fsync_every = fsync_every
        self.unreported = 0
        self.resumed = 0
        """Bytes of partial fragments the last run read back from the candidate."""
        self.stopped_partial = b""
        """The ``partial`` note of the last run if it stopped early (error or cancellation),
        taken after a final fsync; b"" otherwise. ``fota fetch`` keeps it in its state."""

    async def run(
        self,
        manifest: Manifest,
        image_uri: str,
        verified: bytes,
        *,
        partial: bytes = b"",
        budget: tuple[int, int] | None = None,
    ) -> None:
        """Download until every fragment is verified; report the outcome as an event.

        Args:
            manifest: the update's manifest.
            image_uri: the resolved image URI.
            verified: the bitmap of fragments already verified.
            partial: the journal's note of the pages of partial fragments already in the
                candidate (``FragmentVerified.partial``); they are read back, not fetched.
            budget: ``(bytes received before this run, the data budget)``: the run stops
                itself once it is over (DATA_BUDGET_EXCEEDED), rather than leave the check to
                the core, which hears of bytes only per verified fragment, later.
        """
        await self.fetch(Layout.of(manifest), image_uri, verified, partial=partial, budget=budget)

    async def fetch(
        self,
        layout: Layout,
        image_uri: str,
        verified: bytes,
        *,
        partial: bytes = b"",
        budget: tuple[int, int] | None = None,
    ) -> None:
        """Download ``layout``'s missing fragments; report the outcome as an event."""
        uid = layout.update_id
        self.unreported = 0
        self.resumed = 0
        self.stopped_partial = b""
        try:
            await self._run(layout, image_uri, verified, partial, budget)
        except asyncio.CancelledError:
            raise
        except FotaError as exc:
            if isinstance(exc, DiskFull):  # the download pauses (the core decides); say why
                log.warning("candidate_disk_full", update_id=uid, error=str(exc))
            self.emit(ev.DownloadFailed(uid, exc, self.unreported))
        except OSError as exc:  # the candidate file could not be written (disk full, I/O error)
            full = exc.errno in NO_SPACE
            (log.warning if full else log.error)(
                "candidate_disk_full" if full else "candidate_write_failed",
                update_id=uid,
                error=str(exc),
            )
            error = storage_error(f"candidate {self.candidate}: {exc}", exc)
            self.emit(ev.DownloadFailed(uid, error, self.unreported))
        else:
            self.emit(ev.DownloadFinished(uid, self.unreported))

    def _check_space(self, layout: Layout, todo: list[int]) -> None:
        """Refuse to start a download the file system cannot hold.

        The candidate is sparse: only the fragments still to come take new space.
        """
        needed = sum(layout.span(i)[1] for i in todo)
        try:
            free = self.free_space(self.candidate.parent)
        except OSError as exc:
            raise StorageError(f"free space of {self.candidate.parent}: {exc}") from exc
        if free - self.reserve < needed:
            raise NotEnoughSpace(
                f"image needs {needed} more bytes; {free} free in {self.candidate.parent}, "
                f"{self.reserve} of them reserved (min_free_space)"
            )

    async def _run(
        self,
        layout: Layout,
        image_uri: str,
        verified: bytes,
        partial: bytes,
        budget: tuple[int, int] | None,
    ) -> None:
        uid = layout.update_id
        fd = self.ops.open(self.candidate, os.O_RDWR | os.O_CREAT)
        try:
            no_readahead(fd)
            restart = os.fstat(fd).st_size > 0  # pages may be on disk already
            # Exactly the image's size: stale bytes of an older candidate must not linger.
            os.ftruncate(fd, layout.image_size)
            bad = await asyncio.to_thread(_recheck, fd, layout, verified)
            if bad:
                log.warning("fragments_invalid_on_disk", update_id=uid, fragments=bad)
                self.emit(ev.FragmentsInvalid(uid, tuple(bad)))
            todo = [i for i in range(layout.count) if not bitmap_get(verified, i) or i in bad]
            log.debug("download_started", update_id=uid, fragments=len(todo), uri=image_uri)
            if not todo:
                return
            self._check_space(layout, todo)
            fetcher = self.fetchers(image_uri, window=self.window, block_size=self.block_size)
            # A fragment re-checked on disk above can carry notes before this run completes
            # one (a run killed again soon after its restart).
            held = (i for i in range(layout.count - 1, -1, -1) if bitmap_get(verified, i))
            checked = next((i for i in held if i not in bad), None)
            assembly = _Assembly(
                layout,
                fd,
                self.ops,
                self.emit,
                fetcher,
                todo,
                self.fsync_every,
                budget,
                self.block_size,
                self.noted,
                checked,
                restart,
            )
            runs = decode_runs(partial, layout)
            if runs:
                await asyncio.to_thread(assembly.resume, runs)
                self.resumed = assembly.resumed
                log.debug("partial_fragments_resumed", update_id=uid, bytes=assembly.resumed)
            stopped = True
            try:
                await fetcher.run(assembly.plan(), assembly.on_block)
                stopped = False
            finally:
                try:
                    await assembly.finish(stopped)
                finally:
                    # Bytes of fragments never completed still count against the data budget.
                    self.unreported = assembly.received
                    self.stopped_partial = assembly.stopped_partial
            if assembly.wanted:
                raise IntegrityError(
                    f"server ended the transfer with {len(assembly.wanted)} fragments missing"
                )
        finally:
            self.ops.close(fd)
