"""The write-ahead journal: one small atomic record per device, manifests as files of their own.

Persistence rules (design.md):

* Every write is atomic: a temp file in the same directory, write, fsync, ``os.replace``, fsync
  the directory. A power cut leaves either the old or the new record, never half of one.
* Write-ahead order: fragment bytes reach the candidate file and are fsynced (by the
  downloader, through the same :class:`FileOps`) before the journal marks them verified.
* Manifests are written once each, named by their digest, before a record that names them;
  on load they are re-verified, and a record naming a manifest that fails is not trusted.

All file operations go through a :class:`FileOps` object so a test can record their order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import structlog

from fota.core.manifest import Manifest, TrustStore, verify
from fota.core.record import Record
from fota.core.states import State
from fota.errors import FotaError, JournalError
from fota.fileops import FileOps

__all__ = ["CANDIDATE_NAME", "RECORD_NAME", "FileOps", "Journal", "Loaded"]

log = structlog.get_logger(__name__)

RECORD_NAME = "journal.cbor"
CANDIDATE_NAME = "candidate.bin"


@dataclass(slots=True)
class Loaded:
    """What :meth:`Journal.load` found."""

    record: Record
    pending: Manifest | None
    installed: Manifest | None


PAST_THE_INSTALL = frozenset(
    {State.INSTALLING, State.AWAIT_RESTART, State.AWAIT_COMMIT, State.ROLLING_BACK}
)
"""States in which a pending update's install has begun: it is finished (or rolled back)."""


class Journal:
    """The on-disk state of one device under ``state_dir``.

    Args:
        state_dir: a directory owned by fota (created 0700 if missing).
        trust: keys to re-verify stored manifests on load.
        ops: file operations (injectable for tests).
    """

    def __init__(self, state_dir: Path, trust: TrustStore, ops: FileOps | None = None) -> None:
        self.dir = Path(state_dir)
        self.trust = trust
        self.ops = ops or FileOps()
        self._written: set[bytes] = set()
        self._last: Record | None = None

    @property
    def candidate_path(self) -> Path:
        """Where the image being downloaded lives."""
        return self.dir / CANDIDATE_NAME

    def _manifest_path(self, digest: bytes) -> Path:
        return self.dir / f"manifest-{digest.hex()}.cose"

    def _load_manifest(
        self, digest: bytes | None, what: str, *, revoked_ok: bool
    ) -> Manifest | None:
        if digest is None:
            return None
        path = self._manifest_path(digest)
        try:
            raw = path.read_bytes()
            manifest = verify(raw, self.trust, revoked_ok=revoked_ok)
        except (OSError, FotaError) as exc:
            log.error("stored_manifest_unusable", which=what, path=str(path), error=str(exc))
            return None
        if digest not in (manifest.digest, hashlib.sha256(raw).digest()):
            # (A journal written before issue 16 §3 names a manifest by the SHA-256 of its
            # bytes; load() moves the record to the manifest's identity.)
            log.error(
                "stored_manifest_unusable", which=what, path=str(path), error="digest mismatch"
            )
            return None
        self._written.add(digest)
        return manifest

    def load(self) -> Loaded:
        """Read the record and re-verify the manifests it names.

        A missing record is a new device. A damaged record raises :class:`JournalError` (the
        caller decides; the daemon refuses to start rather than forget an installed image).
        A pending manifest that no longer verifies drops the pending update: nothing that was
        not checked is trusted.
        """
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            data = (self.dir / RECORD_NAME).read_bytes()
        except FileNotFoundError:
            self._last = Record()
            self._sweep(self._last)
            return Loaded(self._last, None, None)
        except OSError as exc:
            raise JournalError(f"journal {self.dir / RECORD_NAME}: {exc}") from exc
        record = Record.from_bytes(data)
        # The running image stays trusted after its key was revoked or rotated out; a pending
        # update does only once its install has begun (it cannot be undone half-way): before
        # that, a revoked key drops it.
        installed = self._load_manifest(record.installed, "installed", revoked_ok=True)
        pending = self._load_manifest(
            record.pending, "pending", revoked_ok=record.state in PAST_THE_INSTALL
        )
        if record.pending is not None and pending is None:
            log.error("pending_update_dropped", digest=record.pending.hex())
            record = record.evolve(
                state=State.IDLE,
                pending=None,
                manifest_uri=None,
                verified=b"",
                defer_until=None,
                defer_reason="",
                attempts=0,
                restarts=0,
                progress=0,
            )
        if record.installed is not None and installed is None:
            # Without its manifest the running image cannot decide politeness or anti-rollback;
            # refusing to guess is safer than treating the device as empty.
            raise JournalError(f"installed manifest {record.installed.hex()} is missing or invalid")
        self._last = record
        self._sweep(record)
        record, pending = self._identities(record, pending, installed)
        return Loaded(record, pending, installed)

    @staticmethod
    def _identities(
        record: Record, pending: Manifest | None, installed: Manifest | None
    ) -> tuple[Record, Manifest | None]:
        """Name the manifests by their identity (``Manifest.digest``) in the record.

        Journals written before issue 16 §3 name them by the SHA-256 of their bytes. Only
        the record in memory changes: the next save writes each manifest under its new name
        before the record that names it, then removes the old file (``_written`` holds the
        old name), so a crash in between leaves the old, consistent pair on disk.

        An update already installing (fota updating the image it runs in) keeps its old
        digest, and so its update id, to the end: its installer's state (file, A/B, RAUC)
        names it, and a commit or a rollback must still find it.
        """
        if installed is not None and record.installed != installed.digest:
            record = record.evolve(installed=installed.digest)
        if pending is not None and record.pending != pending.digest:
            if record.state in PAST_THE_INSTALL and record.pending is not None:
                pending = dataclasses.replace(pending, digest=record.pending)
            else:
                record = record.evolve(pending=pending.digest)
        return record, pending

    def save(self, record: Record, manifests: tuple[Manifest | None, ...] = ()) -> None:
        """Durably store ``record``, after any manifest it names that is not on disk yet."""
        for manifest in manifests:
            if manifest is not None and manifest.digest not in self._written:
                self.ops.write_atomic(self._manifest_path(manifest.digest), manifest.raw)
                self._written.add(manifest.digest)
        self.ops.write_atomic(self.dir / RECORD_NAME, record.to_bytes())
        self._last = record
        self._collect(record)

    def _collect(self, record: Record) -> None:
        """Remove manifest files the record no longer names (after the record is durable)."""
        keep = {record.pending, record.installed}
        for digest in list(self._written):
            if digest not in keep:
                self.ops.unlink(self._manifest_path(digest))
                self._written.discard(digest)

    def _sweep(self, record: Record) -> None:
        """At load: remove what an interrupted save left behind (temp files, orphan manifests)."""
        keep = {self._manifest_path(d).name for d in (record.pending, record.installed) if d}
        for path in self.dir.glob("manifest-*.cose"):
            if path.name not in keep:
                log.info("orphan_removed", path=str(path))
                self.ops.unlink(path)
        for path in self.dir.glob(".*.tmp"):
            self.ops.unlink(path)
