"""One image path: which fetcher serves an image URI, and with which settings.

``CoapTransport.block_fetcher`` (the update client) and ``fota fetch`` both pick the fetcher
here, so a setting means the same on either path: BERT over TCP for ``coap+tcp://``
(RFC 8323), else the windowed NON Block2 fetcher over UDP (``fota.transport.window``). A
secured path plugs in here too, as ``secured``: the security context that carries the image
requests itself (OSCORE today, through aiocoap; a DTLS session next, issue 21).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fota.transport import BlockFetcher
from fota.transport.tcp import TcpFetcher
from fota.transport.window import WindowFetcher


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """How the image fetchers retransmit, pace and give up (``Config`` and ``fota fetch``).

    Over TCP (no retransmissions) ``ack_timeout`` and ``max_retransmit`` bound how long one
    answer may take: as long as the UDP path would wait for a block over all its tries.

    Attributes:
        ack_timeout: CoAP ACK_TIMEOUT, seconds: the first retransmission timeout.
        max_retransmit: CoAP MAX_RETRANSMIT: a block is asked for at most this plus one times.
        retransmission: ``cocoa`` or ``rfc7252`` (``fota.transport.congestion``).
        congestion: ``aimd`` or ``fixed`` window.
        min_rto: the adaptive timeout's floor, seconds.
    """

    ack_timeout: float = 2.0
    max_retransmit: int = 4
    retransmission: str = "cocoa"
    congestion: str = "aimd"
    min_rto: float = 0.2


class Secured(Protocol):
    """A security context that carries image requests itself (OSCORE today; DTLS next)."""

    def secured_fetcher(self, uri: str, *, window: int, block_size: int) -> BlockFetcher:
        """The fetcher for ``uri`` through this context; its ``window`` is the real one."""
        ...


def image_fetcher(
    uri: str,
    *,
    window: int,
    block_size: int,
    settings: ImageSettings,
    secured: Secured | None = None,
) -> BlockFetcher:
    """The fetcher for an image URI: through ``secured`` when given, else plain UDP or TCP.

    Raises:
        PermanentServerError: a URI no fetcher can serve (or outside ``secured``'s origin).
    """
    if secured is not None:
        return secured.secured_fetcher(uri, window=window, block_size=block_size)
    if uri.startswith("coap+tcp://"):
        # TCP retransmits by itself: a block may take as long as the UDP path would wait for
        # it over all its retransmissions (RFC 7252's MAX_TRANSMIT_WAIT, less the random
        # factor) before the transfer fails and resumes later.
        wait = settings.ack_timeout * (2 ** (settings.max_retransmit + 1) - 1)
        return TcpFetcher.for_uri(uri, timeout=wait, window=window, block_size=block_size)
    return WindowFetcher.for_uri(
        uri,
        window=window,
        block_size=block_size,
        timeout=settings.ack_timeout,
        max_tries=settings.max_retransmit + 1,
        retransmission=settings.retransmission,
        congestion=settings.congestion,
        min_rto=settings.min_rto,
    )
