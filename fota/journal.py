"""The write-ahead journal: one small atomic record per device, manifests as files of their own.

Persistence rules (design.md):

* Every write is atomic: a temp file in the same directory, write, fsync, ``os.replace``, fsync
  the directory. A power cut leaves either the old or the new record, never half of one.
* Write-ahead order: fragment bytes reach the candidate file and are fsynced (by the
  downloader, through the same :class:`FileOps`) before the journal marks them verified.
* Manifests are written once each, named by their digest, before a record that names them;
  on load they are re-verified, and a record naming a manifest that fails is not trusted.
* Two generations (issue 17 §2): before a save replaces ``journal.cbor``, the current record
  also gets the name ``journal.prev.cbor`` (a hard link renamed into place), so
  ``journal.cbor`` is never missing. A crash at any point leaves at least one good record, and
  a record that is damaged anyway (truncated, a flipped bit, empty: a disk fault) falls back
  to the previous one. What cannot be loaded is moved to ``quarantine/``, never deleted, and
  the load says so (:attr:`Loaded.recovered`, a ``STATE_RECOVERED`` report in the outbox):
  the updater starts whatever it finds, and the anti-rollback floor is never lowered.

All file operations go through a :class:`FileOps` object so a test can record their order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from fota.core.keyset import MAX_FLOOR
from fota.core.manifest import Manifest, TrustStore, verify
from fota.core.record import Record, Report, take_report_seq
from fota.core.states import State
from fota.errors import FotaError, JournalError, ManifestError, ResultCode
from fota.fileops import FileOps, join

__all__ = [
    "CANDIDATE_NAME",
    "PREVIOUS_NAME",
    "QUARANTINE_DIR",
    "RECORD_NAME",
    "FileOps",
    "Journal",
    "Loaded",
]

log = structlog.get_logger(__name__)

RECORD_NAME = "journal.cbor"
PREVIOUS_NAME = "journal.prev.cbor"
"""The previous generation of the record (the one before the last save)."""
CANDIDATE_NAME = "candidate.bin"
QUARANTINE_DIR = "quarantine"
"""Where state that could not be loaded is moved (inside the state directory, mode 0700)."""
MAX_QUARANTINED = 16
"""Files kept in the quarantine; the oldest goes first (repeated faults cannot fill the disk)."""
REPORT_SEQ_GAP = 64
"""After a fall back to the previous generation, how far above the numbers the lost record
may have used its recovery's report is numbered: the lost record is one save ahead, and one
save queues far fewer reports than this. The replayed generation numbers its own reports as
the lost one did (a server de-duplicates by number), skipping the recovery's
(``Record.reserved``)."""

REPORT_SEQ_RANDOM_BITS = 62
"""When no generation of the record can be read, the report numbering starts again at a random
number of this many bits: the lost record's numbers are unknown (docs/journal.md, "Recovery")."""


@dataclass(slots=True)
class Loaded:
    """What :meth:`Journal.load` found."""

    record: Record
    pending: Manifest | None
    installed: Manifest | None
    recovered: str = ""
    """What this load recovered from ("": nothing was damaged); also in ``record.recovered``."""
    pending_lost: str = ""
    """Why the pending manifest could not be loaded ("": it loaded, or none is pending). The
    record still names the update: the engine hands this to the machine first
    (``PendingLost``), which drops it. The journal keeps to its files."""


PAST_THE_INSTALL = frozenset(
    {State.INSTALLING, State.AWAIT_RESTART, State.AWAIT_COMMIT, State.ROLLING_BACK}
)
"""States in which a pending update's install has begun: it is finished (or rolled back)."""


