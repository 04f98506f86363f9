"""The write-ahead journal: call order, round trips, damage, interrupted writes, cleanup, modes.

All files are real files under pytest's ``tmp_path``; a recording :class:`FileOps` subclass shows
the order of the OS calls that make the write-ahead rules of design.md hold.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import zlib
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from fota.core import events as ev
from fota.core import manifest as mf
from fota.core.machine import Machine, Model
from fota.core.manifest import Component, Manifest, ManifestBody, Severity, TrustStore
from fota.core.policy import Policy
from fota.core.record import SCHEMA, Record, Report, bitmap_get, bitmap_new, bitmap_set
from fota.core.states import State
from fota.download import Downloader
from fota.errors import JournalError, ResultCode
from fota.fileops import StrPath
from fota.journal import CANDIDATE_NAME, PREVIOUS_NAME, RECORD_NAME, FileOps, Journal
from fota.transport import Block, SequentialFetcher

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KID = b"journal-test-key"
FRAGMENT = 1024
IMAGE = bytes((i * 31 + 7) % 256 for i in range(3 * FRAGMENT + 428))  # 4 fragments, last short
IMAGE_URI = "coap://127.0.0.1:1234/fota/img/x"
TMP = f".{RECORD_NAME}.tmp"

Call = tuple[str, ...]


def trust() -> TrustStore:
    return TrustStore({KID: KEY.public_key()})


def make_manifest(sequence: int, image: bytes = IMAGE) -> Manifest:
    body = ManifestBody(
        sequence=sequence,
        component=Component.FIRMWARE,
        version=f"{sequence}.0",
        device_class="gw",
        image_size=len(image),
        image_sha256=hashlib.sha256(image).digest(),
        image_uri="../img/x",
        fragment_size=FRAGMENT,
        fragment_sha256=tuple(
            hashlib.sha256(image[i : i + FRAGMENT]).digest() for i in range(0, len(image), FRAGMENT)
        ),
        severity=Severity.MANDATORY,
    )
    return mf.verify(mf.sign(body, KEY, KID), trust())


def manifest_file(state_dir: Path, m: Manifest) -> Path:
    return state_dir / f"manifest-{m.digest.hex()}.cose"


def manifest_files(state_dir: Path) -> set[str]:
    return {p.name for p in state_dir.glob("manifest-*.cose")}


_TEMP = re.compile(r"^(\..+)\.[0-9a-f]{32}(\.tmp)$")


def _shown(path: StrPath) -> str:
    """A file's name, with a temporary file's random part left out (``.record.tmp``)."""
    return _TEMP.sub(r"\1\2", os.path.basename(path))


class RecordingOps(FileOps):
    """Records every call as (operation, file name[, destination name]), then does it.

    Temporary names are recorded without their random part: they are unpredictable on
    purpose (``FileOps.write_atomic``), the order of the calls is what these tests check.
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.names: dict[int, str] = {}

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        self.names[fd] = _shown(path)
        self.calls.append(("open", _shown(path)))
        return fd

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self.calls.append(("pwrite", self.names[fd]))
        super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self.calls.append(("fsync", self.names[fd]))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self.calls.append(("close", self.names.pop(fd)))
        super().close(fd)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        self.calls.append(("replace", _shown(src), os.path.basename(dst)))
        super().replace(src, dst)

    def fsync_dir(self, path: StrPath) -> None:
        self.calls.append(("fsync_dir", os.path.basename(path)))
        super().fsync_dir(path)

    def unlink(self, path: StrPath) -> None:
        self.calls.append(("unlink", os.path.basename(path)))
        super().unlink(path)


