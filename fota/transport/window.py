"""Windowed Block2 over UDP: up to W NON requests in flight, a new one as each answer lands.

Theory of operation:

* Each wanted byte range is cut into requests of the current block size. A request is a NON GET
  with a Block2 option (``fota.transport.wire``), so requests overlap (aiocoap allows only one
  outstanding CON per server, RFC 7252's NSTART = 1) and cost a few microseconds each.
* The loop runs in a worker thread on a blocking socket. Measured here (10 MiB, 1 KiB blocks,
  W = 16, libcoap's server): the same loop on asyncio's datagram transport took 0.67-0.80 s,
  because every datagram costs an event-loop iteration; on a blocking socket it took 0.13 s.
  The event loop only sees fragment-level events, which ``on_block``'s caller marshals back.
* The token is a per-transfer salt, the transmission's number and the request's byte offset: a
  response is matched to its request by token, and to the transmission it answers, so every
  round trip is measured unambiguously (a CON retransmission, with the same token, cannot be
  told from the first); the byte offset of the payload comes from its own Block2 option.
* NON messages are never retransmitted by CoAP itself, so this module does it: a request not
  answered within its timeout is sent again; after ``max_tries`` the transfer fails with a
  retryable :class:`~fota.errors.TransportError`. The timeout is CoCoA's (``retransmission =
  "cocoa"``: learnt from measured round trips, dithered, with a variable backoff and a lower
  bound) or RFC 7252's (``"rfc7252"``: the first timeout times 1 to 1.5, doubling per try),
  from ``fota.transport.congestion``.
* The window is congestion-controlled (``congestion = "aimd"``): it grows while answers come
  back and is halved on a loss, at most once per window, never above ``window``; a lost block
  waits for its own timeout while the others go on. ``"fixed"`` keeps ``window`` in flight.
* A server may answer with a smaller block (RFC 7959 §2.4): the rest of the range is asked
  again at that size, and so is everything after it.
* A block shorter than its Block2 option says (``fota.transport.truncated``) is not taken:
  the request stays in flight and its timeout asks again.
* Duplicated and late answers are matched by token to nothing in flight and dropped, and
  answers in any order are fine: each carries its own offset.
* 5.03 with Max-Age pauses sending for Max-Age seconds (the server asked for it), and counts
  as one of that request's tries, so a server that only ever answers 5.03 ends the transfer
  like a silent one; other transient answers are retried like a loss; fota.core.codes
  decides the rest: a permanent refusal stops the transfer (PermanentServerError), 4.04
  raises ResourceMissing, 4.08 raises ImageChanged.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from fota.core import codes
from fota.errors import TransportError
from fota.transport import Block, endpoint, raise_for, truncated, wire
from fota.transport import szx as block_szx
from fota.transport.congestion import AimdWindow, CocoaRto, FixedWindow, Rfc7252Rto, Rto, Window

log = structlog.get_logger(__name__)

SERVICE_UNAVAILABLE = 0xA3  # 5.03
MAX_PAUSE = 300.0
"""Longest pause a 5.03's Max-Age buys, seconds."""
INITIAL_WINDOW = 4
"""Requests in flight at the start of a transfer with congestion = "aimd" (then slow start)."""
POLL = 0.05
"""Longest blocking wait, so a cancelled transfer's thread notices within this many seconds."""

OnBlock = Callable[[Block], None]


async def finish_thread(worker: asyncio.Future[None], stop: threading.Event) -> None:
    """Await a worker thread's future; on cancellation, stop the thread and still wait for it.

    Returning while the thread runs would let the caller close files the thread writes to
    (a reused descriptor number could be the journal's). Further cancellations while waiting
    are absorbed; the first one is raised once the thread has ended (within ``POLL``).
    """
    cancelled = False
    while True:
        try:
            await asyncio.shield(worker)
            break
        except asyncio.CancelledError:
            cancelled = True
            if worker.done():
                break
            stop.set()
    if cancelled:
        raise asyncio.CancelledError
    worker.result()


