"""A real CoAP update server for tests, demos and manual checks.

It serves the resources of ``docs/protocol.md`` over UDP on ``127.0.0.1`` (port 0 by
default: the OS picks one, see :attr:`UpdateServer.port`):

* images and manifests are files under ``root``, addressed by digest, and Block2 slices are cut
  from disk for each request (stateless: a new server on the same files resumes a download);
  the ETag is derived from the image digest, so it survives a server restart;
* announcements per device (or for every device) are observable;
* every request and every status report is recorded for tests to assert on;
* a seeded :class:`FaultPlan` injects faults ("corrupt block k" first; more come with the
  download-engine issue).
"""

from __future__ import annotations

import asyncio
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

from fota.core import manifest as mf
from fota.core.manifest import Component, ManifestBody, PrivateKey, Severity

log = structlog.get_logger(__name__)

CF_CBOR = 60
CF_COSE_SIGN1 = 18
CF_OCTETS = 42
DEFAULT_FRAGMENT = 64 * 1024
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


@dataclass
class FaultPlan:
    """Seeded faults the server injects.

    Attributes:
        seed: seeds the random choices, so a failing run can be repeated.
        corrupt_blocks: block number (in the request's block size) -> how many times to flip a
            byte in that block's payload before serving it intact.
    """

    seed: int = 0
    corrupt_blocks: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def corrupt(self, block: int, times: int = 1) -> FaultPlan:
        """Corrupt block ``block`` the next ``times`` times it is served."""
        self.corrupt_blocks[block] = self.corrupt_blocks.get(block, 0) + times
        return self

    def corrupt_random(self, count: int, blocks: int) -> FaultPlan:
        """Corrupt ``count`` distinct blocks chosen (seeded) among the first ``blocks``."""
        for block in self._random.sample(range(blocks), count):
            self.corrupt(block)
        return self

    def apply(self, block: int, payload: bytes) -> bytes:
        """Return the payload to serve for ``block`` (corrupted while the plan says so)."""
        left = self.corrupt_blocks.get(block, 0)
        if not left or not payload:
            return payload
        self.corrupt_blocks[block] = left - 1
        i = self._random.randrange(len(payload))
        return payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1 :]


@dataclass(frozen=True, slots=True)
class RequestLog:
    """One request the server saw."""

    method: str
    path: str
    offset: int | None
    block_size: int | None
    at: float