def assert_write_ahead(calls: list[Call], fragments: int) -> None:
    """The k-th candidate write is fsynced before the k-th journal write starts.

    The candidate is fsynced in a worker thread while the download goes on, so calls of the two
    files interleave; what must hold is the order per fragment, and each journal write's own
    order (temp write -> fsync(temp) -> replace -> fsync_dir).
    """
    assert calls[0] == ("open", CANDIDATE_NAME) and calls[-1] == ("close", CANDIDATE_NAME)
    writes = [i for i, c in enumerate(calls) if c == ("pwrite", CANDIDATE_NAME)]
    syncs = [i for i, c in enumerate(calls) if c == ("fsync", CANDIDATE_NAME)]
    journal_opens = [i for i, c in enumerate(calls) if c == ("open", f".{RECORD_NAME}.tmp")]
    assert len(writes) == fragments and len(journal_opens) == fragments
    for write, journal in zip(writes, journal_opens, strict=True):
        assert any(write < sync < journal for sync in syncs), (write, journal, calls)
    journal_calls = [c for c in calls if c[1] != CANDIDATE_NAME]
    assert journal_calls == record_write() * fragments


def record_write() -> list[Call]:
    """The calls of one record save over an existing one: the current generation gets the
    previous one's name too (a link renamed into place), then the new record is written
    atomically (docs/journal.md, "Recovery")."""
    return [("replace", f".{PREVIOUS_NAME}.tmp", PREVIOUS_NAME), *atomic_write(RECORD_NAME)]


def atomic_write(name: str, directory: str = "state") -> list[Call]:
    """The calls of one ``FileOps.write_atomic`` of ``name`` (design.md: atomic writes)."""
    tmp = f".{name}.tmp"
    return [
        ("open", tmp),
        ("pwrite", tmp),
        ("fsync", tmp),
        ("close", tmp),
        ("replace", tmp, name),
        ("fsync_dir", directory),
    ]


class FakeTransport:
    """Serves Block2 slices of an in-memory image; may answer smaller blocks and corrupt some."""

    def __init__(self, image: bytes, max_block: int = 512, corrupt: dict[int, int] | None = None):
        self.image = image
        self.max_block = max_block
        self.corrupt = dict(corrupt or {})  # byte offset -> times to corrupt the block there
        self.requests: list[tuple[str, int, int]] = []

    def block_fetcher(self, uri: str, *, window: int, block_size: int) -> SequentialFetcher:
        return SequentialFetcher(self, uri, block_size)  # type: ignore[arg-type]

    async def fetch_block(self, uri: str, offset: int, block_size: int) -> Block:
        self.requests.append((uri, offset, block_size))
        size = min(block_size, self.max_block)
        assert offset % size == 0, "the downloader asks at multiples of the block size"
        data = self.image[offset : offset + size]
        if self.corrupt.get(offset, 0) > 0:
            self.corrupt[offset] -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        more = offset + len(data) < len(self.image)
        return Block(offset, data, more, size2=len(self.image), etag=b"etag")


class Harness:
    """The engine's part in a download, reduced to what the journal sees.

    Like ``Engine._handle``: each ``FragmentVerified`` marks the fragment in the record, and the
    record is journaled before anything else happens; ``FragmentsInvalid`` clears the bits.
    """

    def __init__(self, state_dir: Path, manifest: Manifest, ops: FileOps) -> None:
        self.journal = Journal(state_dir, trust(), ops)
        self.journal.load()
        self.manifest = manifest
        self.events: list[ev.Event] = []
        self.vouched_on_disk: list[bool] = []
        self.record = Record(
            state=State.DOWNLOADING,
            pending=manifest.digest,
            manifest_uri="coap://127.0.0.1:1234/fota/m/abc",
            verified=bitmap_new(manifest.fragment_count),
        )

    def save(self) -> None:
        self.journal.save(self.record, (self.manifest, None))

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)
        if isinstance(event, ev.FragmentVerified):
            # The downloader says the bytes are durable: they must be on disk already.
            for index in event.indexes:
                offset, length = self.manifest.fragment_span(index)
                with open(self.journal.candidate_path, "rb") as f:
                    f.seek(offset)
                    on_disk = f.read(length)
                expected = self.manifest.body.fragment_sha256[index]
                self.vouched_on_disk.append(hashlib.sha256(on_disk).digest() == expected)
                self.record = self.record.evolve(verified=bitmap_set(self.record.verified, index))
            self.save()
        elif isinstance(event, ev.FragmentsInvalid):
            verified = self.record.verified
            for index in event.indexes:
                verified = bitmap_set(verified, index, False)
            self.record = self.record.evolve(verified=verified)
            self.save()

    async def download(self, transport: FakeTransport) -> None:
        downloader = Downloader(
            transport.block_fetcher,
            self.journal.ops,
            self.journal.candidate_path,
            self.emit,
            block_size=1024,
        )
        await downloader.run(self.manifest, IMAGE_URI, self.record.verified)