def _why(exc: JournalError) -> str:
    """A short reason for a report's detail (the log has the whole message)."""
    text = str(exc).split("journal record: ", 1)[-1]
    return text if len(text) <= 48 else text[:45] + "..."


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

    @staticmethod
    def _manifest_name(digest: bytes) -> str:
        return f"manifest-{digest.hex()}.cose"

    def _manifest_path(self, digest: bytes) -> str:
        """A plain ``str``: a new name at every update is kept out of pathlib (fileops.join)."""
        return join(self.dir, self._manifest_name(digest))

    def _load_manifest(
        self, digest: bytes | None, what: str, *, revoked_ok: bool
    ) -> tuple[Manifest | None, str]:
        """The stored manifest ``digest`` names, re-verified; else None and why ("": revoked).

        A manifest refused only because its key was revoked is a decision, not damage: it is
        dropped without a recovery (the key's revocation was reported).
        """
        if digest is None:
            return None, ""
        path = self._manifest_path(digest)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            manifest = verify(raw, self.trust, revoked_ok=revoked_ok)
        except FileNotFoundError:
            log.error("stored_manifest_unusable", which=what, path=path, error="missing")
            return None, "missing"
        except (OSError, FotaError) as exc:
            log.error("stored_manifest_unusable", which=what, path=path, error=str(exc))
            revoked = isinstance(exc, ManifestError) and exc.kind == "revoked_key"
            return None, "" if revoked else "invalid"
        if digest not in (manifest.digest, hashlib.sha256(raw).digest()):
            # (A journal written before issue 16 §3 names a manifest by the SHA-256 of its
            # bytes; load() moves the record to the manifest's identity.)
            log.error("stored_manifest_unusable", which=what, path=path, error="digest mismatch")
            return None, "invalid"
        self._written.add(digest)
        return manifest, ""

    def read_record(self, name: str = RECORD_NAME) -> Record | None:
        """Decode one generation of the record (None: there is no such file).

        Raises:
            JournalError: the file cannot be read or is damaged (naming the file and why).
        """
        path = self.dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JournalError(f"journal {path}: {exc.strerror or exc}") from exc
        try:
            return Record.from_bytes(data)
        except JournalError as exc:
            raise JournalError(f"{name}: {exc}") from exc

    def load(self) -> Loaded:
        """Read the record and re-verify the manifests it names; recover from what is damaged.

        A missing record is a new device. A damaged record falls back to the previous
        generation; a damaged or missing installed manifest is moved aside and its sequence
        number (kept in the record) becomes the anti-rollback floor; a pending manifest that
        no longer verifies drops the pending update: nothing that was not checked is trusted.
        Each recovery is logged, noted in the record and queued as a ``STATE_RECOVERED``
        report (docs/journal.md, "Recovery").

        Raises:
            JournalError: damaged state could not be moved aside (the disk refuses writes).
        """
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        record, recovered, replay = self._read_generations()
        # The running image stays trusted after its key was revoked or rotated out; a pending
        # update does only once its install has begun (it cannot be undone half-way): before
        # that, a revoked key drops it.
        installed, installed_fault = self._load_manifest(
            record.installed, "installed", revoked_ok=True
        )
        pending, pending_fault = self._load_manifest(
            record.pending, "pending", revoked_ok=record.state in PAST_THE_INSTALL
        )
        pending_lost = ""
        if record.pending is not None and pending is None:
            log.error("pending_update_dropped", digest=record.pending.hex())
            moved = self._quarantine(self._manifest_name(record.pending)) if pending_fault else ""
            pending_lost = (
                f"pending manifest {pending_fault}{moved}: update dropped"
                if pending_fault
                else "the pending manifest's key was revoked: update dropped"
            )
            if pending_fault:
                recovered.append(pending_lost)
        if record.installed is not None and installed is None:
            record, detail = self._lost_installed(record, installed_fault or "invalid")
            recovered.append(detail)
        elif installed is not None and record.installed_sequence != installed.body.sequence:
            # (Records written before the field: from now on a lost manifest keeps its floor.)
            record = record.evolve(installed_sequence=installed.body.sequence)
        self._last = record
        self._sweep(record)
        record, pending = self._identities(record, pending, installed)
        detail = "; ".join(recovered)[:200]  # a report's detail is at most 200 characters
        if detail:
            # The report says the state the device goes on in: IDLE when the update is
            # dropped (the machine drops it, PendingLost, before anything else happens).
            state = State.IDLE if pending_lost else record.state
            record = self._note_recovery(record, detail, replay=replay, state=state)
        if detail and not pending_lost:
            # Durable at once: the damaged files are gone from their places already, and the
            # report and the floor must not depend on the engine's first save. A disk that
            # refuses the write (full) must not keep the updater down either: the record is
            # used as it is, and the engine's next save (retried) makes it durable. (With a
            # pending update lost, that first save is the machine's drop, right after this:
            # one write, so a kill in between finds the state as it was on disk, and the
            # recovery is found, and reported, once.)
            try:
                self.save(record, (pending, installed))
            except OSError as exc:
                log.error("recovery_not_saved", error=str(exc))
        return Loaded(record, pending, installed, detail, pending_lost)

    def _read_generations(self) -> tuple[Record, list[str], bool]:
        """The newest good generation, what was recovered, and whether it is the previous one.

        The previous generation is one step behind: the lost record's step is replayed.
        """
        recovered: list[str] = []
        try:
            current = self.read_record(RECORD_NAME)
        except JournalError as exc:
            log.error("journal_damaged", path=str(self.dir / RECORD_NAME), error=str(exc))
            recovered.append(f"{RECORD_NAME} {_why(exc)}{self._quarantine(RECORD_NAME)}")
            current = None
        if current is not None:
            return current, recovered, False
        try:
            previous = self.read_record(PREVIOUS_NAME)
        except JournalError as exc:
            log.error("journal_damaged", path=str(self.dir / PREVIOUS_NAME), error=str(exc))
            recovered.append(f"{PREVIOUS_NAME} {_why(exc)}{self._quarantine(PREVIOUS_NAME)}")
            previous = None
        if previous is not None:
            # A save never leaves journal.cbor missing: it was damaged, or deleted. The lost
            # record may have sent reports under the next numbers already: the replay sends
            # the same step's reports under the same numbers (_note_recovery).
            if not recovered:
                recovered.append(f"{RECORD_NAME} missing")
            recovered.insert(0, "previous generation used")
            log.warning("journal_previous_generation_used", state=previous.state.name)
            return previous, recovered, True
        stored = self._stored_manifests()
        if not recovered and not stored:
            return Record(), recovered, False  # a new device
        return (*self._without_record(stored, recovered), False)

    def _stored_manifests(self) -> list[tuple[Path, Manifest | None]]:
        found: list[tuple[Path, Manifest | None]] = []
        for path in sorted(self.dir.glob("manifest-*.cose")):
            try:
                found.append((path, verify(path.read_bytes(), self.trust, revoked_ok=True)))
            except (OSError, FotaError):
                found.append((path, None))
        return found

    def _without_record(
        self, stored: list[tuple[Path, Manifest | None]], recovered: list[str]
    ) -> tuple[Record, list[str]]:
        """No generation is readable: start empty, with the highest floor the files prove.

        The stored manifests were written by fota into its own directory, one of them perhaps
        the running image's: the highest sequence number among those that verify is the
        floor (never lower than the running image's; a pending update of that number must
        be signed again). They are moved aside: no record names them.
        """
        sequences = [m.body.sequence for _, m in stored if m is not None]
        for path, _ in stored:
            self._quarantine(path.name)
        floor = max(sequences) if sequences else None
        # The manifest at the floor may be taken again (Record.floor_identity): it may be the
        # pending update's, which must not wait for a new signature to complete.
        at_floor = {m.digest for _, m in stored if m is not None and m.body.sequence == floor}
        identity = at_floor.pop() if len(at_floor) == 1 else None
        recovered.insert(
            0,
            "no readable journal: started empty"
            + (f", anti-rollback floor {floor} (stored manifests)" if floor is not None else ""),
        )
        # The numbers the lost records used are unknown, and a server de-duplicates reports
        # by (device, number): starting again from 0 would have every report taken for one it
        # has (a final report lost). A random start is far from them (2**62: no collision).
        seq = secrets.randbits(REPORT_SEQ_RANDOM_BITS)
        return Record(floor=floor, floor_identity=identity, report_seq=seq), recovered

    def _lost_installed(self, record: Record, fault: str) -> tuple[Record, str]:
        """The running image's manifest is gone: move it aside, keep its floor."""
        assert record.installed is not None
        moved = self._quarantine(self._manifest_name(record.installed))
        if record.floor is not None:
            floor, why = record.floor, "the floor a keyset set"
        elif record.installed_sequence is not None:
            floor, why = record.installed_sequence, "its sequence number"
        else:
            # A record written before installed_sequence, and the manifest lost before its
            # first start with this version: no number is proven. Lowering the floor could let
            # an old image back in; refusing updates until a root keyset resets the floor
            # (docs/security.md, floor-reset) needs the operator, not a person at the device.
            floor, why = MAX_FLOOR, "unknown: updates refused until a keyset resets the floor"
        log.error(
            "installed_manifest_lost",
            digest=record.installed.hex(),
            fault=fault,
            floor=floor,
        )
        record = record.evolve(installed=None, installed_sequence=None, floor=floor)
        return record, f"installed manifest {fault}{moved}: anti-rollback floor {floor} ({why})"

    def _note_recovery(self, record: Record, detail: str, *, replay: bool, state: State) -> Record:
        """Note the recovery in the record and queue its report (result STATE_RECOVERED).

        ``replay``: ``record`` is the previous generation, whose next step the lost record had
        taken, perhaps sending its reports (numbered from ``record.report_seq``) already. The
        replayed step must send them under the same numbers, so that the server, which
        de-duplicates by (device, sequence), keeps one of each (one final report, not two).
        So the numbering is left as it is, and the recovery's own report takes a number
        :data:`REPORT_SEQ_GAP` above the highest the lost record could have reached (its
        start, or the end of a reservation it would have jumped to), reserved in
        ``record.reserved`` so that nothing later takes it again.
        """
        log.error("state_recovered", detail=detail, state=record.state.name)
        if replay:
            first, end = record.reserved or (None, record.report_seq)
            sequence = max(end, record.report_seq) + REPORT_SEQ_GAP
            record = record.evolve(reserved=(sequence if first is None else first, sequence + 1))
        else:
            sequence, record = take_report_seq(record)
        report = Report(
            sequence=sequence,
            state=state,
            result=ResultCode.STATE_RECOVERED,
            detail=detail,
        )
        return record.evolve(recovered=detail, outbox=(*record.outbox, report))

    def _quarantine(self, name: str) -> str:
        """Move ``name`` (in the state directory) into the quarantine; " (moved to ...)" or "".

        Raises:
            JournalError: it exists and cannot be moved (the updater must not start on it).
        """
        src = self.dir / name
        if not os.path.lexists(src):
            return ""
        qdir = self.dir / QUARANTINE_DIR
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(qdir, 0o700)
            dst = qdir / f"{time.time_ns():020d}-{name}"
            self.ops.replace(src, dst)
            self.ops.fsync_dir(qdir)
            self.ops.fsync_dir(self.dir)
            kept = sorted(qdir.iterdir())
            for old in kept[: max(0, len(kept) - MAX_QUARANTINED)]:
                self.ops.unlink(old)
        except OSError as exc:
            raise JournalError(f"cannot move {src} to {qdir}: {exc.strerror or exc}") from exc
        log.warning("state_quarantined", path=str(src), to=str(dst))
        return f" (moved to {QUARANTINE_DIR}/)"

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
        for manifest in manifests:
            if (
                manifest is not None
                and manifest.digest == record.installed
                and record.installed_sequence != manifest.body.sequence
            ):
                record = record.evolve(installed_sequence=manifest.body.sequence)
        self._keep_previous()
        self.ops.write_atomic(self.dir / RECORD_NAME, record.to_bytes())
        previous, self._last = self._last, record
        self._collect(record, previous)

    def _keep_previous(self) -> None:
        """Make the current record the previous generation too, without ever unnaming it.

        A second name (a hard link under a temporary name, renamed over
        ``journal.prev.cbor``) for the current file: ``journal.cbor`` exists at every instant
        and always names a whole record, old or new, so a reader, and a kill at any point,
        never finds it missing. The directory fsync of the write that follows makes both
        names durable; whichever subset of these renames a power cut keeps, at least one good
        generation remains (docs/journal.md, "Recovery").
        """
        tmp = join(self.dir, f".{PREVIOUS_NAME}.{secrets.token_hex(16)}.tmp")  # not interned
        try:
            os.link(self.dir / RECORD_NAME, tmp, follow_symlinks=False)
        except FileNotFoundError:
            return  # no current record (a new device, or one moved to the quarantine)
        try:
            self.ops.replace(tmp, self.dir / PREVIOUS_NAME)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _collect(self, record: Record, previous: Record | None = None) -> None:
        """Remove manifest files the record no longer names (after the record is durable).

        Those ``previous`` names stay: it is ``journal.prev.cbor`` now, which a damaged
        record falls back to ("Recovery"); the next save removes them.
        """
        keep = {record.pending, record.installed}
        if previous is not None:
            keep |= {previous.pending, previous.installed}
        for digest in list(self._written):
            if digest not in keep:
                self.ops.unlink(self._manifest_path(digest))
                self._written.discard(digest)

    def _sweep(self, record: Record) -> None:
        """At load: remove what an interrupted save left behind (temp files, orphan manifests).

        The manifests the previous generation names stay (it may be fallen back to).
        """
        named = {record.pending, record.installed}
        with contextlib.suppress(JournalError):
            previous = self.read_record(PREVIOUS_NAME)
            if previous is not None:
                self._written |= {d for d in (previous.pending, previous.installed) if d}
                named |= {previous.pending, previous.installed}
        keep = {self._manifest_name(d) for d in named if d}
        for path in self.dir.glob("manifest-*.cose"):
            if path.name not in keep:
                log.info("orphan_removed", path=str(path))
                self.ops.unlink(path)
        for path in self.dir.glob(".*.tmp"):
            self.ops.unlink(path)
