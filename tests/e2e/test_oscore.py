"""OSCORE end to end: a secured test server and a client over real loopback UDP.

The server serves OSCORE-protected requests only; each device has its own security context
(``UpdateServer.provision_oscore``), bound to its device id. What is checked: a polite update
over the secured channel, with no image byte readable on the wire; a plaintext client, a
client with the wrong secret, and a device asking for another device's resources are each
refused and get nothing installed; a client with OSCORE refuses to send a request outside the
server's origin in plaintext.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from structlog.testing import capture_logs

from fota import AutoAuthorize, Client, Config, ResultCode, State
from fota.errors import ConfigError, PermanentServerError, TransportError
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import Reports
from fota.testing.pytest_plugin import Signing as PluginSigning
from fota.transport import ConcurrentFetcher
from fota.transport.coap import CoapTransport
from fota.transport.oscore import close_context, load_context, provision
from tests.conftest import Signing, make_config

KiB = 1024
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def secured(tmp_path: Path, fota_signing: PluginSigning) -> AsyncIterator[UpdateServer]:
    server = UpdateServer(tmp_path / "srv", fota_signing.key, fota_signing.kid, oscore=True)
    await server.start()
    yield server
    await server.stop()


def config_for(
    tmp_path: Path, server: UpdateServer, signing: PluginSigning, device: str, **kw: Any
) -> Config:
    own = Signing(signing.key, signing.kid, signing.trust)
    return make_config(tmp_path, server, own, device, boot_id_path=None, **kw)


async def test_polite_update_over_oscore_with_nothing_readable_on_the_wire(
    tmp_path: Path,
    secured: UpdateServer,
    fota_signing: PluginSigning,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # aiocoap's own logging too, at its most talkative
    with capture_logs() as logs:
        await polite_update_over_oscore(tmp_path, secured, fota_signing)
    # No secret in any log line: the master secret, and the keys aiocoap derives from it.
    secret = json.loads((tmp_path / "dev1-oscore" / "secret.json").read_text())["secret_hex"]
    text = repr(logs) + caplog.text
    assert len(logs) > 20 and secret not in text and bytes.fromhex(secret).hex() not in text
    assert repr(bytes.fromhex(secret)) not in text
    for side in (tmp_path / "dev1-oscore", tmp_path / "dev1" / "state"):
        assert side.stat().st_mode & 0o077 == 0, f"{side} is private"
        for path in side.iterdir():
            if path.is_file() and path.name not in ("settings.json", "lock"):
                assert path.stat().st_mode & 0o077 == 0, f"{path} is private"


async def polite_update_over_oscore(
    tmp_path: Path, secured: UpdateServer, fota_signing: PluginSigning
) -> None:
    secured.provision_oscore("dev1", tmp_path / "dev1-oscore")
    sent: list[bytes] = []
    secured.wire_hook = sent.append
    image = random.Random(1).randbytes(256 * KiB)
    v1 = secured.publish(image, "1.0", device_class="test-gw")
    config = config_for(tmp_path, secured, fota_signing, "dev1", oscore=tmp_path / "dev1-oscore")
    reports = Reports(secured, "dev1")
    async with Client(config, handler=AutoAuthorize()) as client:
        await reports.wait_for(v1, ResultCode.SUCCESS)
        v2 = secured.publish(image[::-1], "2.0", device_class="test-gw")
        await reports.wait_for(v2, ResultCode.SUCCESS)
        assert client.status().installed_version == "2.0"
    assert hashlib.sha256(config.target.read_bytes()).digest() == v2.image_sha256  # type: ignore[union-attr]
    reports.assert_in_order(v2, ResultCode.INITIAL, ResultCode.SUCCESS)
    reports.assert_final(v2, ResultCode.SUCCESS)
    # Every block went out, and encrypted: no 16-byte run of either image is on the wire.
    assert len(secured.image_requests(v2.image_sha256)) >= len(image) // KiB
    wire = b"".join(sent)
    assert len(wire) > 2 * len(image)
    for i in range(0, len(image), 4 * KiB):
        assert image[i : i + 16] not in wire and image[::-1][i : i + 16] not in wire
    assert secured.refused == []


async def test_a_plaintext_client_is_refused_and_gets_nothing(
    tmp_path: Path, secured: UpdateServer, fota_signing: PluginSigning
) -> None:
    v1 = secured.publish(b"x" * 4 * KiB, "1.0", device_class="test-gw")
    refused = asyncio.Event()
    secured.request_hook = lambda r: refused.set() if "refused" in r.faults else None
    config = config_for(tmp_path, secured, fota_signing, "dev1")  # no oscore
    async with Client(config, handler=AutoAuthorize()) as client:
        await asyncio.wait_for(refused.wait(), 10)
        assert client.status().state is State.IDLE
    assert ("GET", "/fota/ann/dev1", "4.01") in secured.refused
    assert not config.target.exists()  # type: ignore[union-attr]
    assert secured.reports == [] and secured.devices == {}
    # Nor does a plain CoAP GET of the manifest or the image get a byte of it.
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for path in (f"m/{v1.digest.hex()}", f"img/{v1.image_sha256.hex()}"):
            msg = aiocoap.Message(code=Code.GET, uri=f"{secured.uri}/fota/{path}")
            response = await ctx.request(msg).response
            assert response.code == Code.UNAUTHORIZED and response.payload == b""
    finally:
        await ctx.shutdown()


async def test_a_client_with_the_wrong_secret_is_refused(
    tmp_path: Path, secured: UpdateServer, fota_signing: PluginSigning
) -> None:
    secured.provision_oscore("dev1", tmp_path / "good")
    settings = json.loads((tmp_path / "good" / "settings.json").read_text())
    forged = tmp_path / "forged"
    # The right ids, another secret: what an attacker who read the ids off the wire has.
    provision(
        tmp_path / "unused",
        forged,
        server_id=bytes.fromhex(settings["recipient-id_hex"]),
        device_id=bytes.fromhex(settings["sender-id_hex"]),
    )
    secured.publish(b"y" * 4 * KiB, "1.0", device_class="test-gw")
    transport = CoapTransport(
        secured.uri, "dev1", ack_timeout=0.25, max_retransmit=1, oscore=forged
    )
    try:
        # The server cannot verify the request and answers without protection; the client
        # takes no unprotected answer (nor would it one forged by someone on the path).
        with pytest.raises(TransportError, match="NotAProtectedMessage"):
            await transport.fetch(f"{secured.uri}/fota/ann/dev1", limit=1024)
    finally:
        await transport.aclose()
    assert secured.reports == [] and "dev1" not in secured.devices


async def test_a_device_cannot_read_or_report_as_another(
    tmp_path: Path, secured: UpdateServer, fota_signing: PluginSigning
) -> None:
    secured.provision_oscore("dev1", tmp_path / "dev1")
    secured.provision_oscore("dev2", tmp_path / "dev2")
    # dev2's context, and dev1's resources: its announcement, and its reports.
    transport = CoapTransport(secured.uri, "dev1", ack_timeout=0.25, oscore=tmp_path / "dev2")
    try:
        with pytest.raises(PermanentServerError, match=r"4\.03"):
            await transport.fetch(f"{secured.uri}/fota/ann/dev1", limit=1024)
        with pytest.raises(PermanentServerError, match=r"4\.03"):
            await transport.post_report(b"\xa2\x01\x64dev1\x02\x00")
    finally:
        await transport.aclose()
    assert ("GET", "/fota/ann/dev1", "4.03") in secured.refused
    assert ("POST", "/fota/report/dev1", "4.03") in secured.refused
    assert secured.reports == []


async def test_with_oscore_nothing_is_sent_outside_the_servers_origin(
    tmp_path: Path, secured: UpdateServer
) -> None:
    secured.provision_oscore("dev1", tmp_path / "dev1")
    transport = CoapTransport(secured.uri, "dev1", oscore=tmp_path / "dev1")
    try:
        with pytest.raises(PermanentServerError, match="outside the OSCORE-protected"):
            await transport.fetch("coap://127.0.0.2:61616/fota/m/00", limit=1024)
        with pytest.raises(PermanentServerError, match="outside the OSCORE-protected"):
            transport.block_fetcher("coap+tcp://127.0.0.1:61616/img", window=4, block_size=1024)
    finally:
        await transport.aclose()


async def test_the_oscore_path_says_the_window_it_really_has(
    tmp_path: Path, secured: UpdateServer
) -> None:
    """Issue 18 §3: aiocoap sends one confirmable request per server at a time (NSTART 1),
    so an OSCORE download asks one block at a time whatever ``window`` says: the fetcher
    says 1, and the log says why, once."""
    secured.provision_oscore("dev1", tmp_path / "dev1")
    transport = CoapTransport(secured.uri, "dev1", oscore=tmp_path / "dev1")
    try:
        with capture_logs() as logs:
            first = transport.block_fetcher(f"{secured.uri}/img", window=8, block_size=1024)
            second = transport.block_fetcher(f"{secured.uri}/img", window=8, block_size=1024)
        assert isinstance(first, ConcurrentFetcher) and isinstance(second, ConcurrentFetcher)
        assert first.window == second.window == 1
        told = [e for e in logs if e["event"] == "oscore_window"]
        assert [(e["asked"], e["used"]) for e in told] == [(8, 1)]
    finally:
        await transport.aclose()


def test_an_unusable_context_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"oscore: .*missing is not a directory"):
        load_context(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"oscore: .*empty: .* lacks sender-id, recipient-id"):
        load_context(tmp_path / "empty")
    with pytest.raises(ConfigError, match="needs a coap:// server"):
        CoapTransport("coap+tcp://127.0.0.1:61616", "dev1", oscore=tmp_path / "empty")


def test_one_context_has_one_user_until_closed(tmp_path: Path) -> None:
    provision(tmp_path / "s", tmp_path / "d")
    first = load_context(tmp_path / "d")
    with pytest.raises(ConfigError, match="in use by another process"):
        load_context(tmp_path / "d")
    close_context(first)
    close_context(load_context(tmp_path / "d"))


def test_provisioned_secrets_are_private(tmp_path: Path) -> None:
    provision(tmp_path / "s", tmp_path / "d")
    for side in ("s", "d"):
        assert (tmp_path / side / "secret.json").stat().st_mode & 0o077 == 0
        assert (tmp_path / side).stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="at most 7"):
        provision(tmp_path / "x", tmp_path / "y", device_id=b"12345678")


# -- the commands: fota server --oscore, fota fetch --oscore ---------------------------------------


def test_fota_server_and_fetch_over_oscore_and_a_plaintext_fetch_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    def fota(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fota", *args], capture_output=True, text=True, timeout=60
        )

    assert fota("manifest", "keygen", "--out", str(tmp_path / "k")).returncode == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(random.Random(3).randbytes(100_000))
    server = subprocess.Popen(
        [
            sys.executable, "-m", "fota", "server",
            "--root", str(tmp_path / "srv"),
            "--key", str(tmp_path / "k"),
            "--port", "0",
            "--json",
            "--publish", f"{image}=1.0",
            "--oscore", f"gw-1={tmp_path / 'gw-1'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        lines = [json.loads(server.stdout.readline()) for _ in range(2)]
        uri = lines[1]["uri"]
        img = f"{uri}/fota/img/{hashlib.sha256(image.read_bytes()).hexdigest()}"
        got = fota("fetch", img, "--out", str(tmp_path / "got"), "--oscore", str(tmp_path / "gw-1"))
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "got").read_bytes() == image.read_bytes()
        plain = fota("fetch", img, "--out", str(tmp_path / "plain"), "--ack-timeout", "0.25")
        assert plain.returncode != 0 and "4.01" in plain.stderr
        assert not (tmp_path / "plain").exists()
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0


async def test_a_server_spelled_in_capitals_is_still_protected(
    tmp_path: Path, secured: UpdateServer, fota_signing: PluginSigning
) -> None:
    # aiocoap looks contexts up by its own spelling of the URI (host lower-cased): a context
    # registered under the configured spelling would never be found, and every request would
    # go out in plaintext.
    secured.provision_oscore("dev1", tmp_path / "ctx")
    v1 = secured.publish(b"z" * 8 * KiB, "1.0", device_class="test-gw")
    config = dataclasses.replace(
        config_for(tmp_path, secured, fota_signing, "dev1", oscore=tmp_path / "ctx"),
        server=f"coap://LOCALHOST:{secured.port}",
    )
    async with Client(config, handler=AutoAuthorize()):
        await Reports(secured, "dev1").wait_for(v1, ResultCode.SUCCESS)
    assert secured.refused == [], "nothing arrived unprotected"
