"""Block2 download over CoAP over TCP (RFC 8323) with BERT, streamed to the fragment assembly.

Theory of operation:

* One TCP connection per transfer. The client sends its Capabilities and Settings Message
  (7.01) with Block-Wise-Transfer (BERT supported) and a Max-Message-Size that bounds what the
  server may send in one response: that bound, not the image size, is the memory used
  (libcoap's server otherwise answers with 8 MiB blocks).
* Requests are GETs with Block2. With ``block_size`` 1024 (the default) they use SZX 7 (BERT):
  the block number counts 1 KiB units, and the server answers with any multiple of 1 KiB, up
  to the smaller Max-Message-Size of the two CSMs. A smaller ``block_size`` is asked for as
  such, one block per message. Either way the payload goes on as one block; the assembly cuts
  it at fragment boundaries.
* Up to ``window`` requests are outstanding on the connection (pipelined; answers are matched
  by token). Each asks for the next ``step`` bytes: the block size, or with BERT what one
  answer carries. An answer shorter than asked has the rest asked for again at once.
* TCP is reliable, so there is no retransmission. An answer that takes longer than the UDP
  path would wait for a block (``ack_timeout`` doubled over ``max_retransmit``
  retransmissions) fails the transfer, as does a dropped connection: a retryable
  TransportError, and the engine resumes from the verified fragments.
* As in ``fota.transport.window``, the loop runs in a worker thread on a blocking socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from fota.core import codes
from fota.errors import TransportError
from fota.transport import Block, endpoint, raise_for, szx, wire
from fota.transport.window import OnBlock, finish_thread

log = structlog.get_logger(__name__)

CSM, PING, PONG, RELEASE, ABORT = 0xE1, 0xE2, 0xE3, 0xE4, 0xE5
OPT_MAX_MESSAGE_SIZE = 2
OPT_BLOCK_WISE_TRANSFER = 4
BERT_SZX = 7
UNIT = 1024


def _length_header(length: int, tkl: int) -> bytes:
    if length < 13:
        return bytes([(length << 4) | tkl])
    if length < 269:
        return bytes([(13 << 4) | tkl, length - 13])
    if length < 65805:
        return bytes([(14 << 4) | tkl]) + (length - 269).to_bytes(2, "big")
    return bytes([(15 << 4) | tkl]) + (length - 65805).to_bytes(4, "big")


def encode(code: int, token: bytes, options: bytes, payload: bytes = b"") -> bytes:
    """One RFC 8323 message: Len/TKL, extended length, code, token, options, payload."""
    body = options + (b"\xff" + payload if payload else b"")
    return _length_header(len(body), len(token)) + bytes([code]) + token + body


def encode_csm(max_message_size: int) -> bytes:
    """Our CSM: Max-Message-Size (option 2) and Block-Wise-Transfer (option 4, empty)."""
    size = wire.encode_uint(max_message_size)
    options = (
        bytes([(OPT_MAX_MESSAGE_SIZE << 4) | len(size)])
        + size
        + bytes([(OPT_BLOCK_WISE_TRANSFER - OPT_MAX_MESSAGE_SIZE) << 4])
    )
    return encode(CSM, b"", options)


def csm_max_message_size(options: bytes) -> int | None:
    """The Max-Message-Size option (2) of a CSM's options, None when absent or malformed."""
    pos, number = 0, 0
    while pos < len(options) and options[pos] != 0xFF:
        delta, length = options[pos] >> 4, options[pos] & 0x0F
        pos += 1
        if delta == 15 or length == 15:
            return None
        extended = []
        for nibble in (delta, length):
            if nibble == 13:
                extended.append(options[pos] + 13 if pos < len(options) else -1)
                pos += 1
            elif nibble == 14:
                raw = options[pos : pos + 2]
                extended.append(int.from_bytes(raw, "big") + 269 if len(raw) == 2 else -1)
                pos += 2
            else:
                extended.append(nibble)
        delta, length = extended
        if delta < 0 or length < 0 or pos + length > len(options):
            return None
        number += delta
        if number == OPT_MAX_MESSAGE_SIZE:
            return int.from_bytes(options[pos : pos + length], "big") if length <= 4 else None
        pos += length
    return None


