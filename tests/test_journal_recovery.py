"""Issue 17 §2: state that cannot be loaded never keeps the updater down.

Each test fails on the code before the change: there, a damaged ``journal.cbor`` or a missing
or invalid installed manifest made ``Journal.load`` raise ``JournalError`` and the daemon exit
2 (which systemd's ``RestartPreventExitStatus=2`` turns into "down until a person comes").
Now a damaged record falls back to the previous generation, damaged state is moved to
``quarantine/`` and reported (``STATE_RECOVERED``), and the anti-rollback floor holds.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from fota import Client, ResultCode, State
from fota.cli_control import status_rows
from fota.control.server import status_dict
from fota.core.record import Record
from fota.fileops import FileOps
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
from tests.test_daemon import Daemon, daemon, provision, rundir  # noqa: F401
from tests.test_journal import make_manifest, manifest_file, trust

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
    # Reported, under a number the lost record cannot have used.
    report = loaded.record.outbox[-1]
    assert report.result is ResultCode.STATE_RECOVERED
    assert report.sequence == first.report_seq + REPORT_SEQ_GAP
    assert report.detail.startswith("previous generation used; journal.cbor")
    assert quarantined(state_dir) == [RECORD_NAME]
    # The recovery is durable at once: the next start loads cleanly, with nothing to report.
    again = Journal(state_dir, trust()).load()
    assert again.recovered == "" and again.record == loaded.record


class KilledOps(FileOps):
    """Raises (as a kill would stop the process) at one call of a save; counts the calls."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at, self.count = stop_at, 0

    def _step(self) -> None:
        self.count += 1
        if self.count == self.stop_at:
            raise KeyboardInterrupt  # a BaseException: nothing after it runs, as after kill -9

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._step()
        return super().open(path, flags, mode)

    def fsync(self, fd: int) -> None:
        self._step()
        super().fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self._step()
        super().replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
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
    assert "no readable journal" in loaded.recovered
    assert loaded.record.outbox[-1].result is ResultCode.STATE_RECOVERED
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
        digest = client.engine.model.record.installed  # type: ignore[union-attr]
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
