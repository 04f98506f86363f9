"""A real CoAP update server for tests, demos and manual checks.

It serves the resources of ``docs/protocol.md`` over UDP on ``127.0.0.1`` (port 0 by
default: the OS picks one, see :attr:`UpdateServer.port`):

* images and manifests are files under ``root``, addressed by digest, and Block2 slices are cut
  from disk for each request (stateless: a new server on the same files resumes a download);
  the ETag is derived from the image digest, so it survives a server restart;
* announcements per device (or for every device) are observable, and may withdraw (cancel) a
  manifest; with ``sign_announcements`` each is a COSE_Sign1 signed when it is sent, issued
  at :attr:`UpdateServer.clock` and valid for ``announcement_lifetime`` seconds (a test turns
  the clock back to serve expired ones, or the signing off to serve unsigned ones); a dead
  observer (a killed or restarted client) is dropped without costing a live one its
  notification (see ``_Wire``);
* every request and every status report is recorded for tests to assert on;
* a seeded :class:`FaultPlan` injects faults into image requests: corrupt or truncated
  blocks, request loss, response delay (fixed + jitter, or answers one at a time), duplicated
  and reordered responses (on the wire: the datagram is sent twice, or held back until the
  next one has left), a smaller block size or another ETag from some request on, 5.03 with
  Max-Age, 4.04, and a cancel or a superseding manifest announced part-way through a
  download; image requests in flight (received, not yet answered) are counted, so a test can
  check the client's window.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiocoap
import aiocoap.resource
import cbor2
import structlog
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from fota.core import announce_sig
from fota.core import manifest as mf
from fota.core.manifest import Component, ManifestBody, PrivateKey, Severity
from fota.core.report import ReportError, decode_report
from fota.errors import ConfigError
from fota.fileops import sha256_prefix
from fota.transport.oscore import available as oscore_available
from fota.transport.oscore import close_context as close_oscore
from fota.transport.oscore import context_of as oscore_context_of
from fota.transport.oscore import load_context as load_oscore
from fota.transport.oscore import provision

log = structlog.get_logger(__name__)

CF_CBOR = 60
CF_COSE_SIGN1 = 18
CF_OCTETS = 42
DEFAULT_FRAGMENT = 64 * 1024
NO_RESPONSE_ALL = 2 | 8 | 16
"""RFC 7967 No-Response value that suppresses 2.xx, 4.xx and 5.xx answers."""
ALL_DEVICES = "*"


def bound_port(context: Any) -> int:
    """The UDP port an aiocoap server context is bound to.

    aiocoap has no public call for it; this one helper knows where the socket lives.
    """
    for interface in context.request_interfaces:
        transport = interface.token_interface.message_interface.transport
        sockname = transport.get_extra_info("socket").getsockname()
        return int(sockname[1])
    raise RuntimeError("server context has no request interface")


@dataclass(frozen=True, slots=True)
class Reaction:
    """What the server does with one image request, as :meth:`FaultPlan.react` decided.

    Attributes:
        faults: names of the faults injected into this request (empty: served normally).
        drop: do not answer at all (the request is lost).
        turn: answer in turn, this many seconds after the previous image answer (0: at once).
        delay: seconds to wait before answering (after the turn).
        busy_max_age: answer 5.03 Service Unavailable with this Max-Age.
        not_found: answer 4.04 Not Found.
        max_block_size: serve at most this block size.
        etag: serve this ETag instead of the image's own.
        duplicate: send the response datagram twice.
        fresh_mid: the copy gets another message ID (a server that answered twice, rather
            than a network that duplicated one datagram; RFC 7252 §4.5 deduplication by
            message ID does not catch it).
        reorder: hold the response datagram back until the next one has been sent.
        actions: announcements to make before answering (see :meth:`FaultPlan.cancel_after`
            and :meth:`FaultPlan.supersede_after`).
    """

    faults: tuple[str, ...] = ()
    drop: bool = False
    turn: float = 0.0
    delay: float = 0.0
    busy_max_age: int | None = None
    not_found: bool = False
    max_block_size: int | None = None
    etag: bytes | None = None
    duplicate: bool = False
    fresh_mid: bool = False
    reorder: bool = False
    actions: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class Action:
    """An announcement the fault plan makes part-way through a download.

    Attributes:
        at: the image request number (see :attr:`FaultPlan.seen`) it is due at.
        kind: ``"cancel"``: withdraw the manifest of the image being requested;
            ``"supersede"``: announce ``published``.
        published: the superseding manifest (from :meth:`UpdateServer.make_manifest`).
    """

    at: int
    kind: str
    published: Published | None = None


@dataclass
class FaultPlan:
    """Seeded faults the server injects into image requests (``/fota/img/...``).

    Every random choice comes from one ``random.Random(seed)``, so a failing run can be repeated
    (the draws follow the order in which requests arrive). A test sets the plan up front
    (``UpdateServer(..., faults=FaultPlan(seed=7).lose(10))``) or changes it at run time
    (``server.faults.busy(3)`` or ``server.faults.loss_percent = 0``): the server consults it for
    every request. "After N requests" counts from the call, in image requests the plan has seen.

    Attributes:
        seed: seeds the random choices, so a failing run can be repeated.
        corrupt_blocks: block number (in the request's block size) -> how many times to flip a
            byte in that block's payload before serving it intact.
        corrupt_manifest_blocks: the same for manifest blocks.
        loss_percent: share of image requests dropped without an answer, 0..100.
        delay_fixed: seconds every answer to an image request is held back.
        delay_jitter: up to this many more seconds (uniform, seeded), per request.
        throttle_interval: image answers leave one at a time, at least this many seconds apart
            (0: no throttle).
        shrink_from: from this image request number on, blocks are at most ``shrink_size``.
        shrink_size: the smaller block size served from ``shrink_from`` on.
        etag_from: from this image request number on, ``etag`` is served as the ETag.
        etag: the changed ETag.
        busy_left: the next this many image requests are answered 5.03 Service Unavailable.
        busy_max_age: the Max-Age (seconds) of those 5.03 answers.
        missing_images: hex digests of images answered 4.04 Not Found (the file stays).
        truncate_blocks: image block number -> how many times to serve it cut short (its
            Block2 option unchanged: a non-final block with fewer bytes than its size, or a
            final block that ends before Size2).
        truncate_manifest_blocks: the same for manifest blocks.
        truncate_keep: bytes a truncated block keeps (None: a seeded random share).
        duplicate_percent: share of image responses sent twice, 0..100.
        duplicate_fresh_mid: whether the copy gets a new message ID.
        reorder_percent: share of image responses held back until the next one left, 0..100.
        reorder_hold: the longest a held response waits for a next one (then it goes alone).
        actions: announcements still due (cancel, supersede), in order.
        seen: image requests seen so far (numbers them from 0, in arrival order).
    """

    seed: int = 0
    corrupt_blocks: dict[int, int] = field(default_factory=dict)
    corrupt_manifest_blocks: dict[int, int] = field(default_factory=dict)
    loss_percent: float = 0.0
    delay_fixed: float = 0.0
    delay_jitter: float = 0.0
    throttle_interval: float = 0.0
    shrink_from: int | None = None
    shrink_size: int = 1024
    etag_from: int | None = None
    etag: bytes | None = None
    busy_left: int = 0
    busy_max_age: int = 1
    missing_images: set[str] = field(default_factory=set)
    truncate_blocks: dict[int, int] = field(default_factory=dict)
    truncate_manifest_blocks: dict[int, int] = field(default_factory=dict)
    truncate_keep: int | None = None
    duplicate_percent: float = 0.0
    duplicate_fresh_mid: bool = False
    reorder_percent: float = 0.0
    reorder_hold: float = 0.05
    actions: list[Action] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    # -- setting faults up (each returns the plan, so calls chain) ------------------------

    def corrupt(self, block: int, times: int = 1, *, manifest: bool = False) -> FaultPlan:
        """Corrupt block ``block`` the next ``times`` times it is served.

        Args:
            block: the block number, in the block size the request asks for.
            times: how many answers carry a flipped byte.
            manifest: corrupt the manifest's block instead of the image's.
        """
        table = self.corrupt_manifest_blocks if manifest else self.corrupt_blocks
        table[block] = table.get(block, 0) + times
        return self

    def corrupt_random(self, count: int, blocks: int) -> FaultPlan:
        """Corrupt ``count`` distinct blocks chosen (seeded) among the first ``blocks``."""
        for block in self._random.sample(range(blocks), count):
            self.corrupt(block)
        return self

    def lose(self, percent: float) -> FaultPlan:
        """Drop ``percent`` % of image requests (seeded), answering nothing.

        A dropped NON request gets no datagram back; a dropped CON request gets only the
        empty ACK (RFC 7967 No-Response), so its response never comes either.

        Raises:
            ValueError: ``percent`` is outside 0..100.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent {percent} must be in 0..100")
        self.loss_percent = percent
        return self

    def delay(self, seconds: float, jitter: float = 0.0) -> FaultPlan:
        """Hold every answer back ``seconds`` plus up to ``jitter`` more (uniform, seeded).

        Raises:
            ValueError: a negative delay or jitter.
        """
        if seconds < 0 or jitter < 0:
            raise ValueError(f"delay {seconds} and jitter {jitter} must not be negative")
        self.delay_fixed, self.delay_jitter = seconds, jitter
        return self

    def throttle(self, interval: float) -> FaultPlan:
        """Answer image requests one at a time, in arrival order, ``interval`` seconds apart.

        A slow link or a single-threaded server: requests queue while one is served. Unlike a
        per-request delay, the answers cannot bunch up (each waits for the previous one to leave
        plus ``interval``), so a client with a window of W keeps W requests queued here: each
        new one arrives while the other W - 1 still wait. A ``delay`` still applies after the
        turn.

        Raises:
            ValueError: a negative interval.
        """
        if interval < 0:
            raise ValueError(f"throttle interval {interval} must not be negative")
        self.throttle_interval = interval
        return self

    def shrink_block(self, after_requests: int = 0, size: int = 256) -> FaultPlan:
        """Serve blocks of at most ``size`` bytes once ``after_requests`` more requests came.

        RFC 7959 §2.4 lets a server answer with a smaller block than asked; the client must
        follow it.

        Raises:
            ValueError: ``size`` is not a power of two in 16..1024.
        """
        if size not in (16, 32, 64, 128, 256, 512, 1024):
            raise ValueError(f"block size {size} must be a power of two in 16..1024")
        self.shrink_from, self.shrink_size = self.seen + after_requests, size
        return self

    def change_etag(self, after_requests: int = 0, etag: bytes | None = None) -> FaultPlan:
        """Serve another ETag for the same bytes once ``after_requests`` more requests came.

        Args:
            after_requests: image requests still served with the image's own ETag.
            etag: the new ETag (1..8 bytes); None draws 8 seeded random bytes.

        Raises:
            ValueError: ``etag`` is empty or longer than 8 bytes.
        """
        if etag is not None and not 1 <= len(etag) <= 8:
            raise ValueError(f"an ETag has 1..8 bytes, not {len(etag)}")
        self.etag_from = self.seen + after_requests
        self.etag = etag if etag is not None else self._random.randbytes(8)
        return self

    def busy(self, count: int, max_age: int = 1) -> FaultPlan:
        """Answer the next ``count`` image requests 5.03 Service Unavailable, Max-Age ``max_age``.

        Raises:
            ValueError: a negative count or Max-Age.
        """
        if count < 0 or max_age < 0:
            raise ValueError(f"busy count {count} and max_age {max_age} must not be negative")
        self.busy_left, self.busy_max_age = count, max_age
        return self

    def missing(self, sha256: bytes) -> FaultPlan:
        """Answer 4.04 Not Found for the image with this digest (its file stays on disk)."""
        self.missing_images.add(sha256.hex())
        return self

    def truncate(
        self, block: int, times: int = 1, *, keep: int | None = None, manifest: bool = False
    ) -> FaultPlan:
        """Serve block ``block`` cut short the next ``times`` times (then intact).

        The response keeps its Block2 option (number, size, More flag) and Size2, so a
        client sees a block with fewer bytes than it says: a truncated datagram, or a server
        bug. RFC 7959 §2.2: every block but the last carries exactly the block size.

        Args:
            block: the block number, in the block size the request asks for.
            times: how many answers are truncated.
            keep: bytes kept (cut to at most the payload less one); None: a seeded random
                number of bytes, at least 1 and less than the payload.
            manifest: truncate the manifest's block instead of the image's.

        Raises:
            ValueError: ``times`` below 1 or ``keep`` negative.
        """
        if times < 1 or (keep is not None and keep < 0):
            raise ValueError(f"truncate times {times} must be >= 1 and keep {keep} >= 0")
        table = self.truncate_manifest_blocks if manifest else self.truncate_blocks
        table[block] = table.get(block, 0) + times
        self.truncate_keep = keep
        return self

    def duplicate(self, percent: float = 100.0, *, fresh_mid: bool = False) -> FaultPlan:
        """Send ``percent`` % of image responses twice (seeded).

        Args:
            percent: share of responses duplicated, 0..100.
            fresh_mid: give the copy a new message ID (a server answering twice) instead of
                the same one (a network duplicating a datagram).

        Raises:
            ValueError: ``percent`` is outside 0..100.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"duplicate percent {percent} must be in 0..100")
        self.duplicate_percent, self.duplicate_fresh_mid = percent, fresh_mid
        return self

    def reorder(self, percent: float = 50.0, *, hold: float = 0.05) -> FaultPlan:
        """Hold ``percent`` % of image responses back until the next response has left.

        The held datagram then follows the one that overtook it, so the client gets
        answers out of request order. With nothing else to send it goes alone after
        ``hold`` seconds (merely late).

        Raises:
            ValueError: ``percent`` outside 0..100, or a ``hold`` that is not positive.
        """
        if not 0 <= percent <= 100 or hold <= 0:
            raise ValueError(f"reorder percent {percent} must be in 0..100 and hold {hold} > 0")
        self.reorder_percent, self.reorder_hold = percent, hold
        return self

    def cancel_after(self, requests: int) -> FaultPlan:
        """Withdraw the manifest being downloaded once ``requests`` more image requests came.

        The server announces a cancel (``{1: seq, 4: digest}``) for the manifest of the
        image asked for, to every device it was announced to, before it answers that request.

        Raises:
            ValueError: a negative count.
        """
        return self._schedule(requests, "cancel", None)

    def supersede_after(self, requests: int, published: Published) -> FaultPlan:
        """Announce ``published`` once ``requests`` more image requests came.

        ``published`` comes from :meth:`UpdateServer.make_manifest`; it is announced to every
        device before the server answers that request, so it supersedes the download under
        way.

        Raises:
            ValueError: a negative count.
        """
        return self._schedule(requests, "supersede", published)

    def _schedule(self, requests: int, kind: str, published: Published | None) -> FaultPlan:
        if requests < 0:
            raise ValueError(f"{kind} after {requests} requests: the count must not be negative")
        self.actions.append(Action(self.seen + requests, kind, published))
        self.actions.sort(key=lambda a: a.at)
        return self

    # -- used by the server ---------------------------------------------------------------

    def react(self, name: str) -> Reaction:
        """Decide, for the next image request (for the image named ``name``), which faults hit.

        Each call counts one request (see ``seen``). A lost request is only lost: it consumes
        no 5.03 and is not delayed.
        """
        number = self.seen
        self.seen += 1
        due = tuple(a for a in self.actions if a.at <= number)
        if due:
            self.actions = [a for a in self.actions if a.at > number]
        if self.loss_percent and self._random.random() * 100 < self.loss_percent:
            return Reaction(faults=("lost",), drop=True, actions=due)
        faults = ["cancelled" if a.kind == "cancel" else "superseded" for a in due]
        turn = self.throttle_interval
        if turn:
            faults.append("throttled")
        delay = self.delay_fixed
        if self.delay_jitter:
            delay += self._random.uniform(0, self.delay_jitter)
        if delay:
            faults.append("delayed")
        if name in self.missing_images:
            return Reaction(
                (*faults, "missing"), turn=turn, delay=delay, not_found=True, actions=due
            )
        if self.busy_left > 0:
            self.busy_left -= 1
            return Reaction(
                (*faults, "busy"),
                turn=turn,
                delay=delay,
                busy_max_age=self.busy_max_age,
                actions=due,
            )
        duplicate = bool(
            self.duplicate_percent and self._random.random() * 100 < self.duplicate_percent
        )
        if duplicate:
            faults.append("duplicated")
        reorder = bool(self.reorder_percent and self._random.random() * 100 < self.reorder_percent)
        if reorder:
            faults.append("reordered")
        max_block_size = None
        if self.shrink_from is not None and number >= self.shrink_from:
            faults.append("shrunk")
            max_block_size = self.shrink_size
        etag = None
        if self.etag_from is not None and number >= self.etag_from:
            faults.append("etag")
            etag = self.etag
        return Reaction(
            tuple(faults),
            turn=turn,
            delay=delay,
            max_block_size=max_block_size,
            etag=etag,
            duplicate=duplicate,
            fresh_mid=duplicate and self.duplicate_fresh_mid,
            reorder=reorder,
            actions=due,
        )

    def apply(self, block: int, payload: bytes, *, manifest: bool = False) -> tuple[bytes, str]:
        """The payload to serve for ``block``, and the fault applied to it ("" for none).

        A block is truncated or corrupted (one byte flipped) while the plan says so.
        """
        table = self.truncate_manifest_blocks if manifest else self.truncate_blocks
        cut = table.get(block, 0)
        if cut and len(payload) > 1:
            table[block] = cut - 1
            keep = self.truncate_keep
            if keep is None:
                keep = self._random.randrange(1, len(payload))
            return payload[: min(keep, len(payload) - 1)], "truncated"
        table = self.corrupt_manifest_blocks if manifest else self.corrupt_blocks
        left = table.get(block, 0)
        if not left or not payload:
            return payload, ""
        table[block] = left - 1
        i = self._random.randrange(len(payload))
        return payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1 :], "corrupt"


@dataclass(frozen=True, slots=True)
class RequestLog:
    """One request the server saw, logged as it arrived.

    Attributes:
        method: ``GET`` or ``POST``.
        path: the resource path.
        offset: byte offset asked for (Block2 requests; 0 for a GET without Block2).
        block_size: block size the server serves for it (what was asked, capped by the
            server's largest block and a ``shrink_block`` fault).
        at: ``time.monotonic()`` at arrival.
        asked: block size the client asked for (None: no Block2 option).
        faults: faults injected into this request (see :meth:`FaultPlan.react`).
        in_flight: image requests in flight at the server right after this one arrived,
            itself included (None for other requests and for lost ones).
    """

    method: str
    path: str
    offset: int | None
    block_size: int | None
    at: float
    asked: int | None = None
    faults: tuple[str, ...] = ()
    in_flight: int | None = None


@dataclass
class DeviceSeen:
    """What the server knows about one device (for ``fota server``'s live view and tests).

    A device is known from its first announcement request or report. Image requests carry no
    device id (they come from the downloader's own socket), so progress is what the device
    reported (key 7, bytes verified), not what the server sent.

    Attributes:
        device: the device id (the path under ``/fota/ann/`` and ``/fota/report/``).
        address: ``host:port`` of its last announcement request or report.
        first_seen: ``time.time()`` of its first request.
        last_seen: ``time.time()`` of its last request.
        observing: its announcement observations currently registered.
        reports: reports received from it (duplicates left out).
        state: the state code of its last report (None: none yet).
        result: the result code of its last report.
        update_id: the update id of its last report that named one.
        verified: bytes verified, from its last report that said so.
        detail: the detail text of its last report.
    """

    device: str
    address: str
    first_seen: float
    last_seen: float
    observing: int = 0
    reports: int = 0
    state: int | None = None
    result: int | None = None
    update_id: str | None = None
    verified: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Published:
    """What :meth:`UpdateServer.publish` made.

    ``digest`` is the manifest's identity, as the client's ``Manifest.digest``; the manifest
    is served at ``m/{digest hex}``.
    """

    raw: bytes
    digest: bytes
    update_id: str
    sequence: int
    image_sha256: bytes
    image_path: Path


def fragment_digests(path: Path, fragment_size: int) -> tuple[bytes, ...]:
    """SHA-256 of every fragment of a file (at least one, for an empty file)."""
    out = []
    with open(path, "rb") as f:
        while chunk := f.read(fragment_size):
            out.append(hashlib.sha256(chunk).digest())
    return tuple(out) or (hashlib.sha256(b"").digest(),)


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a whole file, read in 1 MiB pieces."""
    return sha256_prefix(path, path.stat().st_size)


class _Sliced(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """Serves immutable files named by hex digest, cutting Block2 slices from disk."""

    def __init__(self, server: UpdateServer, folder: Path, content_format: int, kind: str) -> None:
        super().__init__()
        self.server = server
        self.folder = folder
        self.content_format = content_format
        self.kind = kind

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False  # we slice ourselves, from disk, without holding the body

    async def render_get(self, request: Any) -> Any:
        path = request.opt.uri_path
        refused = self.server._refuse(request, f"/fota/{self.kind}/{'/'.join(path)}", None)
        if refused is not None:
            return refused
        if (
            len(path) != 1
            or len(path[0]) != 64
            or any(c not in "0123456789abcdef" for c in path[0])
        ):
            return aiocoap.Message(code=Code.NOT_FOUND)
        name = path[0]
        block2 = request.opt.block2
        asked = 1 << (block2.size_exponent + 4) if block2 is not None else None
        szx = min(block2.size_exponent if block2 else 6, self.server.max_szx)
        offset = block2.start if block2 else 0
        where = f"/fota/{self.kind}/{name}"
        if self.kind != "img":
            response, fault = self._slice(name, block2 is not None, offset, szx)
            faults: tuple[str, ...] = (fault,) if fault else ()
            self.server._log("GET", where, offset, 1 << (szx + 4), asked=asked, faults=faults)
            return response
        reaction = self.server.faults.react(name)
        for action in reaction.actions:
            self.server._act(action, name)
        if reaction.max_block_size is not None:
            szx = min(szx, reaction.max_block_size.bit_length() - 5)
        size = 1 << (szx + 4)
        if reaction.drop:
            self.server._log("GET", where, offset, size, asked=asked, faults=reaction.faults)
            # RFC 7967 No-Response for every class: aiocoap sends nothing back for a NON
            # request (and only the empty ACK for a CON one).
            return aiocoap.Message(code=Code.CONTENT, no_response=NO_RESPONSE_ALL)
        faults = reaction.faults
        if reaction.not_found:
            response = aiocoap.Message(code=Code.NOT_FOUND)
        elif reaction.busy_max_age is not None:
            response = aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, max_age=reaction.busy_max_age)
        else:
            response, fault = self._slice(name, block2 is not None, offset, szx, reaction.etag)
            if fault:
                faults = (*faults, fault)
        if reaction.duplicate or reaction.reorder:
            # The wire layer finds the response by its token (the request's) as it leaves.
            self.server._wire_faults[bytes(request.token)] = reaction
        self.server._image_arrived(where, offset, size, asked, faults)
        try:
            # The faults themselves: a slow link, a slow server.
            if reaction.turn:
                async with self.server._turn:
                    await asyncio.sleep(reaction.turn)
            if reaction.delay:
                await asyncio.sleep(reaction.delay)
            return response
        finally:
            self.server._image_answered()

    def _slice(
        self, name: str, blockwise: bool, offset: int, szx: int, etag: bytes | None = None
    ) -> tuple[Any, str]:
        """The response for a slice of a file, and the fault the plan applied to it."""
        size = 1 << (szx + 4)
        try:
            # A small positioned read per block; a thread hop would cost more than it saves.
            with open(self.folder / name, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(offset)
                payload = f.read(size)
        except FileNotFoundError:
            return aiocoap.Message(code=Code.NOT_FOUND), ""
        if offset and offset >= total:
            return aiocoap.Message(code=Code.BAD_OPTION), ""
        more = offset + len(payload) < total
        fault = ""
        if self.kind != "k":  # the fault plan knows image and manifest blocks
            payload, fault = self.server.faults.apply(
                offset // size, payload, manifest=self.kind == "m"
            )
        response = aiocoap.Message(
            code=Code.CONTENT, payload=payload, content_format=self.content_format
        )
        if blockwise or more:
            response.opt.block2 = BlockOption.BlockwiseTuple(offset // size, more, szx)
            response.opt.size2 = total
            response.opt.etag = etag if etag is not None else bytes.fromhex(name)[:8]
        return response, fault


class _Wire:
    """The server socket's sending side, with the plan's duplicates and reordering.

    Wraps the datagram transport of aiocoap's UDP interface (everything but ``sendmsg`` is
    passed through), so these faults happen where they happen in a network: after aiocoap
    encoded the response. A response is found by its token, which the resource registered
    in :attr:`UpdateServer._wire_faults` while answering the request.

    It also keeps one client's death from deafening another (issue 17 §4). A notification to
    a client that is gone (killed, restarted on another port) draws an ICMP port-unreachable.
    Linux queues it with its address on the socket's error queue (aiocoap reads that and drops
    the dead client's exchanges: right) and also leaves it pending on the socket, where it fails
    the *next* ``sendmsg``, to whomever it goes. aiocoap's transport blames that send's
    destination, the live client, and ends its observation from inside the send, which
    re-enters aiocoap's pipe and crashes it (``TypeError: 'bool' object is not iterable`` in
    ``pipe.py``): the live client's notification is lost and it is deaf until it re-registers.
    So a failed send is tried once more (the failed call cleared the pending error and sent
    nothing); only an error that fails it again is about this datagram, and it is handed to
    aiocoap on the next loop step, outside the send.
    """

    def __init__(self, inner: Any, server: UpdateServer, protocol: Any) -> None:
        self._inner = inner
        self._server = server
        self._protocol = protocol
        self._held: tuple[bytes, Any, int, Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sendmsg(self, data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        reaction = None
        if len(data) >= 4:
            token = bytes(data[4 : 4 + (data[0] & 0x0F)])
            reaction = self._server._wire_faults.pop(token, None)
        if reaction is not None and reaction.reorder and self._held is None:
            self._held = (data, ancdata, flags, address)
            self._timer = asyncio.get_running_loop().call_later(
                self._server.faults.reorder_hold, self._release, False
            )
            return
        self._send(data, ancdata, flags, address)
        if reaction is not None and reaction.duplicate:
            copy = data
            if reaction.fresh_mid:
                mid = (int.from_bytes(data[2:4], "big") + 0x8000) & 0xFFFF
                copy = data[:2] + mid.to_bytes(2, "big") + data[4:]
            self._send(copy, ancdata, flags, address)
            self._server.duplicated += 1
        self._release(True)

    def _send(self, data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        sock = self._inner.get_extra_info("socket")
        try:
            sock.sendmsg((data,), ancdata, flags, address)
        except OSError:
            try:
                sock.sendmsg((data,), ancdata, flags, address)
            except OSError as exc:
                # About this datagram (no route, a full buffer): aiocoap's handling, with the
                # destination it is sending to (a context variable, hence the copy), but not
                # from inside the pipe that is sending.
                asyncio.get_running_loop().call_soon(
                    self._protocol.error_received, exc, context=contextvars.copy_context()
                )
                return
        if self._server.wire_hook is not None:
            self._server.wire_hook(bytes(data))

    def _release(self, overtaken: bool) -> None:
        """Send the held datagram: after the one that overtook it, or alone when time is up."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, None
        if held is not None:
            self._send(*held)
            if overtaken:
                self._server.reordered += 1


class _Announcements(aiocoap.resource.ObservableResource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """``/fota/ann/{device}``: observable, per device or for all devices."""

    def __init__(self, server: UpdateServer) -> None:
        super().__init__()
        self.server = server
        self.by_device: dict[str, dict[Any, Any]] = {}
        """Per device, its live observations and the address each was registered from."""

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        device = "/".join(request.opt.uri_path)
        if not self.server._authorized(request, device):
            return  # not accepted: render_get refuses it, and that ends the observation
        watchers = self.by_device.setdefault(device, {})
        # A device that registers from another address has most likely restarted: notify
        # its older observations once, so that a dead one draws its ICMP error now and is
        # dropped (a live one just hears the current announcement again). Without this, a
        # killed device stays listed as observing until the next announcement.
        older = [obs for obs, remote in watchers.items() if remote != request.remote]
        watchers[serverobservation] = request.remote

        def gone() -> None:
            watchers.pop(serverobservation, None)
            self.server._observers_changed(device, len(watchers))

        serverobservation.accept(gone)
        # aiocoap calls this before render_get; the change is told once, with the count.
        self.server._seen_device(device, request, tell=False)
        self.server._observers_changed(device, len(watchers))
        for observation in older:
            observation.trigger()

    def notify(self, devices: Iterable[str]) -> None:
        targets = set(devices)
        for device, watchers in self.by_device.items():
            if ALL_DEVICES in targets or device in targets:
                for observation in list(watchers):
                    observation.trigger()

    async def render_get(self, request: Any) -> Any:
        device = "/".join(request.opt.uri_path)
        refused = self.server._refuse(request, f"/fota/ann/{device}", device)
        if refused is not None:
            return refused
        self.server._log("GET", f"/fota/ann/{device}", None, None)
        self.server._seen_device(device, request)
        ann = self.server.announcements.get(device) or self.server.announcements.get(ALL_DEVICES)
        body: dict[int, Any] = {1: 0} if ann is None else ann
        if self.server.sign_announcements:
            return aiocoap.Message(
                code=Code.CONTENT,
                payload=self.server.signed_announcement(body),
                content_format=CF_COSE_SIGN1,
            )
        return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(body), content_format=CF_CBOR)


class _Reports(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """``/fota/report/{device}``: records reports, de-duplicated by (device, sequence)."""

    def __init__(self, server: UpdateServer) -> None:
        super().__init__()
        self.server = server

    async def render_post(self, request: Any) -> Any:
        device = "/".join(request.opt.uri_path)
        refused = self.server._refuse(request, f"/fota/report/{device}", device, method="POST")
        if refused is not None:
            return refused
        self.server._log("POST", f"/fota/report/{device}", None, None)
        try:
            received = decode_report(request.payload)
            if received.device_id != device:
                raise ReportError("device", f"{received.device_id!r} posted to {device!r}'s path")
        except ReportError as exc:
            log.warning("report_refused", device=device, error=str(exc), field=exc.field)
            self.server.bad_reports.append((device, str(exc)))
            return aiocoap.Message(code=Code.BAD_REQUEST, payload=str(exc).encode()[:200])
        report = cbor2.loads(request.payload)  # checked: the record keeps the map as sent
        self.server._seen_device(device, request)
        self.server._record_report(device, report)
        return aiocoap.Message(code=Code.CHANGED)


class UpdateServer:
    """A CoAP update server on loopback, for tests and demos.

    Args:
        root: directory for images and manifests (created if missing).
        signing_key: key that signs published manifests.
        kid: key id put in the protected header.
        host: address to bind (loopback only in tests).
        port: UDP port; 0 lets the OS pick.
        faults: fault injection plan.
        max_block_size: largest block the server sends (a smaller one than asked is allowed
            by RFC 7959 and exercises the client's offset logic).
        oscore: serve OSCORE-protected requests only (needs ``fota[oscore]``): a plaintext
            request is answered 4.01 Unauthorized, and a device may read only its own
            announcement and post only its own reports (else 4.03). Devices are added with
            :meth:`provision_oscore`.
        sign_announcements: serve every announcement signed (CDDL ``signed-announcement``) by
            ``signing_key``, issued when it is sent; it may be switched at any time.
        announcement_lifetime: seconds from a signed announcement's issue to its expiry.
        announcement_refresh: re-sign and notify every observer this often (seconds), so
            observing devices stay fresh; None: only when an announcement changes (and at
            :meth:`refresh_announcements`).
        clock: the issue instant of signed announcements (epoch seconds); a test turns it
            back to serve expired ones.
    """

    def __init__(
        self,
        root: Path,
        signing_key: PrivateKey,
        kid: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        max_block_size: int = 1024,
        oscore: bool = False,
        sign_announcements: bool = False,
        announcement_lifetime: float = 3600.0,
        announcement_refresh: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.sign_announcements = sign_announcements
        self.announcement_lifetime = announcement_lifetime
        self.announcement_refresh = announcement_refresh
        self.clock = clock
        self._refresher: asyncio.Task[None] | None = None
        self.oscore = oscore
        self._credentials: Any = None
        self._device_of: dict[int, str] = {}  # id() of a server security context -> device
        if oscore:
            missing = oscore_available()
            if missing is not None:
                raise ConfigError(f"oscore: {missing}")
            from aiocoap.credentials import CredentialsMap

            self._credentials = CredentialsMap()
        self.bad_reports: list[tuple[str, str]] = []
        """Reports answered 4.00 (device, why): not of the report rule, or another device's."""
        self.refused: list[tuple[str, str, str]] = []
        """Requests refused by the OSCORE checks: (method, path, response code)."""
        self.key = signing_key
        self.kid = kid
        self.host = host
        self.port = port
        self.faults = faults or FaultPlan()
        self.max_szx = max_block_size.bit_length() - 5
        self.announcements: dict[str, dict[int, Any]] = {}
        """The announcement body (CBOR map of ``docs/protocol.md``) per device id or
        :data:`ALL_DEVICES`; a device's own entry wins."""
        self.requests: list[RequestLog] = []
        self.request_hook: Callable[[RequestLog], None] | None = None
        """Called with every request as it arrives (tests wait on it instead of sleeping)."""
        self.in_flight = 0
        """Image requests received and not answered yet (> 0 while a response is delayed)."""
        self.max_in_flight = 0
        """The most image requests that were ever in flight at once."""
        self._turn = asyncio.Lock()  # FIFO: throttled answers leave one at a time, in order
        self._wire_faults: dict[bytes, Reaction] = {}
        self.duplicated = 0
        """Image responses the fault plan sent twice."""
        self.reordered = 0
        """Image responses the fault plan held back and sent after a later one."""
        self.wire_hook: Callable[[bytes], None] | None = None
        """Called with every datagram the server sends, as sent (what an eavesdropper sees)."""
        self._manifests_of: dict[str, list[bytes]] = {}  # image hex digest -> manifest digests
        self.reports: list[dict[int, Any]] = []
        """Every report received, in arrival order, duplicates left out."""
        self._reports_by_device: dict[str, list[dict[int, Any]]] = {}
        self.duplicate_reports = 0
        self._seen: set[tuple[str, int]] = set()
        self.devices: dict[str, DeviceSeen] = {}
        """Every device that asked for its announcement or reported, by device id."""
        self.device_hook: Callable[[DeviceSeen], None] | None = None
        """Called with a device's record whenever it changes (a live view redraws on it)."""
        self.published: list[Published] = []
        """Every manifest :meth:`publish` announced, oldest first."""
        self._changed = asyncio.Condition()
        self._ctx: Any = None
        self._sequence = 0
        (self.root / "img").mkdir(parents=True, exist_ok=True)
        (self.root / "m").mkdir(parents=True, exist_ok=True)
        (self.root / "k").mkdir(parents=True, exist_ok=True)
        self.keyset: tuple[int, bytes] | None = None
        """The keyset announced (version, digest), set by :meth:`publish_keyset`."""
        self._ann = _Announcements(self)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve."""
        site = aiocoap.resource.Site()
        site.add_resource(["fota", "ann"], self._ann)
        site.add_resource(["fota", "m"], _Sliced(self, self.root / "m", CF_COSE_SIGN1, "m"))
        site.add_resource(["fota", "img"], _Sliced(self, self.root / "img", CF_OCTETS, "img"))
        site.add_resource(["fota", "k"], _Sliced(self, self.root / "k", CF_COSE_SIGN1, "k"))
        site.add_resource(["fota", "report"], _Reports(self))
        served: Any = site
        if self.oscore:
            from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

            # Unprotects what a known context protected; plaintext passes through to the
            # resources, which refuse it (_refuse).
            served = OscoreSiteWrapper(site, self._credentials)
        # udp6 only: aiocoap's default server transports include TCP, which falls back to
        # port 5683 when asked for port 0.
        self._ctx = await aiocoap.Context.create_server_context(
            served, bind=(self.host, self.port), transports=["udp6"]
        )
        self.port = bound_port(self._ctx)
        if self.announcement_refresh is not None:
            self._refresher = asyncio.create_task(
                self._refresh_every(self.announcement_refresh), name="fota-server-refresh"
            )
        for interface in self._ctx.request_interfaces:
            messages = interface.token_interface.message_interface
            messages.transport = _Wire(messages.transport, self, messages)
        log.info("update_server_started", uri=self.uri)

    async def stop(self) -> None:
        """Stop serving."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()
        if self._credentials is not None:
            for context in self._credentials.values():
                close_oscore(context)
            self._credentials.clear()
            self._device_of.clear()

    async def __aenter__(self) -> UpdateServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def uri(self) -> str:
        """Base URI for clients (``Config.server``)."""
        return f"coap://{self.host}:{self.port}"

    # -- OSCORE ---------------------------------------------------------------------------

    def provision_oscore(self, device: str, device_dir: Path) -> None:
        """Make a security context pair for ``device``: the server's half, and its own.

        The device's half is written to ``device_dir`` (``Config.oscore``); the server's
        lives under ``root/oscore/`` and is bound to the device id, so the device may read
        only its announcement and post only its reports. Works while the server runs.

        Raises:
            ValueError: the server does not serve OSCORE, or ``device`` has a context already.
        """
        if not self.oscore:
            raise ValueError("provision_oscore: the server was made without oscore=True")
        label = f":{device}"
        if label in self._credentials:
            raise ValueError(f"provision_oscore: {device!r} has a security context already")
        number = len(self._device_of) + 1
        own = self.root / "oscore" / hashlib.sha256(device.encode()).hexdigest()[:16]
        provision(own, Path(device_dir), device_id=number.to_bytes(4, "big"))
        context = load_oscore(own, key=f"server context of {device}")
        self._credentials[label] = context
        self._device_of[id(context)] = device

    def _authorized(self, request: Any, device: str | None) -> bool:
        if not self.oscore:
            return True
        context = oscore_context_of(request)
        if context is None:
            return False
        return device is None or self._device_of.get(id(context)) == device

    def _refuse(self, request: Any, path: str, device: str | None, *, method: str = "GET") -> Any:
        """The 4.01 or 4.03 answer for a request the OSCORE rules refuse, else None."""
        if self._authorized(request, device):
            return None
        if oscore_context_of(request) is None:
            code, text = Code.UNAUTHORIZED, "4.01"
        else:
            code, text = Code.FORBIDDEN, "4.03"
        self.refused.append((method, path, text))
        log.warning("request_refused", method=method, path=path, code=text)
        self._log(method, path, None, None, faults=("refused",))
        return aiocoap.Message(code=code)

    # -- publishing -----------------------------------------------------------------------

    def store_image(self, image: bytes | Path) -> tuple[Path, bytes]:
        """Put an image under its digest; return (path, sha256)."""
        if isinstance(image, bytes):
            sha = hashlib.sha256(image).digest()
            path = self.root / "img" / sha.hex()
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(image)
                os.replace(tmp, path)
            return path, sha
        sha = file_sha256(image)
        path = self.root / "img" / sha.hex()
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            with open(image, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
            os.replace(tmp, path)
        return path, sha

    def make_manifest(
        self,
        image: bytes | Path,
        version: str,
        *,
        device_class: str,
        sequence: int | None = None,
        polite: bool = True,
        component: Component = Component.FIRMWARE,
        severity: Severity = Severity.OPTIONAL,
        max_deferral: int = 0,
        deadline: int | None = None,
        fragment_size: int = DEFAULT_FRAGMENT,
        key: PrivateKey | None = None,
        kid: bytes | None = None,
    ) -> Published:
        """Store an image and sign a manifest for it, without announcing it.

        ``deadline`` (UTC epoch seconds, manifest key 14): past it the update proceeds without
        asking and through every local wait.
        """
        path, sha = self.store_image(image)
        size = path.stat().st_size
        if sequence is None:
            sequence = self._sequence + 1
        self._sequence = max(self._sequence, sequence)
        body = ManifestBody(
            sequence=sequence,
            component=component,
            version=version,
            device_class=device_class,
            image_size=size,
            image_sha256=sha,
            image_uri=f"../img/{sha.hex()}",
            fragment_size=fragment_size,
            fragment_sha256=fragment_digests(path, fragment_size),
            polite=polite,
            severity=severity,
            max_deferral=max_deferral,
            deadline=deadline,
        )
        raw = mf.sign(body, key or self.key, kid or self.kid)
        digest = mf.envelope_id(raw)  # the manifest's identity: what announcements and cancels name
        assert digest is not None
        self._manifests_of.setdefault(sha.hex(), []).append(digest)
        return Published(raw, digest, mf.update_id_of(digest), sequence, sha, path)

    def announce_raw(
        self, raw: bytes, sequence: int, devices: Iterable[str] = (ALL_DEVICES,)
    ) -> bytes:
        """Serve ``raw`` as a manifest (whatever it contains) and announce it; return its digest.

        The digest announced (and the file's name) is the manifest's identity
        (:func:`fota.core.manifest.envelope_id`) when ``raw`` is a COSE_Sign1 envelope, else
        the SHA-256 of the bytes. Two envelopes of one identity share one file: the last
        one announced is served.
        """
        digest = mf.envelope_id(raw) or hashlib.sha256(raw).digest()
        (self.root / "m" / digest.hex()).write_bytes(raw)
        devices = tuple(devices)
        self.announce_body({1: sequence, 2: digest, 3: f"../m/{digest.hex()}"}, devices)
        log.info("manifest_announced", sequence=sequence, digest=digest.hex()[:16], devices=devices)
        return digest

    def signed_announcement(self, body: dict[int, Any]) -> bytes:
        """``body`` as a signed announcement, issued now (:attr:`clock`), with its expiry."""
        issued = int(self.clock())
        lifetime = max(1, int(self.announcement_lifetime))
        return announce_sig.sign(body, self.key, self.kid, issued, issued + lifetime)

    def refresh_announcements(self) -> None:
        """Notify every observer again: signed announcements go out re-signed, issued now."""
        self._ann.notify((ALL_DEVICES,))

    async def _refresh_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)  # the re-signing period, a timer
            if self.sign_announcements:
                self.refresh_announcements()

    def announce_body(self, body: dict[int, Any], devices: Iterable[str] = (ALL_DEVICES,)) -> None:
        """Serve ``body`` as the announcement, as it is (a malformed one too), and notify.

        For tests of a misbehaving server; :meth:`publish` and :meth:`cancel` build correct
        bodies. Setting :attr:`announcements` directly changes the announcement without
        notifying observers (a lost notification).
        """
        devices = tuple(devices)
        for device in devices:
            self.announcements[device] = self._with_keyset(body)
        self._ann.notify(devices)

    def _with_keyset(self, body: dict[int, Any]) -> dict[int, Any]:
        out = dict(body)
        if self.keyset is not None and 5 not in out:
            version, digest = self.keyset
            out[5], out[6] = version, f"../k/{digest.hex()}"
        return out

    def publish_keyset(self, raw: bytes, version: int) -> bytes:
        """Serve a keyset (``fota.core.keyset``) and announce it to every device.

        Every announcement gets keys 5 and 6 from now on, so a device fetches the keyset
        before the manifest announced with it. Returns the keyset's digest.
        """
        digest = hashlib.sha256(raw).digest()
        (self.root / "k" / digest.hex()).write_bytes(raw)
        self.keyset = (version, digest)
        devices = tuple(self.announcements) or (ALL_DEVICES,)
        for device in devices:
            body = {k: v for k, v in self.announcements.get(device, {1: 0}).items() if k < 5}
            self.announcements[device] = self._with_keyset(body)
        self._ann.notify(devices)
        log.info("keyset_announced", version=version, digest=digest.hex()[:16])
        return digest

    def cancel(self, digest: bytes, devices: Iterable[str] = (ALL_DEVICES,)) -> int:
        """Withdraw the manifest with this identity: announce ``{1: seq, 4: digest}``.

        ``digest`` is :attr:`Published.digest` (the manifest's identity, not the SHA-256 of
        its bytes), so the cancel also holds for a re-encoded envelope of the same manifest.

        The announcement sequence is bumped (so are later manifests' default sequences) and
        observers are notified. The withdrawn manifest stays downloadable. Returns the
        announcement's sequence number.

        Raises:
            ValueError: ``digest`` is not 32 bytes.
        """
        if len(digest) != 32:
            raise ValueError(f"a manifest digest has 32 bytes, not {len(digest)}")
        announced = [a[1] for a in self.announcements.values() if isinstance(a.get(1), int)]
        sequence: int = max([self._sequence, *announced]) + 1
        self._sequence = sequence
        devices = tuple(devices)
        self.announce_body({1: sequence, 4: digest}, devices)
        log.info("manifest_cancelled", sequence=sequence, digest=digest.hex()[:16], devices=devices)
        return sequence

    def publish(
        self,
        image: bytes | Path,
        version: str,
        *,
        devices: Iterable[str] = (ALL_DEVICES,),
        **kwargs: Any,
    ) -> Published:
        """Sign a manifest for ``image`` and announce it (see :meth:`make_manifest` for options)."""
        published = self.make_manifest(image, version, **kwargs)
        self.announce_raw(published.raw, published.sequence, devices)
        self.published.append(published)
        return published

    def _act(self, action: Action, image: str) -> None:
        """Make an announcement the fault plan scheduled, while image ``image`` is requested."""
        if action.kind == "supersede":
            assert action.published is not None
            published = action.published
            self.announce_raw(published.raw, published.sequence)
            self.published.append(published)
            return
        digests = set(self._manifests_of.get(image, ()))
        devices = [d for d, ann in self.announcements.items() if ann.get(2) in digests]
        for digest in {self.announcements[d][2] for d in devices}:
            self.cancel(digest, [d for d in devices if self.announcements[d].get(2) == digest])

    # -- records --------------------------------------------------------------------------

    def _log(
        self,
        method: str,
        path: str,
        offset: int | None,
        block_size: int | None,
        *,
        asked: int | None = None,
        faults: tuple[str, ...] = (),
        in_flight: int | None = None,
    ) -> None:
        entry = RequestLog(
            method, path, offset, block_size, time.monotonic(), asked, faults, in_flight
        )
        self.requests.append(entry)
        if self.request_hook is not None:
            self.request_hook(entry)

    def _image_arrived(
        self, path: str, offset: int, block_size: int, asked: int | None, faults: tuple[str, ...]
    ) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._log(
            "GET", path, offset, block_size, asked=asked, faults=faults, in_flight=self.in_flight
        )

    def _image_answered(self) -> None:
        self.in_flight -= 1

    @property
    def in_flight_samples(self) -> list[int]:
        """The in-flight count at each image request's arrival (that request included).

        Lost requests are not sampled: the server never holds them.
        """
        return [r.in_flight for r in self.requests if r.in_flight is not None]

    def _seen_device(self, device: str, request: Any, *, tell: bool = True) -> DeviceSeen:
        now = time.time()
        try:
            address = str(request.remote.hostinfo)
        except Exception:  # a remote without host info (not UDP): still the same device
            address = "?"
        seen = self.devices.get(device)
        if seen is None:
            seen = self.devices[device] = DeviceSeen(device, address, now, now)
            if tell:  # a polling device shows up before its first report
                self._device_changed(seen)
        else:
            seen.address, seen.last_seen = address, now
        return seen

    def _device_changed(self, seen: DeviceSeen) -> None:
        if self.device_hook is not None:
            self.device_hook(seen)

    def _observers_changed(self, device: str, count: int) -> None:
        seen = self.devices.get(device)
        if seen is not None:
            seen.observing = count
            self._device_changed(seen)

    def _record_report(self, device: str, report: dict[int, Any]) -> None:
        key = (device, report[2])
        if key in self._seen:
            self.duplicate_reports += 1
            return
        self._seen.add(key)
        self.reports.append(report)
        self._reports_by_device.setdefault(device, []).append(report)
        seen = self.devices.get(device)
        if seen is not None:
            seen.reports += 1
            seen.state, seen.result = report.get(3), report.get(4)
            detail = report.get(8)
            seen.detail = detail if isinstance(detail, str) else ""
            if isinstance(report.get(5), str):
                seen.update_id = report[5]
            if isinstance(report.get(7), int):
                seen.verified = report[7]
            self._device_changed(seen)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def reports_for(self, device: str) -> list[dict[int, Any]]:
        """The reports one device sent, in arrival order, duplicates left out (a copy)."""
        return list(self._reports_by_device.get(device, ()))

    def image_requests(self, sha256: bytes) -> list[RequestLog]:
        """Requests for the image with this digest."""
        path = f"/fota/img/{sha256.hex()}"
        return [r for r in self.requests if r.path == path]

    async def wait_for_report(
        self,
        predicate: Callable[[dict[int, Any]], bool],
        timeout: float = 30.0,
        *,
        device: str | None = None,
    ) -> dict[int, Any]:
        """Wait until a report matching ``predicate`` has arrived; return it.

        Args:
            predicate: tests one report (the CBOR map of ``docs/protocol.md``).
            timeout: seconds before ``TimeoutError``.
            device: only reports posted to this device's resource (None: any device).
        """

        def found() -> dict[int, Any] | None:
            pool = self.reports if device is None else self._reports_by_device.get(device, ())
            return next((r for r in pool if predicate(r)), None)

        async def _wait() -> dict[int, Any]:
            async with self._changed:
                await self._changed.wait_for(lambda: found() is not None)
            report = found()
            assert report is not None
            return report

        return await asyncio.wait_for(_wait(), timeout)
