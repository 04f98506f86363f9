"""Issue 17 §2: state that cannot be loaded never keeps the updater down.

Each test fails on the code before the change: there, a damaged ``journal.cbor`` or a missing
or invalid installed manifest made ``Journal.load`` raise ``JournalError`` and the daemon exit
2 (which systemd's ``RestartPreventExitStatus=2`` turns into "down until a person comes").
Now a damaged record falls back to the previous generation, damaged state is moved to
``quarantine/`` and reported (``STATE_RECOVERED``), and the anti-rollback floor holds.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from fota import Client, Decision, ResultCode, State
from fota.app.cli_control import status_rows
from fota.app.control.server import status_dict
from fota.core.record import Record, take_report_seq
from fota.fileops import FileOps, StrPath
from fota.journal import (
    MAX_QUARANTINED,
    PREVIOUS_NAME,
    QUARANTINE_DIR,
    RECORD_NAME,
    REPORT_SEQ_GAP,
    Journal,
)
from fota.testing import UpdateServer
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config
from tests.e2e.test_daemon import Daemon, daemon, provision, publish, rundir  # noqa: F401
from tests.integration.test_journal import make_manifest, manifest_file, trust

BOUND = 30.0


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x10
    return bytes(damaged)


def _empty(data: bytes) -> bytes:
    return b""


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": _truncate,
    "bit-flipped": _flip,
    "empty": _empty,
}


def two_generations(state_dir: Path) -> tuple[Record, Record]:
    """Two saves: the first record is the previous generation, the second the current one."""
    installed = make_manifest(8)
    journal = Journal(state_dir, trust())
    journal.load()
    first = Record(State.IDLE, installed=installed.digest, report_seq=5)
    second = first.evolve(report_seq=6, provisioned_at=1_800_000_000.0)
    journal.save(first, (None, installed))
    journal.save(second, (None, installed))
    return first.evolve(installed_sequence=8), second.evolve(installed_sequence=8)


def quarantined(state_dir: Path) -> list[str]:
    qdir = state_dir / QUARANTINE_DIR
    return sorted(p.name.split("-", 1)[1] for p in qdir.iterdir()) if qdir.exists() else []


# -- generations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_record_falls_back_to_the_previous_generation(tmp_path: Path, damage: str) -> None:
    state_dir = tmp_path / "state"
    first, _ = two_generations(state_dir)
    current = state_dir / RECORD_NAME
    current.write_bytes(DAMAGE[damage](current.read_bytes()))

    loaded = Journal(state_dir, trust()).load()

    assert loaded.installed is not None and loaded.installed.body.sequence == 8
    assert loaded.record.provisioned_at is None  # the previous generation's content
    assert loaded.record.installed == first.installed
    assert "previous generation used" in loaded.recovered
    assert loaded.record.recovered == loaded.recovered
    # Reported, under a number the lost record cannot have used, and that the numbering
    # skips; the replayed step numbers its reports as the lost record did.
    report = loaded.record.outbox[-1]
    assert report.result is ResultCode.STATE_RECOVERED
    assert report.sequence == first.report_seq + REPORT_SEQ_GAP
    assert loaded.record.report_seq == first.report_seq
    assert loaded.record.reserved == (report.sequence, report.sequence + 1)
    assert report.detail.startswith("previous generation used; journal.cbor")
    assert quarantined(state_dir) == [RECORD_NAME]
    # The recovery is durable at once: the next start loads cleanly, with nothing to report.
    again = Journal(state_dir, trust()).load()
    assert again.recovered == "" and again.record == loaded.record


def test_the_numbering_skips_what_a_recovery_reserved() -> None:
    seq, record = take_report_seq(Record(report_seq=5, reserved=(7, 8)))
    assert (seq, record.report_seq, record.reserved) == (5, 6, (7, 8))
    seq, record = take_report_seq(record)
    assert (seq, record.report_seq, record.reserved) == (6, 8, None)
    seq, record = take_report_seq(record)
    assert (seq, record.report_seq) == (8, 9)


def test_a_second_fall_back_reserves_above_the_first_and_numbers_the_replay_alike(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    first, _ = two_generations(state_dir)
    current = state_dir / RECORD_NAME
    current.write_bytes(_truncate(current.read_bytes()))
    once = Journal(state_dir, trust()).load().record
    recovery = once.outbox[-1].sequence
    assert once.report_seq == first.report_seq and once.reserved == (recovery, recovery + 1)
    # The replayed step saves (a report queued), and that record is lost too.
    journal = Journal(state_dir, trust())
    journal.load()
    seq, stepped = take_report_seq(once)
    assert seq == first.report_seq
    journal.save(stepped)
    current.write_bytes(b"")
    twice = Journal(state_dir, trust()).load().record
    second = twice.outbox[-1]
    assert second.result is ResultCode.STATE_RECOVERED
    # Above every number the lost records could have reached, the first recovery's included.
    assert second.sequence == recovery + 1 + REPORT_SEQ_GAP
    assert twice.report_seq == first.report_seq
    assert twice.reserved == (recovery, second.sequence + 1)
    numbers = [take_report_seq(twice)[0]]
    record = twice
    for _ in range(REPORT_SEQ_GAP * 2 + 2):
        seq, record = take_report_seq(record)
        numbers.append(seq)
    assert recovery not in numbers and second.sequence not in numbers


def test_a_fall_back_past_a_commit_still_finds_the_manifest_it_names(tmp_path: Path) -> None:
    """The commit's save stopped naming the old image's manifest; the previous generation,
    before the commit, names it: it stays while that generation may be fallen back to (the
    old code removed it, and the fall back reported the running image's manifest lost)."""
    state_dir = tmp_path / "state"
    old, new = make_manifest(8), make_manifest(9)
    journal = Journal(state_dir, trust())
    journal.load()
    before = Record(State.AWAIT_COMMIT, pending=new.digest, installed=old.digest)
    journal.save(before, (new, old))
    journal.save(Record(State.IDLE, installed=new.digest), (None, new))
    Journal(state_dir, trust()).load()  # a clean start sweeps orphans, not these
    current = state_dir / RECORD_NAME
    current.write_bytes(_truncate(current.read_bytes()))

    loaded = Journal(state_dir, trust()).load()
    assert loaded.record.state is State.AWAIT_COMMIT
    assert loaded.installed is not None and loaded.installed.body.sequence == 8
    assert loaded.pending is not None and loaded.pending.body.sequence == 9
    assert loaded.recovered.startswith("previous generation used")
    assert "installed manifest" not in loaded.recovered


class FullDiskOps(FileOps):
    """Every atomic write fails as on a full disk (renames and removals still work)."""

    def write_atomic(self, path: StrPath, data: bytes, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_recovery_on_a_full_disk_starts_and_is_saved_by_the_next_save(tmp_path: Path) -> None:
    """Found by chaos (issue 17): the recovery's save met a full disk and the daemon crashed
    at start (OSError out of Journal.load): down until the disk had room."""
    state_dir = tmp_path / "state"
    first, _ = two_generations(state_dir)
    current = state_dir / RECORD_NAME
    current.write_bytes(_truncate(current.read_bytes()))

    loaded = Journal(state_dir, trust(), FullDiskOps()).load()
    assert loaded.recovered.startswith("previous generation used")
    assert loaded.record.outbox[-1].result is ResultCode.STATE_RECOVERED
    assert not current.exists()  # moved to the quarantine; the previous generation remains
    # The next start recovers the same way, with the same report number (no second one).
    again = Journal(state_dir, trust())
    reloaded = again.load()
    assert reloaded.record.outbox[-1].sequence == loaded.record.outbox[-1].sequence
    assert reloaded.record.report_seq == first.report_seq


class KilledOps(FileOps):
    """Raises (as a kill would stop the process) at one call of a save; counts the calls."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at, self.count = stop_at, 0

    def _step(self) -> None:
        self.count += 1
        if self.count == self.stop_at:
            raise KeyboardInterrupt  # a BaseException: nothing after it runs, as after kill -9

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        self._step()
        return super().open(path, flags, mode)

    def fsync(self, fd: int) -> None:
        self._step()
        super().fsync(fd)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        self._step()
        super().replace(src, dst)

    def fsync_dir(self, path: StrPath) -> None:
        self._step()
        super().fsync_dir(path)


def test_a_save_stopped_at_any_call_leaves_a_current_record_old_or_new(tmp_path: Path) -> None:
    """journal.cbor is never missing, whatever call of a save a kill lands on."""
    _, second = two_generations(tmp_path / "probe")
    third = second.evolve(report_seq=7)
    calls = KilledOps(0)
    Journal(tmp_path / "probe", trust(), calls).save(third)
    assert calls.count >= 5
    for stop_at in range(1, calls.count + 1):
        state_dir = tmp_path / f"s{stop_at}"
        two_generations(state_dir)
        with pytest.raises(KeyboardInterrupt):
            Journal(state_dir, trust(), KilledOps(stop_at)).save(third)
        loaded = Journal(state_dir, trust()).load()
        assert loaded.recovered == "" and loaded.record in (second, third), stop_at


def test_a_missing_current_record_falls_back_to_the_previous_one_and_says_so(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    first, _ = two_generations(state_dir)
    (state_dir / RECORD_NAME).unlink()  # a save never does this: it was lost
    loaded = Journal(state_dir, trust()).load()
    assert loaded.record.installed == first.installed and loaded.record.provisioned_at is None
    assert loaded.recovered.startswith("previous generation used; journal.cbor missing")
    assert loaded.record.outbox[-1].result is ResultCode.STATE_RECOVERED


def test_both_generations_damaged_starts_empty_with_the_floor_of_the_stored_manifests(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    two_generations(state_dir)
    (state_dir / RECORD_NAME).write_bytes(b"")
    (state_dir / PREVIOUS_NAME).write_bytes(b"\x00")
    loaded = Journal(state_dir, trust()).load()
    assert loaded.installed is None
    assert loaded.record.floor == 8  # the stored manifest's number: never lowered
    assert loaded.record.floor_identity == make_manifest(8).digest  # it may be taken again
    assert "no readable journal" in loaded.recovered
    assert loaded.record.outbox[-1].result is ResultCode.STATE_RECOVERED
    # The lost records' report numbers are unknown: numbering starts far from them (from 0,
    # on the old code, the server took every new report for one it had).
    assert loaded.record.outbox[-1].sequence >= 2**20
    assert loaded.record.report_seq == loaded.record.outbox[-1].sequence + 1
    assert quarantined(state_dir) == sorted(
        [RECORD_NAME, PREVIOUS_NAME, manifest_file(state_dir, make_manifest(8)).name]
    )


def test_the_quarantine_is_bounded(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    two_generations(state_dir)
    for _ in range(MAX_QUARANTINED + 5):
        (state_dir / RECORD_NAME).write_bytes(b"")
        Journal(state_dir, trust()).load()
    assert len(list((state_dir / QUARANTINE_DIR).iterdir())) == MAX_QUARANTINED


def test_a_lost_manifest_of_a_record_without_its_sequence_refuses_rather_than_lowers(
    tmp_path: Path,
) -> None:
    """A record written before ``installed_sequence``: no number is proven, none is guessed."""
    state_dir = tmp_path / "state"
    installed = make_manifest(8)
    Journal(state_dir, trust()).load()
    (state_dir / manifest_file(state_dir, installed).name).write_bytes(installed.raw)
    (state_dir / RECORD_NAME).write_bytes(Record(installed=installed.digest).to_bytes())
    manifest_file(state_dir, installed).unlink()
    loaded = Journal(state_dir, trust()).load()
    assert loaded.record.floor == 2**64 - 1
    assert "unknown" in loaded.recovered


# -- a real client against the test server -------------------------------------------------------


async def _provisioned(client: Client, server: UpdateServer, sequence: int) -> None:
    server.publish(os.urandom(20_000), "1.0", device_class=DEVICE_CLASS, sequence=sequence)
    await client.wait_for(lambda s: s.installed_version == "1.0" and s.reports_pending == 0, BOUND)


@pytest.mark.parametrize("damage", ["missing", "invalid"])
async def test_lost_installed_manifest_is_moved_aside_reported_and_keeps_the_floor(
    tmp_path: Path, server: UpdateServer, signing: Signing, damage: str
) -> None:
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=RecordingHandler()) as client:
        await _provisioned(client, server, sequence=5)
        digest = client._engine.model.record.installed  # type: ignore[union-attr]
    assert digest is not None
    stored = config.state_dir / f"manifest-{digest.hex()}.cose"
    if damage == "missing":
        stored.unlink()
    else:
        stored.write_bytes(stored.read_bytes()[:-7])

    handler = RecordingHandler()
    async with Client(config, handler=handler) as client:
        status = await client.wait_for(lambda s: s.reports_pending == 0, BOUND)
        assert status.installed_version is None
        assert f"installed manifest {damage}" in status.recovered
        assert "anti-rollback floor 5" in status.recovered
        recovered = [r for r in server.reports if r[4] == ResultCode.STATE_RECOVERED]
        assert len(recovered) == 1 and "floor 5" in recovered[0][8]
        assert quarantined(config.state_dir) == ([] if damage == "missing" else [stored.name])
        # `fota status` shows it (the rows the CLI prints from the control socket's status).
        rows = dict(status_rows(status_dict(status)))
        assert rows["Recovered"] == status.recovered

        # The floor was not lowered: an older image is still a rollback.
        old = server.publish(os.urandom(1000), "0.9", device_class=DEVICE_CLASS, sequence=4)
        await client.wait_for(
            lambda s: any(r.get(5) == old.update_id for r in server.reports), BOUND
        )
        assert [r[4] for r in server.reports if r.get(5) == old.update_id] == [ResultCode.ROLLBACK]
        # A newer one is asked about (the lost image may have been polite), then installs.
        server.publish(os.urandom(1000), "2.0", device_class=DEVICE_CLASS, sequence=6)
        step, _ = await asyncio.wait_for(handler.asks.get(), BOUND)
        assert step == "download"
        done = await client.wait_for(lambda s: s.installed_version == "2.0", BOUND)
        assert done.recovered == ""  # cleared when the next update commits


@pytest.mark.parametrize("damage", ["missing", "invalid"])
async def test_a_lost_pending_manifest_drops_the_update_through_the_machine(
    tmp_path: Path, server: UpdateServer, signing: Signing, damage: str
) -> None:
    """Issue 18 §2: the journal says what it could not load; the machine drops the update.

    Before, ``Journal.load`` rewrote the record to IDLE itself. Now the record it returns
    still names the update, and the engine hands ``PendingLost`` to the machine before
    anything else sees the model: the client is IDLE from its first status on, listeners
    hear the state change, and the recovery is reported once.
    """
    config = make_config(tmp_path, server, signing)
    waiting = RecordingHandler(download=[Decision.pending()])
    async with Client(config, handler=waiting) as client:
        await _provisioned(client, server, sequence=5)
        v2 = server.publish(os.urandom(4000), "2.0", device_class=DEVICE_CLASS, sequence=6)
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, BOUND)
        digest = client._engine.model.record.pending  # type: ignore[union-attr]
    assert digest is not None
    stored = config.state_dir / f"manifest-{digest.hex()}.cose"
    if damage == "missing":
        stored.unlink()
    else:
        stored.write_bytes(stored.read_bytes()[:-7])

    client = Client(config, handler=RecordingHandler())
    heard: list[tuple[str, dict[str, Any]]] = []
    client.listen(lambda n: heard.append((n.kind, dict(n.fields))))
    async with client:
        first = client.status()
        assert (first.state, first.update_id) == (State.IDLE, None)
        assert first.installed_version == "1.0"
        record = client._engine.model.record  # type: ignore[union-attr]
        assert record.pending is None and record.verified == b"" and record.state is State.IDLE
        assert f"pending manifest {damage}" in first.recovered
        # The server still offers 2.0: fetched and verified afresh, it installs after all.
        installed = await client.wait_for(lambda s: s.installed_version == "2.0", BOUND)
        assert installed.recovered == ""  # the note went with the update that was dropped
        await client.wait_for(lambda s: s.reports_pending == 0, BOUND)
    assert heard[0] == (
        "state",
        {"state": "IDLE", "previous": "AWAIT_DOWNLOAD_AUTH", "version": None},
    )
    recovered = [r for r in server.reports if r[4] == ResultCode.STATE_RECOVERED]
    assert len(recovered) == 1 and "update dropped" in recovered[0][8]
    assert recovered[0][3] == State.IDLE.value  # the state the device went on in
    done = [r for r in server.reports if r.get(5) == v2.update_id and r[4] == ResultCode.SUCCESS]
    assert len(done) == 1


async def test_a_drop_the_disk_cannot_take_at_start_is_kept_and_saved_later(
    tmp_path: Path, server: UpdateServer, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 18 §2: the machine's drop of a lost pending update hits a full disk.

    Undone (as an ordinary event is), the model was half dropped: the next event met a
    record naming an update with no manifest, and ``Restarted`` crashed on it. Now the drop
    is kept in memory, like a recovery on a full disk, and the next save writes it.
    """
    config = make_config(tmp_path, server, signing)
    waiting = RecordingHandler(download=[Decision.pending()])
    async with Client(config, handler=waiting) as client:
        await _provisioned(client, server, sequence=5)
        server.publish(os.urandom(4000), "2.0", device_class=DEVICE_CLASS, sequence=6)
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, BOUND)
        digest = client._engine.model.record.pending  # type: ignore[union-attr]
    assert digest is not None
    (config.state_dir / f"manifest-{digest.hex()}.cose").unlink()

    real = Journal.save
    refused: list[Record] = []

    def full_once(self: Journal, record: Record, manifests: Any = ()) -> None:
        if not refused:
            refused.append(record)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record, manifests)

    monkeypatch.setattr(Journal, "save", full_once)
    client = Client(config, handler=RecordingHandler(download=[Decision.pending()]))
    with capture_logs() as logs:
        async with client:
            first = client.status()
            assert (first.state, first.update_id) == (State.IDLE, None)
            await client.wait_for(lambda s: s.reports_pending == 0, BOUND)
    assert refused and refused[0].state is State.IDLE and refused[0].pending is None
    assert not [e for e in logs if e["event"] in ("event_crashed", "task_crashed")]
    assert [e["event"] for e in logs].count("recovery_not_saved") == 1
    on_disk = Journal(config.state_dir, signing.trust).read_record()
    # What is on disk is whole: no record names a manifest that is not there.
    assert on_disk is not None
    assert (
        on_disk.pending is None
        or (config.state_dir / f"manifest-{on_disk.pending.hex()}.cose").exists()
    )