class WindowFetcher:
    """Fetch byte ranges of one CoAP resource with a sliding window of NON Block2 requests.

    Args:
        host: server address (IP literal or name).
        port: server UDP port.
        path: Uri-Path segments of the resource.
        window: most requests in flight.
        block_size: block size asked for (16..1024).
        timeout: first per-request timeout in seconds: RFC 7252's ACK_TIMEOUT, and CoCoA's
            RTO before any round trip was measured.
        max_tries: sends of one request before the transfer fails.
        retransmission: ``"cocoa"`` (adaptive) or ``"rfc7252"`` (fixed, doubling).
        congestion: ``"aimd"`` (a window that adapts to losses) or ``"fixed"``.
        min_rto: CoCoA's lower bound on the timeout, seconds.
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
        retransmission: str = "cocoa",
        congestion: str = "aimd",
        min_rto: float = 0.2,
    ) -> None:
        if retransmission not in ("cocoa", "rfc7252"):
            raise ValueError(f"retransmission {retransmission!r} is not cocoa or rfc7252")
        if congestion not in ("aimd", "fixed"):
            raise ValueError(f"congestion {congestion!r} is not aimd or fixed")
        self.host, self.port, self.path = host, port, path
        self.uri = f"coap://{host}:{port}/{'/'.join(path)}"
        self.window = max(1, window)
        self.block_size = block_size
        self.timeout = timeout
        self.max_tries = max_tries
        self._path_options = wire.encode_path(path)
        self._salt = os.urandom(2)
        self._mid = int.from_bytes(os.urandom(2), "big")
        self._urgent: deque[tuple[int, int]] = deque()
        self._plan: Iterator[tuple[int, int]] = iter(())
        self._flight: dict[int, tuple[int, float, int]] = {}  # offset -> (size, deadline, tries)
        self._busy_tries: dict[int, int] = {}  # offset -> tries it had when answered 5.03
        self._sock: socket.socket | None = None
        self._paused_until = 0.0
        self._stop = threading.Event()
        self.sent = 0
        self.retransmits = 0
        self.truncated = 0
        self.rto: Rto = (
            CocoaRto(initial=timeout, min_rto=min(min_rto, timeout), max_rto=max(32.0, timeout))
            if retransmission == "cocoa"
            else Rfc7252Rto(timeout)
        )
        self.flow: Window = (
            AimdWindow(self.window, cwnd=min(INITIAL_WINDOW, self.window))
            if congestion == "aimd"
            else FixedWindow(self.window)
        )
        self._sent_at: dict[int, dict[int, float]] = {}  # offset -> transmission -> sent at
        self._number: dict[int, int] = {}  # offset -> its latest transmission's number
        self._dither = random.Random()

    @classmethod
    def for_uri(cls, uri: str, **options: Any) -> WindowFetcher:
        """A fetcher for a ``coap://host[:port]/path`` URI (options as for the constructor).

        Raises:
            PermanentServerError: not a ``coap://`` URI with a host.
        """
        host, port, path = endpoint(uri, "coap", "unsupported URI for an image (coap:// only)")
        return cls(host, port, path, **options)

    # -- public ---------------------------------------------------------------------------

    def want(self, offset: int, length: int) -> None:
        """Ask (again) for a byte range before anything else in the plan.

        Call it from ``on_block`` (the transfer's thread) or before :meth:`run`.
        """
        self._urgent.append((offset, length))

    async def run(self, plan: Iterator[tuple[int, int]], on_block: OnBlock) -> None:
        """Fetch every range of ``plan`` (and of :meth:`want`), calling ``on_block`` per block.

        ``on_block`` runs in the transfer's worker thread: it must be quick and must not touch
        the event loop except through ``call_soon_threadsafe``. A :class:`~fota.errors.FotaError`
        it raises ends the transfer with that error. Cancelling ``run`` stops the thread and
        waits for it (within ``POLL`` seconds), so no block is handled after ``run`` returns.
        """
        self._plan = plan
        self._stop.clear()
        loop = asyncio.get_running_loop()
        worker = loop.run_in_executor(None, self._blocking_run, on_block)
        await finish_thread(worker, self._stop)

    # -- the transfer thread --------------------------------------------------------------

    def _blocking_run(self, on_block: OnBlock) -> None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.connect(address)
        except OSError as exc:
            raise TransportError(f"{self.uri}: {exc}") from exc
        self._sock = sock
        try:
            self._loop(sock, on_block)
        finally:
            self._sock = None
            sock.close()

    def _loop(self, sock: socket.socket, on_block: OnBlock) -> None:
        self._fill(time.monotonic())
        while self._flight or self._urgent:
            if self._stop.is_set():
                return
            now = time.monotonic()
            earliest = min((d for _, d, _ in self._flight.values()), default=now + POLL)
            wait = min(POLL, max(0.0005, earliest - now))
            if self._paused_until > now:
                wait = min(wait, max(0.0005, self._paused_until - now))
            sock.settimeout(wait)
            try:
                data = sock.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                # Nothing came (or ICMP port unreachable: the server is not there yet). Resend
                # what is due, and send what waits: after a 5.03 pause nothing may be in flight.
                now = time.monotonic()
                self._check(now)
                self._fill(now)
                continue
            except OSError as exc:
                raise TransportError(f"{self.uri}: {exc}") from exc
            self._received(sock, data, on_block)
            now = time.monotonic()
            self._check(now)
            self._fill(now)

    def _next_range(self) -> tuple[int, int] | None:
        if self._urgent:
            return self._urgent.popleft()
        return next(self._plan, None)

    def _fill(self, now: float) -> None:
        if now < self._paused_until:
            return
        # The congestion window limits requests on their first transmission; one waiting to
        # be asked again does not hold a new one back (a lost block must not stall the rest),
        # and all together never pass ``window``.
        fresh = sum(1 for _, _, tries in self._flight.values() if tries == 1)
        while len(self._flight) < self.window and fresh < self.flow.allowed():
            fresh += 1
            piece = self._next_range()
            if piece is None:
                return
            offset, length = piece
            size = self.block_size
            if offset % size:
                size = min(offset & -offset, self.block_size)  # the largest size that aligns
            if length > size:
                # Send the first block of the range now; the rest goes first in line.
                self._urgent.appendleft((offset + size, length - size))
            if offset not in self._flight:
                self._send(offset, size, self._busy_tries.pop(offset, 0) + 1, now)

    def _send(self, offset: int, size: int, tries: int, now: float) -> None:
        assert self._sock is not None
        self._mid = (self._mid + 1) & 0xFFFF
        token = self._salt + bytes([min(tries, 255)]) + offset.to_bytes(5, "big")
        message = wire.encode_block_get(
            self._mid,
            token,
            self._path_options,
            offset // size,
            block_szx(size),
            has_path=bool(self.path),
        )
        try:
            self._sock.send(message)
        except OSError as exc:  # ECONNREFUSED from an earlier ICMP, ENOBUFS: a loss, retried
            log.debug("send_failed", uri=self.uri, error=str(exc))
        self.rto.age(now)  # a path quiet for long: the RTO moves toward the middle ground
        self._sent_at.setdefault(offset, {})[min(tries, 255)] = now
        self._number[offset] = self.flow.sent()
        self._flight[offset] = (size, now + self.rto.timeout(tries, self._dither.random()), tries)
        self.sent += 1

    def _check(self, now: float) -> None:
        if now < self._paused_until:
            return
        for offset, (size, deadline, tries) in list(self._flight.items()):
            if deadline > now:
                continue
            if tries >= self.max_tries:
                raise TransportError(f"{self.uri}: no answer for byte {offset} after {tries} tries")
            self.retransmits += 1
            self.flow.lost(self._number.get(offset, 0))  # a timeout: take it as congestion
            self._send(offset, size, tries + 1, now)

    def _received(self, sock: socket.socket, data: bytes, on_block: OnBlock) -> None:
        response = wire.decode(data)
        if response is None or len(response.token) != 8 or response.token[:2] != self._salt:
            return  # not ours (or not CoAP)
        if response.mtype == wire.CON:
            try:
                sock.send(wire.encode_empty(wire.ACK, response.mid))
            except OSError as exc:  # the server sends the response again if the ACK is lost
                log.debug("ack_failed", uri=self.uri, error=str(exc))
        offset = int.from_bytes(response.token[3:], "big")
        flight = self._flight.get(offset)
        if flight is None:
            return  # a duplicate or a late answer to a request already answered
        if response.mtype == wire.RST:
            raise TransportError(f"{self.uri}: request reset by the server")
        block = self._handle(offset, flight[0], response)
        if block is not None:
            on_block(block)

    def _handle(self, offset: int, size: int, response: wire.Response) -> Block | None:
        code = response.code
        if code != wire.CONTENT:
            if code == SERVICE_UNAVAILABLE:
                # At most MAX_PAUSE: a Max-Age of 2**32-1 would pause the download for 136
                # years; each 5.03 counts as a try, so a server that keeps asking runs out.
                asked = float(response.max_age if response.max_age is not None else 60)
                delay = min(asked, MAX_PAUSE)
                log.info("server_busy", uri=self.uri, max_age=delay)
                self._paused_until = time.monotonic() + delay
                # Ask again after the pause: every request in flight gets a fresh deadline.
                for other, (osize, _, tries) in list(self._flight.items()):
                    self._flight[other] = (osize, self._paused_until + self.timeout, tries)
                tries = self._flight.pop(offset)[2]
                self._sent_at.pop(offset, None)  # no round trip to learn from: it paused
                if tries >= self.max_tries:
                    # A server that answers only 5.03 (Max-Age 0 too) runs out of tries like
                    # a silent one, instead of being asked again forever.
                    raise TransportError(f"{self.uri}: byte {offset} answered 5.03 {tries} times")
                self._busy_tries[offset] = tries
                self._urgent.appendleft((offset, size))
                return None
            verdict = codes.for_get(code)
            if verdict is not codes.Verdict.RETRY:
                raise_for(self.uri, code, verdict)
            # Transient errors (5.xx): leave it in flight; the timeout sends it again.
            log.info("block_error_response", uri=self.uri, code=wire.code_text(code), offset=offset)
            return None
        if response.block2 is None:
            self._answered(offset, response.token[2])
            return Block(0, response.payload, False, len(response.payload), response.etag)
        num, more, szx = response.block2
        got = 1 << (szx + 4)
        start = num * got
        if start != offset:
            raise TransportError(f"{self.uri}: asked for byte {offset}, got block at {start}")
        if truncated(response.payload, more, start, got, response.size2):
            # A block shorter than it says (RFC 7959 §2.2: only the last may be short, and it
            # ends at Size2): a cut datagram or a server bug. Leave it in flight, so the
            # timeout asks again and max_tries bounds a server that always does it.
            self.truncated += 1
            log.info(
                "block_truncated",
                uri=self.uri,
                offset=offset,
                got=len(response.payload),
                block_size=got,
            )
            return None
        self._answered(offset, response.token[2])
        if got < size:
            # The server chose a smaller block: follow it from here on.
            if got < self.block_size:
                log.info("block_size_reduced", uri=self.uri, asked=size, got=got)
                self.block_size = got
            if more:
                self._urgent.appendleft((offset + got, size - got))
        return Block(start, response.payload, more, response.size2, response.etag)

    def _answered(self, offset: int, copy: int) -> None:
        """A request was answered: it leaves the window, and its round trip is measured.

        ``copy`` is the transmission the answer names in its token: the round trip runs from
        that transmission, so no timeout wait is ever counted as path delay.
        """
        self._flight.pop(offset)
        now = time.monotonic()
        sent = self._sent_at.pop(offset, {}).get(copy)
        self._number.pop(offset, None)
        if sent is not None:
            self.rto.answered(now - sent, copy, now)
        self.flow.answered()
