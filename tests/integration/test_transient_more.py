"""Issue 17 §3 and §5, the gaps left: a real client against the real test server on loopback.

- A manifest or keyset (each addressed by the digest its announcement names) that answers
  4.04 for a moment (a server restarted and refilling its files) is asked again with back-off
  and jitter within ``not_found_budget``; past the budget the outcome is what it was before.
  The server hides the file for a while (renamed away, put back by a request hook), as a
  server refilling its directory does.
- A verification that cannot read the candidate, or that crashes, is reported as what it is
  (FAILED with the error), not as "image digest mismatch".
- A failed update revived by an announcement of it is a new attempt: its reports carry the
  attempt number, and each attempt has exactly one final report.

Nothing sleeps: the tests wait on client states, server reports, request hooks and the
client's own log events; timings are shortened through settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import Client, Config, ResultCode, State, Status
from fota.core import keyset as ks
from fota.core import policy
from fota.core.manifest import TrustStore, kid_for
from fota.fileops import seal_candidate
from fota.testing import RequestLog, UpdateServer
from fota.testing.pytest_plugin import Reports
from tests.conftest import DEVICE_CLASS, Signing, make_config

KiB = 1024
FRAGMENT = 16 * KiB
WAIT = 30.0
pytestmark = pytest.mark.timeout(90)


def image_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def fast(config: Config, **kw: Any) -> Config:
    """Shortened timings: retries within tens of milliseconds, capped low."""
    return dataclasses.replace(config, retry_base=0.02, retry_cap=0.2, retry_jitter=0.1, **kw)


def done(status: Status) -> bool:
    return status.state is State.IDLE and status.installed_version == "1.0"


class Logs:
    """fota's log events as they happen (structlog's processors replaced, put back after)."""

    def __init__(self) -> None:
        self.events: list[MutableMapping[str, Any]] = []
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def _seen(self, event: MutableMapping[str, Any]) -> None:
        if os.environ.get("DEBUG_LOGS"):
            print("LOG", dict(event))
        self.events.append(dict(event))
        self._loop.call_soon_threadsafe(self._changed.set)

    def named(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def first_of(self, *names: str, timeout: float = WAIT) -> MutableMapping[str, Any]:
        """The first event (in order of logging) with one of ``names``, waiting for one."""

        async def wait() -> MutableMapping[str, Any]:
            while True:
                self._changed.clear()
                found = next((e for e in self.events if e.get("event") in names), None)
                if found is not None:
                    return found
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)


@contextlib.contextmanager
def watching_logs() -> Iterator[Logs]:
    logs = Logs()

    def hook(logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        logs._seen(event)
        raise structlog.DropEvent

    before = structlog.get_config()["processors"]
    structlog.configure(processors=[hook])
    try:
        yield logs
    finally:
        structlog.configure(processors=before)


class Hidden:
    """A server file renamed away (the server answers 4.04), put back after ``count`` asks."""

    def __init__(self, server: UpdateServer, path: Path, count: int | None) -> None:
        self.path = path
        self.hidden = path.with_name(path.name + ".away")
        self.where = f"/fota/{path.parent.name}/{path.name}"
        self.count = count
        self.asked = 0
        """Requests for the file while it was away (each answered 4.04)."""
        self.after = 0
        """Requests for the file after it came back."""
        os.replace(path, self.hidden)
        server.request_hook = self.hook

    def hook(self, entry: RequestLog) -> None:
        if entry.path != self.where:
            return
        if not self.hidden.exists():
            self.after += 1
            return
        self.asked += 1
        if self.asked == self.count:
            self.back()

    def back(self) -> None:
        """The server has refilled the file: the next request gets it."""
        os.replace(self.hidden, self.path)


# -- 1. a manifest that answers 4.04 for a moment ----------------------------------------------


async def test_a_manifest_answering_404_for_a_moment_is_fetched_again(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    published = server.make_manifest(
        image_of(32 * KiB, 1), "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    config = fast(make_config(tmp_path, server, signing), not_found_budget=30.0)
    reports = Reports(server, "dev1")
    with watching_logs() as logs:
        async with Client(config) as client:
            server.announce_raw(published.raw, published.sequence)
            # A server restarted and refilling its files: the manifest it announces answers
            # 4.04 three times before it is back (hidden before any request can arrive).
            gone = Hidden(server, server.root / "m" / published.digest.hex(), count=3)
            # Before: the first 4.04 ended the fetch (manifest_fetch_failed) for good.
            first = await logs.first_of("update_completed", "manifest_fetch_failed")
            assert first["event"] == "update_completed", first
            await client.wait_for(done, WAIT)
    assert gone.asked == 3 and gone.after == 1
    waits = logs.named("manifest_missing")
    assert len(waits) == 3 and all(w["retry_in"] > 0 for w in waits)
    reports.assert_final(published, ResultCode.SUCCESS)


async def test_a_manifest_missing_past_the_budget_stops_as_before(
    tmp_path: Path, server: UpdateServer, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws: list[float] = []
    real = policy.stall_delay

    def spy(elapsed: float, settings: Any, draw: float = -1.0) -> float:
        draws.append(draw)
        return real(elapsed, settings, draw)

    monkeypatch.setattr(policy, "stall_delay", spy)
    published = server.make_manifest(
        image_of(32 * KiB, 2), "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    config = fast(make_config(tmp_path, server, signing), not_found_budget=0.3)
    with watching_logs() as logs:
        async with Client(config) as client:
            server.announce_raw(published.raw, published.sequence)
            gone = Hidden(server, server.root / "m" / published.digest.hex(), count=None)
            failed = await logs.first_of("manifest_fetch_failed")
            assert "4.04" in failed["error"]
            # Asked again with back-off within the budget (before: once), and not forever.
            asked = gone.asked
            assert 3 <= asked <= 20
            assert client.status().state is State.IDLE and client.status().update_id is None
            # As before: the next announcement fetches it again.
            gone.back()
            server.announce_raw(published.raw, published.sequence)
            await client.wait_for(done, WAIT)
    assert gone.asked == asked
    # Each wait drew this device's own jitter (a fleet must not retry in lockstep).
    assert len(draws) == len(logs.named("manifest_missing")) == asked - 1
    assert len(set(draws)) == len(draws) and all(0 <= d < 1 for d in draws)


# -- 1. a keyset that answers 4.04 for a moment -------------------------------------------------


def keypair() -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, kid_for(key.public_key())


ROOT, ROOT_KID = keypair()
A, A_KID = keypair()  # the factory key, configured on the device
B, B_KID = keypair()  # a key only the announced keyset brings


def keyed_config(tmp_path: Path, server: UpdateServer, **kw: Any) -> Config:
    trust = TrustStore({A_KID: A.public_key()})
    roots = TrustStore({ROOT_KID: ROOT.public_key()})
    return fast(make_config(tmp_path, server, Signing(A, A_KID, trust), trust_roots=roots, **kw))


@pytest.mark.parametrize("window", [2, None], ids=["window", "past_the_budget"])
async def test_a_keyset_answering_404_is_fetched_again_within_the_budget(
    tmp_path: Path, window: int | None
) -> None:
    async with UpdateServer(tmp_path / "srv", A, A_KID) as server:
        reports = Reports(server, "dev1")
        digest = server.publish_keyset(ks.sign(1, [(B_KID, B.public_key())], ROOT, ROOT_KID), 1)
        gone = Hidden(server, server.root / "k" / digest.hex(), count=window)
        # Signed by B: only the keyset makes it acceptable.
        v1 = server.publish(
            image_of(8 * KiB, 3), "1.0", device_class=DEVICE_CLASS, key=B, kid=B_KID
        )
        budget = 30.0 if window else 0.3
        with watching_logs() as logs:
            async with Client(keyed_config(tmp_path, server, not_found_budget=budget)) as client:
                final = await server.wait_for_report(
                    lambda r: (
                        r.get(5) == v1.update_id
                        and r[4] in (ResultCode.SUCCESS, ResultCode.UNKNOWN_KEY)
                    ),
                    WAIT,
                    device="dev1",
                )
                if window:
                    # Before: one 4.04, keyset_fetch_failed, and B's manifest UNKNOWN_KEY.
                    assert final[4] == ResultCode.SUCCESS, final
                    assert gone.asked == 2 and gone.after == 1
                    assert client._engine.trust.version == 1
                else:
                    # Past the budget: as before, the keyset is not applied and the manifest
                    # it would have vouched for is refused; but it was asked for again first.
                    assert final[4] == ResultCode.UNKNOWN_KEY, final
                    assert logs.named("keyset_fetch_failed")
                    assert gone.asked >= 3, "asked again with back-off (before: once)"
                    assert client._engine.trust.version == 0
        if window:
            reports.assert_final(v1, ResultCode.SUCCESS)
        assert len(logs.named("keyset_missing")) == (window or gone.asked - 1)


# -- 2. a verification that cannot read the candidate, or crashes -----------------------------


@pytest.mark.parametrize("fault", ["directory", "crash"])
async def test_a_verify_that_cannot_check_the_image_says_why(
    tmp_path: Path,
    server: UpdateServer,
    signing: Signing,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    real = seal_candidate
    calls: list[Path] = []

    def broken(path: Path, size: int) -> bytes:
        calls.append(path)
        if fault == "crash":
            raise RuntimeError("a bug in the verification")
        # The candidate replaced by a directory under the running client: the real read
        # fails with a real OSError (EISDIR).
        path.unlink()
        path.mkdir()
        return real(path, size)

    monkeypatch.setattr("fota.effects.seal_candidate", broken)
    image = image_of(32 * KiB, 4)
    published = server.make_manifest(
        image, "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    config = fast(make_config(tmp_path, server, signing))
    reports = Reports(server, "dev1")
    with watching_logs() as logs:
        async with Client(config) as client:
            server.announce_raw(published.raw, published.sequence)
            await client.wait_for(lambda s: s.state is State.FAILED, WAIT)
            await reports.wait_for(published, ResultCode.FAILED)
    # Before: "image digest mismatch" (INTEGRITY_FAILURE), after refetching the whole image
    # max_attempts times, with nothing in the report or the log about what failed.
    (final,) = [r for r in reports.of(published) if r.state is State.FAILED]
    assert final.result is ResultCode.FAILED
    why = "IsADirectoryError" if fault == "directory" else "RuntimeError: a bug in the verification"
    assert final.detail.startswith("verify failed: ") and why in final.detail, final.detail
    assert "digest mismatch" not in final.detail
    (logged,) = logs.named("update_failed")
    assert logged["result"] == "FAILED" and logged["detail"][:200] == final.detail
    assert len(calls) == 1, "not refetched and verified again: the storage failed, not the bytes"
    reports.assert_final(published, ResultCode.FAILED)


# -- 3. one final report per attempt ----------------------------------------------------------

STEPS = {ResultCode.INITIAL, ResultCode.DEFERRED, ResultCode.AUTHORIZED, ResultCode.FORCED}


def attempts_of(server: UpdateServer, update_id: str) -> dict[int, list[ResultCode]]:
    """The final results the server received for ``update_id``, by attempt (report key 10).

    A report is final unless its result is a step's (``Reports.STEPS``) or it is the
    ROLLING_BACK step's. Also checks what re-opening means: reports arrive in attempt order,
    and nothing of an attempt follows its final report.
    """
    reports = [r for r in server.reports_for("dev1") if r.get(5) == update_id]
    finals: dict[int, list[ResultCode]] = {}
    closed: set[int] = set()
    last = 0
    for r in sorted(reports, key=lambda r: r[2]):
        attempt = r.get(10, 0)
        assert attempt >= last, f"attempt {attempt} reported after attempt {last}"
        assert attempt not in closed, f"a report of attempt {attempt} after its final one: {r}"
        last = attempt
        if ResultCode(r[4]) not in STEPS and State(r[3]) is not State.ROLLING_BACK:
            finals.setdefault(attempt, []).append(ResultCode(r[4]))
            closed.add(attempt)
    return finals


async def test_a_revived_update_that_succeeds_is_a_second_attempt_with_one_final_each(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    published = server.make_manifest(
        image_of(32 * KiB, 5), "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    server.faults.missing(published.image_sha256)  # gone for good, as far as it can tell
    config = fast(make_config(tmp_path, server, signing), not_found_budget=0.0)
    reports = Reports(server, "dev1")
    async with Client(config) as client:
        server.announce_raw(published.raw, published.sequence)
        failed = await server.wait_for_report(
            lambda r: r.get(5) == published.update_id and r[4] == ResultCode.INVALID_URI,
            WAIT,
            device="dev1",
        )
        assert 10 not in failed, "the first attempt carries no attempt number"
        await client.wait_for(lambda s: s.state is State.FAILED, WAIT)
        server.faults.missing_images.discard(published.image_sha256.hex())  # it is back
        server.announce_raw(published.raw, published.sequence)  # the server retries it
        await client.wait_for(done, WAIT)
        await reports.wait_for(published, ResultCode.SUCCESS)
    # Before: two final reports of one update ([INVALID_URI, SUCCESS]), indistinguishable
    # from a device that reported twice. Now the revival re-opened it as attempt 1.
    assert attempts_of(server, published.update_id) == {
        0: [ResultCode.INVALID_URI],
        1: [ResultCode.SUCCESS],
    }
    retried = [r for r in server.reports_for("dev1") if r.get(10) == 1]
    assert retried[0][4] == ResultCode.INITIAL and "announced again" in retried[0][8]


async def test_a_revived_update_failing_again_and_restarted_keeps_counting_attempts(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    published = server.make_manifest(
        image_of(32 * KiB, 6), "1.0", device_class=DEVICE_CLASS, fragment_size=FRAGMENT
    )
    server.faults.missing(published.image_sha256)
    config = fast(make_config(tmp_path, server, signing), not_found_budget=0.0)

    def failed(attempt: int) -> Callable[[dict[int, Any]], bool]:
        return lambda r: (
            r.get(5) == published.update_id
            and r[4] == ResultCode.INVALID_URI
            and r.get(10, 0) == attempt
        )

    async with Client(config) as client:
        server.announce_raw(published.raw, published.sequence)
        await server.wait_for_report(failed(0), WAIT, device="dev1")
        await client.wait_for(lambda s: s.state is State.FAILED, WAIT)
        # Announced again while the image is still missing: attempt 1 fails too.
        server.announce_raw(published.raw, published.sequence)
        await server.wait_for_report(failed(1), WAIT, device="dev1")
        await client.wait_for(lambda s: s.state is State.FAILED, WAIT)
    # The daemon restarts (the attempt count is journaled); the image is back, and the
    # announcement the new process observes at once retries the update: attempt 2.
    server.faults.missing_images.discard(published.image_sha256.hex())
    async with Client(config) as client:
        await client.wait_for(done, WAIT)
        await Reports(server, "dev1").wait_for(published, ResultCode.SUCCESS)
    assert attempts_of(server, published.update_id) == {
        0: [ResultCode.INVALID_URI],
        1: [ResultCode.INVALID_URI],
        2: [ResultCode.SUCCESS],
    }
