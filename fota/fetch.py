"""``fota fetch``: the image downloader on its own, resumable and verified.

Like ``coap-client-notls -o FILE URI``, but the transfer survives a kill: fragments that were
written and fsynced are recorded in a small journal beside the output (``FILE.fota-fetch``,
written atomically after the fsync that covers them), with the pages of the fragments still
incomplete that the same fsync covered (``partial``, as in the client's journal; also after a
sync the downloader makes once a fragment's worth of such pages is written with no fragment
done), and a second run with the same URI fetches only the rest. The bytes go to
``FILE.part`` and become ``FILE`` only after the whole image's SHA-256 was computed (and
matched ``--sha256`` when given).

A resumed run asks for no probe first: the whole window starts at once with the size the
journal holds. The first answers decide whether it is the same resource: a ``Size2`` that
differs, or a block the journal vouched for (the *witness*, asked for first) that now holds
other bytes, drops the journal and starts over. The ETag is not enough for that: libcoap's
server (4.3) gives every client session a new one (1, 2, 3 ...), so a changed ETag is only
logged, and an equal one proves nothing either.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cbor2
import structlog

from fota.core import events as ev
from fota.core.record import bitmap_get, bitmap_new, bitmap_set
from fota.download import Downloader, Layout, decode_runs, no_readahead
from fota.errors import FotaError, ImageChanged, IntegrityError, JournalError, TransportError
from fota.fileops import FileOps, sha256_prefix
from fota.statedir import lock_file
from fota.transport import Block, BlockFetcher
from fota.transport.image import ImageSettings, image_fetcher

log = structlog.get_logger(__name__)

LOCK_SUFFIX = ".fota-fetch.lock"
"""The lock beside the output: ``FILE.fota-fetch.lock`` (left in place; it holds a PID)."""

FRAGMENT = 256 * 1024
"""Journal granularity: one small atomic journal write per 256 KiB keeps write
amplification near 1 + 4 KiB / 256 KiB (a journal write costs a 4 KiB block)."""


@dataclass(slots=True)
class FetchResult:
    """What a fetch did."""

    size: int
    sha256: bytes
    resumed_fragments: int


class SavedStateStale(ImageChanged):
    """The resource behind the URI is not the one a previous fetch's journal describes."""


@dataclass(slots=True)
class _State:
    """What ``FILE.fota-fetch`` holds: the resource, and which of its bytes are durable."""

    uri: str
    size: int
    etag: bytes | None
    done: bytes
    partial: bytes = b""

    def to_cbor(self) -> bytes:
        return cbor2.dumps(
            {
                "uri": self.uri,
                "size": self.size,
                "etag": self.etag,
                "done": self.done,
                "partial": self.partial,
            }
        )


def _load_state(path: Path, uri: str) -> _State | None:
    """A previous run's journal, if it fetched the same URI (None: start afresh).

    A journal of an older version has no ``partial``: its fragments still count.
    """
    try:
        state = cbor2.loads(path.read_bytes())
        size, etag, done = state["size"], state.get("etag"), state["done"]
        partial = state.get("partial", b"")
        if state["uri"] != uri:
            return None
        if type(size) is not int or size <= 0 or not isinstance(done, bytes):
            raise ValueError("size or done of the wrong type")
        if etag is not None and not isinstance(etag, bytes):
            raise ValueError("etag of the wrong type")
        if not isinstance(partial, bytes):
            partial = b""
        if len(done) != len(bitmap_new(Layout("fetch", size, FRAGMENT, None).count)):
            raise ValueError(f"done has {len(done)} bytes for {size} bytes of image")
        return _State(uri, size, etag, bytes(done), partial)
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged journal only costs a fresh download
        log.warning("fetch_journal_ignored", path=str(path), error=str(exc))
    return None


