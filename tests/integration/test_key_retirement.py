"""Issue 16 §4: a keyset retires the keys it leaves out, and a root keyset can reset the floor.

Two attacks that worked before:

- Rotation did not retire a configured (factory) key: after a keyset that no longer lists it,
  whoever held that key still signed updates the device installed. Now a key a keyset leaves
  out, configured or not, trusts no new manifest; it still verifies the running image's
  stored manifest, after a restart too.
- A stolen key that signed sequence 2**64-1 blocked every later update for good, revocation
  and rotation notwithstanding (nothing can be greater). Now a keyset signed by a root key may
  carry ``floor-reset`` (key 4): the anti-rollback floor from then on, kept in the journal
  record until the next update commits, applied again at start if a crash came between the
  keyset and the record, and reported.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import AutoAuthorize, Client, Config, ResultCode
from fota.core import keyset as ks
from fota.core.manifest import TrustStore, kid_for
from fota.errors import ManifestError
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import Reports
from fota.trust import Trust
from tests.conftest import DEVICE_CLASS, Signing, make_config

pytestmark = pytest.mark.timeout(90)

MAX = 2**64 - 1


def keypair() -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, kid_for(key.public_key())


ROOT, ROOT_KID = keypair()
A, A_KID = keypair()  # the factory key, configured on the device
B, B_KID = keypair()


def roots() -> TrustStore:
    return TrustStore({ROOT_KID: ROOT.public_key()})


def device_config(tmp_path: Path, server: UpdateServer, **kw: Any) -> Config:
    """A device configured with A (its factory key) and the root key, fresh stores each time."""
    trust = TrustStore({A_KID: A.public_key()})
    return make_config(tmp_path, server, Signing(A, A_KID, trust), trust_roots=roots(), **kw)


RESTARTED = {"poll_interval": 0.2}
"""A restarted client polls: the test server may keep the closed client's observation, and
aiocoap then loses a notification now and then (``'bool' object is not iterable`` in its
pipe); this is about keys and floors, not about observing."""


def image(config: Config) -> bytes:
    assert config.target is not None
    return hashlib.sha256(config.target.read_bytes()).digest()


# -- a configured key a keyset leaves out ------------------------------------------------------


async def test_a_configured_key_a_keyset_leaves_out_signs_no_new_update(tmp_path: Path) -> None:
    async with UpdateServer(tmp_path / "srv", A, A_KID) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        async with Client(device_config(tmp_path, server), handler=AutoAuthorize()) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            # Rotation: keyset 1 lists B only. A is not revoked, just no longer listed.
            server.publish_keyset(ks.sign(1, [(B_KID, B.public_key())], ROOT, ROOT_KID), 1)
            v2 = server.publish(os.urandom(4096), "2.0", device_class=DEVICE_CLASS)  # by A
            await reports.wait_for(v2, ResultCode.UNKNOWN_KEY)
            assert client._engine.trust.version == 1
            assert client.status().installed_version == "1.0"
        assert not server.image_requests(v2.image_sha256), "no byte of A's 2.0 was fetched"

        # A restart: the running image's manifest, signed by A, still loads (and decides
        # politeness and the floor); A still signs nothing new; B does.
        config = device_config(tmp_path, server, **RESTARTED)
        async with Client(config, handler=AutoAuthorize()) as client:
            assert client.status().installed_version == "1.0"
            assert config.trust.get(A_KID) is None
            assert config.trust.get(A_KID, retired=True) is not None
            v3 = server.publish(os.urandom(4096), "3.0", device_class=DEVICE_CLASS)  # by A
            await reports.wait_for(v3, ResultCode.UNKNOWN_KEY)
            v4 = server.publish(
                os.urandom(4096), "4.0", device_class=DEVICE_CLASS, key=B, kid=B_KID
            )
            await reports.wait_for(v4, ResultCode.SUCCESS)
        assert image(config) == v4.image_sha256
        assert not server.image_requests(v3.image_sha256)


def test_a_keyset_listing_the_configured_key_keeps_it(tmp_path: Path) -> None:
    trust = TrustStore({A_KID: A.public_key()})
    device = Trust(trust, roots(), tmp_path)
    device.offer(ks.sign(1, [(A_KID, A.public_key()), (B_KID, B.public_key())], ROOT, ROOT_KID))
    assert trust.get(A_KID) is not None and trust.get(B_KID) is not None
    device.offer(ks.sign(2, [(B_KID, B.public_key())], ROOT, ROOT_KID))
    assert trust.get(A_KID) is None and trust.get(A_KID, retired=True) is not None
    # A fresh process: the configured key comes from the configuration again, and the stored
    # keyset retires it again.
    again = TrustStore({A_KID: A.public_key()})
    Trust(again, roots(), tmp_path).load()
    assert again.get(A_KID) is None and again.get(B_KID) is not None


# -- the floor reset: the codec and the trust store -----------------------------------------------


def test_a_floor_reset_round_trips_and_is_a_uint() -> None:
    keyset = ks.decode(ks.sign(2, [], ROOT, ROOT_KID, floor_reset=MAX), roots())
    assert keyset.floor_reset == MAX
    assert ks.decode(ks.sign(3, [], ROOT, ROOT_KID), roots()).floor_reset is None
    for bad in (-1, MAX + 1, True, 1.0, "7"):
        from fota.core import manifest as mf

        raw = mf.sign_payload(cbor2.dumps({1: 4, 2: [], 4: bad}), ROOT, ROOT_KID)
        with pytest.raises(ManifestError, match=re.escape("keyset floor-reset")) as caught:
            ks.decode(raw, roots())
        assert caught.value.result is ResultCode.MALFORMED


def test_only_a_root_keyset_resets_the_floor(tmp_path: Path) -> None:
    # The thief holds a manifest key, not a root: a keyset it signs is refused whole.
    device = Trust(TrustStore({A_KID: A.public_key()}), roots(), tmp_path)
    with pytest.raises(ManifestError, match="not in the trust store"):
        device.offer(ks.sign(1, [(A_KID, A.public_key())], A, A_KID, floor_reset=0))
    assert device.version == 0 and device.floor_reset is None
    device.offer(ks.sign(1, [(B_KID, B.public_key())], ROOT, ROOT_KID, floor_reset=5))
    assert device.floor_reset == 5


def test_the_documented_cddl_has_the_floor_reset() -> None:
    import pycddl

    text = (Path(__file__).parents[2] / "docs" / "security.md").read_text()
    (block,) = re.findall(r"```cddl\n(.*?)```", text, re.S)
    schema = pycddl.Schema(f"root = keyset\n{block}")
    raw = ks.sign(2, [(B_KID, B.public_key())], ROOT, ROOT_KID, revoked=[A_KID], floor_reset=MAX)
    schema.validate_cbor(cbor2.loads(raw).value[2])
    with pytest.raises(pycddl.ValidationError):
        schema.validate_cbor(cbor2.dumps({1: 1, 2: [], 4: -1}))


# -- the floor reset end to end ------------------------------------------------------------------


def _floor_reports(server: UpdateServer) -> list[dict[int, Any]]:
    return [r for r in server.reports if "anti-rollback floor reset" in r.get(8, "")]


async def test_a_fast_forward_is_recovered_by_a_root_keyset_resetting_the_floor(
    tmp_path: Path,
) -> None:
    async with UpdateServer(tmp_path / "srv", A, A_KID) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=1)
        config = device_config(tmp_path, server)
        async with Client(config, handler=AutoAuthorize()) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            # A is stolen: its thief signs the highest sequence number there is.
            evil = server.publish(
                os.urandom(4096), "6.6.6", device_class=DEVICE_CLASS, sequence=MAX
            )
            await reports.wait_for(evil, ResultCode.SUCCESS)
            # Revocation and rotation alone do not help: nothing is greater than 2**64-1.
            server.publish_keyset(
                ks.sign(1, [(B_KID, B.public_key())], ROOT, ROOT_KID, revoked=[A_KID]), 1
            )
            stuck = server.publish(
                os.urandom(4096), "2.0", device_class=DEVICE_CLASS, sequence=2, key=B, kid=B_KID
            )
            await reports.wait_for(stuck, ResultCode.ROLLBACK)
            # The operator's root keyset 2 resets the floor to the last legitimate number, 1.
            server.publish_keyset(
                ks.sign(2, [(B_KID, B.public_key())], ROOT, ROOT_KID, floor_reset=1), 2
            )
            await server.wait_for_report(lambda r: "anti-rollback floor reset to 1" in r.get(8, ""))
            assert client._engine.model is not None and client._engine.model.record.floor == 1
        # Durable: a restart keeps the floor (the record), and does not report it again.
        config = device_config(tmp_path, server, **RESTARTED)
        async with Client(config, handler=AutoAuthorize()) as client:
            assert client.status().installed_version == "6.6.6"
            assert client._engine.model is not None and client._engine.model.record.floor == 1
            # A manifest not above the floor is still refused...
            low = server.publish(
                os.urandom(4096), "1.1", device_class=DEVICE_CLASS, sequence=1, key=B, kid=B_KID
            )
            await reports.wait_for(low, ResultCode.ROLLBACK)
            # ... and a normal next update installs.
            v3 = server.publish(
                os.urandom(4096), "3.0", device_class=DEVICE_CLASS, sequence=3, key=B, kid=B_KID
            )
            await reports.wait_for(v3, ResultCode.SUCCESS)
            # Its number is the floor now: the reset is spent.
            assert client._engine.model.record.floor is None
            replay = server.publish(
                os.urandom(4096), "2.5", device_class=DEVICE_CLASS, sequence=2, key=B, kid=B_KID
            )
            await reports.wait_for(replay, ResultCode.ROLLBACK)
        assert image(config) == v3.image_sha256
        assert len(_floor_reports(server)) == 1
        assert not server.image_requests(stuck.image_sha256)


async def test_a_floor_reset_stored_but_not_journaled_is_applied_at_start(tmp_path: Path) -> None:
    async with UpdateServer(tmp_path / "srv", A, A_KID) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=MAX)
        config = device_config(tmp_path, server)
        async with Client(config, handler=AutoAuthorize()):
            await reports.wait_for(v1, ResultCode.SUCCESS)
        # A power cut after fota.trust stored the keyset, before the record noted it: the
        # keyset is on disk, the record knows nothing of it.
        Trust(TrustStore({A_KID: A.public_key()}), roots(), config.state_dir).offer(
            ks.sign(1, [(B_KID, B.public_key())], ROOT, ROOT_KID, revoked=[A_KID], floor_reset=7)
        )
        config = device_config(tmp_path, server, **RESTARTED)
        async with Client(config, handler=AutoAuthorize()) as client:
            await server.wait_for_report(lambda r: "anti-rollback floor reset to 7" in r.get(8, ""))
            assert client._engine.model is not None
            assert (
                client._engine.model.record.floor,
                client._engine.model.record.keyset_version,
            ) == (
                7,
                1,
            )
            v2 = server.publish(
                os.urandom(4096), "2.0", device_class=DEVICE_CLASS, sequence=8, key=B, kid=B_KID
            )
            await reports.wait_for(v2, ResultCode.SUCCESS)
        assert image(config) == v2.image_sha256
