"""The fragment downloader: a child task of the engine that reports only through events.

For each fragment the journal does not vouch for, it fetches the fragment's blocks, writes each
at its byte offset in the candidate file, hashes the fragment as it arrives, and when the
fragment is complete and matches its signed digest, fsyncs the candidate and only then emits
``FragmentVerified`` (write-ahead order: the journal marks it after the bytes are durable).
A fragment that fails its digest is fetched again; no unverified byte is ever vouched for.

Before fetching, fragments the journal already vouches for are re-read and re-hashed: bytes on
disk are not trusted just because a record says so (a cheap read, once per download start).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from fota.core import events as ev
from fota.core.manifest import Manifest
from fota.core.record import bitmap_get
from fota.errors import FotaError, ImageChanged, IntegrityError, StorageError, TransportError
from fota.journal import FileOps
from fota.transport import Transport

log = structlog.get_logger(__name__)

FRAGMENT_TRIES = 3
"""Times one fragment may fail its digest in one download run before the run fails."""


def _recheck(ops: FileOps, fd: int, manifest: Manifest, verified: bytes) -> list[int]:
    bad = []
    for index in range(manifest.fragment_count):
        if not bitmap_get(verified, index):
            continue
        offset, length = manifest.fragment_span(index)
        data = os.pread(fd, length, offset)
        if hashlib.sha256(data).digest() != manifest.body.fragment_sha256[index]:
            bad.append(index)
    return bad


class Downloader:
    """Fetches the missing fragments of one update into the candidate file.

    Args:
        transport: the network.
        ops: file operations (shared with the journal so tests see one ordered log).
        candidate: path of the candidate file.
        emit: puts an event into the engine's inbox.
        block_size: CoAP block size asked for (the server may answer smaller).
    """

    def __init__(
        self,
        transport: Transport,
        ops: FileOps,
        candidate: Path,
        emit: Callable[[ev.Event], None],
        *,
        block_size: int = 1024,
    ) -> None:
        self.transport = transport
        self.ops = ops
        self.candidate = candidate
        self.emit = emit
        self.block_size = block_size

    async def run(self, manifest: Manifest, image_uri: str, verified: bytes) -> None:
        """Download until every fragment is verified; report the outcome as an event."""
        uid = manifest.update_id
        try:
            await self._run(manifest, image_uri, verified)
        except asyncio.CancelledError:
            raise
        except FotaError as exc:
            self.emit(ev.DownloadFailed(uid, exc))
        except OSError as exc:  # the candidate file could not be written (disk full, I/O error)
            log.error("candidate_write_failed", update_id=uid, error=str(exc))
            self.emit(ev.DownloadFailed(uid, StorageError(f"candidate {self.candidate}: {exc}")))
        else:
            self.emit(ev.DownloadFinished(uid))

    async def _run(self, manifest: Manifest, image_uri: str, verified: bytes) -> None:
        uid = manifest.update_id
        fd = self.ops.open(self.candidate, os.O_RDWR | os.O_CREAT)
        try:
            bad = await asyncio.to_thread(_recheck, self.ops, fd, manifest, verified)
            if bad:
                log.warning("fragments_invalid_on_disk", update_id=uid, fragments=bad)
                self.emit(ev.FragmentsInvalid(uid, tuple(bad)))
            todo = [
                i for i in range(manifest.fragment_count) if not bitmap_get(verified, i) or i in bad
            ]
            log.debug("download_started", update_id=uid, fragments=len(todo), uri=image_uri)
            for index in todo:
                await self._fragment(fd, manifest, image_uri, index)
        finally:
            self.ops.close(fd)

    async def _fragment(self, fd: int, manifest: Manifest, uri: str, index: int) -> None:
        start, length = manifest.fragment_span(index)
        end = start + length
        expected = manifest.body.fragment_sha256[index]
        for attempt in range(1, FRAGMENT_TRIES + 1):
            digest = hashlib.sha256()
            offset, block_size = start, self.block_size
            while offset < end:
                block = await self.transport.fetch_block(uri, offset, block_size)
                if block.size2 is not None and block.size2 != manifest.body.image_size:
                    raise ImageChanged(
                        f"{uri}: Size2 {block.size2} differs from the manifest's image_size "
                        f"{manifest.body.image_size}"
                    )
                if block.offset != offset:
                    raise TransportError(
                        f"{uri}: asked for byte {offset}, got block at {block.offset}"
                    )
                data = block.data[: end - offset]
                if not data:
                    raise IntegrityError(f"{uri}: image ends at byte {offset}, manifest says {end}")
                self.ops.pwrite(fd, data, offset)
                digest.update(data)
                offset += len(data)
                if len(block.data) < block_size and offset < end and block.more:
                    # The server answers with smaller blocks (RFC 7959 2.4): follow it.
                    block_size = len(block.data)
            if digest.digest() == expected:
                self.ops.fsync(fd)
                self.emit(ev.FragmentVerified(manifest.update_id, index))
                return
            log.warning(
                "fragment_corrupt", update_id=manifest.update_id, fragment=index, attempt=attempt
            )
        raise IntegrityError(f"fragment {index} failed its digest {FRAGMENT_TRIES} times in a row")
