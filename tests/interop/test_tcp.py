"""CoAP over TCP with BERT (RFC 8323) against libcoap's coap-server-notls, a foreign peer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fota.core import events as ev
from fota.core.record import bitmap_new
from fota.download import Downloader, Layout
from fota.fileops import FileOps
from fota.transport import tcp
from fota.transport.tcp import TcpFetcher
from tests.interop.test_download_faults import coap_client, libcoap_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]
MiB = 1024 * 1024


async def put_over_tcp(base: str, image: bytes, tmp_path: Path, name: str) -> tuple[str, Layout]:
    """PUT ``image`` into libcoap's server over TCP; return its URI and a 64 KiB layout."""
    file = tmp_path / "image.bin"
    file.write_bytes(image)
    uri = f"{base.replace('coap://', 'coap+tcp://')}/img"
    code, out = await coap_client("-m", "put", "-b", "1024", "-f", str(file), uri)
    assert code == 0, out.decode(errors="replace")
    fragment = 64 * 1024
    digests = tuple(
        hashlib.sha256(image[i : i + fragment]).digest() for i in range(0, len(image), fragment)
    )
    return uri, Layout(name, len(image), fragment, digests)


def test_csm_and_request_framing() -> None:
    csm = tcp.encode_csm(256 * 1024)
    # Len 4 (option 2 with a 3-byte value, then option 4 empty), TKL 0; code 7.01.
    assert csm == bytes([0x50, 0xE1, 0x23, 0x04, 0x00, 0x00, 0x20])
    assert tcp.encode(1, b"ab", b"\xb3img")[:4] == bytes([0x42, 0x01]) + b"ab"
    big = tcp.encode(0x45, b"", b"", b"x" * 70_000)
    assert big[0] >> 4 == 15 and int.from_bytes(big[1:5], "big") == 70_001 - 65805


async def test_bert_download_from_libcoap_is_streamed_and_verified(tmp_path: Path) -> None:
    image = os.urandom(3 * MiB + 5000)
    async with libcoap_server(tmp_path / "coap-server.log") as base:
        uri, layout = await put_over_tcp(base, image, tmp_path, "tcp-test")
        fetchers: list[TcpFetcher] = []

        def factory(uri: str, *, window: int, block_size: int) -> TcpFetcher:
            # A small message limit: the server must send many BERT blocks, each bounded.
            fetchers.append(TcpFetcher.for_uri(uri, max_message_size=128 * 1024 + 1024))
            return fetchers[-1]

        events: list[ev.Event] = []
        candidate = tmp_path / "candidate"
        downloader = Downloader(factory, FileOps(), candidate, events.append)
        await downloader.fetch(layout, uri, bitmap_new(layout.count))
    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    vouched = [i for e in events if isinstance(e, ev.FragmentVerified) for i in e.indexes]
    assert sorted(vouched) == list(range(layout.count))
    assert candidate.read_bytes() == image
    # BERT: far fewer requests than 1 KiB blocks, and none larger than our advertised limit.
    assert len(image) // (128 * 1024) <= fetchers[0].requests <= len(image) // (64 * 1024) + 2


async def test_bert_resume_skips_verified_fragments(tmp_path: Path) -> None:
    image = os.urandom(1 * MiB)
    async with libcoap_server(tmp_path / "coap-server.log") as base:
        uri, layout = await put_over_tcp(base, image, tmp_path, "tcp-resume")
        fragment = layout.fragment_size
        candidate = tmp_path / "candidate"
        candidate.write_bytes(image[: 8 * fragment] + bytes(len(image) - 8 * fragment))
        verified = bytes([0xFF]) + bytes(1)  # fragments 0..7 on disk and vouched for
        events: list[ev.Event] = []
        downloader = Downloader(
            lambda uri, **_: TcpFetcher.for_uri(uri), FileOps(), candidate, events.append
        )
        await downloader.fetch(layout, uri, verified)
    assert isinstance(events[-1], ev.DownloadFinished), events[-1]
    vouched = [i for e in events if isinstance(e, ev.FragmentVerified) for i in e.indexes]
    assert sorted(vouched) == list(range(8, 16))
    assert candidate.read_bytes() == image
