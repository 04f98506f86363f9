"""Block2 download over CoAP over TCP (RFC 8323) with BERT, streamed to the fragment assembly.

Theory of operation:

* One TCP connection per transfer. The client sends its Capabilities and Settings Message
  (7.01) with Block-Wise-Transfer (BERT supported) and a Max-Message-Size that bounds what the
  server may send in one response: that bound, not the image size, is the memory used
  (libcoap's server otherwise answers with 8 MiB blocks).
* Requests are GETs with Block2 SZX 7 (BERT): the block number counts 1 KiB units, and the
  server answers with any multiple of 1 KiB. The payload is handed on in 1 KiB pieces, which
  never cross a fragment boundary (fragments are multiples of 1 KiB).
* TCP is reliable, so there is no retransmission; one request is outstanding at a time (a
  response's size is only known when it arrives, and with large blocks the round trips are
  few). A dropped connection is a retryable TransportError: the engine resumes from the
  verified fragments.
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
from fota.transport import Block, endpoint, raise_for, wire
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


class TcpFetcher:
    """Fetch byte ranges of one ``coap+tcp://`` resource with BERT Block2 requests.

    Args:
        host: server address.
        port: server TCP port.
        path: Uri-Path segments.
        max_message_size: the largest message we accept (advertised in our CSM).
        timeout: seconds to wait for any answer before the transfer fails (retryable).
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: tuple[str, ...],
        *,
        max_message_size: int = 256 * 1024 + 1024,
        timeout: float = 30.0,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.uri = f"coap+tcp://{host}:{port}/{'/'.join(path)}"
        self.max_message_size = max_message_size
        self.timeout = timeout
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
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(encode_csm(self.max_message_size))
            covered = 0  # bytes delivered past this point in the current run of ranges
            while not self._stop.is_set():
                urgent = bool(self._urgent)
                piece = self._urgent.popleft() if urgent else next(plan, None)
                if piece is None:
                    return
                offset, length = piece
                end = offset + length
                if not urgent and offset < covered:
                    offset = min(covered, end)  # an earlier large block already brought it
                while offset < end and not self._stop.is_set():
                    got, more = self._fetch(sock, offset, end, on_block)
                    covered = offset + got
                    if not more or got == 0:
                        break
                    offset += got
        finally:
            self._forget(sock)

    def _fetch(
        self, sock: socket.socket, offset: int, end: int, on_block: OnBlock
    ) -> tuple[int, bool]:
        self.requests += 1
        token = os.urandom(4)
        # The UDP encoder's options (behind its 4-byte header: no token here): with no Uri-Path
        # the Block2 option delta is 23, which needs an extended delta byte.
        options = wire.encode_block_get(
            0, b"", self._path_options, offset // UNIT, BERT_SZX, has_path=bool(self.path)
        )[4:]
        sock.sendall(encode(wire.GET, token, options))
        while True:
            code, rtoken, body = self._read(sock)
            if code == PING:
                sock.sendall(encode(PONG, rtoken, b""))
                continue
            if code in (RELEASE, ABORT):
                raise TransportError(f"{self.uri}: the server closed the session ({code:#x})")
            if code == CSM or rtoken != token:
                continue
            break
        # The options and payload are encoded as over UDP: decode them behind a UDP header.
        response = wire.decode(bytes([0x40 | len(rtoken), code, 0, 0]) + rtoken + body, bert=True)
        if response is None:
            raise TransportError(f"{self.uri}: malformed response")
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
            num, _, szx = response.block2
            start = num * (UNIT if szx == BERT_SZX else 1 << (szx + 4))
        if start != offset:
            raise TransportError(f"{self.uri}: asked for byte {offset}, got block at {start}")
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
