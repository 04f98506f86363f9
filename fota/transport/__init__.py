"""The transport seam: what the engine needs from the network, as a Protocol.

``fota.transport.coap.CoapTransport`` implements it with aiocoap. Errors are always
:class:`~fota.errors.FotaError` subclasses (``TransportError``, ``PermanentServerError``,
``ImageChanged``); no aiocoap exception crosses this line.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from fota.core import codes
from fota.core.uri import path_segments
from fota.errors import ImageChanged, PermanentServerError, ResourceMissing, TransportError

if TYPE_CHECKING:
    # Not at run time: `fota fetch` imports this module and must stay light (no cryptography).
    from fota.core.announce_sig import Envelope


@dataclass(frozen=True, slots=True)
class Announcement:
    """A decoded announcement; ``manifest_uri`` is already resolved to an absolute URI.

    Attributes:
        sequence: the announcement's sequence number (0: nothing announced).
        manifest_digest: SHA-256 of the announced manifest, if one is announced.
        manifest_uri: where to fetch it, if one is announced.
        cancel: SHA-256 of a manifest the server withdraws (key 4); an announcement may
            carry only a cancel.
        keyset_version: version of the server's current keyset (key 5), if it has one.
        keyset_uri: where to fetch it (key 6, resolved).
        signed: the envelope of a signed announcement (its signature and expiry are checked
            by the engine, ``fota.core.announce_sig.check``); None: it came unsigned.
    """

    sequence: int
    manifest_digest: bytes | None
    manifest_uri: str | None
    cancel: bytes | None = None
    keyset_version: int | None = None
    keyset_uri: str | None = None
    signed: Envelope | None = None


@dataclass(frozen=True, slots=True)
class Block:
    """One Block2 response.

    Attributes:
        offset: byte offset of ``data`` in the resource (from the response's block number and
            size, which may be smaller than asked).
        data: the payload.
        more: whether more blocks follow.
        size2: total size if the server said so.
        etag: the ETag if the server sent one.
    """

    offset: int
    data: bytes
    more: bool
    size2: int | None = None
    etag: bytes | None = None


def endpoint(uri: str, scheme: str, refusal: str) -> tuple[str, int, tuple[str, ...]]:
    """``(host, port, Uri-Path segments)`` of a ``scheme://host[:port]/path`` URI.

    The one URI-to-options reading of the image fetchers (UDP and TCP).

    Raises:
        PermanentServerError: another scheme or no host (``refusal`` says why), a malformed
            port, or a path with a "." or ".." segment (RFC 7252 §5.10.1).
    """
    parts = urlsplit(uri)
    if parts.scheme != scheme or not parts.hostname:
        raise PermanentServerError(uri, refusal)
    try:
        port = parts.port or 5683
    except ValueError:  # "h:x", "h:99999": urllib raises only when the port is read
        raise PermanentServerError(uri, "malformed port in the URI") from None
    try:
        path = path_segments(uri)
    except ValueError as exc:
        raise PermanentServerError(uri, f"not requested: {exc}") from None
    return parts.hostname, port, path


BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)
"""The block sizes of RFC 7959 (SZX 0..6; SZX 7 is BERT, over TCP only)."""


def szx(block_size: int) -> int:
    """The Block2 SZX of ``block_size``, for every transport.

    Raises:
        ValueError: not a power of two from 16 to 1024.
    """
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} must be a power of two from 16 to 1024")
    return block_size.bit_length() - 5


def raise_for(uri: str, code: int, verdict: codes.Verdict) -> None:
    """Raise the fota error that a verdict of :mod:`fota.core.codes` names.

    The one mapping from an answer's meaning to an error, for UDP (aiocoap and the window
    fetcher) and TCP alike. Returns for data and acknowledgements; a transient answer is a
    ``TransportError`` (retryable).
    """
    said = codes.text(code)
    match verdict:
        case codes.Verdict.DATA | codes.Verdict.ACK:
            return
        case codes.Verdict.CHANGED:
            raise ImageChanged(f"{uri}: server answered {said} (the resource changed)")
        case codes.Verdict.MISSING:
            raise ResourceMissing(uri, said)
        case codes.Verdict.PERMANENT:
            raise PermanentServerError(uri, said)
    raise TransportError(f"{uri}: server answered {said}")


def truncated(payload: bytes, more: bool, start: int, size: int, size2: int | None) -> bool:
    """Whether a Block2 payload is not as long as its own options say.

    RFC 7959 §2.2: a block with the More flag carries exactly the block size; the last block
    ends the resource, so it must reach Size2 when the server sent one. A payload that breaks
    either was cut short (or the server is broken): it must be asked for again, never taken as
    a smaller block size or the image's end.

    Args:
        payload: the response's payload.
        more: the Block2 More flag.
        start: the block's byte offset (number times size).
        size: the block size from the Block2 SZX.
        size2: the Size2 option, if any.
    """
    if more:
        return len(payload) != size
    return size2 is not None and start + len(payload) < size2


class BlockFetcher(Protocol):
    """Fetches byte ranges of one resource, block by block, in any order."""

    def want(self, offset: int, length: int) -> None:
        """Ask (again) for a byte range before the rest of the plan."""
        ...

    async def run(self, plan: Iterator[tuple[int, int]], on_block: Callable[[Block], None]) -> None:
        """Fetch every ``(offset, length)`` range of ``plan`` and of :meth:`want`.

        ``on_block`` is called once per block received; an error it raises ends the run.
        """
        ...


class SequentialFetcher:
    """A :class:`BlockFetcher` over ``Transport.fetch_block``: one request at a time.

    For transports without a windowed path (fakes in tests, or a future transport).
    """

    def __init__(self, transport: Transport, uri: str, block_size: int) -> None:
        self.transport = transport
        self.uri = uri
        self.block_size = block_size
        self._urgent: deque[tuple[int, int]] = deque()

    def want(self, offset: int, length: int) -> None:
        """Queue a range before the rest of the plan."""
        self._urgent.append((offset, length))

    async def run(self, plan: Iterator[tuple[int, int]], on_block: Callable[[Block], None]) -> None:
        """Fetch each range block by block."""
        while True:
            piece = self._urgent.popleft() if self._urgent else next(plan, None)
            if piece is None:
                return
            offset, length = piece
            end = offset + length
            while offset < end:
                block = await self.transport.fetch_block(self.uri, offset, self.block_size)
                on_block(block)
                if not block.data or not block.more:
                    break
                if len(block.data) < self.block_size:
                    self.block_size = len(block.data)
                offset = block.offset + len(block.data)


class ConcurrentFetcher:
    """A :class:`BlockFetcher` over ``Transport.fetch_block`` with up to ``window`` in flight.

    For a path whose messages the transport itself must build (OSCORE protects each request
    in aiocoap, so the raw windowed fetcher cannot be used): ``window`` workers each ask for
    the next block and wait for it. Retransmission is the transport's (CON); a block that
    fails after its retries ends the run with that error, and the download resumes from the
    verified fragments. A smaller block than asked is followed, as in :class:`SequentialFetcher`.
    """

    def __init__(self, transport: Transport, uri: str, *, window: int, block_size: int) -> None:
        self.transport = transport
        self.uri = uri
        self.window = max(1, window)
        self.block_size = block_size
        self._urgent: deque[tuple[int, int]] = deque()
        self._plan: Iterator[tuple[int, int]] = iter(())
        self._busy = 0
        self._changed = asyncio.Condition()

    def want(self, offset: int, length: int) -> None:
        """Queue a range before the rest of the plan (called from ``on_block``)."""
        self._urgent.append((offset, length))

    def _next(self) -> tuple[int, int] | None:
        """The next block to ask for, ``(offset, block size)``, cut from the first range."""
        piece = self._urgent.popleft() if self._urgent else next(self._plan, None)
        if piece is None:
            return None
        offset, length = piece
        size = self.block_size
        if offset % size:
            size = min(offset & -offset, size)  # the largest size that aligns
        if length > size:
            self._urgent.appendleft((offset + size, length - size))
        return offset, size

    def _ready(self) -> bool:
        """Whether a worker may go on: work is waiting, or nobody can add any."""
        if self._urgent or self._busy == 0:
            return True
        piece = next(self._plan, None)  # peek, and put it back first in line
        if piece is not None:
            self._urgent.appendleft(piece)
        return piece is not None

    async def run(self, plan: Iterator[tuple[int, int]], on_block: Callable[[Block], None]) -> None:
        """Fetch every range of ``plan`` and of :meth:`want`, ``window`` blocks at a time.

        Raises:
            FotaError: the first error a block ended with (the others are cancelled).
        """
        self._plan = plan

        async def worker() -> None:
            while True:
                async with self._changed:
                    # An idle worker waits while others are busy: a block in flight may fail
                    # its fragment's digest and queue the fragment again.
                    await self._changed.wait_for(self._ready)
                    piece = self._next()
                    if piece is None:
                        return
                    self._busy += 1
                offset, size = piece
                try:
                    block = await self.transport.fetch_block(self.uri, offset, size)
                    on_block(block)
                    got = len(block.data)
                    if block.more and 0 < got < size:  # the server chose a smaller block size
                        self.block_size = min(self.block_size, got)
                        self._urgent.appendleft((offset + got, size - got))
                finally:
                    async with self._changed:
                        self._busy -= 1
                        self._changed.notify_all()

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.window):
                    group.create_task(worker())
        except BaseExceptionGroup as errors:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The download is being stopped: that, not a worker's error on the way out.
                raise asyncio.CancelledError from None
            # Callers expect one typed error, as from the other fetchers.
            raise errors.exceptions[0] from None


class Transport(Protocol):
    """What the engine and the downloader use to talk to the update server."""

    def announcements(self) -> AsyncIterator[Announcement]:
        """Yield the current announcement and every change to it, forever."""
        ...

    def check_now(self) -> None:
        """Make the announcement watcher fetch the announcement now and yield it.

        Returns at once (call it from the event loop's thread); for an application that just
        woke from sleep. Works whether the watcher polls or observes.
        """
        ...

    async def fetch(self, uri: str, *, limit: int) -> bytes:
        """Fetch a small resource block by block; stop after ``limit + 1`` bytes."""
        ...

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        """Fetch the block at byte ``offset`` (a multiple of ``block_size``)."""
        ...

    def block_fetcher(self, uri: str, *, window: int, block_size: int) -> BlockFetcher:
        """A fetcher for the image at ``uri`` with up to ``window`` requests in flight."""
        ...

    async def post_report(self, body: bytes) -> None:
        """Deliver one CBOR status report; return only when the server acknowledged it."""
        ...

    async def aclose(self) -> None:
        """Release sockets."""
        ...
