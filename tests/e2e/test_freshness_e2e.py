"""Freshness end to end (issue 16 §5): a real client, the real test server, a real control socket.

The attacker here is the server or the path: it serves announcements unsigned, expired or
older than one the device already took (a replay), or stops serving fresh ones (a freeze).
With ``require_signed_announcements`` the device ignores the first three (no manifest or
image byte is asked for) and says it is stale after ``freshness_window`` (status, a control
event, a WARNING, a report). Without the setting it takes unsigned ones as before.

No sleeps: tests wait on log entries, notices, control events and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import cbor2
import pytest
from structlog.testing import capture_logs

from fota import AutoAuthorize, Client, ResultCode
from fota.app.cli_control import status_rows
from fota.app.control import ControlClient
from fota.app.control.server import ControlServer
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import Reports
from tests.conftest import DEVICE_CLASS, Signing, make_config
from tests.control_rig import short_dir
from tests.integration.test_control import control_schema

pytestmark = pytest.mark.timeout(60)

BOUND = 20.0
Entry = dict[str, Any]


class LogWatch:
    """A structlog processor that keeps every entry and wakes tests waiting for one."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._waiters: list[tuple[Callable[[Entry], bool], asyncio.Future[Entry]]] = []

    def __call__(self, logger: object, method: str, entry: MutableMapping[str, Any]) -> Entry:
        seen = {**entry, "log_level": method}
        self.entries.append(seen)
        for predicate, future in self._waiters:
            if not future.done() and predicate(seen):
                future.get_loop().call_soon_threadsafe(_settle, future, seen)
        return seen

    def of(self, event: str) -> list[Entry]:
        return [e for e in self.entries if e.get("event") == event]

    async def wait_for(
        self, event: str, predicate: Callable[[Entry], bool] = lambda e: True
    ) -> Entry:
        def wanted(e: Entry) -> bool:
            return e.get("event") == event and predicate(e)

        found = next((e for e in self.entries if wanted(e)), None)
        if found is not None:
            return found
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        waiter = (wanted, future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, BOUND)
        finally:
            self._waiters.remove(waiter)


def _settle(future: asyncio.Future[Entry], entry: Entry) -> None:
    if not future.done():
        future.set_result(entry)


@contextlib.contextmanager
def watching_logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    with capture_logs(processors=[watch]):
        yield watch


def ignored(reason: str) -> Callable[[Entry], bool]:
    return lambda e: reason in str(e.get("reason"))


def fetched(server: UpdateServer, kind: str) -> list[str]:
    """Paths of the manifest (``m``) or image (``img``) requests the server saw."""
    return [r.path for r in server.requests if r.path.startswith(f"/fota/{kind}/")]


# -- ignored, then taken --------------------------------------------------------------------------


async def test_unsigned_announcements_are_ignored_when_signed_ones_are_required(
    tmp_path: Path, signing: Signing
) -> None:
    async with UpdateServer(tmp_path / "srv", signing.key, signing.kid) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(tmp_path, server, signing, require_signed_announcements=True)
        with watching_logs() as logs:
            async with Client(config, handler=AutoAuthorize()) as client:
                entry = await logs.wait_for("announcement_ignored", ignored("unsigned"))
                assert entry["sequence"] == v1.sequence
                assert not fetched(server, "m") and not fetched(server, "img")
                # The server signs from now on: the same announcement is taken.
                server.sign_announcements = True
                server.refresh_announcements()
                await reports.wait_for(v1, ResultCode.SUCCESS)
                assert client.status().installed_version == "1.0"
        assert config.target is not None
        assert hashlib.sha256(config.target.read_bytes()).digest() == v1.image_sha256


@pytest.mark.parametrize("required", [True, False], ids=["required", "not-required"])
async def test_an_expired_announcement_is_ignored_and_its_image_never_requested(
    tmp_path: Path, signing: Signing, required: bool
) -> None:
    # Issued two hours ago, valid for one: what a replaying path or a frozen mirror serves.
    async with UpdateServer(
        tmp_path / "srv",
        signing.key,
        signing.kid,
        sign_announcements=True,
        announcement_lifetime=3600,
        clock=lambda: time.time() - 7200,
    ) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(tmp_path, server, signing, require_signed_announcements=required)
        with watching_logs() as logs:
            async with Client(config, handler=AutoAuthorize()):
                entry = await logs.wait_for("announcement_ignored", ignored("expired"))
                assert entry["sequence"] == v1.sequence
                assert not fetched(server, "m") and not fetched(server, "img")
                server.clock = time.time  # the server signs a current one again
                server.refresh_announcements()
                await reports.wait_for(v1, ResultCode.SUCCESS)