# -- (a) write-ahead order ----------------------------------------------------------------------


async def test_fragment_is_fsynced_before_the_journal_vouches_for_it(tmp_path: Path) -> None:
    manifest = make_manifest(1)
    ops = RecordingOps()
    harness = Harness(tmp_path / "state", manifest, ops)

    harness.save()  # entering DOWNLOADING: the manifest file first, then the record naming it
    manifest_name = manifest_file(tmp_path / "state", manifest).name
    assert ops.calls == atomic_write(manifest_name) + atomic_write(RECORD_NAME)  # the first
    ops.calls.clear()

    await harness.download(FakeTransport(IMAGE, max_block=512))

    uid = manifest.update_id
    # Each event carries the bytes received for it (the data budget counts them).
    assert harness.events == [
        *(ev.FragmentVerified(uid, i, FRAGMENT) for i in range(3)),
        ev.FragmentVerified(uid, 3, 428),
        ev.DownloadFinished(uid),
    ]
    assert harness.vouched_on_disk == [True] * 4

    # Each verified fragment is written once (one pwrite of the whole fragment, whatever the
    # block size), fsynced, and only then journaled; the manifest is not written again.
    assert_write_ahead(ops.calls, fragments=4)

    loaded = Journal(tmp_path / "state", trust()).load()
    assert [bitmap_get(loaded.record.verified, i) for i in range(4)] == [True] * 4
    assert (tmp_path / "state" / CANDIDATE_NAME).read_bytes() == IMAGE


async def test_corrupt_fragment_is_never_fsynced_or_journaled(tmp_path: Path) -> None:
    manifest = make_manifest(1)
    ops = RecordingOps()
    harness = Harness(tmp_path / "state", manifest, ops)
    harness.save()
    ops.calls.clear()

    # The second block of fragment 1 arrives corrupted once: the whole fragment is fetched again.
    transport = FakeTransport(IMAGE, max_block=512, corrupt={FRAGMENT + 512: 1})
    await harness.download(transport)

    assert harness.vouched_on_disk == [True] * 4
    # The bad pass of fragment 1 never reaches the candidate: 4 fragment writes, not 5.
    assert_write_ahead(ops.calls, fragments=4)
    assert [r[1] for r in transport.requests].count(FRAGMENT + 512) == 2