# -- the daemon, a real subprocess ----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_daemon_with_a_damaged_journal_starts_and_fota_status_shows_it(
    daemon: Daemon,  # noqa: F811
) -> None:
    await daemon.start()
    await provision(daemon)
    assert await daemon.stop() == 0
    journal = daemon.dir / "state" / RECORD_NAME
    journal.write_bytes(_flip(journal.read_bytes()))

    await daemon.start()  # READY=1: it did not exit 2
    async with daemon.control() as control:
        status = await control.status()
    assert "previous generation used" in status["recovered"]
    code, out, _ = await daemon.fota("status")
    assert code == 0
    # The detail may wrap inside the table's cell (its width follows the socket path's).
    flat = " ".join(re.sub(r"[│╭╮╰╯─┬┴┼├┤]", " ", out).split())
    assert "Recovered" in out and "previous generation used" in flat, out
    assert await daemon.stop(signal.SIGTERM) == 0


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_a_final_report_delivered_then_its_generation_lost_reaches_the_server_once(
    daemon: Daemon,  # noqa: F811
) -> None:
    """Found by chaos (issue 17): kill -9 after the server had the SUCCESS report and before
    the journal noted its acknowledgement, then ``journal.cbor`` lost. The previous generation
    (before the commit) commits again. On the old code its SUCCESS took a new number (the
    recovery's report had taken the lost one's, +64): the server counted two final reports.
    Now the replay sends the report the server has, under the same number."""
    daemon.write_config(extra='[authorization]\nmode = "auto"\n')
    await daemon.start()
    await provision(daemon)
    server = daemon.server
    assert daemon.proc is not None
    pid = daemon.proc.pid
    loop = asyncio.get_running_loop()
    posted: list[dict[int, Any]] = []  # the update's reports that reached the store
    replayed = asyncio.Event()
    store = server._record_report

    def successes() -> list[dict[int, Any]]:
        # Those the store saw, de-duplicated there or not.
        return [r for r in posted if r[4] == ResultCode.SUCCESS]

    def spy(device: str, report: dict[int, Any]) -> None:
        if report.get(5) == v2.update_id:
            posted.append(report)
            if report[4] == ResultCode.SUCCESS and len(successes()) == 1:
                # Delivered: the server has it; the daemon dies before it hears the answer.
                os.kill(pid, signal.SIGKILL)
        store(device, report)

    def on_request(entry: Any) -> None:
        if entry.path.startswith("/fota/report/"):  # after the POST is handled
            loop.call_soon(lambda: replayed.set() if len(successes()) >= 2 else None)

    server._record_report = spy  # type: ignore[method-assign]
    server.request_hook = on_request
    v2 = publish(server, "2.0")
    assert await asyncio.wait_for(daemon.proc.wait(), BOUND) == -signal.SIGKILL
    daemon.proc = None
    state = daemon.dir / "state"
    # The situation: the newest generation has the commit, the previous one is before it (the
    # commit is done again), or, when the acknowledgement of an earlier report was saved
    # after the commit, has it too with the SUCCESS report not yet acknowledged (it is sent
    # again). Either way the server has the report already.
    previous = Record.from_bytes((state / PREVIOUS_NAME).read_bytes())
    before_commit = previous.pending == v2.digest and previous.installed != v2.digest
    unacknowledged = previous.installed == v2.digest and any(
        r.result is ResultCode.SUCCESS for r in previous.outbox
    )
    assert before_commit or unacknowledged, previous
    current = state / RECORD_NAME
    current.write_bytes(_truncate(current.read_bytes()))

    await daemon.start()
    await asyncio.wait_for(replayed.wait(), BOUND)
    first, again = successes()
    # The replay sent the report the server has (the same number), not a second one.
    assert again[2] == first[2], (first, again)
    finals = [r for r in server.reports if r.get(5) == v2.update_id and r[4] == ResultCode.SUCCESS]
    assert finals == [first]
    # Numbers stay unique per device: the recovery's report has one of its own.
    recovered = [r for r in server.reports_for("gw-daemon") if r[4] == ResultCode.STATE_RECOVERED]
    assert len(recovered) == 1
    numbers = [r[2] for r in server.reports_for("gw-daemon")]
    assert len(numbers) == len(set(numbers))
    async with daemon.control() as control:
        status = await control.status()
    assert status["installed_version"] == "2.0"
    assert await daemon.stop(signal.SIGTERM) == 0


