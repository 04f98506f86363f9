"""Windowed Block2 over UDP: up to W NON requests in flight, a new one as each answer lands.

Theory of operation:

* Each wanted byte range is cut into requests of the current block size. A request is a NON GET
  with a Block2 option (``fota.transport.wire``), so requests overlap (aiocoap allows only one
  outstanding CON per server, RFC 7252's NSTART = 1) and cost a few microseconds each.
* The token is a per-transfer salt plus the request's byte offset: a response is matched to its
  request by token, and the byte offset of its payload comes from its own Block2 option.
* NON messages are never retransmitted by CoAP itself, so this module does it: a request not
  answered within its timeout is sent again (timeout doubling per try); after ``max_tries`` the
  transfer fails with a retryable :class:`~fota.errors.TransportError`.
* A server may answer with a smaller block (RFC 7959 §2.4): the rest of the range is asked
  again at that size, and so is everything after it.
* 5.03 with Max-Age pauses sending for Max-Age seconds (the server asked for it); other 5.xx are
  retried like a loss; 4.04 / 4.03 / 4.00 / 4.15 stop the transfer (PermanentServerError);
  4.08 raises ImageChanged.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Iterator

import structlog

from fota.errors import FotaError, ImageChanged, PermanentServerError, TransportError
from fota.transport import Block, wire

log = structlog.get_logger(__name__)

PERMANENT_CODES = {0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x8F}  # 4.00-4.05, 4.15
REQUEST_INCOMPLETE = 0x88  # 4.08
SERVICE_UNAVAILABLE = 0xA3  # 5.03

OnBlock = Callable[[Block], None]


def szx_of(size: int) -> int:
    """SZX for a block size of 16..1024."""
    return size.bit_length() - 5


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: WindowFetcher) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.owner._received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the server is not there (yet); retries decide.
        log.debug("udp_error", error=str(exc))


class WindowFetcher:
    """Fetch byte ranges of one CoAP resource with a sliding window of NON Block2 requests.

    Args:
        host: server address (IP literal or name).
        port: server UDP port.
        path: Uri-Path segments of the resource.
        window: most requests in flight.
        block_size: block size asked for (16..1024).
        timeout: first per-request timeout in seconds (doubles per try).
        max_tries: sends of one request before the transfer fails.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: tuple[str, ...],
        *,
        window: int = 8,
        block_size: int = 1024,
        timeout: float = 2.0,
        max_tries: int = 5,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.window = max(1, window)
        self.block_size = block_size
        self.timeout = timeout
        self.max_tries = max_tries
        self._path_options = wire.encode_path(path)
        self._salt = os.urandom(3)
        self._mid = int.from_bytes(os.urandom(2), "big")
        self._urgent: deque[tuple[int, int]] = deque()
        self._plan: Iterator[tuple[int, int]] = iter(())
        # offset -> (size, deadline, tries)
        self._flight: dict[int, tuple[int, float, int]] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._done: asyncio.Future[None] | None = None
        self._on_block: OnBlock | None = None
        self._paused_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.sent = 0
        self.retransmits = 0

    # -- public ---------------------------------------------------------------------------

    def want(self, offset: int, length: int) -> None:
        """Ask (again) for a byte range before anything else in the plan."""
        self._urgent.append((offset, length))
        self._fill()

    async def run(self, plan: Iterator[tuple[int, int]], on_block: OnBlock) -> None:
        """Fetch every range of ``plan`` (and of :meth:`want`), calling ``on_block`` per block.

        ``on_block`` runs inside the datagram callback: it must be quick, and an exception it
        raises (a :class:`~fota.errors.FotaError`) ends the transfer with that error.
        """
        loop = asyncio.get_running_loop()
        self._plan, self._on_block = plan, on_block
        self._done = loop.create_future()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), remote_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise TransportError(f"coap://{self.host}:{self.port}: {exc}") from exc
        self._transport = transport
        try:
            self._fill()
            self._arm()
            await self._done
        finally:
            if self._timer is not None:
                self._timer.cancel()
            transport.close()
            self._transport = None

    # -- sending --------------------------------------------------------------------------

    def _next_range(self) -> tuple[int, int] | None:
        if self._urgent:
            return self._urgent.popleft()
        return next(self._plan, None)

    def _fill(self) -> None:
        done = self._done
        if self._transport is None or done is None or done.done():
            return
        now = time.monotonic()
        if now < self._paused_until:
            return
        while len(self._flight) < self.window:
            piece = self._next_range()
            if piece is None:
                break
            offset, length = piece
            size = self.block_size
            if offset % size:
                size = offset & -offset if offset else size  # the largest size that aligns
                size = min(size, self.block_size)
            if length > size:
                # Send the first block of the range now; the rest goes first in line.
                self._urgent.appendleft((offset + size, length - size))
            if offset in self._flight:
                continue
            self._send(offset, size, 1, now)
        if not self._flight and not self._urgent:
            # Nothing in flight and nothing left: the plan is exhausted.
            done.set_result(None)

    def _send(self, offset: int, size: int, tries: int, now: float) -> None:
        assert self._transport is not None
        self._mid = (self._mid + 1) & 0xFFFF
        token = self._salt + offset.to_bytes(5, "big")
        self._transport.sendto(
            wire.encode_block_get(
                self._mid,
                token,
                self._path_options,
                offset // size,
                szx_of(size),
                has_path=bool(self.path),
            )
        )
        self._flight[offset] = (size, now + self.timeout * (2 ** (tries - 1)), tries)
        self.sent += 1

    # -- timeouts -------------------------------------------------------------------------

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.005, self.timeout / 4), self._check)

    def _check(self) -> None:
        now = time.monotonic()
        if now >= self._paused_until:
            for offset, (size, deadline, tries) in list(self._flight.items()):
                if deadline > now:
                    continue
                if tries >= self.max_tries:
                    self._fail(
                        TransportError(
                            f"coap://{self.host}:{self.port}/{'/'.join(self.path)}: no answer for"
                            f" byte {offset} after {tries} tries"
                        )
                    )
                    return
                self.retransmits += 1
                self._send(offset, size, tries + 1, now)
            self._fill()
        self._arm()

    def _fail(self, error: FotaError) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)

    # -- receiving ------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        response = wire.decode(data)
        if response is None or response.token[:3] != self._salt or len(response.token) != 8:
            return  # not ours (or not CoAP)
        if response.mtype == wire.CON and self._transport is not None:
            self._transport.sendto(wire.encode_empty(wire.ACK, response.mid))
        offset = int.from_bytes(response.token[3:], "big")
        flight = self._flight.get(offset)
        if flight is None:
            return  # a duplicate or a late answer to a request already answered
        if response.mtype == wire.RST:
            self._fail(TransportError(f"coap://{self.host}:{self.port}: request reset"))
            return
        try:
            self._handle(offset, flight[0], response)
        except FotaError as exc:
            self._fail(exc)
            return
        self._fill()

    def _handle(self, offset: int, size: int, response: wire.Response) -> None:
        code = response.code
        uri = f"coap://{self.host}:{self.port}/{'/'.join(self.path)}"
        if code != wire.CONTENT:
            if code == SERVICE_UNAVAILABLE:
                delay = float(response.max_age if response.max_age is not None else 60)
                log.info("server_busy", uri=uri, max_age=delay)
                self._paused_until = time.monotonic() + delay
                del self._flight[offset]
                self._urgent.appendleft((offset, size))
                return
            if code in PERMANENT_CODES:
                raise PermanentServerError(uri, wire.code_text(code))
            if code == REQUEST_INCOMPLETE:
                raise ImageChanged(f"{uri}: server answered 4.08 (the resource changed)")
            # Other errors (5.xx): leave it in flight; the timeout sends it again.
            log.info("block_error_response", uri=uri, code=wire.code_text(code), offset=offset)
            return
        del self._flight[offset]
        if response.block2 is None:
            block = Block(0, response.payload, False, len(response.payload), response.etag)
        else:
            num, more, szx = response.block2
            got = 1 << (szx + 4)
            start = num * got
            if start != offset:
                raise TransportError(f"{uri}: asked for byte {offset}, got block at {start}")
            if got < size:
                # The server chose a smaller block: follow it from here on.
                log.info("block_size_reduced", uri=uri, asked=size, got=got)
                self.block_size = got
                if more:
                    self._urgent.appendleft((offset + got, size - got))
            block = Block(start, response.payload, more, response.size2, response.etag)
        assert self._on_block is not None
        self._on_block(block)
