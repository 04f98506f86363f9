"""Issue 16 §3 end to end: lenient but validly signed manifests through a real client and server.

Each case announces, through the real :class:`~fota.testing.UpdateServer`, an envelope signed
by a key the device trusts, and asserts the refusal is reported with the documented result
code before any image request. Before issue 16 §3 each was installed (or, for the dot URI,
fetched with ``..`` Uri-Path options on the wire).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fota import Client, Decision, ResultCode, State
from fota.core import manifest as mf
from fota.testing import Published, UpdateServer
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config

pytestmark = pytest.mark.timeout(120)

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
EC = ec.generate_private_key(ec.SECP256R1())
EC_KID = b"ec-key"
DOT_URI = "../img/%2e%2e/%2E%2E/etc/passwd"


def _sign(protected: bytes, payload: bytes, key: Any, *, high_s: bool = False) -> bytes:
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(to_sign)
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    s = N - min(s, N - s) if high_s else min(s, N - s)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclasses.dataclass
class Craft:
    """What a case changes in a validly signed envelope."""

    header: Any = None
    payload: Callable[[dict[int, Any]], None] | None = None
    unprotected: Any = None
    ecdsa_high_s: bool = False


def _set(key: int, value: Any) -> Callable[[dict[int, Any]], None]:
    def change(body: dict[int, Any]) -> None:
        body[key] = value

    return change


def _as_bignum(key: int) -> Callable[[dict[int, Any]], None]:
    def change(body: dict[int, Any]) -> None:
        value = int(body[key])
        body[key] = cbor2.CBORTag(2, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))

    return change


def envelope(good: Published, signing: Signing, craft: Craft) -> bytes:
    """``good``'s body, re-signed (validly) after the case's change."""
    body = cbor2.loads(mf.verify(good.raw, signing.trust).body.to_cbor())
    if craft.payload is not None:
        craft.payload(body)
    payload = cbor2.dumps(body)
    key: Any = EC if craft.ecdsa_high_s else signing.key
    kid = EC_KID if craft.ecdsa_high_s else signing.kid
    header = craft.header(kid) if callable(craft.header) else {1: -7 if key is EC else -8, 4: kid}
    protected = cbor2.dumps(header)
    signature = _sign(protected, payload, key, high_s=craft.ecdsa_high_s)
    unprotected = {} if craft.unprotected is None else craft.unprotected(kid)
    return cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, signature]))


CASES: dict[str, tuple[Craft, ResultCode, str]] = {
    "bignum-sequence": (Craft(payload=_as_bignum(2)), ResultCode.MALFORMED, "sequence"),
    "bignum-image-size": (Craft(payload=_as_bignum(6)), ResultCode.MALFORMED, "image_size"),
    "bignum-max-deferral": (Craft(payload=_as_bignum(13)), ResultCode.MALFORMED, "max_deferral"),
    "label-true": (
        Craft(header=lambda kid: {True: -8, 4: kid}),
        ResultCode.MALFORMED,
        "protected",
    ),
    "label-simple-1": (
        Craft(header=lambda kid: {cbor2.CBORSimpleValue(1): -8, 4: kid}),
        ResultCode.MALFORMED,
        "protected",
    ),
    "label-float-1.0": (
        Craft(header=lambda kid: {1.0: -8, 4: kid}),
        ResultCode.MALFORMED,
        "protected",
    ),
    "label-bignum": (
        Craft(header=lambda kid: {cbor2.CBORTag(2, b"\x01"): -8, 4: kid}),
        ResultCode.MALFORMED,
        "protected",
    ),
    "alg-tag-3-bignum": (
        Craft(header=lambda kid: {1: cbor2.CBORTag(3, b"\x07"), 4: kid}),
        ResultCode.MALFORMED,
        "alg",
    ),
    "crit-unknown-label": (
        Craft(header=lambda kid: {1: -8, 4: kid, 2: [99], 99: 1}),
        ResultCode.MALFORMED,
        "crit",
    ),
    "unprotected-repeats-kid": (
        Craft(unprotected=lambda kid: {4: kid}),
        ResultCode.MALFORMED,
        "unprotected",
    ),
    "unprotected-other-alg": (
        Craft(unprotected=lambda kid: {1: -7}),
        ResultCode.MALFORMED,
        "unprotected",
    ),
    "es256-high-s": (Craft(ecdsa_high_s=True), ResultCode.BAD_SIGNATURE, "signature"),
    "dot-segment-uri": (Craft(payload=_set(8, DOT_URI)), ResultCode.INVALID_URI, "image_uri"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_lenient_envelope_is_refused_before_any_image_request(
    case: str, tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    craft, result, field_name = CASES[case]
    signing.trust.add(EC_KID, EC.public_key())
    handler = RecordingHandler()
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=handler) as client:
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=10)
        await client.wait_for(lambda s: s.installed_version == "1.0" and s.reports_pending == 0, 30)
        good = server.make_manifest(os.urandom(5000), "9.9", device_class=DEVICE_CLASS, sequence=50)
        raw = envelope(good, signing, craft)
        announced = server.announce_raw(raw, 50)
        report = await server.wait_for_report(lambda r: r[4] == result, timeout=30)
        assert report[5] == mf.update_id_of(announced)
        assert report[8].startswith(f"manifest {field_name}:"), report[8]
        status = client.status()
        assert status.state is State.IDLE and status.installed_version == "1.0"
    assert not server.image_requests(good.image_sha256), "no image byte requested"
    assert all(".." not in r.path.split("/") for r in server.requests)
    assert [c for c in handler.calls if c[0] != "complete"] == [], "nobody was asked"
    assert hashlib.sha256(config.target.read_bytes()).digest() == v1.image_sha256  # type: ignore[union-attr]


async def test_a_dot_segment_uri_never_reaches_the_wire(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    # The image URI names another (allowed) origin: a UDP socket that records datagrams.
    # Before issue 16 §3 the client sent it GETs with ".." Uri-Path options.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    origin = f"coap://127.0.0.1:{sink.getsockname()[1]}"
    config = make_config(tmp_path, server, signing, allowed_origins=[origin])
    try:
        async with Client(config, handler=RecordingHandler()) as client:
            server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=10)
            await client.wait_for(lambda s: s.installed_version == "1.0", 30)
            good = server.make_manifest(os.urandom(5000), "9.9", device_class=DEVICE_CLASS)
            body = mf.verify(good.raw, signing.trust).body
            evil = dataclasses.replace(body, image_uri=f"{origin}/img/%2e%2e/%2E%2E/etc/passwd")
            raw = mf.sign(evil, signing.key, signing.kid)
            server.announce_raw(raw, body.sequence)
            report = await server.wait_for_report(lambda r: r[4] == ResultCode.INVALID_URI)
            assert report[8].startswith("manifest image_uri:") and "dot segment" in report[8]
        # Refused at the manifest check, before a download could start: nothing was sent.
        with pytest.raises(BlockingIOError):
            sink.recv(2048)
    finally:
        sink.close()


def _reencode(raw: bytes) -> bytes:
    """The same signed manifest with longer CBOR heads (tag 18 in two bytes, the array and
    each byte string's length in wider heads): other bytes, another SHA-256, same signature."""
    protected, _, payload, signature = cbor2.loads(raw).value

    def bstr(b: bytes) -> bytes:
        return b"\x5a" + len(b).to_bytes(4, "big") + b

    return b"\xd8\x12\x98\x04" + bstr(protected) + b"\xb8\x00" + bstr(payload) + bstr(signature)


def _announce_bytes(server: UpdateServer, raw: bytes, sequence: int) -> bytes:
    """Serve ``raw`` under the SHA-256 of its bytes and announce that (as a hostile or an
    older server would), so the client fetches it whatever identity it has."""
    digest = hashlib.sha256(raw).digest()
    (server.root / "m" / digest.hex()).write_bytes(raw)
    server.announce_body({1: sequence, 2: digest, 3: f"../m/{digest.hex()}"})
    return digest


async def test_a_reencoded_envelope_of_a_cancelled_update_is_still_cancelled(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    handler = RecordingHandler(download=[Decision.pending(), Decision.pending()])
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=handler) as client:
        server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=10)
        await client.wait_for(lambda s: s.installed_version == "1.0" and s.reports_pending == 0, 30)
        v2 = server.publish(os.urandom(5000), "2.0", device_class=DEVICE_CLASS, sequence=20)
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, 30)
        server.cancel(v2.digest)
        await server.wait_for_report(
            lambda r: r[4] == ResultCode.CANCELLED and r[5] == v2.update_id
        )
        await client.wait_for(lambda s: s.state is State.IDLE and s.reports_pending == 0, 30)

        again = _reencode(v2.raw)
        assert again != v2.raw and mf.verify(again, signing.trust).digest == v2.digest
        _announce_bytes(server, again, 21)
        # Fetched (its bytes are new), recognised by its identity, refused as cancelled.
        report = await server.wait_for_report(
            lambda r: r[4] == ResultCode.CANCELLED and "manifest digest:" in r.get(8, "")
        )
        assert report[5] == v2.update_id
        # It is not asked for again: a later manifest is the next thing the handler sees.
        v3 = server.publish(os.urandom(3000), "3.0", device_class=DEVICE_CLASS, sequence=30)
        await client.wait_for(lambda s: s.state is State.AWAIT_DOWNLOAD_AUTH, 30)
        assert client.status().update_id == v3.update_id
    assert [c for c in handler.calls if c[0] == "download"] == [
        ("download", v2.update_id),
        ("download", v3.update_id),
    ]
    assert not server.image_requests(v2.image_sha256)