async def test_resume_reuses_only_fragments_that_still_verify(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    manifest = make_manifest(1)
    # A previous run vouched for fragments 0 and 2; fragment 2's bytes were damaged since, and
    # fragment 1 was half written but never vouched for.
    state_dir.mkdir(mode=0o700)
    candidate = bytearray(len(IMAGE))
    candidate[0:FRAGMENT] = IMAGE[0:FRAGMENT]
    candidate[2 * FRAGMENT : 3 * FRAGMENT] = IMAGE[2 * FRAGMENT : 3 * FRAGMENT]
    candidate[2 * FRAGMENT + 5] ^= 0x40
    candidate[FRAGMENT : FRAGMENT + 512] = IMAGE[FRAGMENT : FRAGMENT + 512]
    (state_dir / CANDIDATE_NAME).write_bytes(bytes(candidate))

    harness = Harness(state_dir, manifest, RecordingOps())
    harness.record = harness.record.evolve(verified=bitmap_set(bitmap_set(b"\x00", 0), 2))
    harness.save()
    transport = FakeTransport(IMAGE, max_block=1024)
    await harness.download(transport)

    uid = manifest.update_id
    assert harness.events == [
        ev.FragmentsInvalid(uid, (2,)),
        ev.FragmentVerified(uid, 1, FRAGMENT),
        ev.FragmentVerified(uid, 2, FRAGMENT),
        ev.FragmentVerified(uid, 3, 428),
        ev.DownloadFinished(uid),
    ]
    assert [offset for _, offset, _ in transport.requests] == [1024, 2048, 3072]
    assert (state_dir / CANDIDATE_NAME).read_bytes() == IMAGE


# -- (b) round trip -----------------------------------------------------------------------------


def full_record(pending: Manifest, installed: Manifest) -> Record:
    return Record(
        state=State.INSTALL_DEFERRED,
        pending=pending.digest,
        manifest_uri=f"coap://[::1]:61616/fota/m/{pending.digest.hex()}",
        installed=installed.digest,
        refused=(hashlib.sha256(b"refused").digest(),),
        verified=b"\x0f",
        etag=b"\x01\x02\x03\x04",
        defer_until=1_900_000_000.25,
        defer_reason="battery below 20 %",
        attempts=2,
        restarts=1,
        progress=75,
        report_seq=12,
        outbox=(
            Report(
                10,
                State.INSTALL_DEFERRED,
                ResultCode.DEFERRED,
                update_id=pending.update_id,
                manifest_sequence=pending.body.sequence,
                verified_bytes=len(IMAGE),
                detail="battery below 20 %",
                until=1_900_000_000,
            ),
            Report(11, State.FAILED, ResultCode.MALFORMED),
        ),
        installed_sequence=installed.body.sequence,
    )


POLICY = Policy("gw")


def saved(state_dir: Path) -> tuple[Record, Manifest, Manifest]:
    pending, installed = make_manifest(9), make_manifest(8)
    record = full_record(pending, installed)
    journal = Journal(state_dir, trust())
    journal.load()
    journal.save(record, (pending, installed))
    return record, pending, installed


def test_save_load_round_trip_with_every_field(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    record, pending, installed = saved(state_dir)
    assert manifest_files(state_dir) == {
        manifest_file(state_dir, pending).name,
        manifest_file(state_dir, installed).name,
    }
    assert manifest_file(state_dir, pending).read_bytes() == pending.raw

    loaded = Journal(state_dir, trust()).load()  # a new process
    assert loaded.record == record
    assert loaded.pending is not None and loaded.installed is not None
    assert (loaded.pending.raw, loaded.pending.digest) == (pending.raw, pending.digest)
    assert (loaded.installed.raw, loaded.installed.digest) == (installed.raw, installed.digest)
    assert loaded.pending.body == pending.body and loaded.installed.body == installed.body
    assert loaded.record.outbox[0].until == 1_900_000_000
    assert loaded.record.outbox[1].update_id is None


def test_missing_journal_is_a_new_device(tmp_path: Path) -> None:
    loaded = Journal(tmp_path / "new" / "state", trust()).load()
    assert loaded.record == Record()
    assert loaded.pending is None and loaded.installed is None


def test_manifests_are_reverified_against_the_trust_store_on_load(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    saved(state_dir)
    other = TrustStore({KID: ed25519.Ed25519PrivateKey.generate().public_key()})
    # The key changed: the installed manifest no longer verifies, and that is not ignored: it
    # is moved aside, its sequence number stays the floor, and the recovery is reported.
    loaded = Journal(state_dir, other).load()
    assert loaded.installed is None and loaded.record.installed is None
    assert loaded.record.floor == 8
    assert "installed manifest invalid" in loaded.recovered
    assert loaded.record.outbox[-1].result is ResultCode.STATE_RECOVERED


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last signature byte
    path.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path, Manifest], object]] = {
    "flipped": lambda path, _: _tamper(path),
    "missing": lambda path, _: path.unlink(),
    "truncated": lambda path, m: path.write_bytes(m.raw[:-10]),
    "other-valid-manifest": lambda path, _: path.write_bytes(make_manifest(99).raw),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_damaged_pending_manifest_is_dropped_on_load(tmp_path: Path, damage: str) -> None:
    state_dir = tmp_path / "state"
    record, pending, installed = saved(state_dir)
    DAMAGE[damage](manifest_file(state_dir, pending), pending)

    loaded = Journal(state_dir, trust()).load()
    assert loaded.pending is None
    assert loaded.installed is not None and loaded.installed.digest == installed.digest
    # The journal keeps to its files: it says what it could not load, and the machine drops
    # the update (issue 18 §2; it used to rewrite the record to IDLE itself).
    assert loaded.record.state is record.state and loaded.record.pending == pending.digest
    assert loaded.pending_lost.startswith("pending manifest") and "update dropped" in (
        loaded.pending_lost
    )
    # The damage is reported (a manifest that is no longer there or no longer verifies).
    assert loaded.record.outbox[:-1] == record.outbox
    assert loaded.record.outbox[-1].result is ResultCode.STATE_RECOVERED
    assert loaded.record.outbox[-1].detail.startswith("pending manifest")
    # The report names the state the device goes on in: the update is dropped.
    assert loaded.record.outbox[-1].state is State.IDLE
    assert loaded.record.report_seq == record.report_seq + 1
    # The journal wrote nothing: the machine's drop is the one write (a kill before it finds
    # the manifest gone at the next start, and reports the recovery once, then).
    again = Journal(state_dir, trust()).load()
    assert (
        again.pending_lost
        and [r.result for r in again.record.outbox].count(ResultCode.STATE_RECOVERED) == 1
    )

    model = Model(POLICY, trust(), loaded.record, installed=loaded.installed)
    handled = await Machine(model).handle(ev.PendingLost(loaded.pending_lost), 0.0)
    assert handled.accepted and handled.commands == ()
    assert model.state is State.IDLE and model.record.state is State.IDLE
    assert model.pending is None and model.record.pending is None
    assert model.record.verified == b"" and model.record.partial == b""
    assert model.record.defer_until is None
    assert (model.record.attempts, model.record.restarts) == (0, 0)
    # What is not about the dropped update survives: the installed image and the outbox.
    assert model.record.installed == installed.digest
    assert model.record.outbox == loaded.record.outbox


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_damaged_installed_manifest_is_moved_aside_keeping_its_floor(
    tmp_path: Path, damage: str
) -> None:
    """Issue 17 §2 (was: the load raised JournalError and the daemon stayed down)."""
    state_dir = tmp_path / "state"
    _, _, installed = saved(state_dir)
    DAMAGE[damage](manifest_file(state_dir, installed), installed)
    loaded = Journal(state_dir, trust()).load()
    assert loaded.installed is None and loaded.record.floor == installed.body.sequence
    assert not manifest_file(state_dir, installed).exists()


# -- (c) damaged journal ------------------------------------------------------------------------


def record_bytes(tmp_path: Path) -> bytes:
    saved(tmp_path / "state")
    return (tmp_path / "state" / RECORD_NAME).read_bytes()


def load_bytes(state_dir: Path, data: bytes) -> None:
    """Decode ``data`` as the current generation (``Journal.load`` recovers from damage:
    tests/e2e/test_journal_recovery.py; here the damage must be detected at all)."""
    (state_dir / RECORD_NAME).write_bytes(data)
    Journal(state_dir, trust()).read_record()


def test_truncated_journal_raises_journal_error_at_every_length(tmp_path: Path) -> None:
    data = record_bytes(tmp_path)
    for cut in range(len(data)):
        with pytest.raises(JournalError):
            load_bytes(tmp_path / "state", data[:cut])


def test_flipped_bit_raises_journal_error_at_every_position(tmp_path: Path) -> None:
    data = record_bytes(tmp_path)
    for index in range(len(data)):
        for bit in (0, 3, 7):
            damaged = bytearray(data)
            damaged[index] ^= 1 << bit
            with pytest.raises(JournalError):
                load_bytes(tmp_path / "state", bytes(damaged))
    load_bytes(tmp_path / "state", data)  # the undamaged bytes still load


def _with_schema(data: bytes, schema: object) -> bytes:
    _, body, crc = cbor2.loads(data)
    return cbor2.dumps([schema, body, crc])


@pytest.mark.parametrize("schema", [0, SCHEMA + 1, SCHEMA + 100, "1", None, -1])
def test_wrong_schema_number_raises_journal_error(tmp_path: Path, schema: object) -> None:
    data = record_bytes(tmp_path)
    with pytest.raises(JournalError, match="schema"):
        load_bytes(tmp_path / "state", _with_schema(data, schema))


@pytest.mark.parametrize(
    "body",
    [
        cbor2.dumps([0, None]),  # too few fields
        cbor2.dumps({"state": 0}),
        cbor2.dumps([99, *[None] * 13]),  # no such state
        b"\xff",  # not CBOR, under a valid checksum
    ],
)
def test_bad_body_under_a_valid_checksum_raises_journal_error(tmp_path: Path, body: bytes) -> None:
    saved(tmp_path / "state")
    with pytest.raises(JournalError):
        load_bytes(tmp_path / "state", cbor2.dumps([SCHEMA, body, zlib.crc32(body)]))


@pytest.mark.parametrize("data", [b"", b"\x00", cbor2.dumps([1, 2]), cbor2.dumps("abc")])
def test_not_a_record_raises_journal_error(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "state").mkdir()
    with pytest.raises(JournalError):
        load_bytes(tmp_path / "state", data)


@pytest.mark.parametrize(("schema", "fields"), [(1, 16), (2, 16), (2, 24), (2, 27)])
def test_a_record_written_before_fields_were_appended_loads_with_their_defaults(
    schema: int, fields: int
) -> None:
    """fota 0.1 wrote 16 fields (schema 1); fields are only ever appended since."""
    record = Record(state=State.DOWNLOADING, pending=b"p" * 32, attempts=2, report_seq=5)
    full = cbor2.loads(cbor2.loads(record.to_bytes())[1])
    body = cbor2.dumps(full[:fields])
    loaded = Record.from_bytes(cbor2.dumps([schema, body, zlib.crc32(body)]))
    assert loaded == record


def test_huge_schema_number_raises_journal_error() -> None:
    body = Record().to_bytes()
    with pytest.raises(JournalError):
        Record.from_bytes(cbor2.dumps([10**5000, body, 0]))


VALID_RECORD = full_record(make_manifest(9), make_manifest(8))
VALID_BYTES = VALID_RECORD.to_bytes()

_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(min_value=0),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=5,
)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(_EDITS, st.integers(min_value=0))
def test_damaged_record_raises_only_journal_error(
    edits: list[tuple[str, int, int]], cut: int
) -> None:
    data = bytearray(VALID_BYTES)
    for op, pos, value in edits:
        i = pos % (len(data) + 1)
        if op == "insert":
            data.insert(i, value)
        elif i < len(data):
            if op == "flip":
                data[i] ^= 1 << (value % 8)
            elif op == "set":
                data[i] = value
            else:
                del data[i]
    for candidate in (bytes(data), bytes(data[: cut % (len(data) + 1)])):
        try:
            record = Record.from_bytes(candidate)
        except JournalError:
            continue
        # Damage either raises or left the record as it was (e.g. bytes appended after it).
        assert record == VALID_RECORD


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_journal_error(data: bytes) -> None:
    try:
        Record.from_bytes(data)
    except JournalError:
        return
    raise AssertionError(f"{data.hex()} decoded as a record")


