"""CoAP transport over aiocoap (UDP; ``coap://``).

Images are fetched with explicit Block2 requests (``handle_blockwise=False``): aiocoap's automatic
block-wise keeps the whole body in memory and re-assembles it quadratically. Each block's byte
offset comes from the *response's* block number and size, so a server that answers with a smaller
block size than asked (RFC 7959 section 2.4) is simply followed.

aiocoap ships no type information; everything from it is ``Any`` here, and nothing from it
leaves this module: its errors become :mod:`fota.errors` types with the original as
``__cause__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiocoap
import aiocoap.error
import cbor2
import structlog
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.optiontypes import BlockOption

from fota.core.announce_sig import open_envelope
from fota.core.text import show
from fota.core.uri import check_uri_reference, origin, path_segments, resolve
from fota.errors import (
    ConfigError,
    FotaError,
    ImageChanged,
    ManifestError,
    PermanentServerError,
    TransportError,
)
from fota.transport import Announcement, Block, BlockFetcher, ConcurrentFetcher, truncated
from fota.transport.oscore import close_context as close_oscore
from fota.transport.oscore import load_context as load_oscore
from fota.transport.tcp import TcpFetcher
from fota.transport.window import WindowFetcher

log = structlog.get_logger(__name__)

CF_CBOR = 60
CF_COSE_SIGN1 = 18
"""``application/cose; cose-type="cose-sign1"``: a signed announcement (docs/protocol.md)."""
PERMANENT = frozenset(
    {
        Code.BAD_REQUEST,
        Code.FORBIDDEN,
        Code.NOT_FOUND,
        Code.UNSUPPORTED_CONTENT_FORMAT,
        Code.METHOD_NOT_ALLOWED,
        Code.UNAUTHORIZED,
        Code.BAD_OPTION,
    }
)


def tuning(ack_timeout: float, max_retransmit: int) -> TransportTuning:
    """A TransportTuning with our timing (tests shorten it; RFC 7252 defaults otherwise)."""

    class _Tuning(TransportTuning):  # type: ignore[misc]  # aiocoap is untyped
        ACK_TIMEOUT = ack_timeout
        MAX_RETRANSMIT = max_retransmit

    return _Tuning()


def poll_delay(interval: float, jitter: float, rng: random.Random) -> float:
    """One poll interval, drawn uniformly in ``interval * (1 ± jitter)``.

    A fleet that started together (a power cut ends) must not poll in lockstep.
    """
    return interval * rng.uniform(1.0 - jitter, 1.0 + jitter)


def szx_for(block_size: int) -> int:
    """The SZX exponent for a block size of 16..1024 bytes (a power of two)."""
    if block_size not in (16, 32, 64, 128, 256, 512, 1024):
        raise ValueError(f"block_size {block_size} must be a power of two from 16 to 1024")
    return int(math.log2(block_size)) - 4


def classify(uri: str, response: Any) -> None:
    """Raise the fota error for a non-success response."""
    code = response.code
    if code.is_successful():
        return
    if code == Code.REQUEST_ENTITY_INCOMPLETE:
        raise ImageChanged(f"{uri}: server answered {code} (the resource changed)")
    if code in PERMANENT:
        raise PermanentServerError(uri, str(code))
    raise TransportError(f"{uri}: server answered {code}")


def _parse_announcement(payload: bytes, content_format: int | None, base: str) -> Announcement:
    """Decode an announcement (CDDL ``announcement`` in docs/protocol.md) fetched from ``base``.

    A tagged COSE_Sign1 is a signed announcement (CDDL ``signed-announcement``): its
    envelope's form is checked here, its signature and expiry by the engine.

    Args:
        payload: the response's payload.
        content_format: its Content-Format option (None: absent, taken as CBOR); 60, or
            18 for a signed announcement.
        base: the announcement's URI; the manifest location resolves against it.

    Raises:
        ValueError: not a CBOR map of the announcement's fields, with the right types and
            sizes; the message names the field. The caller ignores such an announcement.
    """
    if content_format is not None and content_format not in (CF_CBOR, CF_COSE_SIGN1):
        raise ValueError(
            f"content format {show(content_format)} is not {CF_CBOR} (CBOR)"
            f" or {CF_COSE_SIGN1} (COSE_Sign1)"
        )
    try:
        body = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types on hostile input
        raise ValueError(f"not CBOR ({show(str(exc), 80)})") from exc
    signed = None
    if isinstance(body, cbor2.CBORTag):
        # A signed announcement (CDDL signed-announcement): its fields are the payload's;
        # the engine checks the signature and the expiry (announce_sig.check).
        try:
            signed, body = open_envelope(payload)
        except ManifestError as exc:
            raise ValueError(str(exc)) from exc
    elif content_format == CF_COSE_SIGN1:
        raise ValueError(f"content format {CF_COSE_SIGN1} (COSE_Sign1) but not a COSE_Sign1")
    if not isinstance(body, dict):
        raise ValueError("not a CBOR map")
    seq = body.get(1)
    digest = body.get(2)
    location = body.get(3)
    cancel = body.get(4)
    if type(seq) is not int or not 0 <= seq < 1 << 64:
        raise ValueError("sequence (key 1): expected an unsigned integer below 2**64")
    if digest is not None and not (isinstance(digest, bytes) and len(digest) == 32):
        raise ValueError("manifest digest (key 2): expected 32 bytes")
    if location is not None:
        if not isinstance(location, str):
            raise ValueError("manifest location (key 3): expected text")
        problem = check_uri_reference(location)
        if problem:
            raise ValueError(f"manifest location (key 3): {problem}")
    if 4 in body and not (isinstance(cancel, bytes) and len(cancel) == 32):
        raise ValueError("cancel (key 4): expected 32 bytes")
    keyset_version, keyset_location = body.get(5), body.get(6)
    if (5 in body) != (6 in body):
        raise ValueError("keyset (keys 5 and 6): expected both or neither")
    if 5 in body:
        if type(keyset_version) is not int or not 1 <= keyset_version < 1 << 63:
            raise ValueError("keyset version (key 5): expected an integer in 1..2**63-1")
        if not isinstance(keyset_location, str):
            raise ValueError("keyset location (key 6): expected text")
        problem = check_uri_reference(keyset_location)
        if problem:
            raise ValueError(f"keyset location (key 6): {problem}")
    uri = resolve(base, location) if location else None
    keyset_uri = resolve(base, keyset_location) if isinstance(keyset_location, str) else None
    return Announcement(seq, digest, uri, cancel, keyset_version, keyset_uri, signed)


class CoapTransport:
    """The :class:`~fota.transport.Transport` for ``coap://`` servers.

    Args:
        server: base URI of the update server, e.g. ``coap://127.0.0.1:5683``.
        device_id: this device's id (names the announcement and report resources).
        ack_timeout: CoAP ACK_TIMEOUT in seconds (RFC 7252 default 2.0).
        max_retransmit: CoAP MAX_RETRANSMIT (RFC 7252 default 4).
        poll_interval: poll the announcement this often instead of observing (sleepy
            devices); None observes.
        observe_refresh: re-register an observation that was silent this long (seconds).
        poll_jitter: each poll interval is drawn uniformly in ``poll_interval * (1 ± jitter)``
            (0 <= jitter < 1), so a fleet does not poll in lockstep.
        oscore: directory of the OSCORE security context shared with the server
            (``fota.transport.oscore``); every request is then protected, and a URI outside
            the server's origin is refused rather than sent in plaintext.
        retransmission: the image fetcher's timeout, ``cocoa`` or ``rfc7252``
            (``fota.transport.congestion``).
        congestion: the image fetcher's window, ``aimd`` or ``fixed``.
        min_rto: CoCoA's lower bound on the timeout, seconds.

    Raises:
        ValueError: ``poll_jitter`` is outside 0..1.
        ConfigError: ``oscore`` with a ``coap+tcp://`` server, or an unusable context.
    """

    def __init__(
        self,
        server: str,
        device_id: str,
        *,
        ack_timeout: float = 2.0,
        max_retransmit: int = 4,
        poll_interval: float | None = None,
        observe_refresh: float = 300.0,
        poll_jitter: float = 0.1,
        oscore: Path | None = None,
        retransmission: str = "cocoa",
        congestion: str = "aimd",
        min_rto: float = 0.2,
    ) -> None:
        if not 0 <= poll_jitter < 1:
            raise ValueError(f"poll_jitter {poll_jitter} must be in 0..1 (1 excluded)")
        self.server = server.rstrip("/")
        self.retransmission, self.congestion, self.min_rto = retransmission, congestion, min_rto
        self._oscore: Any = None
        if oscore is not None:
            if urlsplit(self.server).scheme != "coap":
                raise ConfigError(f"oscore: needs a coap:// server, not {self.server}")
            self._oscore = load_oscore(Path(oscore))
        self.device_id = device_id
        self.announce_uri = f"{self.server}/fota/ann/{device_id}"
        self.report_uri = f"{self.server}/fota/report/{device_id}"
        self.poll_interval = poll_interval
        self.observe_refresh = observe_refresh
        self.poll_jitter = poll_jitter
        self._random = random.Random()
        # Set by check_now(); the poll timer, the observation wait and the back-off all
        # also wait on it. Cleared just before a fetch, so a check made during a fetch
        # gets a fetch of its own.
        self._check = asyncio.Event()
        self._tuning = tuning(ack_timeout, max_retransmit)
        self._ctx: Any = None
        self._ctx_lock = asyncio.Lock()
        # Resolved remote per URI: building a request from a URI string re-parses and
        # re-resolves it every time, a measurable share of per-block CPU.
        self._remotes: dict[str, tuple[Any, tuple[str, ...]]] = {}

    async def _context(self) -> Any:
        async with self._ctx_lock:
            if self._ctx is None:
                if self._oscore is None:
                    self._ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
                else:
                    self._ctx = await aiocoap.Context.create_client_context(
                        transports=["oscore", "udp6"]
                    )
                    # Under aiocoap's own spelling of the origin (host lower-cased, IPv6 in
                    # canonical form): it looks requests up by that, and a request it finds no
                    # context for would go out in plaintext.
                    base = aiocoap.Message(code=Code.GET, uri=self.server + "/").get_request_uri()
                    self._ctx.client_credentials[base.rstrip("/") + "/*"] = self._oscore
            return self._ctx

    def _guard(self, ctx: Any, msg: Any, uri: str) -> None:
        """With OSCORE, refuse to send ``msg`` unless our context protects it (fail closed)."""
        if self._oscore is None:
            return
        from aiocoap.credentials import CredentialsMissingError

        try:
            found = ctx.client_credentials.credentials_from_request(msg)
        except CredentialsMissingError:
            found = None
        if found is not self._oscore:
            raise PermanentServerError(uri, "no OSCORE context covers it; not sent in plaintext")

    def _unprotected(self, response: Any) -> bool:
        """With OSCORE, whether an answer came without protection (never to be believed)."""
        if self._oscore is None:
            return False
        from aiocoap.transports.oscore import OSCOREAddress

        return not isinstance(response.remote, OSCOREAddress)

    def _protected(self, uri: str) -> None:
        """With OSCORE, refuse a URI the security context does not cover (never plaintext)."""
        if self._oscore is not None and origin(uri) != origin(self.server):
            raise PermanentServerError(uri, "outside the OSCORE-protected server's origin")

    async def aclose(self) -> None:
        """Shut the client context down (and release the OSCORE context, if any)."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()
        close_oscore(self._oscore)
        self._oscore = None

    def _message(self, uri: str, **options: Any) -> Any:
        cached = self._remotes.get(uri)
        if cached is None:
            return aiocoap.Message(uri=uri, transport_tuning=self._tuning, **options)
        remote, path = cached
        msg = aiocoap.Message(uri_path=path, transport_tuning=self._tuning, **options)
        msg.remote = remote
        return msg

    async def _request(self, uri: str, **options: Any) -> Any:
        self._protected(uri)
        try:
            path_segments(uri)  # aiocoap would send a "." or ".." Uri-Path (RFC 7252 §5.10.1)
        except ValueError as exc:
            raise PermanentServerError(uri, f"not requested: {exc}") from None
        ctx = await self._context()
        try:
            msg = self._message(uri, **options)
        except aiocoap.error.MalformedUrlError as exc:
            # The URI came from the server (a location, a manifest): asking again won't help.
            raise PermanentServerError(uri, f"malformed URI ({exc})") from exc
        self._guard(ctx, msg, uri)
        try:
            response = await ctx.request(msg, handle_blockwise=False).response
        except aiocoap.error.Error as exc:
            raise TransportError(f"{uri}: {exc.__class__.__name__}: {exc}") from exc
        except OSError as exc:
            raise TransportError(f"{uri}: {exc}") from exc
        if self._unprotected(response):
            raise TransportError(f"{uri}: an unprotected answer to an OSCORE request")
        if uri not in self._remotes and self._oscore is None:
            # Not with OSCORE: a request must go through the OSCORE transport again, and the
            # response's remote is that transport's address, not the server's.
            self._remotes[uri] = (response.remote, tuple(msg.opt.uri_path))
        return response

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        """Fetch the block at byte ``offset``.

        Raises:
            TransportError: timeout, reset, 5.xx, or a block shorter than its options say
                (retryable).
            PermanentServerError: 4.04 and the like.
            ImageChanged: 4.08.
        """
        szx = szx_for(block_size)
        response = await self._request(
            uri, code=Code.GET, block2=BlockOption.BlockwiseTuple(offset // block_size, False, szx)
        )
        classify(uri, response)
        block2 = response.opt.block2
        size2 = response.opt.size2
        # aiocoap decodes options of any length: a 2000-byte Block2 is a block number that
        # str() refuses. RFC 7959 allows 0..3 bytes (SZX 7 is BERT, TCP only) and a 0..4 byte
        # Size2; like wire.decode, take anything longer as a damaged answer (retryable).
        if size2 is not None and size2 >= 1 << 32:
            raise TransportError(f"{uri}: Size2 longer than 4 bytes")
        if block2 is not None and (block2.block_number >= 1 << 20 or block2.size_exponent == 7):
            raise TransportError(f"{uri}: Block2 longer than 3 bytes, or SZX 7 (BERT) over UDP")
        if block2 is None:
            # A server that ignores Block2 sends the whole resource at once.
            return Block(0, response.payload, False, len(response.payload), response.opt.etag)
        if truncated(
            response.payload, bool(block2.more), block2.start, block2.size, response.opt.size2
        ):
            # Retryable: a cut datagram is gone on the next try; a server that always does
            # it runs out of attempts.
            raise TransportError(
                f"{uri}: block {block2.block_number} has {len(response.payload)} bytes; "
                f"its Block2 says {block2.size}"
                + ("" if block2.more else f" and Size2 {response.opt.size2}")
            )
        return Block(
            offset=block2.start,
            data=response.payload,
            more=bool(block2.more),
            size2=response.opt.size2,
            etag=response.opt.etag,
        )

    def block_fetcher(self, uri: str, *, window: int, block_size: int) -> BlockFetcher:
        """The image fetcher for ``uri``.

        BERT over TCP for ``coap+tcp://`` (RFC 8323), else a windowed NON Block2 fetcher over
        UDP (``fota.transport.window``).
        """
        if uri.startswith("coap+tcp://"):
            self._protected(uri)
            return TcpFetcher.for_uri(uri)
        if self._oscore is not None:
            # The raw windowed fetcher builds its own datagrams; OSCORE's are aiocoap's.
            return ConcurrentFetcher(self, uri, window=window, block_size=block_size)
        return WindowFetcher.for_uri(
            uri,
            window=window,
            block_size=block_size,
            timeout=self._tuning.ACK_TIMEOUT,
            max_tries=self._tuning.MAX_RETRANSMIT + 1,
            retransmission=self.retransmission,
            congestion=self.congestion,
            min_rto=self.min_rto,
        )

    async def fetch(self, uri: str, *, limit: int) -> bytes:
        """Fetch a small resource with explicit Block2 requests, at most ``limit + 1`` bytes."""
        parts: list[bytes] = []
        offset, size = 0, 1024
        while True:
            block = await self.fetch_block(uri, offset, size)
            if block.offset != offset:
                raise TransportError(f"{uri}: asked for byte {offset}, got block at {block.offset}")
            parts.append(block.data)
            offset += len(block.data)
            if not block.more or offset > limit:
                return b"".join(parts)
            if len(block.data) < size:  # the server chose a smaller block size: follow it
                size = len(block.data)
                if offset % size:
                    raise TransportError(
                        f"{uri}: block size {size} does not divide offset {offset}"
                    )

    async def post_report(self, body: bytes) -> None:
        """POST a report; any 2.xx is an acknowledgement."""
        response = await self._request(
            self.report_uri, code=Code.POST, payload=body, content_format=CF_CBOR
        )
        classify(self.report_uri, response)

    def _decode_announcement(self, response: Any) -> Announcement | None:
        if self._unprotected(response):
            log.warning("announcement_unprotected", uri=self.announce_uri)
            return None
        try:
            classify(self.announce_uri, response)
            return _parse_announcement(
                response.payload, response.opt.content_format, self.announce_uri
            )
        except Exception as exc:  # a misbehaving server must not stop the watcher
            log.warning("announcement_unusable", uri=self.announce_uri, error=show(str(exc), 200))
            return None

    def check_now(self) -> None:
        """Fetch the announcement now (a plain GET) and yield it, polling or observing.

        For an application that just woke from sleep. Returns at once; call it from the event
        loop's thread. Several calls before the fetch starts make one fetch.
        """
        self._check.set()

    def next_poll_delay(self) -> float:
        """The next poll interval (see ``poll_jitter``)."""
        assert self.poll_interval is not None
        return poll_delay(self.poll_interval, self.poll_jitter, self._random)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` (a timer) or until :meth:`check_now`, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._check.wait()

    async def _get_announcement(self) -> Announcement | None:
        self._check.clear()
        response = await self._request(self.announce_uri, code=Code.GET)
        return self._decode_announcement(response)

    async def announcements(self) -> AsyncGenerator[Announcement, None]:
        """Observe (or poll) the announcement; yield every usable one, forever.

        :meth:`check_now` makes it fetch (GET) and yield the announcement at once, in both
        modes. Network errors are retried with a capped back-off so the watcher never dies;
        they are logged at INFO because a gateway losing its uplink is an expected event.
        """
        backoff = 1.0
        while True:
            try:
                if self.poll_interval is not None:
                    ann = await self._get_announcement()
                    backoff = 1.0
                    if ann is not None:
                        yield ann
                    await self._pause(self.next_poll_delay())
                    continue
                ctx = await self._context()
                msg = aiocoap.Message(
                    code=Code.GET, uri=self.announce_uri, observe=0, transport_tuning=self._tuning
                )
                self._check.clear()  # the registration's answer is a fresh announcement
                self._guard(ctx, msg, self.announce_uri)
                request = ctx.request(msg)
                try:
                    response = await request.response
                    backoff = 1.0
                    ann = self._decode_announcement(response)
                    if ann is not None:
                        yield ann
                    notes = self._notifications(request.observation)
                    async with contextlib.aclosing(notes):
                        async for note in notes:
                            if note is None:  # silent too long: re-register at once
                                backoff = 0.0
                                break
                            yield note
                finally:
                    if not request.observation.cancelled:
                        request.observation.cancel()
            except (aiocoap.error.Error, OSError, FotaError) as exc:
                # FotaError too: an unusable URI or a missing OSCORE context must not end the
                # watcher; it backs off and tries again.
                log.info("announcement_retry", uri=self.announce_uri, error=str(exc), delay=backoff)
            # Back-off between re-registrations (a timer, not synchronisation), with jitter so
            # that a fleet does not come back in lockstep after an outage; check_now() cuts it
            # short. A polling (sleepy) device backs off up to its poll interval, not to the
            # observer's minute.
            await self._pause(poll_delay(backoff, self.poll_jitter, self._random))
            cap = max(60.0, self.poll_interval) if self.poll_interval is not None else 60.0
            backoff = min(max(backoff, 0.5) * 2, cap)

    async def _notifications(self, observation: Any) -> AsyncGenerator[Announcement | None, None]:
        """The usable notifications of one observation, and a GET's answer per check_now().

        Ends when the server ends the observation; yields None (and should be left) when the
        observation was silent for ``observe_refresh`` seconds: a server that restarts
        forgets its observers without telling them.
        """
        notifications = aiter(observation)

        async def next_notification() -> Any:
            try:
                return await anext(notifications)
            except StopAsyncIteration:
                return None

        loop = asyncio.get_running_loop()
        silent_until = loop.time() + self.observe_refresh
        # One pending read, kept across checks: cancelling it would cancel the iterator's
        # own future.
        pending = asyncio.create_task(next_notification())
        checking: asyncio.Task[Any] | None = None
        try:
            while True:
                checking = asyncio.create_task(self._check.wait())
                done, _ = await asyncio.wait(
                    (pending, checking),
                    timeout=max(0.0, silent_until - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                checking.cancel()
                if pending in done:
                    notification = pending.result()
                    if notification is None:
                        log.info("observation_ended", uri=self.announce_uri)
                        return
                    pending = asyncio.create_task(next_notification())
                    silent_until = loop.time() + self.observe_refresh
                    ann = self._decode_announcement(notification)
                elif checking in done:
                    log.debug("announcement_check", uri=self.announce_uri)
                    ann = await self._get_announcement()
                else:
                    log.debug("observation_refreshed", uri=self.announce_uri)
                    yield None
                    return
                if ann is not None:
                    yield ann
        finally:
            pending.cancel()
            if checking is not None:
                checking.cancel()