async def test_a_reencoded_envelope_of_the_running_image_is_not_an_update(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    # The installed manifest under other bytes: known by its identity, not refused, not asked.
    handler = RecordingHandler()
    config = make_config(tmp_path, server, signing)
    async with Client(config, handler=handler) as client:
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS, sequence=10)
        await client.wait_for(lambda s: s.installed_version == "1.0" and s.reports_pending == 0, 30)
        reports = len(server.reports)
        fetched = asyncio.Event()
        again = _reencode(v1.raw)
        path = f"/fota/m/{hashlib.sha256(again).hexdigest()}"
        server.request_hook = lambda r: fetched.set() if r.path == path else None
        _announce_bytes(server, again, 11)
        await asyncio.wait_for(fetched.wait(), 30)
        v2 = server.publish(os.urandom(3000), "2.0", device_class=DEVICE_CLASS, sequence=12)
        await client.wait_for(lambda s: s.installed_version == "2.0" and s.reports_pending == 0, 30)
    # Every report after v1's is about v2: the re-encoded 1.0 was recognised, not refused.
    assert {r.get(5) for r in server.reports[reports:]} == {v2.update_id}


def test_the_es256_helper_here_makes_high_s_signatures() -> None:
    # The high-S case above tests what it says only if the envelope really is high-S.
    protected = cbor2.dumps({1: -7, 4: EC_KID})
    sig = _sign(protected, b"x", EC, high_s=True)
    assert int.from_bytes(sig[32:], "big") > N // 2
