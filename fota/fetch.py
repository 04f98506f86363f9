"""``fota fetch``: the image downloader on its own, resumable and verified.

Like ``coap-client-notls -o FILE URI``, but the transfer survives a kill: fragments that were
written and fsynced are recorded in a small journal beside the output (``FILE.fota-fetch``,
written atomically after the fsync that covers them), and a second run with the same URI
fetches only the rest. The bytes go to ``FILE.part`` and become ``FILE`` only after the whole
image's SHA-256 was computed (and matched ``--sha256`` when given).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cbor2
import structlog

from fota.core import events as ev
from fota.core.record import bitmap_new, bitmap_set
from fota.download import Downloader, Layout
from fota.errors import FotaError, IntegrityError, JournalError, TransportError
from fota.fileops import FileOps, sha256_prefix
from fota.statedir import lock_file
from fota.transport import Block, BlockFetcher
from fota.transport.tcp import TcpFetcher
from fota.transport.window import WindowFetcher

log = structlog.get_logger(__name__)

LOCK_SUFFIX = ".fota-fetch.lock"
"""The lock beside the output: ``FILE.fota-fetch.lock`` (left in place; it holds a PID)."""

FRAGMENT = 256 * 1024
"""Journal granularity: one small atomic journal write per 256 KiB keeps write
amplification near 1 + 4 KiB / 256 KiB (a journal write costs a 4 KiB block)."""


@dataclass(slots=True)
class FetchResult:
    """What a fetch did."""

    size: int
    sha256: bytes
    resumed_fragments: int


def _load_state(path: Path, uri: str, size: int, etag: bytes | None, count: int) -> bytes:
    """The fragments a previous run vouched for, if it fetched the same resource.

    Without fragment digests the ETag is what says "same resource": a server that swapped the
    file for another of the same size must not get its old fragments mixed in.
    """
    try:
        state = cbor2.loads(path.read_bytes())
        same = (state["uri"], state["size"], state.get("etag")) == (uri, size, etag)
        if same and len(state["done"]) == len(bitmap_new(count)):
            return bytes(state["done"])
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged journal only costs a fresh download
        log.warning("fetch_journal_ignored", path=str(path), error=str(exc))
    return bitmap_new(count)


async def fetch(
    uri: str,
    out: Path,
    *,
    sha256: bytes | None = None,
    window: int = 16,
    block_size: int = 1024,
    ack_timeout: float = 2.0,
    max_retransmit: int = 4,
    fsync_every: int = 1,
    oscore: Path | None = None,
    retransmission: str = "cocoa",
    congestion: str = "aimd",
    min_rto: float = 0.2,
    restart: bool = False,
) -> FetchResult:
    """Download ``uri`` to ``out``, resuming a previous run; verify the SHA-256 if given.

    With ``oscore`` (a security context directory, ``fota.transport.oscore``) every request
    is OSCORE-protected and goes through aiocoap, ``window`` at a time. With ``restart`` a
    previous partial fetch of ``out`` is forgotten first (``--restart``).

    Raises:
        FotaError: transport errors, a server refusal, or a digest mismatch (IntegrityError).
        StateDirLocked: another ``fota fetch`` is writing ``out`` (it holds
            ``FILE.fota-fetch.lock``); the message names ``out`` and its PID.
    """
    out = Path(out)
    journal = out.with_name(out.name + ".fota-fetch")
    candidate = out.with_name(out.name + ".part")
    ops = FileOps()
    # One fetch per output (issue 17 §1): two would write the same .part and journal. Taken
    # before the state is read; the kernel releases it when this process dies.
    lock = lock_file(out.parent, out.name + LOCK_SUFFIX, out)
    try:
        if restart:
            remove_leftovers(out)  # under the lock: never another fetch's file
        return await _fetch(
            uri,
            out,
            journal,
            candidate,
            ops,
            sha256=sha256,
            window=window,
            block_size=block_size,
            ack_timeout=ack_timeout,
            max_retransmit=max_retransmit,
            fsync_every=fsync_every,
            oscore=oscore,
            retransmission=retransmission,
            congestion=congestion,
            min_rto=min_rto,
        )
    finally:
        lock.release()


async def _fetch(
    uri: str,
    out: Path,
    journal: Path,
    candidate: Path,
    ops: FileOps,
    *,
    sha256: bytes | None,
    window: int,
    block_size: int,
    ack_timeout: float,
    max_retransmit: int,
    fsync_every: int,
    oscore: Path | None,
    retransmission: str,
    congestion: str,
    min_rto: float,
) -> FetchResult:

    secured = None
    if oscore is not None:
        from fota.transport.coap import CoapTransport

        parts = urlsplit(uri)
        secured = CoapTransport(
            f"{parts.scheme}://{parts.netloc}",
            "fetch",
            ack_timeout=ack_timeout,
            max_retransmit=max_retransmit,
            oscore=oscore,
        )

    def fetchers(uri: str, *, window: int, block_size: int) -> BlockFetcher:
        if secured is not None:
            return secured.block_fetcher(uri, window=window, block_size=block_size)
        if uri.startswith("coap+tcp://"):
            return TcpFetcher.for_uri(uri)
        return WindowFetcher.for_uri(
            uri,
            window=window,
            block_size=block_size,
            timeout=ack_timeout,
            max_tries=max_retransmit + 1,
            retransmission=retransmission,
            congestion=congestion,
            min_rto=min_rto,
        )

    try:
        # One block first, for Size2: the download is planned in fragments of a known image.
        blocks: list[Block] = []
        await fetchers(uri, window=1, block_size=block_size).run(
            iter([(0, block_size)]), blocks.append
        )
        first = blocks[0]
        if first.size2 is not None:
            size = first.size2
        elif not first.more:
            size = len(first.data)
        else:
            raise TransportError(f"{uri}: the server sent no Size2; cannot plan the download")
        layout = Layout("fetch", size, FRAGMENT, None)
        done = _load_state(journal, uri, size, first.etag, layout.count)
        resumed = sum(bin(b).count("1") for b in done)
        failure: list[FotaError] = []

        def emit(event: ev.Event) -> None:
            nonlocal done
            if isinstance(event, ev.FragmentVerified):
                done = bitmap_set(done, event.index)
                # After the fsync that covered the fragment: the journal may vouch for it now.
                state = {"uri": uri, "size": size, "etag": first.etag, "done": done}
                ops.write_atomic(journal, cbor2.dumps(state))
            elif isinstance(event, ev.DownloadFailed):
                failure.append(event.error)

        downloader = Downloader(
            fetchers,
            ops,
            candidate,
            emit,
            block_size=block_size,
            window=window,
            fsync_every=fsync_every,
        )
        await downloader.fetch(layout, uri, done)
        if failure:
            raise failure[0]
        digest = await asyncio.to_thread(sha256_prefix, candidate, size)
        if sha256 is not None and digest != sha256:
            ops.unlink(candidate)
            ops.unlink(journal)
            raise IntegrityError(
                f"{uri}: SHA-256 {digest.hex()} is not the expected {sha256.hex()}"
            )
        ops.replace(candidate, out)
        ops.fsync_dir(out.parent)
        ops.unlink(journal)
        return FetchResult(size, digest, resumed)
    except OSError as exc:
        raise JournalError(f"{out}: {exc}") from exc
    finally:
        if secured is not None:
            await secured.aclose()


def remove_leftovers(out: Path) -> None:
    """Forget a previous partial fetch of ``out`` (the ``--restart`` option)."""
    for suffix in (".fota-fetch", ".part"):
        path = out.with_name(out.name + suffix)
        if path.exists():
            os.unlink(path)