# -- (d) interrupted atomic writes --------------------------------------------------------------


class FailingOps(FileOps):
    """Fails one operation on one file name while armed, like a power cut at that point."""

    def __init__(self) -> None:
        self.fail: tuple[str, str] | None = None

    def _check(self, op: str, name: str) -> None:
        if self.fail == (op, name):
            raise OSError(f"simulated failure: {op} {name}")

    def replace(self, src: StrPath, dst: StrPath) -> None:
        self._check("replace", os.path.basename(dst))
        super().replace(src, dst)

    def fsync(self, fd: int) -> None:
        self._check("fsync", "any")
        super().fsync(fd)


@pytest.mark.parametrize("failure", [("replace", RECORD_NAME), ("fsync", "any")])
def test_interrupted_write_leaves_the_previous_journal_loadable(
    tmp_path: Path, failure: tuple[str, str]
) -> None:
    state_dir = tmp_path / "state"
    ops = FailingOps()
    journal = Journal(state_dir, trust(), ops)
    journal.load()
    first = make_manifest(1)
    before = Record(State.AWAIT_DOWNLOAD_AUTH, pending=first.digest, report_seq=3)
    journal.save(before, (first, None))
    on_disk = (state_dir / RECORD_NAME).read_bytes()

    ops.fail = failure
    after = before.evolve(state=State.DOWNLOADING, verified=bitmap_new(4), report_seq=4)
    with pytest.raises(OSError, match="simulated"):
        journal.save(after, (first, None))
    assert (state_dir / RECORD_NAME).read_bytes() == on_disk

    loaded = Journal(state_dir, trust()).load()  # after the crash
    assert loaded.record == before
    assert loaded.pending is not None and loaded.pending.digest == first.digest

    ops.fail = None
    journal.save(after, (first, None))
    assert Journal(state_dir, trust()).load().record == after