async def test_a_pending_update_completes_after_both_generations_are_lost(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    """Found by chaos (issue 17): a journal damaged while the previous generation still shared
    its file lost both; the pending update's sequence number became the floor (never lowered),
    and its manifest, announced again, was refused as a rollback: stranded until signed again.
    The manifest found at the floor may be taken at it; another of that number may not."""
    from fota import AutoAuthorize, Decision

    config = make_config(tmp_path, server, signing)
    async with Client(config) as client:
        server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=1)
        await client.wait_for(lambda s: s.installed_version == "1.0" and s.reports_pending == 0, 30)
    handler = RecordingHandler(download=[Decision.pending()])
    async with Client(config, handler=handler) as client:
        v2 = server.publish(os.urandom(5000), "2.0", device_class=DEVICE_CLASS, sequence=2)
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, 30)
    state_dir = config.state_dir
    (state_dir / RECORD_NAME).write_bytes(b"")
    (state_dir / PREVIOUS_NAME).write_bytes(b"")
    async with Client(config, handler=AutoAuthorize()) as client:
        await client.wait_for(lambda s: s.installed_version == "2.0", 30)
    assert client.status().installed_version == "2.0"
    finals = [r[4] for r in server.reports if r.get(5) == v2.update_id]
    assert finals[-1] == ResultCode.SUCCESS
    # Another manifest of that number is still refused: the floor was not lowered.
    v2b = server.publish(os.urandom(3000), "2.0b", device_class=DEVICE_CLASS, sequence=2)
    async with Client(config, handler=AutoAuthorize()) as client:
        report = await server.wait_for_report(lambda r: r.get(5) == v2b.update_id)
        assert report[4] == ResultCode.ROLLBACK
        assert client.status().installed_version == "2.0"
