"""The hand-written CoAP codec of the block downloader, against aiocoap's own encoder."""

from __future__ import annotations

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from hypothesis import given, settings
from hypothesis import strategies as st

from fota.transport import wire


def test_block_get_decodes_in_aiocoap_as_we_meant_it() -> None:
    token = b"\x01\x02\x03" + (5 * 1024).to_bytes(5, "big")
    raw = wire.encode_block_get(0x1234, token, wire.encode_path(("fota", "img", "ab" * 32)), 5, 6)
    msg = aiocoap.Message.decode(raw)
    assert msg.code == Code.GET and msg.mid == 0x1234 and msg.token == token
    assert msg.mtype == aiocoap.NON
    assert msg.opt.uri_path == ("fota", "img", "ab" * 32)
    assert msg.opt.block2 == BlockOption.BlockwiseTuple(5, False, 6)


def test_long_path_segments_and_large_block_numbers() -> None:
    path = ("x" * 300, "", "y" * 20)
    raw = wire.encode_block_get(1, b"t" * 8, wire.encode_path(path), 70_000, 2)
    msg = aiocoap.Message.decode(raw)
    assert msg.opt.uri_path == path and msg.opt.block2.block_number == 70_000


def test_response_from_aiocoap_decodes() -> None:
    msg = aiocoap.Message(code=Code.CONTENT, payload=b"z" * 512)
    # Set after construction: aiocoap deprecates passing them in (the library manages them).
    msg.mid, msg.token, msg.mtype = 7, b"abcdefgh", aiocoap.NON
    msg.opt.block2 = BlockOption.BlockwiseTuple(3, True, 5)
    msg.opt.size2 = 123_456
    msg.opt.etag = b"\x00\x11"
    msg.opt.max_age = 30
    r = wire.decode(msg.encode())
    assert r is not None
    assert (r.mtype, r.code, r.mid, r.token) == (wire.NON, wire.CONTENT, 7, b"abcdefgh")
    assert r.block2 == (3, True, 5) and r.size2 == 123_456 and r.etag == b"\x00\x11"
    assert r.max_age == 30 and r.payload == b"z" * 512


def test_malformed_datagrams_decode_to_none() -> None:
    assert wire.decode(b"") is None
    assert wire.decode(b"\x00\x45\x00\x01") is None  # version 0
    assert wire.decode(b"\x49\x45\x00\x01") is None  # token length 9
    assert wire.decode(b"\x58\x45\x00\x01abc") is None  # token cut short
    assert wire.decode(b"\x50\x45\x00\x01\xff") is None  # payload marker, no payload
    assert wire.decode(b"\x50\x45\x00\x01\xd1") is None  # extended delta cut short
    assert wire.decode(b"\x50\x45\x00\x01\xf0") is None  # delta 15 is reserved
    assert wire.decode(b"\x50\x45\x00\x01\xd3\x0a\x01\x02") is None  # option value cut short


@settings(derandomize=True, deadline=None, max_examples=2000)
@given(st.binary(max_size=64))
def test_decode_never_raises(data: bytes) -> None:
    wire.decode(data)
