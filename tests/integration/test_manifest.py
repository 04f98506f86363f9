"""Signed manifests: sign/verify round trips, pycose interop, and one test per refusal.

Every refusal asserts the typed :class:`ManifestError`, its ``kind``, the ``field`` it names, the
result code it reports (numbers written out from docs/protocol.md) and, where a limit was broken,
that the message names the limit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.algorithms import EdDSA, Es256
from pycose.headers import KID, Algorithm
from pycose.keys.curves import P256, Ed25519
from pycose.keys.ec2 import EC2Key
from pycose.keys.okp import OKPKey
from pycose.messages.sign1message import Sign1Message

from fota.core import manifest as mf
from fota.core.manifest import (
    MAX_FRAGMENTS,
    MAX_MANIFEST_BYTES,
    Component,
    Manifest,
    ManifestBody,
    PrivateKey,
    Severity,
    TrustStore,
)
from fota.core.uri import resolve
from fota.errors import FotaError, ManifestError, ResultCode
from fota.testing.server import fragment_digests

# -- keys and helpers ---------------------------------------------------------------------------

# Deterministic keys, so hypothesis runs (derandomized) see the same bytes every time.
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
EC_KEY = ec.derive_private_key(0x1234_5678_9ABC_DEF0, ec.SECP256R1())
OTHER_ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
OTHER_EC_KEY = ec.derive_private_key(0x0FED_CBA9_8765_4321, ec.SECP256R1())
KID_ED = b"ed25519-key-1"
KID_EC = b"p256-key-1"
DEVICE_CLASS = "gw-test"

# Result codes as docs/protocol.md lists them, written out rather than taken from the code.
RESULTS = {
    "bad_signature": 100,
    "unknown_key": 101,
    "rollback": 102,
    "wrong_device_class": 103,
    "oversize": 104,
    "malformed": 105,
}

# Field names of manifest keys 1..13 as the verifier reports them.
FIELDS = {
    1: "format",
    2: "sequence",
    3: "component",
    4: "version",
    5: "device_class",
    6: "image_size",
    7: "image_sha256",
    8: "image_uri",
    9: "fragment_size",
    10: "fragment_sha256",
    11: "polite",
    12: "severity",
    13: "max_deferral",
}

IMAGE = bytes(i * 7 % 251 for i in range(2500))  # 3 fragments of 1024 (the last one short)


def trust() -> TrustStore:
    store = TrustStore({KID_ED: ED_KEY.public_key()})
    store.add(KID_EC, EC_KEY.public_key())
    return store


def digests(image: bytes, fragment_size: int) -> tuple[bytes, ...]:
    parts = [image[i : i + fragment_size] for i in range(0, len(image), fragment_size)]
    return tuple(hashlib.sha256(p).digest() for p in parts) or (hashlib.sha256(b"").digest(),)


def make_body(
    sequence: int = 7, image: bytes = IMAGE, fragment_size: int = 1024, **changes: Any
) -> ManifestBody:
    fields: dict[str, Any] = {
        "sequence": sequence,
        "component": Component.FIRMWARE,
        "version": "1.2.3",
        "device_class": DEVICE_CLASS,
        "image_size": len(image),
        "image_sha256": hashlib.sha256(image).digest(),
        "image_uri": f"../img/{hashlib.sha256(image).hexdigest()}",
        "fragment_size": fragment_size,
        "fragment_sha256": digests(image, fragment_size),
        "polite": True,
        "severity": Severity.MANDATORY,
        "max_deferral": 3600,
    }
    fields.update(changes)
    return ManifestBody(**fields)


def body_map(**changes: Any) -> dict[Any, Any]:
    """The decoded CBOR map of a valid body, for tests that break one key."""
    decoded: dict[Any, Any] = cbor2.loads(make_body(**changes).to_cbor())
    return decoded


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def raw_signature(key: PrivateKey, to_sign: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(to_sign)
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def cose(
    payload: Any,
    *,
    key: PrivateKey = ED_KEY,
    header: Any = None,
    unprotected: Any = None,
    signature: Any = None,
    tag: int | None = 18,
) -> bytes:
    """Build a COSE_Sign1 by hand (independent of ``mf.sign``), signing whatever it is given.

    ``payload`` may be a dict (encoded here) or already-encoded bytes or any other value (put in
    the array as is, to break the structure).
    """
    if isinstance(payload, dict):
        payload = cbor2.dumps(payload)
    if header is None:
        alg = -8 if isinstance(key, ed25519.Ed25519PrivateKey) else -7
        header = {1: alg, 4: KID_ED if alg == -8 else KID_EC}
    protected = header if isinstance(header, bytes) else cbor2.dumps(header)
    if signature is None:
        body = payload if isinstance(payload, bytes) else b""
        signature = raw_signature(key, sig_structure(protected, body))
    parts = [protected, {} if unprotected is None else unprotected, payload, signature]
    return cbor2.dumps(parts if tag is None else cbor2.CBORTag(tag, parts))


def expect_refusal(
    call: Callable[[], object], kind: str, field: str, *limits: object
) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        call()
    err = info.value
    assert (err.kind, err.field) == (kind, field), str(err)
    assert err.result == ResultCode(RESULTS[kind])
    assert int(err.result) == RESULTS[kind]
    assert isinstance(err, FotaError) and not err.retryable
    message = str(err)
    assert field in message
    for limit in limits:
        assert str(limit) in message, f"{message!r} does not name {limit!r}"
    return err


def refuse(raw: bytes, kind: str, field: str, *limits: object, **kw: Any) -> ManifestError:
    """Assert that ``verify`` refuses ``raw`` as (kind, field), naming ``limits``."""
    store = kw.pop("store", None) or trust()
    return expect_refusal(lambda: mf.verify(raw, store, **kw), kind, field, *limits)


def signed(**changes: Any) -> bytes:
    return mf.sign(make_body(**changes), ED_KEY, KID_ED)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- round trips --------------------------------------------------------------------------------

KEYS = [
    pytest.param(ED_KEY, KID_ED, -8, id="ed25519"),
    pytest.param(EC_KEY, KID_EC, -7, id="es256"),
]


@pytest.mark.parametrize(("key", "kid", "alg"), KEYS)
def test_sign_verify_round_trip(key: PrivateKey, kid: bytes, alg: int) -> None:
    body = make_body(polite=False, severity=Severity.CRITICAL, component=Component.APPLICATION)
    raw = mf.sign(body, key, kid)

    outer = cbor2.loads(raw)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == 18
    protected, unprotected, payload, signature = outer.value
    assert cbor2.loads(protected) == {1: alg, 4: kid}
    assert dict(unprotected) == {}
    assert payload == body.to_cbor()
    assert len(signature) == 64  # Ed25519, and ES256 as r || s (RFC 9053 2.1)

    m = mf.verify(raw, trust())
    assert m.body == body
    assert m.raw == raw
    assert m.kid == kid
    assert m.digest == hashlib.sha256(cbor2.dumps([protected, payload])).digest()  # identity
    assert m.update_id == m.digest.hex()[:16]
    assert m.fragment_count == 3
    assert [m.fragment_span(i) for i in range(3)] == [(0, 1024), (1024, 1024), (2048, 452)]
    # accept() adds device class and anti-rollback on top of the same checks.
    assert mf.accept(raw, trust(), device_class=DEVICE_CLASS, installed=None).body == body


def test_trust_store_looks_keys_up_by_kid() -> None:
    raw_ec = mf.sign(make_body(), EC_KEY, KID_EC)
    raw_ed = mf.sign(make_body(), ED_KEY, KID_ED)
    # Decoys first: the store must pick by kid, not try every key.
    store = TrustStore({b"decoy-1": OTHER_ED_KEY.public_key()})
    store.add(b"decoy-2", OTHER_EC_KEY.public_key())
    store.add(KID_EC, EC_KEY.public_key())
    store.add(KID_ED, ED_KEY.public_key())
    assert len(store) == 4
    assert store.get(KID_EC) is not None and store.get(b"nope") is None
    assert mf.verify(raw_ec, store).kid == KID_EC
    assert mf.verify(raw_ed, store).kid == KID_ED
    # The right key under the wrong kid does not help: the kid names the key.
    swapped = TrustStore({KID_EC: ED_KEY.public_key(), KID_ED: EC_KEY.public_key()})
    refuse(raw_ec, "bad_signature", "signature", store=swapped)
    refuse(raw_ed, "bad_signature", "signature", store=swapped)


def test_trust_store_refuses_curves_other_than_p256() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        TrustStore().add(b"k", p384)


def test_trust_store_constructor_refuses_curves_other_than_p256() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        TrustStore({b"k": p384})


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 5000])
def test_manifest_built_like_the_test_server_verifies(tmp_path: Path, size: int) -> None:
    """Fragment digests from ``fragment_digests`` (as UpdateServer builds them) pass the checks."""
    image = bytes(i % 256 for i in range(size))
    path = tmp_path / "image.bin"
    path.write_bytes(image)
    frags = fragment_digests(path, 1024)
    assert frags == digests(image, 1024)
    body = make_body(image=image, fragment_sha256=frags)
    m = mf.verify(mf.sign(body, ED_KEY, KID_ED), trust())
    assert m.fragment_count == max(1, math.ceil(size / 1024))
    assert sum(m.fragment_span(i)[1] for i in range(m.fragment_count)) == size


# -- interop with pycose ------------------------------------------------------------------------


def _pycose_key(key: PrivateKey, *, private: bool) -> Any:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        x = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if not private:
            return OKPKey(crv=Ed25519, x=x)
        d = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return OKPKey(crv=Ed25519, x=x, d=d)
    numbers = key.private_numbers()
    pub = numbers.public_numbers
    x, y = pub.x.to_bytes(32, "big"), pub.y.to_bytes(32, "big")
    if not private:
        return EC2Key(crv=P256, x=x, y=y)
    return EC2Key(crv=P256, x=x, y=y, d=numbers.private_value.to_bytes(32, "big"))


def _pycose_decode(raw: bytes) -> Any:
    """``Sign1Message.decode``, with a fallback for pycose#141.

    pycose 1.1.0 checks ``isinstance(value, list)`` on the tag content, and cbor2 >= 6 decodes
    tag content as a tuple (and maps in it as frozendict): decode fails before any signature
    check. The fallback hands pycose the same four items as the types it expects.
    """
    try:
        return Sign1Message.decode(raw)
    except TypeError:
        outer = cbor2.loads(raw)
        assert isinstance(outer, cbor2.CBORTag) and outer.tag == 18
        protected, unprotected, payload, signature = outer.value
        return Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)


PYCOSE_ALGS = [
    pytest.param(ED_KEY, KID_ED, EdDSA, id="EdDSA"),
    pytest.param(EC_KEY, KID_EC, Es256, id="ES256"),
]


@pytest.mark.parametrize(("key", "kid", "alg"), PYCOSE_ALGS)
def test_manifest_signed_by_pycose_is_accepted(key: PrivateKey, kid: bytes, alg: Any) -> None:
    body = make_body()
    msg = Sign1Message(phdr={Algorithm: alg, KID: kid}, payload=body.to_cbor())
    msg.key = _pycose_key(key, private=True)
    raw = msg.encode(tag=True)
    assert cbor2.loads(raw).tag == 18
    # pycose signs ES256 in either form; fota takes only the low-S one (issue 16 §3).
    raw = _low_s(raw)

    m = mf.verify(raw, trust())
    assert m.body == body and m.kid == kid
    # pycose's signature, tampered, is refused like ours.
    refuse(flip(raw, len(raw) - 1), "bad_signature", "signature")


def _low_s(raw: bytes) -> bytes:
    """``raw`` with an ES256 signature's s put in the low half (Ed25519 unchanged)."""
    outer = cbor2.loads(raw)
    protected, unprotected, payload, signature = outer.value
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    if cbor2.loads(protected)[1] == -7 and int.from_bytes(signature[32:], "big") > n // 2:
        s = n - int.from_bytes(signature[32:], "big")
        signature = signature[:32] + s.to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(18, [protected, dict(unprotected), payload, signature]))


