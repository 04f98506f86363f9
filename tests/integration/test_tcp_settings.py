"""Issue 18 §3: the TCP image path honours ``window``, ``block_size`` and the timeouts.

Before, ``coap+tcp://`` images were fetched one request at a time, always as BERT, with a
fixed 30 s answer timeout, whatever the settings said. Against a small RFC 8323 peer on
127.0.0.1:0 (it answers what each request asks for, up to its own Max-Message-Size):
requests are pipelined up to ``window``, a smaller ``block_size`` is asked for as such, BERT
requests ask for what one answer carries (contiguous fragments joined, no byte asked twice),
the server's CSM lowers that, and a silent server fails the transfer after as long as the UDP
path would wait for a block.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fota.errors import TransportError
from fota.transport import Block, tcp, wire
from fota.transport.image import ImageSettings, image_fetcher
from fota.transport.tcp import TcpFetcher
from tests.integration.test_supervision import read_message, tcp_peer

pytestmark = pytest.mark.timeout(60)
KiB = 1024


def _option(delta: int, value: bytes) -> bytes:
    assert delta < 269 and len(value) < 13
    if delta < 13:
        return bytes([(delta << 4) | len(value)]) + value
    return bytes([(13 << 4) | len(value), delta - 13]) + value


class Peer:
    """Serves ``image`` over CoAP over TCP; answers each GET with the block it asks for.

    A BERT request (SZX 7) gets as many KiB as fit in ``max_message_size``; SZX 0..6 gets one
    block of that size. ``hold``: answer nothing until that many requests are outstanding
    (then everything, at once): a client that does not pipeline never gets there.
    """

    def __init__(
        self,
        image: bytes,
        *,
        max_message_size: int = 64 * KiB,
        hold: int = 0,
        silent: bool = False,
        largest: int = 6,
    ) -> None:
        self.image = image
        self.largest = largest  # the largest SZX it answers with (below BERT)
        self.max_message_size = max_message_size
        self.hold = hold
        self.silent = silent
        self.asked: list[tuple[int, int]] = []  # (block number, szx) of every GET
        self.outstanding = 0
        self.most = 0
        self.held = asyncio.Event()

    def _answer(self, token: bytes, num: int, szx: int) -> bytes:
        if szx == 7:
            start = num * KiB
            room = (self.max_message_size - 64) // KiB * KiB
            payload = self.image[start : start + room]
            reply_num = num
        else:
            start = num * (1 << (szx + 4))
            szx = min(szx, self.largest)  # a smaller block than asked, numbered its own way
            size = 1 << (szx + 4)
            payload = self.image[start : start + size]
            reply_num = start // size
        more = start + len(payload) < len(self.image)
        options = _option(
            wire.OPT_BLOCK2, wire.encode_uint((reply_num << 4) | (more << 3) | szx)
        ) + _option(wire.OPT_SIZE2 - wire.OPT_BLOCK2, wire.encode_uint(len(self.image)))
        return tcp.encode(wire.CONTENT, token, options, payload)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        waiting: list[bytes] = []
        try:
            writer.write(tcp.encode_csm(self.max_message_size))
            while True:
                code, token, body = await read_message(reader)
                tkl = len(token)
                if code != wire.GET:
                    continue  # the client's CSM
                request = wire.decode(bytes([0x40 | tkl, code, 0, 0]) + token + body, bert=True)
                assert request is not None and request.block2 is not None
                num, _, szx = request.block2
                self.asked.append((num, szx))
                self.outstanding += 1
                self.most = max(self.most, self.outstanding)
                if self.silent:
                    continue
                waiting.append(self._answer(token, num, szx))
                if self.outstanding >= self.hold:
                    self.held.set()
                if self.held.is_set() or not self.hold:
                    for answer in waiting:
                        writer.write(answer)
                    self.outstanding -= len(waiting)
                    waiting.clear()
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def peer_at(peer: Peer) -> AsyncIterator[str]:
    async with tcp_peer(peer) as origin:  # the same 127.0.0.1:0 listener as the other peer
        yield f"{origin}/img"


async def fetch_all(fetcher: TcpFetcher, size: int, piece: int) -> bytes:
    """Run ``fetcher`` over a plan of ``piece``-sized ranges; the bytes, each once."""
    got = bytearray(size)
    seen = bytearray(size)
    twice = 0

    def on_block(block: Block) -> None:
        nonlocal twice
        end = block.offset + len(block.data)
        twice += sum(seen[block.offset : end])
        got[block.offset : end] = block.data
        seen[block.offset : end] = b"\x01" * len(block.data)

    plan = iter([(o, min(piece, size - o)) for o in range(0, size, piece)])
    await fetcher.run(plan, on_block)
    assert twice == 0, f"{twice} bytes delivered twice"
    assert all(seen)
    return bytes(got)


async def test_requests_are_pipelined_up_to_the_window() -> None:
    image = os.urandom(48 * KiB)
    # The peer's CSM allows 1 KiB per answer, and it answers nothing before 8 requests are
    # outstanding: fetched one at a time (the old loop), the transfer would never start.
    peer = Peer(image, max_message_size=KiB + 64, hold=8)
    async with peer_at(peer) as uri:
        fetcher = TcpFetcher.for_uri(uri, window=8)
        done = asyncio.create_task(fetch_all(fetcher, len(image), 4 * KiB))
        await asyncio.wait_for(peer.held.wait(), 10)
        assert await asyncio.wait_for(done, 20) == image
    assert fetcher.peak == 8 and peer.most == 8
    assert len(peer.asked) == 48  # 1 KiB each: the server's CSM lowered what one asks for


async def test_a_smaller_block_size_is_asked_for_as_such() -> None:
    image = os.urandom(10 * KiB + 300)
    peer = Peer(image)
    async with peer_at(peer) as uri:
        fetcher = image_fetcher(uri, window=4, block_size=256, settings=ImageSettings())
        assert isinstance(fetcher, TcpFetcher)
        assert await fetch_all(fetcher, len(image), 4 * KiB) == image
    assert {szx for _, szx in peer.asked} == {4}  # 256-byte blocks, never BERT
    assert sorted(num for num, _ in peer.asked) == list(range(-(-len(image) // 256)))


async def test_a_smaller_block_from_the_server_is_followed() -> None:
    image = os.urandom(6 * KiB + 100)
    peer = Peer(image, largest=3)  # asked for 512-byte blocks, it answers 128-byte ones
    async with peer_at(peer) as uri:
        fetcher = image_fetcher(uri, window=4, block_size=512, settings=ImageSettings())
        assert isinstance(fetcher, TcpFetcher)
        assert await fetch_all(fetcher, len(image), 2 * KiB) == image
    assert peer.asked[0][1] == 5 and {szx for _, szx in peer.asked[8:]} == {3}


async def test_bert_asks_for_what_one_answer_carries_and_nothing_twice() -> None:
    image = os.urandom(100 * KiB)
    peer = Peer(image, max_message_size=32 * KiB + 1024)
    async with peer_at(peer) as uri:
        fetcher = image_fetcher(uri, window=4, block_size=1024, settings=ImageSettings())
        assert isinstance(fetcher, TcpFetcher)
        # 4 KiB fragments, contiguous: joined into requests of 32 KiB (the server's room).
        assert await fetch_all(fetcher, len(image), 4 * KiB) == image
    assert {szx for _, szx in peer.asked} == {7}
    assert [num for num, _ in peer.asked] == [0, 32, 64, 96]


async def test_a_silent_server_fails_the_transfer_after_the_udp_wait() -> None:
    settings = ImageSettings(ack_timeout=0.05, max_retransmit=1)
    peer = Peer(os.urandom(4 * KiB), silent=True)
    async with peer_at(peer) as uri:
        fetcher = image_fetcher(uri, window=2, block_size=1024, settings=settings)
        assert isinstance(fetcher, TcpFetcher)
        assert fetcher.timeout == pytest.approx(0.05 * 3)  # ACK_TIMEOUT * (2**2 - 1)
        with pytest.raises(TransportError):
            await asyncio.wait_for(fetch_all(fetcher, 4 * KiB, 4 * KiB), 10)


def test_the_server_s_max_message_size_is_read_from_its_csm() -> None:
    options = tcp.encode_csm(70_000)[2:]  # Len/TKL and the code off
    assert tcp.csm_max_message_size(options) == 70_000
    assert tcp.csm_max_message_size(b"") is None
    assert tcp.csm_max_message_size(b"\x2f") is None  # a reserved length nibble
