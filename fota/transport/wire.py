"""The few CoAP messages the block downloader needs, encoded and decoded by hand (RFC 7252 §3).

Why not aiocoap for the image: a Block2 GET through aiocoap costs 90-250 µs of CPU (message
objects, option classes, remote parsing, exchange bookkeeping), which caps a 1 KiB-block
download far below what the link and the server allow. The download only ever sends
``GET`` with Uri-Path and Block2 and only reads Block2, Size2, ETag, Max-Age and the payload, so
this module does exactly that, with the Uri-Path options encoded once per transfer. Everything
else (observe, manifest, reports, TCP) stays on aiocoap.

Malformed datagrams decode to None; nothing here raises on hostile input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VERSION = 1
CON, NON, ACK, RST = 0, 1, 2, 3
GET = 1
CONTENT = 0x45  # 2.05

OPT_ETAG = 4
OPT_URI_PATH = 11
OPT_MAX_AGE = 14
OPT_BLOCK2 = 23
OPT_SIZE2 = 28

_HEADER = struct.Struct(">BBH")


def _option_header(delta: int, length: int) -> bytes:
    def nibble(value: int) -> tuple[int, bytes]:
        if value < 13:
            return value, b""
        if value < 269:
            return 13, bytes([value - 13])
        return 14, (value - 269).to_bytes(2, "big")

    d, dx = nibble(delta)
    n, nx = nibble(length)
    return bytes([(d << 4) | n]) + dx + nx


def encode_uint(value: int) -> bytes:
    """CoAP uint option value: big-endian, minimal length (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def encode_path(segments: tuple[str, ...]) -> bytes:
    """Uri-Path options (option 11, one per segment), starting from option number 0."""
    out = bytearray()
    last = 0
    for segment in segments:
        value = segment.encode()
        out += _option_header(OPT_URI_PATH - last, len(value)) + value
        last = OPT_URI_PATH
    return bytes(out)


def encode_block_get(
    mid: int, token: bytes, path_options: bytes, num: int, szx: int, *, has_path: bool = True
) -> bytes:
    """A NON GET with pre-encoded Uri-Path options and a Block2 option asking block ``num``."""
    block = encode_uint((num << 4) | szx)
    delta = OPT_BLOCK2 - (OPT_URI_PATH if has_path else 0)
    return b"".join(
        (
            _HEADER.pack((VERSION << 6) | (NON << 4) | len(token), GET, mid),
            token,
            path_options,
            _option_header(delta, len(block)),
            block,
        )
    )


def encode_empty(mtype: int, mid: int) -> bytes:
    """An empty ACK or RST for message id ``mid``."""
    return _HEADER.pack((VERSION << 6) | (mtype << 4), 0, mid)


@dataclass(slots=True)
class Response:
    """The parts of a response the downloader uses."""

    mtype: int
    code: int
    mid: int
    token: bytes
    payload: bytes
    block2: tuple[int, bool, int] | None = None
    size2: int | None = None
    etag: bytes | None = None
    max_age: int | None = None


def decode(data: bytes, *, bert: bool = False) -> Response | None:
    """Decode a datagram; None when it is not a well-formed CoAP message.

    ``bert`` admits Block2 SZX 7 (BERT), which only reliable transports may use (RFC 8323).
    """
    if len(data) < 4:
        return None
    first, code, mid = _HEADER.unpack_from(data)
    if first >> 6 != VERSION:
        return None
    tkl = first & 0x0F
    if tkl > 8 or len(data) < 4 + tkl:
        return None
    response = Response((first >> 4) & 3, code, mid, bytes(data[4 : 4 + tkl]), b"")
    pos, number, end = 4 + tkl, 0, len(data)
    while pos < end:
        byte = data[pos]
        if byte == 0xFF:
            if pos + 1 == end:
                return None  # a payload marker with no payload is a format error
            response.payload = bytes(data[pos + 1 :])
            break
        pos += 1
        delta, length = byte >> 4, byte & 0x0F
        if delta == 15 or length == 15:
            return None
        if delta == 13:
            if pos >= end:
                return None
            delta, pos = data[pos] + 13, pos + 1
        elif delta == 14:
            if pos + 2 > end:
                return None
            delta, pos = int.from_bytes(data[pos : pos + 2], "big") + 269, pos + 2
        if length == 13:
            if pos >= end:
                return None
            length, pos = data[pos] + 13, pos + 1
        elif length == 14:
            if pos + 2 > end:
                return None
            length, pos = int.from_bytes(data[pos : pos + 2], "big") + 269, pos + 2
        if pos + length > end:
            return None
        number += delta
        value = data[pos : pos + length]
        pos += length
        if number == OPT_BLOCK2:
            if length > 3:
                return None
            raw = int.from_bytes(value, "big")
            if raw & 7 == 7 and not bert:
                return None  # SZX 7 is reserved (BERT only over reliable transports)
            response.block2 = (raw >> 4, bool(raw & 8), raw & 7)
        elif number == OPT_SIZE2:
            if length > 4:
                return None  # uint of 0..4 bytes (RFC 7959 §4); longer is no size at all
            response.size2 = int.from_bytes(value, "big")
        elif number == OPT_ETAG:
            response.etag = bytes(value)
        elif number == OPT_MAX_AGE:
            if length > 4:
                return None  # uint of 0..4 bytes (RFC 7252 §5.10.5); float() of more overflows
            response.max_age = int.from_bytes(value, "big")
    return response


def code_text(code: int) -> str:
    """``4.04`` style text for a code byte."""
    return f"{code >> 5}.{code & 0x1F:02d}"