class _Stop(threading.Event):
    """The transfer thread's stop flag; setting it also wakes a thread blocked on the socket.

    The thread otherwise notices a stop only between socket timeouts (30 s by default): a
    SIGTERM or a cancelled download would wait that long.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake()


class _Runs:
    """The plan's ranges as requests of at most ``span`` bytes, contiguous ranges joined.

    The plan names fragments (or the holes of one); joined, a BERT request asks for as much
    as one answer carries, and no request asks again for bytes an earlier one covers.
    """

    def __init__(self, plan: Iterator[tuple[int, int]]) -> None:
        self.plan = plan
        self.run: tuple[int, int] | None = None  # (start, end) not yet asked for
        self.held: tuple[int, int] | None = None  # a range read ahead that did not join

    def _next(self) -> tuple[int, int] | None:
        if self.held is not None:
            held, self.held = self.held, None
            return held
        piece = next(self.plan, None)
        return None if piece is None else (piece[0], piece[0] + piece[1])

    def take(self, span: int) -> tuple[int, int] | None:
        """The next request, ``(offset, end)``; None when the plan is done."""
        run = self.run
        while run is None or run[0] >= run[1]:
            following = self._next()
            if following is None:
                return None
            run = following
        while run[1] - run[0] < span:
            piece = self._next()
            if piece is None:
                break
            if piece[0] != run[1]:
                self.held = piece
                break
            run = (run[0], piece[1])
        end = min(run[1], run[0] + span)
        self.run = (end, run[1])
        return run[0], end


class TcpFetcher:
    """Fetch byte ranges of one ``coap+tcp://`` resource with BERT Block2 requests.

    Args:
        host: server address.
        port: server TCP port.
        path: Uri-Path segments.
        max_message_size: the largest message we accept (advertised in our CSM).
        timeout: seconds to wait for any answer before the transfer fails (retryable).
        window: requests outstanding on the connection at most.
        block_size: 1024 asks for BERT blocks; 16..512 for blocks of that size.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: tuple[str, ...],
        *,
        max_message_size: int = 256 * 1024 + 1024,
        timeout: float = 30.0,
        window: int = 1,
        block_size: int = UNIT,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.uri = f"coap+tcp://{host}:{port}/{'/'.join(path)}"
        self.max_message_size = max_message_size
        self.timeout = timeout
        self.window = max(1, window)
        self.block_size = block_size
        self.szx = BERT_SZX if block_size >= UNIT else szx(block_size)
        self.peak = 0
        """The most requests that were outstanding at once (what ``window`` allowed)."""
        self._path_options = wire.encode_path(path)
        self._urgent: deque[tuple[int, int]] = deque()
        self._stop = _Stop(self._wake)
        # The socket the thread uses now; shut down (never closed: its number could be
        # reused under the thread) from another thread to wake a blocked connect or recv.
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self.requests = 0

    @classmethod
    def for_uri(cls, uri: str, **options: Any) -> TcpFetcher:
        """A fetcher for ``coap+tcp://host[:port]/path``."""
        host, port, path = endpoint(uri, "coap+tcp", "not a coap+tcp:// URI")
        return cls(host, port, path, **options)

    def want(self, offset: int, length: int) -> None:
        """Ask (again) for a byte range before the rest of the plan."""
        self._urgent.append((offset, length))

    async def run(self, plan: Iterator[tuple[int, int]], on_block: OnBlock) -> None:
        """Fetch every range of ``plan`` (and of :meth:`want`); ``on_block`` runs in a thread."""
        self._stop.clear()
        loop = asyncio.get_running_loop()
        worker = loop.run_in_executor(None, self._blocking_run, plan, on_block)
        await finish_thread(worker, self._stop)

    def _wake(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):  # not connected yet, or already reset
                    self._sock.shutdown(socket.SHUT_RDWR)

    # -- the transfer thread --------------------------------------------------------------

    def _connect(self) -> socket.socket:
        """Connect like ``socket.create_connection``, with each socket wakeable by a stop."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"{self.uri}: {exc}") from exc
        error: OSError = OSError(f"no address for {self.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            with self._sock_lock:
                self._sock = sock
            try:
                if self._stop.is_set():  # stopped before the socket could be woken
                    raise TransportError(f"{self.uri}: stopped")
                sock.settimeout(self.timeout)
                sock.connect(address)
                return sock
            except OSError as exc:
                error = exc
                self._forget(sock)
            except BaseException:
                self._forget(sock)
                raise
        if self._stop.is_set():
            raise TransportError(f"{self.uri}: stopped")
        raise TransportError(f"{self.uri}: {error}") from error

    def _forget(self, sock: socket.socket) -> None:
        with self._sock_lock:
            self._sock = None
        sock.close()

    def _blocking_run(self, plan: Iterator[tuple[int, int]], on_block: OnBlock) -> None:
        try:
            self._transfer(plan, on_block)
        except (OSError, TransportError) as exc:
            if self._stop.is_set():
                # Stopped (the shutdown that woke us caused this): the caller raises its
                # CancelledError; an error here would read as a failed download instead.
                return
            if isinstance(exc, OSError):
                raise TransportError(f"{self.uri}: {exc}") from exc
            raise

    def _transfer(self, plan: Iterator[tuple[int, int]], on_block: OnBlock) -> None:
        sock = self._connect()
        self._buffer = bytearray(self.max_message_size + 16)
        # What one BERT answer carries at most: our Max-Message-Size less room for the
        # header and options (the server's CSM may lower it), in whole KiB.
        self._step = self._bert_step(self.max_message_size)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(encode_csm(self.max_message_size))
            # The server's CSM is its first message (RFC 8323 §5.3): read it before asking,
            # so the first requests already fit its Max-Message-Size.
            code, _, body = self._read(sock)
            if code != CSM:
                raise TransportError(f"{self.uri}: the server's first message is not a CSM")
            self._peer_csm(body)
            outstanding: dict[bytes, tuple[int, int]] = {}  # token -> (offset, end) asked
            runs = _Runs(plan)
            while not self._stop.is_set():
                while len(outstanding) < self.window:
                    span = self._request_span()
                    if self._urgent:
                        offset, length = self._urgent.popleft()
                        if length > span:  # the rest first in line, asked for next
                            self._urgent.appendleft((offset + span, length - span))
                        end = offset + min(length, span)
                    else:
                        taken = runs.take(span)
                        if taken is None:
                            break
                        offset, end = taken
                    outstanding[self._ask(sock, offset)] = (offset, end)
                    self.peak = max(self.peak, len(outstanding))
                if not outstanding:
                    return
                token, code, response = self._answer(sock, outstanding)
                offset, end = outstanding.pop(token)
                got, more = self._deliver(code, response, offset, end, on_block)
                if got and more and offset + got < end:
                    self._urgent.appendleft((offset + got, end - offset - got))
        finally:
            self._forget(sock)

    @staticmethod
    def _bert_step(max_message_size: int) -> int:
        return max(UNIT, (max_message_size - UNIT) // UNIT * UNIT)

    def _request_span(self) -> int:
        """Bytes one request asks for: the block, or what one BERT answer carries."""
        return self._step if self.szx == BERT_SZX else self.block_size

    def _ask(self, sock: socket.socket, offset: int) -> bytes:
        self.requests += 1
        token = os.urandom(4)
        unit = UNIT if self.szx == BERT_SZX else self.block_size
        # The UDP encoder's options (behind its 4-byte header: no token here): with no Uri-Path
        # the Block2 option delta is 23, which needs an extended delta byte.
        options = wire.encode_block_get(
            0, b"", self._path_options, offset // unit, self.szx, has_path=bool(self.path)
        )[4:]
        sock.sendall(encode(wire.GET, token, options))
        return token

    def _answer(
        self, sock: socket.socket, outstanding: dict[bytes, tuple[int, int]]
    ) -> tuple[bytes, int, wire.Response]:
        """The next answer to one of our requests (pings answered, CSMs read)."""
        while True:
            code, rtoken, body = self._read(sock)
            if code == PING:
                sock.sendall(encode(PONG, rtoken, b""))
                continue
            if code in (RELEASE, ABORT):
                raise TransportError(f"{self.uri}: the server closed the session ({code:#x})")
            if code == CSM:
                self._peer_csm(body)
                continue
            if rtoken not in outstanding:
                continue
            # The options and payload are encoded as over UDP: decode them behind a UDP header.
            head = bytes([0x40 | len(rtoken), code, 0, 0]) + rtoken
            response = wire.decode(head + body, bert=True)
            if response is None:
                raise TransportError(f"{self.uri}: malformed response")
            return rtoken, code, response

    def _peer_csm(self, options: bytes) -> None:
        """The server's Max-Message-Size bounds what one BERT answer carries."""
        size = csm_max_message_size(options)
        if size is not None and size > 0:
            self._step = min(self._step, self._bert_step(size))

    def _deliver(
        self, code: int, response: wire.Response, offset: int, end: int, on_block: OnBlock
    ) -> tuple[int, bool]:
        if code != wire.CONTENT:
            raise_for(self.uri, code, codes.for_get(code))
            raise TransportError(f"{self.uri}: server answered {wire.code_text(code)}")
        payload = response.payload
        more = bool(response.block2 and response.block2[1])
        if not more and payload and offset + len(payload) < end:
            # libcoap 4.3.1's server clears M on BERT answers to a request that does not start
            # at block 0 once it has sent Max-Message-Size bytes (and sends no Size2 there).
            # The range we want goes on: ask; a server that really has no more says so.
            log.debug("bert_more_flag_ignored", uri=self.uri, offset=offset, end=end)
            more = True
        start = offset
        if response.block2 is not None:
            num, _, got_szx = response.block2
            start = num * (UNIT if got_szx == BERT_SZX else 1 << (got_szx + 4))
        if start != offset:
            raise TransportError(f"{self.uri}: asked for byte {offset}, got block at {start}")
        if response.block2 is not None and self.szx != BERT_SZX and response.block2[2] < self.szx:
            # The server chose a smaller block (RFC 7959 §2.2): follow it, so the rest of a
            # range is asked for in blocks it numbers the same way.
            self.szx = response.block2[2]
            self.block_size = 1 << (self.szx + 4)
        # The pieces say "no more" only at a confirmed end (M=0 and Size2 reached): M alone is
        # not reliable (above); a transfer that stops short leaves fragments missing, and the
        # downloader reports that.
        at_end = not more and response.size2 is not None and offset + len(payload) >= response.size2
        # One block for the whole payload: the assembly cuts it at fragment boundaries.
        on_block(Block(offset, payload, not at_end, response.size2, response.etag))
        return len(payload), more

    def _read_exact(self, sock: socket.socket, count: int) -> memoryview:
        view = memoryview(self._buffer)[:count]
        got = 0
        while got < count:
            if self._stop.is_set():
                raise TransportError(f"{self.uri}: stopped")
            n = sock.recv_into(view[got:], count - got)
            if n == 0 and self._stop.is_set():  # woken by a shutdown (_Stop.set)
                raise TransportError(f"{self.uri}: stopped")
            if n == 0:
                raise TransportError(f"{self.uri}: connection closed by the server")
            got += n
        return view

    def _read(self, sock: socket.socket) -> tuple[int, bytes, bytes]:
        first = self._read_exact(sock, 1)[0]
        length, tkl = first >> 4, first & 0x0F
        extra = {13: 1, 14: 2, 15: 4}.get(length, 0)
        if extra:
            raw = int.from_bytes(self._read_exact(sock, extra), "big")
            length = raw + {13: 13, 14: 269, 15: 65805}[length]
        if length + tkl + 1 > self.max_message_size + 16:
            raise TransportError(f"{self.uri}: message of {length} bytes over our limit")
        head = bytes(self._read_exact(sock, 1 + tkl))
        body = bytes(self._read_exact(sock, length)) if length else b""
        return head[0], head[1:], body
