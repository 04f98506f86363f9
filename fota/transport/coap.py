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

from fota.core import codes
from fota.core.announce_sig import open_envelope
from fota.core.policy import backoff
from fota.core.text import show
from fota.core.uri import check_uri_reference, origin, path_segments, resolve
from fota.errors import (
    ConfigError,
    FotaError,
    ManifestError,
    PermanentServerError,
    TransportError,
)
from fota.transport import (
    Announcement,
    Block,
    BlockFetcher,
    ConcurrentFetcher,
    raise_for,
    truncated,
)
from fota.transport import szx as block_szx
from fota.transport.image import ImageSettings, image_fetcher
from fota.transport.oscore import close_context as close_oscore
from fota.transport.oscore import load_context as load_oscore

log = structlog.get_logger(__name__)

CF_CBOR = 60
MAX_REMOTES = 16
"""Most URIs whose resolved remote is kept (least recently used out). The hot ones are few:
the image being downloaded, the report and announcement resources; every manifest and image
URI of past updates would otherwise stay for good (250 updates: +2.7 MiB)."""
CF_COSE_SIGN1 = 18
"""``application/cose; cose-type="cose-sign1"``: a signed announcement (docs/protocol.md)."""


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
    return backoff(1, interval, interval, rng.random(), jitter)


def classify(uri: str, response: Any) -> None:
    """Raise the fota error for an answer to a GET that carries no data (fota.core.codes)."""
    raise_for(uri, int(response.code), codes.for_get(int(response.code)))


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


DEREGISTER_WAIT = 1.0
"""Longest wait (seconds; ACK_TIMEOUT if shorter) for the answer to a deregistration."""


def _udp_socket(ctx: Any) -> Any:
    """The UDP socket of an aiocoap client context (aiocoap has no public call for it)."""
    for interface in ctx.request_interfaces:
        with contextlib.suppress(AttributeError):
            return interface.token_interface.message_interface.transport.get_extra_info("socket")
    return None


class _Observation:
    """An announcement observation: aiocoap's request, and the answer that accepted it."""

    __slots__ = ("closed", "request", "response")

    def __init__(self, request: Any) -> None:
        self.request = request
        self.response: Any = None
        self.closed = False


class _Outcome:
    """How one observation ended (see ``CoapTransport._observe``)."""

    __slots__ = ("detail", "established", "kind")

    def __init__(self) -> None:
        self.kind = ""
        self.detail = ""
        self.established: float | None = None  # loop time the server accepted it