def test_interrupted_manifest_write_leaves_the_previous_journal_loadable(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    ops = FailingOps()
    journal = Journal(state_dir, trust(), ops)
    journal.load()
    before = Record(report_seq=1)
    journal.save(before)

    newer = make_manifest(2)
    ops.fail = ("replace", manifest_file(state_dir, newer).name)
    with pytest.raises(OSError, match="simulated"):
        journal.save(Record(State.AWAIT_DOWNLOAD_AUTH, pending=newer.digest), (newer, None))
    # The record was not written: it never names a manifest that is not on disk.
    assert Journal(state_dir, trust()).load().record == before


# -- (e) manifest files no longer named are removed ---------------------------------------------


def test_manifests_no_longer_named_are_removed_after_the_record_is_durable(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    ops = RecordingOps()
    journal = Journal(state_dir, trust(), ops)
    journal.load()
    old, new = make_manifest(1), make_manifest(2)
    old_name, new_name = manifest_file(state_dir, old).name, manifest_file(state_dir, new).name

    journal.save(Record(State.IDLE, installed=old.digest), (None, old))
    journal.save(Record(State.DOWNLOADING, pending=new.digest, installed=old.digest), (new, old))
    assert manifest_files(state_dir) == {old_name, new_name}

    ops.calls.clear()
    journal.save(Record(State.AWAIT_COMMIT, installed=new.digest), (None, new))
    # The previous generation (journal.prev.cbor, which a damaged record falls back to)
    # still names the old one: it stays until the next save.
    assert manifest_files(state_dir) == {old_name, new_name}
    assert ops.calls == record_write()

    ops.calls.clear()
    journal.save(Record(State.IDLE, installed=new.digest), (None, new))
    assert manifest_files(state_dir) == {new_name}
    # The unlink comes after the record that stopped naming the file is durable.
    assert ops.calls == [*record_write(), ("unlink", old_name)]

    ops.calls.clear()
    journal.save(Record(State.IDLE, installed=new.digest), (None, new))
    assert ops.calls == record_write()  # nothing to write again, nothing to remove

    journal.save(Record(State.IDLE))
    assert manifest_files(state_dir) == {new_name}  # the previous generation names it
    journal.save(Record(State.IDLE))
    assert manifest_files(state_dir) == set()
    assert Journal(state_dir, trust()).load().record == Record(State.IDLE)


def test_manifests_named_before_a_restart_are_removed_after_it(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    _, pending, installed = saved(state_dir)

    journal = Journal(state_dir, trust())  # a new process: it learns the files from load()
    journal.load()
    journal.save(Record(State.IDLE, installed=pending.digest), (None, pending))
    journal.save(Record(State.IDLE, installed=pending.digest), (None, pending))
    assert manifest_files(state_dir) == {manifest_file(state_dir, pending).name}
    assert not manifest_file(state_dir, installed).exists()


def test_orphan_manifest_from_an_interrupted_save_is_removed_after_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    ops = FailingOps()
    journal = Journal(state_dir, trust(), ops)
    journal.load()
    journal.save(Record(report_seq=1))
    orphan = make_manifest(3)
    ops.fail = ("replace", RECORD_NAME)
    with pytest.raises(OSError, match="simulated"):
        journal.save(Record(State.AWAIT_DOWNLOAD_AUTH, pending=orphan.digest), (orphan, None))
    assert manifest_file(state_dir, orphan).exists()

    restarted = Journal(state_dir, trust())
    restarted.load()
    restarted.save(Record(report_seq=2))
    assert manifest_files(state_dir) == set()


# -- (f) permissions ----------------------------------------------------------------------------


async def test_state_dir_is_0700_and_files_are_0600(tmp_path: Path) -> None:
    state_dir = tmp_path / "var" / "lib" / "fota"
    manifest = make_manifest(1)
    harness = Harness(state_dir, manifest, FileOps())  # load() creates the directory
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    harness.save()
    await harness.download(FakeTransport(IMAGE))

    files = sorted(p.name for p in state_dir.iterdir())
    assert files == sorted(
        [RECORD_NAME, PREVIOUS_NAME, CANDIDATE_NAME, manifest_file(state_dir, manifest).name]
    )
    for name in files:
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    assert not any(p.name.endswith(".tmp") for p in state_dir.iterdir())


def test_files_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        saved(tmp_path / "state")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for path in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_the_record_s_fields_are_listed_once() -> None:
    """Issue 18 §4: the codec, the checks and the machine's reset all follow one list."""
    from dataclasses import fields

    from fota.core import record as rec

    names = tuple(f.name for f in fields(Record))
    assert tuple(name for name, _, _ in rec._RECORD_FIELDS) == names
    full = full_record(make_manifest(9), make_manifest(8)).evolve(
        fetched=5,
        commit_by=1.0,
        tested=True,
        first_seen=2.0,
        deferred_total=3.0,
        failure="self-test failed",
        partial=b"\x80",
        boot_id="boot-1",
        held=("battery",),
        download_started=4.0,
        forced="deadline",
        revived=1,
        defer_since=5.0,
    )
    assert Record.from_bytes(full.to_bytes()) == full
    # Every field set away from its default, so the reset shows which fields it touches.
    assert all(getattr(full, n) != getattr(Record(), n) for n in rec.UPDATE_FIELDS - {"pending"})
    cleared = full.without_update()
    for name in names:
        expected = getattr(Record(), name) if name in rec.UPDATE_FIELDS else getattr(full, name)
        assert getattr(cleared, name) == expected, name