@pytest.mark.parametrize(("key", "kid", "alg"), PYCOSE_ALGS)
def test_manifest_signed_by_fota_verifies_with_pycose(
    key: PrivateKey, kid: bytes, alg: Any
) -> None:
    body = make_body()
    raw = mf.sign(body, key, kid)

    msg = _pycose_decode(raw)
    msg.key = _pycose_key(key, private=False)
    assert msg.verify_signature() is True
    assert msg.phdr == {Algorithm: alg, KID: kid}
    assert msg.payload == body.to_cbor()

    # pycose really checks: a flipped signature byte fails there too.
    bad = _pycose_decode(flip(raw, len(raw) - 1))
    bad.key = _pycose_key(key, private=False)
    assert bad.verify_signature() is False


# -- refusals: signature and key ----------------------------------------------------------------


@pytest.mark.parametrize(("key", "kid", "alg"), KEYS)
@pytest.mark.parametrize("where", [0, 31, 32, 63])
def test_flipped_signature_byte_is_refused(
    key: PrivateKey, kid: bytes, alg: int, where: int
) -> None:
    raw = mf.sign(make_body(), key, kid)
    # The signature is the last 64 bytes of the encoding.
    refuse(flip(raw, len(raw) - 64 + where), "bad_signature", "signature", kid.hex())


