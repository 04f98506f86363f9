"""Limits against a hostile or broken server, end to end: each refused, reported, nothing installed.

An image larger than the free space (read through the injectable probe), an image on a host the
configuration does not allow, an announced location elsewhere (announcements are unsigned), and
a bundle whose member names climb out of the install root.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import AutoAuthorize, Client, Config, ResultCode, State
from fota.core.manifest import Component, TrustStore, kid_for
from fota.core.uri import DEFAULT_PORTS
from fota.errors import ConfigError
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import Reports
from tests.conftest import Signing, make_config
from tests.integration.test_install_archive import (
    U1_FILES,
    U1_PAYLOAD,
    make_bundle,
    recipe,
    tar_file,
)

pytestmark = pytest.mark.timeout(60)

KEY = ed25519.Ed25519PrivateKey.generate()
KID = kid_for(KEY.public_key())
SIGNING = Signing(KEY, KID, TrustStore({KID: KEY.public_key()}))


def device_config(tmp_path: Path, server: UpdateServer, **kw: Any) -> Config:
    return make_config(tmp_path, server, SIGNING, **kw)


def sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


# -- free space ------------------------------------------------------------------------------


async def test_an_image_larger_than_the_free_space_is_refused_unfetched(tmp_path: Path) -> None:
    async with UpdateServer(tmp_path / "srv", KEY, KID) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class="test-gw")
        config = device_config(tmp_path, server, min_free_space=1000)
        probed: list[Path] = []

        def free_space(path: Path) -> int:
            probed.append(path)
            return 200_000  # 200 kB free, 1000 of them reserved

        async with Client(config, handler=AutoAuthorize(), free_space=free_space) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            v2 = server.publish(os.urandom(199_001), "2.0", device_class="test-gw")
            refused = await reports.wait_for(v2, ResultCode.NOT_ENOUGH_SPACE)
            assert "needs 199001 more bytes; 200000 free" in refused.detail
            assert client.status().installed_version == "1.0"
            v3 = server.publish(os.urandom(199_000), "3.0", device_class="test-gw")
            await reports.wait_for(v3, ResultCode.SUCCESS)
        assert not server.image_requests(v2.image_sha256), "no byte of 2.0 was fetched"
        reports.assert_final(v2, ResultCode.NOT_ENOUGH_SPACE)
        assert probed and all(p == config.state_dir for p in probed)
        assert config.target is not None and sha(config.target) == v3.image_sha256


def test_the_real_probe_reads_the_file_system(tmp_path: Path) -> None:
    from fota.download import available_bytes

    st = os.statvfs(tmp_path)
    assert available_bytes(tmp_path) == st.f_bavail * st.f_frsize > 0
    with pytest.raises(ConfigError, match="min_free_space"):
        Config(
            server="coap://127.0.0.1:61616",
            device_id="d",
            device_class="c",
            state_dir=tmp_path,
            min_free_space=-1,
        )


# -- where images may come from --------------------------------------------------------------


async def test_an_image_on_another_host_is_refused_unless_allowed(tmp_path: Path) -> None:
    async with (
        UpdateServer(tmp_path / "srv", KEY, KID) as server,
        UpdateServer(tmp_path / "mirror", KEY, KID) as mirror,
    ):
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class="test-gw")
        image = os.urandom(8192)
        path, digest = mirror.store_image(image)
        # Signed by the right key, but the image is on the mirror: not on an allowed origin.
        elsewhere = server.make_manifest(image, "2.0", device_class="test-gw")
        body_uri = f"{mirror.uri}/fota/img/{digest.hex()}"
        v2 = server.make_manifest(
            image, "2.0", device_class="test-gw", sequence=elsewhere.sequence + 1
        )
        v2 = _with_image_uri(server, v2, body_uri)
        config = device_config(tmp_path, server)
        async with Client(config, handler=AutoAuthorize()):
            await reports.wait_for(v1, ResultCode.SUCCESS)
            server.announce_raw(v2.raw, v2.sequence)
            refused = await reports.wait_for(v2, ResultCode.INVALID_URI)
            assert "is not on an allowed origin" in refused.detail
        assert not mirror.requests, "nothing was asked of the mirror"

        # Allowed by configuration, the same manifest installs.
        v3 = _with_image_uri(
            server,
            server.make_manifest(image, "3.0", device_class="test-gw", sequence=v2.sequence + 1),
            body_uri,
        )
        config = device_config(tmp_path, server, allowed_origins=[mirror.uri.upper()])
        async with Client(config, handler=AutoAuthorize()):
            server.announce_raw(v3.raw, v3.sequence)
            await reports.wait_for(v3, ResultCode.SUCCESS)
        assert mirror.image_requests(digest) and path.exists()
        assert config.target is not None and sha(config.target) == digest


def _with_image_uri(server: UpdateServer, published, uri: str):  # type: ignore[no-untyped-def]
    """Re-sign ``published`` with its image URI replaced by an absolute one."""
    import dataclasses

    from fota.core import manifest as mf
    from fota.testing.server import Published

    body = mf.verify(published.raw, TrustStore({KID: KEY.public_key()})).body
    raw = mf.sign(dataclasses.replace(body, image_uri=uri), KEY, KID)
    digest = mf.verify(raw, TrustStore({KID: KEY.public_key()})).digest  # the manifest's id
    return Published(
        raw, digest, mf.update_id_of(digest), body.sequence, body.image_sha256, published.image_path
    )


async def test_an_announced_location_elsewhere_is_ignored(tmp_path: Path) -> None:
    async with (
        UpdateServer(tmp_path / "srv", KEY, KID) as server,
        UpdateServer(tmp_path / "other", KEY, KID) as other,
    ):
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class="test-gw")
        config = device_config(tmp_path, server)
        async with Client(config, handler=AutoAuthorize()):
            await reports.wait_for(v1, ResultCode.SUCCESS)
            # An unsigned announcement sends the device to another host: it does not go.
            lure = other.make_manifest(os.urandom(4096), "9.0", device_class="test-gw")
            (other.root / "m" / lure.digest.hex()).write_bytes(lure.raw)
            server.announce_body(
                {1: 50, 2: lure.digest, 3: f"{other.uri}/fota/m/{lure.digest.hex()}"}
            )
            # A later, honest announcement is handled after it, in order.
            v2 = server.publish(os.urandom(4096), "2.0", device_class="test-gw", sequence=51)
            await reports.wait_for(v2, ResultCode.SUCCESS)
        assert other.requests == []


def test_allowed_origins_are_checked(tmp_path: Path) -> None:
    base = {
        "server": "coap://127.0.0.1:61616",
        "device_id": "d",
        "device_class": "c",
        "state_dir": tmp_path,
    }
    for bad, message in (
        ("http://mirror", r"allowed_origins\[0\]: 'http://mirror' is not a coap://"),
        ("coap://mirror/fota", "has a path; give the origin"),
    ):
        with pytest.raises(ConfigError, match=message):
            Config(**base, allowed_origins=[bad])  # type: ignore[arg-type]
    config = Config(**base, allowed_origins=["coap://Mirror.example", "coap+tcp://[::1]:61617"])  # type: ignore[arg-type]
    assert config.origins() == (
        "coap://127.0.0.1:61616",
        f"coap://mirror.example:{DEFAULT_PORTS['coap']}",  # the default port, made explicit
        "coap+tcp://[::1]:61617",
    )


# -- a name from the server that climbs out ---------------------------------------------------


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tar_file("../evil", b"x"), "'../evil': refused"),
        (tar_file("payload/../../evil", b"x"), "goes up a directory"),
    ],
    ids=["dot-dot", "nested-dot-dot"],
)
async def test_a_bundle_member_climbing_out_is_refused_reported_and_not_installed(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes], message: str
) -> None:
    root = tmp_path / "app-root"
    root.mkdir()
    async with UpdateServer(tmp_path / "srv", KEY, KID) as server:
        reports = Reports(server, "dev1")
        bundle = make_bundle(
            tmp_path / "bad.tar", recipe(files=U1_FILES), U1_PAYLOAD, extra=[member]
        )
        config = device_config(
            tmp_path,
            server,
            installers={"application": {"kind": "archive", "root": str(root)}},
        )
        async with Client(config, handler=AutoAuthorize()):
            bad = server.publish(
                bundle, "1.0", device_class="test-gw", component=Component.APPLICATION
            )
            report = await reports.wait_for(bad, ResultCode.ROLLED_BACK)
            assert message in report.detail
            cause = [r for r in reports.of(bad) if r.state is State.ROLLING_BACK]
            assert [r.result for r in cause] == [ResultCode.FAILED]
        reports.assert_final(bad, ResultCode.ROLLED_BACK)
    assert list(root.iterdir()) == [], "nothing was installed"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "srv" / "evil").exists()


# -- a tampered image ----------------------------------------------------------------------------


async def test_a_tampered_image_is_refused_reported_and_not_installed(tmp_path: Path) -> None:
    async with UpdateServer(tmp_path / "srv", KEY, KID) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class="test-gw")
        config = device_config(tmp_path, server)
        async with Client(config, handler=AutoAuthorize()) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            image = bytearray(os.urandom(256 * 1024))
            v2 = server.make_manifest(bytes(image), "2.0", device_class="test-gw")
            # Someone between signing and serving flips one byte of fragment 2, for good.
            image[2 * 64 * 1024 + 100] ^= 0x01
            v2.image_path.write_bytes(bytes(image))
            server.announce_raw(v2.raw, v2.sequence)
            refused = await reports.wait_for(v2, ResultCode.INTEGRITY_FAILURE)
            assert "fragment 2" in refused.detail
            assert client.status().installed_version == "1.0"
        reports.assert_final(v2, ResultCode.INTEGRITY_FAILURE)
        assert State.INSTALLING not in [r.state for r in reports.of(v2)]
        assert config.target is not None and sha(config.target) == v1.image_sha256


async def test_a_resumed_download_is_held_to_the_origins_allowed_now(tmp_path: Path) -> None:
    async with (
        UpdateServer(tmp_path / "srv", KEY, KID) as server,
        UpdateServer(tmp_path / "mirror", KEY, KID) as mirror,
    ):
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class="test-gw")
        image = os.urandom(512 * 1024)
        _, digest = mirror.store_image(image)
        v2 = _with_image_uri(
            server,
            server.make_manifest(image, "2.0", device_class="test-gw"),
            f"{mirror.uri}/fota/img/{digest.hex()}",
        )
        mirror.faults.throttle(0.005)  # slow enough to stop it half-way
        started = asyncio.Event()
        mirror.request_hook = lambda r: started.set() if len(mirror.requests) > 20 else None
        allowing = device_config(tmp_path, server, allowed_origins=[mirror.uri])
        async with Client(allowing, handler=AutoAuthorize()):
            await reports.wait_for(v1, ResultCode.SUCCESS)
            server.announce_raw(v2.raw, v2.sequence)
            await asyncio.wait_for(started.wait(), 20)
        # The next start, with the mirror no longer allowed: the resume is refused.
        async with Client(device_config(tmp_path, server), handler=AutoAuthorize()) as client:
            refused = await reports.wait_for(v2, ResultCode.INVALID_URI)
            assert "is not on an allowed origin" in refused.detail
            assert client.status().installed_version == "1.0"
        reports.assert_final(v2, ResultCode.INVALID_URI)
