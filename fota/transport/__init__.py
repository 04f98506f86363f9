"""The transport seam: what the engine needs from the network, as a Protocol.

``fota.transport.coap.CoapTransport`` implements it with aiocoap. Errors are always
:class:`~fota.errors.FotaError` subclasses (``TransportError``, ``PermanentServerError``,
``ImageChanged``); no aiocoap exception crosses this line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Announcement:
    """A decoded announcement; ``manifest_uri`` is already resolved to an absolute URI."""

    sequence: int
    manifest_digest: bytes | None
    manifest_uri: str | None


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


class Transport(Protocol):
    """What the engine and the downloader use to talk to the update server."""

    def announcements(self) -> AsyncIterator[Announcement]:
        """Yield the current announcement and every change to it, forever."""
        ...

    async def fetch(self, uri: str, *, limit: int) -> bytes:
        """Fetch a small resource block by block; stop after ``limit + 1`` bytes."""
        ...

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        """Fetch the block at byte ``offset`` (a multiple of ``block_size``)."""
        ...

    async def post_report(self, body: bytes) -> None:
        """Deliver one CBOR status report; return only when the server acknowledged it."""
        ...

    async def aclose(self) -> None:
        """Release sockets."""
        ...