async def test_an_older_signed_announcement_is_a_replay_and_ignored(
    tmp_path: Path, signing: Signing
) -> None:
    now = float(int(time.time()))
    issued = [now]
    async with UpdateServer(
        tmp_path / "srv", signing.key, signing.kid, sign_announcements=True, clock=lambda: issued[0]
    ) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(tmp_path, server, signing, require_signed_announcements=True)
        with watching_logs() as logs:
            async with Client(config, handler=AutoAuthorize()) as client:
                await reports.wait_for(v1, ResultCode.SUCCESS)
                # Unexpired, validly signed, but issued before the one the device took.
                issued[0] = now - 100
                v2 = server.publish(os.urandom(4096), "2.0", device_class=DEVICE_CLASS)
                entry = await logs.wait_for("announcement_ignored", ignored("replay"))
                assert entry["sequence"] == v2.sequence
                assert not server.image_requests(v2.image_sha256)
                assert f"/fota/m/{v2.digest.hex()}" not in fetched(server, "m")
                issued[0] = now + 1
                server.refresh_announcements()
                await reports.wait_for(v2, ResultCode.SUCCESS)
                assert client.status().installed_version == "2.0"


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
async def test_without_the_requirement_announcements_are_taken_as_before(
    tmp_path: Path, signing: Signing, signed: bool
) -> None:
    async with UpdateServer(
        tmp_path / "srv", signing.key, signing.kid, sign_announcements=signed
    ) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(tmp_path, server, signing)
        assert not config.require_signed_announcements  # the default
        with watching_logs() as logs:
            async with Client(config, handler=AutoAuthorize()):
                await reports.wait_for(v1, ResultCode.SUCCESS)
        assert not logs.of("announcement_ignored")


# -- stale, then fresh again ----------------------------------------------------------------------


async def test_a_frozen_device_says_so_in_status_events_logs_and_a_report(
    tmp_path: Path, signing: Signing
) -> None:
    # The server (or the path) serves nothing the device may take: unsigned announcements.
    async with UpdateServer(tmp_path / "srv", signing.key, signing.kid) as server:
        config = make_config(
            tmp_path,
            server,
            signing,
            require_signed_announcements=True,
            freshness_window=0.3,
        )
        # (kind, whether the status said stale) at each notice, read as it is told: the
        # window is short, and the device may go stale again soon after a fresh one.
        notices: list[tuple[str, bool]] = []
        with short_dir("fota-fresh-") as sockdir, watching_logs() as logs:
            async with Client(config, handler=AutoAuthorize()) as client:
                client.listen(lambda n: notices.append((n.kind, client.status().stale)))
                control = ControlServer(client, sockdir / "ctl.sock")
                await control.start()
                try:
                    async with ControlClient(control.path, timeout=BOUND) as app:
                        status = await app.subscribe(["stale", "fresh"])
                        if not status["stale"]:  # else it went stale before we subscribed
                            event = await app.wait_event("stale", timeout=BOUND)
                            assert event["window"] == 0.3 and event["last_fresh"] is None
                            status = await app.status()
                        assert status["stale"] is True and status["last_fresh"] is None
                        control_schema("status").validate_cbor(cbor2.dumps(status))
                        assert "announcements stale" in status["line"]
                        rows = dict(status_rows(status))
                        assert rows["Announcements"].startswith("STALE")
                        assert client.status().stale

                        warning = await logs.wait_for("announcements_stale")
                        assert warning["log_level"] == "warning"
                        report = await server.wait_for_report(
                            lambda r: str(r.get(8, "")).startswith("stale:"), BOUND
                        )
                        assert report[4] == ResultCode.INITIAL
                        assert "0.3 s" in report[8]

                        # A fresh signed announcement ends it: an event, and the status.
                        server.sign_announcements = True
                        server.refresh_announcements()
                        fresh = await app.wait_event("fresh", timeout=BOUND)
                        assert fresh["last_fresh"] is not None
                        control_schema("event").validate_cbor(cbor2.dumps(fresh))
                        assert (await app.status())["last_fresh"] is not None
                finally:
                    await control.aclose()
        kinds = [kind for kind, _ in notices]
        # Said once per lapse, not on every check (after "fresh" a new lapse may begin); the
        # status said stale from the stale notice to the fresh one, and not at the fresh one.
        assert "fresh" in kinds and kinds[: kinds.index("fresh")].count("stale") == 1, kinds
        assert (("stale", True) in notices) and notices[kinds.index("fresh")] == ("fresh", False)