@pytest.mark.parametrize(
    ("other", "kid"),
    [
        pytest.param(OTHER_ED_KEY, KID_ED, id="ed25519"),
        pytest.param(OTHER_EC_KEY, KID_EC, id="es256"),
    ],
)
def test_other_key_under_a_trusted_kid_is_refused(other: PrivateKey, kid: bytes) -> None:
    raw = mf.sign(make_body(), other, kid)
    refuse(raw, "bad_signature", "signature", kid.hex())


def test_tampered_payload_or_header_is_refused() -> None:
    raw = signed()
    _, _, payload, signature = cbor2.loads(raw).value
    tampered = bytearray(payload)
    tampered[-1] ^= 0x01  # max_deferral 3600 -> 3601: still a valid body
    refuse(cose(bytes(tampered), signature=signature), "bad_signature", "signature")
    # The kid in the protected header is signed: moving the signature to another kid fails.
    moved = cose(payload, header={1: -7, 4: KID_EC}, signature=signature)
    refuse(moved, "bad_signature", "signature")


def test_alg_that_does_not_match_the_key_type_is_refused() -> None:
    # ES256 named in the header, but the kid belongs to an Ed25519 key.
    raw = cose(make_body().to_cbor(), key=EC_KEY, header={1: -7, 4: KID_ED})
    refuse(raw, "bad_signature", "signature")
    raw = cose(make_body().to_cbor(), key=ED_KEY, header={1: -8, 4: KID_EC})
    refuse(raw, "bad_signature", "signature")