class CoapTransport:
    """The :class:`~fota.transport.Transport` for ``coap://`` servers.

    Args:
        server: base URI of the update server, e.g. ``coap://127.0.0.1:5683``.
        device_id: this device's id (names the announcement and report resources).
        ack_timeout: CoAP ACK_TIMEOUT in seconds (RFC 7252 default 2.0).
        max_retransmit: CoAP MAX_RETRANSMIT (RFC 7252 default 4).
        poll_interval: poll the announcement this often instead of observing (sleepy
            devices); None observes.
        observe_refresh: re-register an observation that was silent this long (seconds);
            also the poll interval when the server answers without Observe.
        poll_jitter: each poll interval is drawn uniformly in ``poll_interval * (1 ± jitter)``
            (0 <= jitter < 1), so a fleet does not poll in lockstep.
        backoff_base: the first wait after a failed observation or poll (seconds); each
            further failure doubles it.
        backoff_cap: the longest wait between failed attempts (seconds; a polling device's
            is at least its poll interval).
        oscore: directory of the OSCORE security context shared with the server
            (``fota.transport.oscore``); every request is then protected, and a URI outside
            the server's origin is refused rather than sent in plaintext.
        retransmission: the image fetcher's timeout, ``cocoa`` or ``rfc7252``
            (``fota.transport.congestion``).
        congestion: the image fetcher's window, ``aimd`` or ``fixed``.
        min_rto: CoCoA's lower bound on the timeout, seconds.

    Raises:
        ValueError: ``poll_jitter`` is outside 0..1, or the back-off is not
            0 < ``backoff_base`` <= ``backoff_cap``.
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
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        oscore: Path | None = None,
        retransmission: str = "cocoa",
        congestion: str = "aimd",
        min_rto: float = 0.2,
    ) -> None:
        if not 0 <= poll_jitter < 1:
            raise ValueError(f"poll_jitter {poll_jitter} must be in 0..1 (1 excluded)")
        if not 0 < backoff_base <= backoff_cap < math.inf:
            raise ValueError(
                f"backoff_base {backoff_base} and backoff_cap {backoff_cap}: "
                "need 0 < backoff_base <= backoff_cap (finite)"
            )
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
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
        self._told_window = False
        self._ctx: Any = None
        self._ctx_lock = asyncio.Lock()
        # Resolved remote per URI: building a request from a URI string re-parses and
        # re-resolves it every time, a measurable share of per-block CPU. At most
        # MAX_REMOTES, in order of use (a dict keeps insertion order: a hit moves to the end).
        self._remotes: dict[str, tuple[Any, tuple[str, ...]]] = {}
        # The announcement observation the server holds for us, if any (aclose ends it).
        self._observing: _Observation | None = None

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
        """Deregister the observation, shut the client context down (and release OSCORE).

        The observation is deregistered here too, not only when the watcher is left: a
        watcher its user stopped iterating may be finalized only after the context is gone.
        """
        if self._observing is not None:
            await self._forget(self._observing)
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()
        close_oscore(self._oscore)
        self._oscore = None

    def _message(self, uri: str, **options: Any) -> Any:
        cached = self._remotes.pop(uri, None)
        if cached is not None:
            self._remotes[uri] = cached  # the most recently used now
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
            while len(self._remotes) > MAX_REMOTES:
                del self._remotes[next(iter(self._remotes))]  # the least recently used
        return response

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        """Fetch the block at byte ``offset``.

        Raises:
            TransportError: timeout, reset, 5.xx, or a block shorter than its options say
                (retryable).
            PermanentServerError: 4.04 and the like.
            ImageChanged: 4.08.
        """
        szx = block_szx(block_size)
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
        """The image fetcher for ``uri`` (:func:`fota.transport.image.image_fetcher`).

        BERT over TCP for ``coap+tcp://`` (RFC 8323), else a windowed NON Block2 fetcher over
        UDP (``fota.transport.window``); with OSCORE, this transport's own requests.
        """
        if uri.startswith("coap+tcp://"):
            self._protected(uri)
        settings = ImageSettings(
            self._tuning.ACK_TIMEOUT,
            self._tuning.MAX_RETRANSMIT,
            self.retransmission,
            self.congestion,
            self.min_rto,
        )
        secured = self if self._oscore is not None else None
        return image_fetcher(
            uri, window=window, block_size=block_size, settings=settings, secured=secured
        )

    def secured_fetcher(self, uri: str, *, window: int, block_size: int) -> BlockFetcher:
        """OSCORE's image fetcher: each block request protected by aiocoap (``Secured``).

        The raw windowed fetcher builds its own datagrams; OSCORE's are aiocoap's, and aiocoap
        has one confirmable request at a time in flight per server (NSTART 1, RFC 7252 §4.7):
        more workers would only queue in its backlog. Said once in the log.
        """
        self._protected(uri)
        real = self._tuning.NSTART
        if window > real and not self._told_window:
            self._told_window = True
            log.info("oscore_window", asked=window, used=real, why="aiocoap NSTART")
        return ConcurrentFetcher(self, uri, window=min(window, real), block_size=block_size)

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
        """POST a report; only 2.01 and 2.04 acknowledge it (fota.core.codes).

        Raises:
            PermanentServerError: the server refuses the report for good (drop it).
            TransportError: anything else that is not an acknowledgement (send it again).
        """
        response = await self._request(
            self.report_uri, code=Code.POST, payload=body, content_format=CF_CBOR
        )
        code = int(response.code)
        raise_for(self.report_uri, code, codes.for_report(code))

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
        modes. Network errors and error answers (a 4.04 before anything was announced) are
        retried with a jittered exponential back-off from ``backoff_base`` to ``backoff_cap``,
        which only a working observation (or poll) resets, so the watcher never dies and never
        hammers; they are logged at INFO because a gateway losing its uplink is an expected
        event. A server that answers without Observe is polled every ``observe_refresh``,
        each poll offering to observe again (with ``poll_interval`` set, polling is plain GETs
        at that interval). Leaving the generator (or :meth:`aclose`) deregisters the
        observation (docs/protocol.md, "Issue 17 §4").
        """
        failures = 0
        unobservable = False
        while True:
            outcome = _Outcome()
            try:
                if self.poll_interval is not None:
                    ann = await self._get_announcement()
                    failures = 0
                    if ann is not None:
                        yield ann
                    await self._pause(self.next_poll_delay())
                    continue
                rounds = self._observe(outcome)
                async with contextlib.aclosing(rounds):
                    async for ann in rounds:
                        yield ann
            except (aiocoap.error.Error, OSError, FotaError) as exc:
                # FotaError too: an unusable URI or a missing OSCORE context must not end the
                # watcher; it backs off and tries again.
                failures = 1 if self._healthy(outcome) else failures + 1
                delay = self._backoff(failures)
                log.info("announcement_retry", uri=self.announce_uri, error=str(exc), delay=delay)
            else:
                if outcome.kind == "unobservable":
                    # Not an error, and nothing to back off from: the server cannot notify,
                    # so look as often as a device that was told to poll.
                    failures = 0
                    interval = self.observe_refresh
                    delay = poll_delay(interval, self.poll_jitter, self._random)
                    if not unobservable:
                        log.info("observe_unsupported", uri=self.announce_uri, interval=interval)
                elif outcome.kind == "silent":
                    failures, delay = 0, 0.0  # re-register at once: the server may have restarted
                else:  # "refused" (an error answer) or "ended" (by the server)
                    failures = 1 if self._healthy(outcome) else failures + 1
                    delay = self._backoff(failures)
                    log.info(
                        "announcement_retry",
                        uri=self.announce_uri,
                        error=outcome.detail,
                        delay=delay,
                    )
                unobservable = outcome.kind == "unobservable"
            # A timer, not synchronisation; check_now() cuts it short.
            await self._pause(delay)

    def _backoff(self, failures: int) -> float:
        """The wait after ``failures`` (>= 1) consecutive failed attempts, with jitter.

        Doubles from ``backoff_base`` up to ``backoff_cap`` (a polling, sleepy device: up to
        its poll interval if that is longer, not to the observer's minute). Always jittered
        (at least ±10 %), so a fleet that lost its server together does not return together.
        """
        cap = self.backoff_cap
        if self.poll_interval is not None:
            cap = max(cap, self.poll_interval)
        jitter = max(self.poll_jitter, 0.1)
        return backoff(failures, self.backoff_base, cap, self._random.random(), jitter)

    def _healthy(self, outcome: _Outcome) -> bool:
        """Whether an observation worked: the server kept it for ``backoff_cap`` or longer.

        Only then does the back-off start over: a server that accepts and at once ends every
        observation (with a last notification, even) must not be asked every
        ``backoff_base`` seconds.
        """
        if outcome.established is None:
            return False
        return asyncio.get_running_loop().time() - outcome.established >= self.backoff_cap

    async def _observe(self, outcome: _Outcome) -> AsyncGenerator[Announcement, None]:
        """One observation of the announcement: register, yield what it brings, deregister.

        Sets ``outcome.kind``: ``refused`` (an error answer), ``unobservable`` (an answer
        without Observe), ``silent`` (nothing for ``observe_refresh``) or ``ended`` (by the
        server); a network error is raised.
        """
        ctx = await self._context()
        msg = aiocoap.Message(
            code=Code.GET, uri=self.announce_uri, observe=0, transport_tuning=self._tuning
        )
        self._check.clear()  # the registration's answer is a fresh announcement
        self._guard(ctx, msg, self.announce_uri)
        observation = _Observation(ctx.request(msg))
        self._observing = observation
        try:
            response = await observation.request.response
            if not response.code.is_successful():
                outcome.kind, outcome.detail = "refused", f"server answered {response.code}"
                return
            ann = self._decode_announcement(response)
            if response.opt.observe is None:
                outcome.kind = "unobservable"
                if ann is not None:
                    yield ann
                return
            observation.response = response
            outcome.established = asyncio.get_running_loop().time()
            if ann is not None:
                yield ann
            notes = self._notifications(observation.request.observation)
            async with contextlib.aclosing(notes):
                async for note in notes:
                    if note is None:  # silent too long
                        outcome.kind = "silent"
                        return
                    yield note
            outcome.kind, outcome.detail = "ended", "the server ended the observation"
        finally:
            await self._forget(observation)

    async def _forget(self, observation: _Observation) -> None:
        """End an observation here, and at the server if it still holds it (RFC 7641 §3.6).

        A client that just goes away leaves its observation at the server until a notification
        bounces off its closed port; deregistering keeps the server's list true and spares it
        that ICMP error (which some servers blame on the next client they send to). Waits
        (briefly) for the server's answer, so that the answer does not bounce either.
        """
        if observation.closed:
            return
        observation.closed = True
        if self._observing is observation:
            self._observing = None
        client_side = observation.request.observation
        if client_side.cancelled:
            return  # the server ended it, or it failed: the server holds nothing
        if observation.response is not None and self._deregister(observation.response):
            ended = asyncio.Event()
            client_side.on_cancel(ended.set)  # the answer ends the observation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self._tuning.ACK_TIMEOUT, DEREGISTER_WAIT)):
                    await ended.wait()
        if not client_side.cancelled:
            client_side.cancel()

    def _deregister(self, response: Any) -> bool:
        """Send a deregistration (a NON GET with Observe: 1 and the observation's token).

        It must come from the registration's socket with its token, which aiocoap's request
        API cannot do, so it is encoded here and sent on aiocoap's socket. Not with OSCORE
        (it would have to be protected); the server then drops the observation when a
        notification bounces. Returns whether it was sent.
        """
        sock = _udp_socket(self._ctx) if self._ctx is not None and self._oscore is None else None
        address = getattr(response.remote, "sockaddr", None)
        if sock is None or address is None:
            return False
        message = aiocoap.Message(code=Code.GET, uri=self.announce_uri, observe=1)
        message.mtype = aiocoap.NON
        message.mid = self._random.getrandbits(16)
        message.token = response.token
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.debug("observation_deregister_failed", uri=self.announce_uri, error=str(exc))
            return False
        log.debug("observation_deregistered", uri=self.announce_uri)
        return True

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