@dataclass(frozen=True, slots=True)
class Published:
    """What :meth:`UpdateServer.publish` made."""

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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


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
        if (
            len(path) != 1
            or len(path[0]) != 64
            or any(c not in "0123456789abcdef" for c in path[0])
        ):
            return aiocoap.Message(code=Code.NOT_FOUND)
        name = path[0]
        file = self.folder / name
        block2 = request.opt.block2
        szx = min(block2.size_exponent if block2 else 6, self.server.max_szx)
        size = 1 << (szx + 4)
        offset = block2.start if block2 else 0
        self.server._log("GET", f"/fota/{self.kind}/{name}", offset, size)
        try:
            # A small positioned read per block; a thread hop would cost more than it saves.
            with open(file, "rb") as f:  # noqa: ASYNC230
                total = os.fstat(f.fileno()).st_size
                f.seek(offset)
                payload = f.read(size)
        except FileNotFoundError:
            return aiocoap.Message(code=Code.NOT_FOUND)
        if offset and offset >= total:
            return aiocoap.Message(code=Code.BAD_OPTION)
        more = offset + len(payload) < total
        if self.kind == "img":
            payload = self.server.faults.apply(offset // size, payload)
        response = aiocoap.Message(
            code=Code.CONTENT, payload=payload, content_format=self.content_format
        )
        if block2 is not None or more:
            response.opt.block2 = BlockOption.BlockwiseTuple(offset // size, more, szx)
            response.opt.size2 = total
            response.opt.etag = bytes.fromhex(name)[:8]
        return response


class _Announcements(aiocoap.resource.ObservableResource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """``/fota/ann/{device}``: observable, per device or for all devices."""

    def __init__(self, server: UpdateServer) -> None:
        super().__init__()
        self.server = server
        self.by_device: dict[str, set[Any]] = {}

    async def add_observation(self, request: Any, serverobservation: Any) -> None:
        device = "/".join(request.opt.uri_path)
        watchers = self.by_device.setdefault(device, set())
        watchers.add(serverobservation)
        serverobservation.accept(lambda: watchers.discard(serverobservation))

    def notify(self, devices: Iterable[str]) -> None:
        targets = set(devices)
        for device, watchers in self.by_device.items():
            if ALL_DEVICES in targets or device in targets:
                for observation in list(watchers):
                    observation.trigger()

    async def render_get(self, request: Any) -> Any:
        device = "/".join(request.opt.uri_path)
        self.server._log("GET", f"/fota/ann/{device}", None, None)
        ann = self.server.announcements.get(device) or self.server.announcements.get(ALL_DEVICES)
        body: dict[int, Any] = {1: 0}
        if ann is not None:
            body = {1: ann[0], 2: ann[1], 3: f"../m/{ann[1].hex()}"}
        return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(body), content_format=CF_CBOR)


class _Reports(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """``/fota/report/{device}``: records reports, de-duplicated by (device, sequence)."""

    def __init__(self, server: UpdateServer) -> None:
        super().__init__()
        self.server = server

    async def render_post(self, request: Any) -> Any:
        device = "/".join(request.opt.uri_path)
        self.server._log("POST", f"/fota/report/{device}", None, None)
        try:
            report = cbor2.loads(request.payload)
            if not isinstance(report, dict) or not isinstance(report.get(2), int):
                raise ValueError("not a report map")
        except Exception:
            return aiocoap.Message(code=Code.BAD_REQUEST)
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
    ) -> None:
        self.root = Path(root)
        self.key = signing_key
        self.kid = kid
        self.host = host
        self.port = port
        self.faults = faults or FaultPlan()
        self.max_szx = max_block_size.bit_length() - 5
        self.announcements: dict[str, tuple[int, bytes]] = {}
        self.requests: list[RequestLog] = []
        self.request_hook: Callable[[RequestLog], None] | None = None
        """Called with every request as it arrives (tests wait on it instead of sleeping)."""
        self.reports: list[dict[int, Any]] = []
        self.duplicate_reports = 0
        self._seen: set[tuple[str, int]] = set()
        self._changed = asyncio.Condition()
        self._ctx: Any = None
        self._sequence = 0
        (self.root / "img").mkdir(parents=True, exist_ok=True)
        (self.root / "m").mkdir(parents=True, exist_ok=True)
        self._ann = _Announcements(self)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve."""
        site = aiocoap.resource.Site()
        site.add_resource(["fota", "ann"], self._ann)
        site.add_resource(["fota", "m"], _Sliced(self, self.root / "m", CF_COSE_SIGN1, "m"))
        site.add_resource(["fota", "img"], _Sliced(self, self.root / "img", CF_OCTETS, "img"))
        site.add_resource(["fota", "report"], _Reports(self))
        # udp6 only: aiocoap's default server transports include TCP, which falls back to
        # port 5683 when asked for port 0.
        self._ctx = await aiocoap.Context.create_server_context(
            site, bind=(self.host, self.port), transports=["udp6"]
        )
        self.port = bound_port(self._ctx)
        log.info("update_server_started", uri=self.uri)

    async def stop(self) -> None:
        """Stop serving."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()

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
        fragment_size: int = DEFAULT_FRAGMENT,
        key: PrivateKey | None = None,
        kid: bytes | None = None,
    ) -> Published:
        """Store an image and sign a manifest for it, without announcing it."""
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
        )
        raw = mf.sign(body, key or self.key, kid or self.kid)
        digest = hashlib.sha256(raw).digest()
        return Published(raw, digest, mf.update_id_of(digest), sequence, sha, path)

    def announce_raw(
        self, raw: bytes, sequence: int, devices: Iterable[str] = (ALL_DEVICES,)
    ) -> bytes:
        """Serve ``raw`` as a manifest (whatever it contains) and announce it; return its digest."""
        digest = hashlib.sha256(raw).digest()
        (self.root / "m" / digest.hex()).write_bytes(raw)
        devices = tuple(devices)
        for device in devices:
            self.announcements[device] = (sequence, digest)
        self._ann.notify(devices)
        log.info("manifest_announced", sequence=sequence, digest=digest.hex()[:16], devices=devices)
        return digest

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
        return published

    # -- records --------------------------------------------------------------------------

    def _log(self, method: str, path: str, offset: int | None, block_size: int | None) -> None:
        entry = RequestLog(method, path, offset, block_size, time.monotonic())
        self.requests.append(entry)
        if self.request_hook is not None:
            self.request_hook(entry)

    def _record_report(self, device: str, report: dict[int, Any]) -> None:
        key = (device, report[2])
        if key in self._seen:
            self.duplicate_reports += 1
            return
        self._seen.add(key)
        self.reports.append(report)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def image_requests(self, sha256: bytes) -> list[RequestLog]:
        """Requests for the image with this digest."""
        path = f"/fota/img/{sha256.hex()}"
        return [r for r in self.requests if r.path == path]

    async def wait_for_report(
        self, predicate: Callable[[dict[int, Any]], bool], timeout: float = 30.0
    ) -> dict[int, Any]:
        """Wait until a report matching ``predicate`` has arrived; return it."""

        def found() -> dict[int, Any] | None:
            return next((r for r in self.reports if predicate(r)), None)

        async def _wait() -> dict[int, Any]:
            async with self._changed:
                await self._changed.wait_for(lambda: found() is not None)
            report = found()
            assert report is not None
            return report

        return await asyncio.wait_for(_wait(), timeout)