@pytest.mark.parametrize("length", [0, 63, 65])
def test_es256_signature_of_the_wrong_length_is_refused(length: int) -> None:
    raw = cose(make_body().to_cbor(), key=EC_KEY, signature=bytes(range(length)))
    refuse(raw, "bad_signature", "signature")


def test_unknown_kid_is_refused() -> None:
    raw = mf.sign(make_body(), ED_KEY, b"not-in-store")
    refuse(raw, "unknown_key", "kid", b"not-in-store".hex())
    refuse(signed(), "unknown_key", "kid", store=TrustStore({b"x": ED_KEY.public_key()}))


# -- refusals: the device's decisions -----------------------------------------------------------


def _accept(raw: bytes, installed: Manifest | None, pending: Manifest | None = None) -> Manifest:
    return mf.accept(raw, trust(), device_class=DEVICE_CLASS, installed=installed, pending=pending)


def test_rollback_lower_and_equal_sequence_are_refused() -> None:
    installed = mf.verify(signed(sequence=5, version="5.0"), trust())
    err = expect_refusal(
        lambda: _accept(signed(sequence=4), installed), "rollback", "sequence", "4", "5"
    )
    assert "not greater than 5" in str(err)
    # Equal but a different manifest (another version): a replay or downgrade all the same.
    expect_refusal(lambda: _accept(signed(sequence=5), installed), "rollback", "sequence", "5")
    # Even the installed manifest's own bytes are not a new update.
    expect_refusal(lambda: _accept(installed.raw, installed), "rollback", "sequence")
    assert _accept(signed(sequence=6), installed).body.sequence == 6
    assert _accept(signed(sequence=0), None).body.sequence == 0


def test_pending_manifest_again_is_accepted_a_different_one_with_its_sequence_is_not() -> None:
    installed = mf.verify(signed(sequence=5), trust())
    pending = _accept(signed(sequence=8, version="8.0"), installed)

    again = _accept(pending.raw, installed, pending)
    assert again.digest == pending.digest and again.body == pending.body

    conflicting = signed(sequence=8, version="8.0-other")
    assert hashlib.sha256(conflicting).digest() != pending.digest
    expect_refusal(lambda: _accept(conflicting, installed, pending), "rollback", "sequence", "8")
    # Between installed and pending: older than the update in progress.
    expect_refusal(
        lambda: _accept(signed(sequence=7), installed, pending), "rollback", "sequence", "8"
    )
    assert _accept(signed(sequence=9), installed, pending).body.sequence == 9


def test_wrong_device_class_is_refused() -> None:
    raw = signed(device_class="other-class")
    err = expect_refusal(lambda: _accept(raw, None), "wrong_device_class", "device_class")
    assert "other-class" in str(err) and DEVICE_CLASS in str(err)
    # verify() alone does not know the device; it accepts the manifest.
    assert mf.verify(raw, trust()).body.device_class == "other-class"