def _witness(state: _State, layout: Layout, block_size: int) -> int | None:
    """Offset of one block the journal vouches for (the last one held), None: no such block."""
    held = decode_runs(state.partial, layout)
    for index in range(layout.count):
        if bitmap_get(state.done, index):
            held.append(layout.span(index))
    best = None
    for offset, length in held:
        first = -(-offset // block_size) * block_size
        last = (offset + length) // block_size * block_size - block_size
        if last >= first and (best is None or last > best):
            best = last
    return best


class _Checked:
    """A block fetcher that asks for the witness first and checks the first answers.

    Raises :class:`SavedStateStale` from ``on_block`` (before the block reaches the
    candidate) when an answer's Size2 is not the journal's, or the witness came back with
    other bytes than the candidate holds.
    """

    def __init__(
        self, inner: BlockFetcher, state: _State, witness: int | None, expected: bytes
    ) -> None:
        self.inner = inner
        self.state = state
        self.witness = witness
        self.expected = expected
        self.seen = False

    def want(self, offset: int, length: int) -> None:
        self.inner.want(offset, length)

    async def run(self, plan: Iterator[tuple[int, int]], on_block: Callable[[Block], None]) -> None:
        if self.witness is not None:
            self.inner.want(self.witness, len(self.expected))

        def check(block: Block) -> None:
            if block.size2 is not None and block.size2 != self.state.size:
                raise SavedStateStale(
                    f"{self.state.uri}: Size2 {block.size2} is not the {self.state.size}"
                    " bytes of the previous fetch"
                )
            if not self.seen:
                self.seen = True
                if block.etag != self.state.etag:
                    log.info(
                        "fetch_etag_changed",
                        uri=self.state.uri,
                        stored=(self.state.etag or b"").hex(),
                        now=(block.etag or b"").hex(),
                    )
            w = self.witness
            if w is not None and block.offset <= w < block.offset + len(block.data):
                self.witness = None
                got = block.data[w - block.offset : w - block.offset + len(self.expected)]
                if got != self.expected[: len(got)]:
                    raise SavedStateStale(
                        f"{self.state.uri}: byte {w} on the server is not what the previous"
                        " fetch wrote there"
                    )
            on_block(block)

        await self.inner.run(plan, check)


async def fetch(
    uri: str,
    out: Path,
    *,
    sha256: bytes | None = None,
    window: int = 16,
    block_size: int = 1024,
    ack_timeout: float = 2.0,
    max_retransmit: int = 4,
    fsync_every: int = 1,
    oscore: Path | None = None,
    retransmission: str = "cocoa",
    congestion: str = "aimd",
    min_rto: float = 0.2,
    restart: bool = False,
) -> FetchResult:
    """Download ``uri`` to ``out``, resuming a previous run; verify the SHA-256 if given.

    With ``oscore`` (a security context directory, ``fota.transport.oscore``) every request
    is OSCORE-protected and goes through aiocoap, ``window`` at a time. With ``restart`` a
    previous partial fetch of ``out`` is forgotten first (``--restart``).

    Raises:
        FotaError: transport errors, a server refusal, or a digest mismatch (IntegrityError).
        StateDirLocked: another ``fota fetch`` is writing ``out`` (it holds
            ``FILE.fota-fetch.lock``); the message names ``out`` and its PID.
    """
    out = Path(out)
    journal = out.with_name(out.name + ".fota-fetch")
    candidate = out.with_name(out.name + ".part")
    ops = FileOps()
    # One fetch per output (issue 17 §1): two would write the same .part and journal. Taken
    # before the state is read; the kernel releases it when this process dies.
    lock = lock_file(out.parent, out.name + LOCK_SUFFIX, out)
    try:
        if restart:
            remove_leftovers(out)  # under the lock: never another fetch's file
        return await _fetch(
            uri,
            out,
            journal,
            candidate,
            ops,
            sha256=sha256,
            window=window,
            block_size=block_size,
            ack_timeout=ack_timeout,
            max_retransmit=max_retransmit,
            fsync_every=fsync_every,
            oscore=oscore,
            retransmission=retransmission,
            congestion=congestion,
            min_rto=min_rto,
        )
    finally:
        lock.release()


async def _fetch(
    uri: str,
    out: Path,
    journal: Path,
    candidate: Path,
    ops: FileOps,
    *,
    sha256: bytes | None,
    window: int,
    block_size: int,
    ack_timeout: float,
    max_retransmit: int,
    fsync_every: int,
    oscore: Path | None,
    retransmission: str,
    congestion: str,
    min_rto: float,
) -> FetchResult:

    secured = None
    if oscore is not None:
        from fota.transport.coap import CoapTransport

        parts = urlsplit(uri)
        secured = CoapTransport(
            f"{parts.scheme}://{parts.netloc}",
            "fetch",
            ack_timeout=ack_timeout,
            max_retransmit=max_retransmit,
            oscore=oscore,
        )

    settings = ImageSettings(ack_timeout, max_retransmit, retransmission, congestion, min_rto)

    def fetchers(uri: str, *, window: int, block_size: int) -> BlockFetcher:
        return image_fetcher(
            uri, window=window, block_size=block_size, settings=settings, secured=secured
        )

    try:
        state = _load_state(journal, uri)
        while True:
            if state is None:
                state = await _probe(uri, fetchers, block_size)
                checked = None
            else:
                checked = _checker(state, candidate, block_size)
            try:
                return await _transfer(
                    uri,
                    out,
                    journal,
                    candidate,
                    ops,
                    state,
                    fetchers,
                    checked,
                    sha256=sha256,
                    window=window,
                    block_size=block_size,
                    fsync_every=fsync_every,
                )
            except ImageChanged as exc:
                if checked is None:
                    raise  # a fresh download: the caller's next attempt starts over
                # The journal described another resource: forget it, and fetch afresh.
                log.warning("fetch_journal_dropped", uri=uri, reason=str(exc))
                ops.unlink(journal)
                ops.unlink(candidate)
                state = None
    except OSError as exc:
        raise JournalError(f"{out}: {exc}") from exc
    finally:
        if secured is not None:
            await secured.aclose()


Fetchers = Callable[..., BlockFetcher]


async def _probe(uri: str, fetchers: Fetchers, block_size: int) -> _State:
    """A fresh start: one block first, for Size2 (the download is planned in fragments)."""
    blocks: list[Block] = []
    await fetchers(uri, window=1, block_size=block_size).run(iter([(0, block_size)]), blocks.append)
    first = blocks[0]
    if first.size2 is not None:
        size = first.size2
    elif not first.more:
        size = len(first.data)
    else:
        raise TransportError(f"{uri}: the server sent no Size2; cannot plan the download")
    layout = Layout("fetch", size, FRAGMENT, None)
    return _State(uri, size, first.etag, bitmap_new(layout.count))


def _checker(state: _State, candidate: Path, block_size: int) -> Callable[[BlockFetcher], _Checked]:
    """Wraps the resumed run's fetcher in the checks of its first answers."""
    layout = Layout("fetch", state.size, FRAGMENT, None)
    witness = _witness(state, layout, block_size)
    expected = b""
    if witness is not None:
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            # The bytes the journal names are gone: nothing of it holds.
            state.done, state.partial, witness = bitmap_new(layout.count), b"", None
        else:
            try:
                no_readahead(fd)  # the pages after it are about to be written
                expected = os.pread(fd, block_size, witness)
            finally:
                os.close(fd)
            if len(expected) != block_size:
                state.done, state.partial, witness = bitmap_new(layout.count), b"", None
    return lambda inner: _Checked(inner, state, witness, expected)


async def _transfer(
    uri: str,
    out: Path,
    journal: Path,
    candidate: Path,
    ops: FileOps,
    state: _State,
    fetchers: Fetchers,
    checked: Callable[[BlockFetcher], _Checked] | None,
    *,
    sha256: bytes | None,
    window: int,
    block_size: int,
    fsync_every: int,
) -> FetchResult:
    size = state.size
    layout = Layout("fetch", size, FRAGMENT, None)
    resumed = sum(bin(b).count("1") for b in state.done)
    failure: list[FotaError] = []
    partial, state.partial = state.partial, b""  # named once, to the downloader

    def emit(event: ev.Event) -> None:
        if isinstance(event, ev.FragmentVerified):
            for index in event.indexes:
                state.done = bitmap_set(state.done, index)
            # After the fsync that covered the fragment and the partial pages: the journal
            # may vouch for them now.
            state.partial = event.partial
            ops.write_atomic(journal, state.to_cbor())
        elif isinstance(event, ev.DownloadFailed):
            failure.append(event.error)

    def noted(partial: bytes) -> None:
        # After a sync that covered pages of incomplete fragments only (no fragment done
        # since the last one): the journal may name them now. A failed write costs only
        # their re-fetch after a kill (the next write tries again).
        state.partial = partial
        try:
            ops.write_atomic(journal, state.to_cbor())
        except OSError as exc:
            log.warning("fetch_journal_write_failed", path=str(journal), error=str(exc))

    def make(uri: str, *, window: int, block_size: int) -> BlockFetcher:
        inner = fetchers(uri, window=window, block_size=block_size)
        return inner if checked is None else checked(inner)

    downloader = Downloader(
        make,
        ops,
        candidate,
        emit,
        block_size=block_size,
        window=window,
        fsync_every=fsync_every,
        noted=noted,
    )
    try:
        await downloader.fetch(layout, uri, state.done, partial=partial)
    finally:
        if downloader.stopped_partial and not isinstance(
            failure[0] if failure else None, ImageChanged
        ):
            # Stopped early (an error, Ctrl-C): the pages of the partial fragments were
            # fsynced after the transfer stopped; keep them for the next run.
            state.partial = downloader.stopped_partial
            ops.write_atomic(journal, state.to_cbor())
    if failure:
        raise failure[0]
    digest = await asyncio.to_thread(sha256_prefix, candidate, size)
    if sha256 is not None and digest != sha256:
        ops.unlink(candidate)
        ops.unlink(journal)
        raise IntegrityError(f"{uri}: SHA-256 {digest.hex()} is not the expected {sha256.hex()}")
    ops.replace(candidate, out)
    ops.fsync_dir(out.parent)
    ops.unlink(journal)
    return FetchResult(size, digest, resumed)


def remove_leftovers(out: Path) -> None:
    """Forget a previous partial fetch of ``out`` (the ``--restart`` option)."""
    for suffix in (".fota-fetch", ".part"):
        path = out.with_name(out.name + suffix)
        if path.exists():
            os.unlink(path)
