"""fota's pytest plugin: a real update server, keys and clients for a device's integration tests.

Installed with fota (entry point ``pytest11``), so a project's tests get these fixtures
without a conftest line; the async ones need pytest-asyncio (``asyncio_mode = "auto"``, or
mark the tests). Everything is real: aiocoap sockets on ``127.0.0.1:0``, signed manifests,
journal files in ``tmp_path``.

    async def test_my_device_installs_2_0(fota_server, fota_publish, fota_client, fota_reports):
        update = fota_publish("2.0", size=64 * 1024)
        client = await fota_client(handler=AutoAuthorize())
        report = await fota_reports.wait_for(update, ResultCode.SUCCESS)
        fota_reports.assert_final(update, ResultCode.SUCCESS)

Fixtures:
    fota_signing: an Ed25519 signing key, its key id, a trust store and the public key's PEM.
    fota_seed: the seed of the server's fault plan: ``--fota-seed N``, else one derived
        from the test's id (stable from run to run); a failing test's report names it.
    fota_server: a started :class:`~fota.testing.UpdateServer`.
    fota_faults: the server's :class:`~fota.testing.FaultPlan`, seeded with ``fota_seed``;
        set faults before the client starts or while it runs.
    fota_publish: ``publish(version, image=None, *, size=..., **manifest_options)``.
    fota_config: ``config(device="dev1", **Config_settings)``: a Config wired to the server,
        with test timing (short ACK timeout and retry delays).
    fota_client: ``await client(device="dev1", handler=None, **Config_settings)``: a started
        :class:`~fota.Client`, closed after the test.
    fota_reports: assertions on the status reports the server received.
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota.client import Client
from fota.config import Config
from fota.core.manifest import TrustStore, kid_for
from fota.core.states import State
from fota.errors import ResultCode
from fota.handler import UpdateHandler
from fota.keys import save_keypair
from fota.testing.server import FaultPlan, Published, UpdateServer

DEVICE_CLASS = "test-gw"
"""The device class of every fixture unless a test asks for another."""

ACK_TIMEOUT = 0.25
"""CoAP ACK timeout of fixture clients: loopback answers in microseconds."""

WAIT = 30.0
"""Default bound of a wait: only a bug gets near it on loopback."""


@dataclass(frozen=True)
class Signing:
    """A manifest signing key and what a device needs to trust it."""

    key: ed25519.Ed25519PrivateKey
    kid: bytes
    trust: TrustStore
    public_pem: Path


@dataclass(frozen=True)
class Report:
    """One status report as the server received it (docs/protocol.md, "Status report")."""

    sequence: int
    state: State
    result: ResultCode
    update_id: str | None
    detail: str
    attempt: int = 0
    """The update's attempt (report key 10): a failed update the server announced again is
    retried as its next attempt, which ends with its own final report."""

    @classmethod
    def of(cls, raw: dict[int, Any]) -> Report:
        """Decode the server's record of one report."""
        return cls(
            raw[2], State(raw[3]), ResultCode(raw[4]), raw.get(5), raw.get(8, ""), raw.get(10, 0)
        )


class Reports:
    """What the server was told, for assertions with readable failures."""

    def __init__(self, server: UpdateServer, device: str) -> None:
        self.server = server
        self.device = device

    def of(self, update: Published | str | None = None) -> list[Report]:
        """The device's reports in arrival order (those of one update when given)."""
        uid = update.update_id if isinstance(update, Published) else update
        out = [Report.of(r) for r in self.server.reports_for(self.device)]
        return [r for r in out if uid is None or r.update_id == uid]

    def results(self, update: Published | str | None = None) -> list[ResultCode]:
        """The result codes, in order."""
        return [r.result for r in self.of(update)]

    async def wait_for(
        self, update: Published | str, result: ResultCode, timeout: float = WAIT
    ) -> Report:
        """Wait until the server has a report of ``update`` with ``result``."""
        uid = update.update_id if isinstance(update, Published) else update
        raw = await self.server.wait_for_report(
            lambda r: r.get(5) == uid and r[4] == result, timeout, device=self.device
        )
        return Report.of(raw)

    def assert_in_order(self, update: Published | str, *results: ResultCode) -> None:
        """``results`` appear among the update's reports in this order (others may be between)."""
        seen = self.results(update)
        it = iter(seen)
        missing = [r for r in results if not any(s == r for s in it)]
        assert not missing, (
            f"{self.device}: expected {[r.name for r in results]} in this order, "
            f"got {[r.name for r in seen]}"
        )

    STEPS = frozenset(
        {ResultCode.INITIAL, ResultCode.DEFERRED, ResultCode.AUTHORIZED, ResultCode.FORCED}
    )
    """Results of step reports; every other result ends an update."""

    def assert_final(self, update: Published | str, result: ResultCode) -> None:
        """Each attempt of the update ended with exactly one final report; the last is ``result``.

        A ROLLING_BACK report carries the failure's code but is a step: the rollback's own
        report (ROLLED_BACK or ROLLBACK_FAILED) is the final one. An update that failed and was
        announced again has one final report per attempt (docs/protocol.md, "Result codes"):
        the highest attempt's is the update's outcome.
        """
        finals: dict[int, list[ResultCode]] = {}
        for r in self.of(update):
            if r.result not in self.STEPS and r.state is not State.ROLLING_BACK:
                finals.setdefault(r.attempt, []).append(r.result)
        last = max(finals, default=0)
        got = [c.name for c in finals.get(last, [])]
        which = f" (attempt {last})" if last else ""
        assert got == [result.name], (
            f"{self.device}: expected one final report {result.name}{which}, got {got}"
        )
        shown = {a: [c.name for c in codes] for a, codes in sorted(finals.items())}
        assert all(len(codes) == 1 for codes in finals.values()), (
            f"{self.device}: expected one final report per attempt, got {shown}"
        )

    def assert_no_duplicates(self) -> None:
        """Every report arrived once, and the device's sequence numbers rise by one."""
        assert self.server.duplicate_reports == 0, (
            f"{self.server.duplicate_reports} reports arrived more than once"
        )
        numbers = [r.sequence for r in self.of()]
        expected = list(range(numbers[0], numbers[0] + len(numbers))) if numbers else []
        assert numbers == expected, (
            f"{self.device}: report sequence numbers {numbers} are not consecutive"
        )