# -- refusals: oversize -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\xff" * (MAX_MANIFEST_BYTES + 1), id="not-cbor"),
        pytest.param(b"\xd2" + b"\x84" * MAX_MANIFEST_BYTES, id="deeply-nested"),
        pytest.param(signed() + bytes(MAX_MANIFEST_BYTES), id="valid-prefix"),
    ],
)
def test_oversize_bytes_are_refused_before_decoding(raw: bytes) -> None:
    assert len(raw) > MAX_MANIFEST_BYTES
    refuse(raw, "oversize", "bytes", MAX_MANIFEST_BYTES, len(raw))


def _padded_to(total: int) -> bytes:
    """A valid signed manifest of exactly ``total`` bytes (padding in extension key 1000)."""
    pad = total - 400
    for _ in range(10):
        raw = cose({**body_map(), 1000: bytes(pad)})
        if len(raw) == total:
            return raw
        pad += total - len(raw)
    raise AssertionError("could not hit the exact size")


def test_manifest_of_exactly_the_byte_limit_is_accepted() -> None:
    raw = _padded_to(MAX_MANIFEST_BYTES)
    assert len(raw) == MAX_MANIFEST_BYTES
    assert mf.verify(raw, trust()).raw == raw
    refuse(_padded_to(MAX_MANIFEST_BYTES + 1), "oversize", "bytes", MAX_MANIFEST_BYTES)


def test_image_over_max_image_size_is_refused() -> None:
    raw = signed()
    refuse(raw, "oversize", "image_size", 2499, len(IMAGE), max_image_size=2499)
    assert mf.verify(raw, trust(), max_image_size=len(IMAGE)).body.image_size == len(IMAGE)
    expect_refusal(
        lambda: mf.accept(
            raw, trust(), device_class=DEVICE_CLASS, installed=None, max_image_size=100
        ),
        "oversize",
        "image_size",
        "100",
    )


def test_more_than_max_fragments_is_refused() -> None:
    count = MAX_FRAGMENTS + 1
    image_size = count * 1024
    big = {**body_map(), 6: image_size, 10: [bytes(32)] * count}
    # The payload check on its own (a full manifest this size is over MAX_MANIFEST_BYTES) ...
    expect_refusal(
        lambda: mf.decode_body(cbor2.dumps(big), max_image_size=1 << 40),
        "oversize",
        "fragment_sha256",
        MAX_FRAGMENTS,
        count,
    )
    # ... and through verify(): the count is checked before each digest's length.
    short = {**big, 10: [b""] * count}
    refuse(cose(short), "oversize", "fragment_sha256", MAX_FRAGMENTS)


def test_manifest_with_max_fragments_fits_the_byte_limit() -> None:
    body = ManifestBody(
        sequence=1,
        component=Component.FIRMWARE,
        version="1",
        device_class=DEVICE_CLASS,
        image_size=MAX_FRAGMENTS * 1024,
        image_sha256=bytes(32),
        image_uri="../img/x",
        fragment_size=1024,
        fragment_sha256=(bytes(32),) * MAX_FRAGMENTS,
    )
    assert mf.verify(mf.sign(body, ED_KEY, KID_ED), trust()).fragment_count == MAX_FRAGMENTS


# -- refusals: malformed COSE -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff", b"\x1c", b"\x5f\x00", b"\xd2", b"\x84", b"\xa1\x01", b"\x7f\x41\x00\xff"],
    ids=lambda r: r.hex() or "empty",
)
def test_not_cbor_is_refused(raw: bytes) -> None:
    refuse(raw, "malformed", "cose_sign1", "not valid CBOR")


@pytest.mark.parametrize(("key", "kid", "alg"), KEYS)
def test_truncated_manifest_is_refused_at_every_cut(key: PrivateKey, kid: bytes, alg: int) -> None:
    raw = mf.sign(make_body(), key, kid)
    for cut in range(len(raw)):
        refuse(raw[:cut], "malformed", "cose_sign1")


def test_untagged_array_is_refused() -> None:
    raw = cose(make_body().to_cbor(), tag=None)
    refuse(raw, "malformed", "cose_sign1", "tag 18")


@pytest.mark.parametrize("tag", [98, 17, 16, 61, 19])
def test_wrong_tag_is_refused(tag: int) -> None:
    refuse(cose(make_body().to_cbor(), tag=tag), "malformed", "cose_sign1", "tag 18")