async def test_a_device_that_keeps_getting_fresh_announcements_is_not_stale(
    tmp_path: Path, signing: Signing
) -> None:
    # The control case for the test above: same window, a server that signs. The device
    # takes the announcement (a first install) and is not stale when it does.
    async with UpdateServer(
        tmp_path / "srv", signing.key, signing.kid, sign_announcements=True
    ) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(
            tmp_path, server, signing, require_signed_announcements=True, freshness_window=60
        )
        async with Client(config, handler=AutoAuthorize()) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            status = client.status()
            assert not status.stale and status.last_fresh is not None


# -- fota server --sign-announcements ----------------------------------------------------------


@pytest.mark.e2e
async def test_fota_server_signs_announcements_for_devices_that_require_them(
    tmp_path: Path,
) -> None:
    from fota.keys import generate, save_keypair
    from tests.e2e.test_server_cli import ServerProcess, config, server_args, trust_of, write_image

    key = tmp_path / "release.key"
    save_keypair(generate(), key)
    images = tmp_path / "images"
    images.mkdir()
    image = write_image(images / "gw-1.0.bin", 4096)
    argv = server_args(tmp_path, key, images, "--json", "--sign-announcements")
    argv += ["--announcement-lifetime", "60"]
    stderr = tmp_path / "server.log"
    with open(stderr, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    server = ServerProcess(proc, stderr)
    try:
        ready = await server.wait_for(lambda line: "uri" in line)
        device = dataclasses.replace(
            config(tmp_path, ready["uri"], trust_of(key)),
            require_signed_announcements=True,
            freshness_window=60.0,
        )
        with watching_logs() as logs:
            async with Client(device, handler=AutoAuthorize()) as client:
                await client.wait_for(lambda s: s.installed_version == "1.0", BOUND)
                status = client.status()
                assert not status.stale and status.last_fresh is not None
        assert not logs.of("announcement_ignored")
        assert device.target is not None and device.target.read_bytes() == image
    finally:
        assert await server.stop() == 0


# -- key rotation ---------------------------------------------------------------------------------


async def test_announcements_signed_by_a_key_a_keyset_brings_are_taken(tmp_path: Path) -> None:
    # The server's key rotates from A to B by a root-signed keyset. The first announcement
    # signed by B names that keyset: the device fetches it (keysets verify by the root keys,
    # whoever announced them) before it checks the announcement, which then verifies.
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fota.core import keyset as ks
    from fota.core.manifest import TrustStore, kid_for

    def keypair() -> tuple[ed25519.Ed25519PrivateKey, bytes]:
        key = ed25519.Ed25519PrivateKey.generate()
        return key, kid_for(key.public_key())

    (root, root_kid), (a, a_kid), (b, b_kid) = keypair(), keypair(), keypair()
    trust = TrustStore({a_kid: a.public_key()})
    async with UpdateServer(tmp_path / "srv", a, a_kid, sign_announcements=True) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(
            tmp_path,
            server,
            Signing(a, a_kid, trust),
            trust_roots=TrustStore({root_kid: root.public_key()}),
            require_signed_announcements=True,
        )
        with watching_logs() as logs:
            async with Client(config, handler=AutoAuthorize()):
                await reports.wait_for(v1, ResultCode.SUCCESS)
                server.key, server.kid = b, b_kid  # announcements are signed by B from now on
                server.publish_keyset(
                    ks.sign(1, [(b_kid, b.public_key())], root, root_kid, revoked=[a_kid]), 1
                )
                v2 = server.publish(os.urandom(4096), "2.0", device_class=DEVICE_CLASS)
                await reports.wait_for(v2, ResultCode.SUCCESS)
        assert not logs.of("announcement_ignored")