SEED_KEY = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--fota-seed``: repeat a run's faults exactly."""
    parser.getgroup("fota").addoption(
        "--fota-seed",
        type=int,
        default=None,
        help="seed of every fota_server's fault plan (default: derived from the test id)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Name the fault seed in a failing test's report, so the run can be repeated."""
    report = yield
    seed = item.stash.get(SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append(("fota", f"fault plan seed {seed}: repeat with --fota-seed {seed}"))
    return report


@pytest.fixture
def fota_seed(request: pytest.FixtureRequest) -> int:
    """The fault plan's seed: ``--fota-seed``, else a stable number from the test's id."""
    given = request.config.getoption("--fota-seed", None)
    seed = int(given) if given is not None else zlib.crc32(request.node.nodeid.encode())
    request.node.stash[SEED_KEY] = seed
    return seed


@pytest.fixture
def fota_faults(fota_server: UpdateServer) -> FaultPlan:
    """The running server's fault plan (``fota_server.faults``), for faults set by a test."""
    return fota_server.faults


@pytest.fixture
def fota_device_class() -> str:
    """The device class fixtures use; override it in a conftest for your devices."""
    return DEVICE_CLASS


@pytest.fixture
def fota_signing(tmp_path: Path) -> Signing:
    """A fresh Ed25519 manifest signing key."""
    key = ed25519.Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    pem = save_keypair(key, tmp_path / "fota-signing.key")
    return Signing(key, kid, TrustStore({kid: key.public_key()}), pem)


@pytest.fixture
def fota_publish(fota_server: UpdateServer, fota_device_class: str) -> Callable[..., Published]:
    """``publish(version, image=None, *, size=16 KiB, **options)``: sign and announce."""

    def publish(
        version: str, image: bytes | Path | None = None, *, size: int = 16 * 1024, **kw: Any
    ) -> Published:
        kw.setdefault("device_class", fota_device_class)
        return fota_server.publish(os.urandom(size) if image is None else image, version, **kw)

    return publish


def device_config(
    server: UpdateServer,
    trust: TrustStore,
    root: Path,
    device: str = "dev1",
    *,
    device_class: str = DEVICE_CLASS,
    **settings: Any,
) -> Config:
    """A Config for one device of a test server, with test timing.

    Its state directory and target are under ``root / device``; the ACK timeout and retry
    delays are short (loopback), and the boot id is not read (no ``boot_id_path``) unless
    ``settings`` say otherwise. ``fota_config`` and fota's own tests build their configs here.
    """
    defaults: dict[str, Any] = {
        "server": server.uri,
        "device_id": device,
        "device_class": device_class,
        "state_dir": root / device / "state",
        "trust": trust,
        "target": root / device / "firmware.bin",
        "ack_timeout": ACK_TIMEOUT,
        "retry_base": 0.05,
        "boot_id_path": None,
    }
    return Config(**{**defaults, **settings})


@pytest.fixture
def fota_config(
    tmp_path: Path, fota_server: UpdateServer, fota_signing: Signing, fota_device_class: str
) -> Callable[..., Config]:
    """``config(device="dev1", **settings)``: a Config for one device of the test server."""

    def config(device: str = "dev1", **kw: Any) -> Config:
        return device_config(
            fota_server, fota_signing.trust, tmp_path, device, device_class=fota_device_class, **kw
        )

    return config


@pytest.fixture
def fota_reports(fota_server: UpdateServer) -> Iterator[Reports]:
    """Assertions on the reports of device ``dev1`` (``Reports(server, device)`` for others)."""
    yield Reports(fota_server, "dev1")


if importlib.util.find_spec("pytest_asyncio") is not None:
    # Only with pytest-asyncio: a project with pytest but without it must still start.
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def fota_server(
        tmp_path: Path, fota_signing: Signing, fota_seed: int
    ) -> AsyncIterator[UpdateServer]:
        """A started update server on ``127.0.0.1:0``, its fault plan seeded with fota_seed."""
        async with UpdateServer(
            tmp_path / "fota-server",
            fota_signing.key,
            fota_signing.kid,
            faults=FaultPlan(seed=fota_seed),
        ) as s:
            yield s

    @pytest_asyncio.fixture
    async def fota_client(
        fota_config: Callable[..., Config],
    ) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
        """``await client(device="dev1", handler=None, **settings)``: a started Client."""
        started: list[Client] = []

        async def client(
            device: str = "dev1", handler: UpdateHandler | None = None, **kw: Any
        ) -> Client:
            c = Client(fota_config(device, **kw), handler=handler)
            await c.start()
            started.append(c)
            return c

        yield client
        for c in reversed(started):
            await c.aclose()