@pytest.mark.parametrize("count", [0, 3, 5])
def test_array_of_other_than_four_elements_is_refused(count: int) -> None:
    good = list(cbor2.loads(signed()).value)
    items = [*good, b"extra"][:count]
    refuse(cbor2.dumps(cbor2.CBORTag(18, items)), "malformed", "cose_sign1", "4 elements")


def test_tag_around_a_map_is_refused() -> None:
    refuse(cbor2.dumps(cbor2.CBORTag(18, {1: 2})), "malformed", "cose_sign1", "4 elements")


@pytest.mark.parametrize(
    "payload", [None, "text", {1: 1}, [b"x"], 7], ids=["detached", "text", "map", "array", "int"]
)
def test_payload_that_is_not_bytes_is_refused(payload: Any) -> None:
    protected = cbor2.dumps({1: -8, 4: KID_ED})
    raw = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, bytes(64)]))
    refuse(raw, "malformed", "payload", "byte string")


def test_other_structural_fields_are_checked() -> None:
    body = make_body().to_cbor()
    refuse(cose(body, header={1: -8, 4: KID_ED}, unprotected=[]), "malformed", "unprotected")
    refuse(cose(body, signature="sig"), "malformed", "signature", "byte string")
    refuse(cose(body, header=cbor2.dumps([1, -8])), "malformed", "protected", "map")
    refuse(cose(body, header=b"\xff"), "malformed", "protected", "not valid CBOR")
    parts = list(cbor2.loads(signed()).value)
    parts[0] = cbor2.loads(parts[0])  # a map where the protected bytes belong
    refuse(cbor2.dumps(cbor2.CBORTag(18, parts)), "malformed", "protected", "byte string")


@pytest.mark.parametrize(
    "alg",
    [-35, -257, -9, 1, 0, "EdDSA", None, True, b"\xf8"],
    ids=lambda a: repr(a),
)
def test_alg_other_than_eddsa_or_es256_is_refused(alg: Any) -> None:
    header = {1: alg, 4: KID_ED} if alg is not None else {4: KID_ED}
    raw = cose(make_body().to_cbor(), header=header)
    refuse(raw, "malformed", "alg", "-8", "-7")


def test_empty_protected_header_is_refused_for_its_missing_alg() -> None:
    refuse(cose(make_body().to_cbor(), header=b""), "malformed", "alg", "-8", "-7")


@pytest.mark.parametrize("kid", [None, b"", b"k" * 65, "text-kid", 7])
def test_kid_missing_or_out_of_range_is_refused(kid: Any) -> None:
    header = {1: -8} if kid is None else {1: -8, 4: kid}
    refuse(cose(make_body().to_cbor(), header=header), "malformed", "kid", "1 to 64")


def test_kid_of_64_bytes_is_accepted() -> None:
    kid = b"k" * 64
    store = TrustStore({kid: ED_KEY.public_key()})
    assert mf.verify(mf.sign(make_body(), ED_KEY, kid), store).kid == kid


def test_huge_integer_alg_is_refused_as_malformed() -> None:
    raw = cose(make_body().to_cbor(), header={1: 10**5000, 4: KID_ED}, signature=bytes(64))
    assert len(raw) < MAX_MANIFEST_BYTES
    refuse(raw, "malformed", "alg")


def test_bytes_after_the_cose_sign1_are_refused() -> None:
    refuse(signed() + b"\x00", "malformed", "cose_sign1")


# -- refusals: malformed body -------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_missing_required_key_is_refused(key: int) -> None:
    broken = body_map()
    del broken[key]
    refuse(cose(broken), "malformed", FIELDS[key], "missing")


# One value of a wrong type per key, and what the message says is expected.
WRONG_TYPES = [
    (1, "1", "int"),
    (2, "7", "int"),
    (3, b"\x00", "int"),
    (4, 123, "str"),
    (5, b"gw-test", "str"),
    (6, "2500", "int"),
    (7, "00" * 32, "bytes"),
    (8, b"../img/x", "str"),
    (9, 1024.0, "int"),
    (10, b"\x00" * 32, "list"),
    (11, 1, "bool"),
    (12, None, "int"),
    (13, [3600], "int"),
]


@pytest.mark.parametrize(("key", "value", "expected"), WRONG_TYPES)
def test_wrong_type_for_a_key_is_refused(key: int, value: Any, expected: str) -> None:
    refuse(cose({**body_map(), key: value}), "malformed", FIELDS[key], f"expected {expected}")


@pytest.mark.parametrize("key", [1, 2, 3, 6, 9, 12, 13])
@pytest.mark.parametrize("value", [True, False])
def test_bool_where_an_int_belongs_is_refused(key: int, value: bool) -> None:
    refuse(cose({**body_map(), key: value}), "malformed", FIELDS[key], "expected int")


@pytest.mark.parametrize("key", [2, 6, 13])
def test_negative_number_is_refused(key: int) -> None:
    refuse(cose({**body_map(), key: -1}), "malformed", FIELDS[key], "negative")


@pytest.mark.parametrize(
    ("key", "value", "field", "limit"),
    [
        (1, 2, "format", "1"),
        (3, 3, "component", "[0, 1, 2]"),
        (12, 3, "severity", "[0, 1, 2]"),
        (4, "", "version", "1..64"),
        (4, "v" * 65, "version", "1..64"),
        (5, "", "device_class", "1..64"),
        (5, "c" * 65, "device_class", "1..64"),
        (4, "2.0\x00; rm -rf /", "version", "control characters"),
        (4, "2.0\n", "version", "control characters"),
        (5, "gw\x1b[31m", "device_class", "control characters"),
        (7, bytes(31), "image_sha256", "32 bytes"),
        (7, bytes(33), "image_sha256", "32 bytes"),
    ],
)
def test_value_out_of_range_is_refused(key: int, value: Any, field: str, limit: str) -> None:
    refuse(cose({**body_map(), key: value}), "malformed", field, limit)


def test_texts_of_the_maximum_length_are_accepted() -> None:
    body = make_body(version="v" * 64, device_class="c" * 64)
    assert mf.verify(mf.sign(body, ED_KEY, KID_ED), trust()).body == body


def test_version_limit_counts_utf8_bytes() -> None:
    refuse(signed(version="é" * 64), "malformed", "version", "64")


@pytest.mark.parametrize("key", [15, 0, 999, 65536, -1])
def test_unknown_key_outside_the_extension_range_is_refused(key: int) -> None:
    refuse(cose({**body_map(), key: 1}), "malformed", f"key {key}", "1000..65535")


def test_non_integer_key_is_refused() -> None:
    refuse(cose({**body_map(), "x": 1}), "malformed", "key 'x'", "integers")
    refuse(cose({**body_map(), 2.5: 1}), "malformed", "key 2.5", "integers")


@pytest.mark.parametrize("key", [1000, 4242, 65535])
def test_extension_key_is_accepted_and_ignored(key: int) -> None:
    raw = cose({**body_map(), key: {"anything": [1, 2.5, None]}})
    assert mf.verify(raw, trust()).body == make_body()


@pytest.mark.parametrize(
    ("frags", "expected"),
    [(2, 3), (4, 3), (0, 3)],
    ids=["too-few", "too-many", "none"],
)
def test_fragment_count_mismatch_is_refused(frags: int, expected: int) -> None:
    broken = {**body_map(), 10: [bytes(32)] * frags}
    refuse(cose(broken), "malformed", "fragment_sha256", f"has {frags}", f"needs {expected}")


def test_fragment_digest_of_the_wrong_length_is_refused() -> None:
    broken = {**body_map(), 10: [bytes(32), bytes(31), bytes(32)]}
    refuse(cose(broken), "malformed", "fragment_sha256", "32 bytes")
    broken = {**body_map(), 10: [bytes(32), "x" * 32, bytes(32)]}
    refuse(cose(broken), "malformed", "fragment_sha256", "32 bytes")


@pytest.mark.parametrize("size", [0, 1, 512, 1000, 1536, 4095, (1 << 20) + 1024, 1 << 21])
def test_fragment_size_not_a_multiple_of_1024_or_over_1_mib_is_refused(size: int) -> None:
    broken = {**body_map(), 9: size}
    refuse(cose(broken), "malformed", "fragment_size", "1024", str(1 << 20))


@pytest.mark.parametrize("size", [1024, 2048, 1 << 20])
def test_fragment_sizes_that_are_accepted(size: int) -> None:
    body = make_body(fragment_size=size)
    assert mf.verify(mf.sign(body, ED_KEY, KID_ED), trust()).body.fragment_size == size


@pytest.mark.parametrize(
    ("uri", "limit"),
    [
        ("http://example.com/img", "coap"),
        ("https://example.com/img", "coap+tcp"),
        ("coaps://example.com/img", "coap"),
        ("file:/etc/passwd", "coap"),
        ("../img/" + "x" * 249, "255"),
        ("", "255"),
        ("../img/a b", "spaces"),
        ("../img/\u00e9", "non-ASCII"),
    ],
)
def test_bad_image_uri_is_refused(uri: str, limit: str) -> None:
    refuse(cose({**body_map(), 8: uri}), "malformed", "image_uri", limit)


@pytest.mark.parametrize(
    "uri",
    ["../img/" + "x" * 248, "coap://h/img", "coap+tcp://[::1]:61616/img", "/fota/img/x", "x"],
)
def test_good_image_uris_are_accepted(uri: str) -> None:
    assert len(uri) <= 255
    assert mf.verify(cose({**body_map(), 8: uri}), trust()).body.image_uri == uri


# -- no other exception, whatever the bytes -----------------------------------------------------


def _verify_or_refuse(raw: bytes) -> None:
    try:
        mf.verify(raw, trust())
    except ManifestError as err:
        assert err.kind in RESULTS and err.result == RESULTS[err.kind]


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_manifest_error(raw: bytes) -> None:
    _verify_or_refuse(raw)
    _verify_or_refuse(b"\xd2\x84" + raw)  # past the tag and array header


VALID = {"ed": mf.sign(make_body(), ED_KEY, KID_ED), "ec": mf.sign(make_body(), EC_KEY, KID_EC)}

_EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(min_value=0),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.sampled_from(sorted(VALID)), _EDITS, st.integers(min_value=0))
def test_mutated_manifest_raises_only_manifest_error(
    which: str, edits: list[tuple[str, int, int]], cut: int
) -> None:
    data = bytearray(VALID[which])
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
    _verify_or_refuse(bytes(data))
    _verify_or_refuse(bytes(data[: cut % (len(data) + 1)]))


_CBOR_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=70)
)
_CBOR = st.recursive(
    _CBOR_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-3, 20) | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(derandomize=True, deadline=None, max_examples=300)
@given(st.dictionaries(st.integers(min_value=-2, max_value=16) | st.just(1000), _CBOR), st.data())
def test_signed_random_bodies_raise_only_manifest_error(
    changes: dict[int, Any], data: st.DataObject
) -> None:
    """Bodies that pass the signature check reach every field check of decode_body."""
    broken = {**body_map(), **changes}
    for key in data.draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2)):
        broken.pop(key, None)
    _verify_or_refuse(cose(broken))


# -- URI references -----------------------------------------------------------------------------

MANIFEST_URI = "coap://127.0.0.1:1234/fota/m/abc"


@pytest.mark.parametrize(
    ("base", "ref", "expected"),
    [
        (MANIFEST_URI, "../img/x", "coap://127.0.0.1:1234/fota/img/x"),
        (MANIFEST_URI, "../img/x?v=2", "coap://127.0.0.1:1234/fota/img/x?v=2"),
        (MANIFEST_URI, "x", "coap://127.0.0.1:1234/fota/m/x"),
        (MANIFEST_URI, "./x", "coap://127.0.0.1:1234/fota/m/x"),
        (MANIFEST_URI, "../../../../x", "coap://127.0.0.1:1234/x"),
        (MANIFEST_URI, "/fota/img/x", "coap://127.0.0.1:1234/fota/img/x"),
        (MANIFEST_URI, "//192.0.2.1:61616/img/x", "coap://192.0.2.1:61616/img/x"),
        (MANIFEST_URI, "coap://example.org/img/x", "coap://example.org/img/x"),
        (MANIFEST_URI, "coap+tcp://example.org:61616/img", "coap+tcp://example.org:61616/img"),
        ("coap+tcp://[::1]:61616/fota/m/abc", "../img/x", "coap+tcp://[::1]:61616/fota/img/x"),
        ("coap+tcp://[::1]:61616/fota/m/abc", "/a/b", "coap+tcp://[::1]:61616/a/b"),
        ("coap+tcp://[::1]:61616/fota/m/abc", "//h/a", "coap+tcp://h/a"),
        ("coap://[::1]/fota/ann/dev1", "../m/ab12", "coap://[::1]/fota/m/ab12"),
        ("coap://h:9", "../img/x", "coap://h:9/img/x"),
    ],
)
def test_resolve_uri_reference(base: str, ref: str, expected: str) -> None:
    assert resolve(base, ref) == expected


def test_resolved_image_uri_of_a_verified_manifest() -> None:
    m = mf.verify(signed(), trust())
    sha = hashlib.sha256(IMAGE).hexdigest()
    assert resolve(MANIFEST_URI, m.body.image_uri) == f"coap://127.0.0.1:1234/fota/img/{sha}"
