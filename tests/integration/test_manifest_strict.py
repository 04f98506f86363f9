"""Issue 16 §3: one signed manifest, one identity; strict where the format says strict.

Every envelope here is validly signed by a trusted key: the attack is a lenient or
non-canonical encoding, not a forgery. Each test fails on the code before issue 16 §3 (cbor2
decoded bignums into ints, Python equality matched labels, the unprotected map and ``crit``
were ignored, high-S verified, the identity was the SHA-256 of the envelope's bytes).
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fota.core import manifest as mf
from fota.core.manifest import Component, ManifestBody, Severity
from fota.core.record import Record
from fota.core.states import State
from fota.core.uri import dot_segment, path_segments, resolve
from fota.errors import ManifestError, PermanentServerError
from fota.journal import RECORD_NAME, Journal
from fota.transport.coap import CoapTransport
from fota.transport.tcp import TcpFetcher
from fota.transport.window import WindowFetcher

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
ED = ed25519.Ed25519PrivateKey.generate()
ED_KID = b"ed-key"
EC = ec.generate_private_key(ec.SECP256R1())
EC_KID = b"ec-key"
TRUST = mf.TrustStore({ED_KID: ED.public_key(), EC_KID: EC.public_key()})
DOT_URI = "../img/%2e%2e/%2E%2E/etc/passwd"


def body(**changes: Any) -> ManifestBody:
    fields: dict[str, Any] = {
        "sequence": 7,
        "component": Component.FIRMWARE,
        "version": "2.0",
        "device_class": "gw",
        "image_size": 2048,
        "image_sha256": b"\x11" * 32,
        "image_uri": "../img/11",
        "fragment_size": 1024,
        "fragment_sha256": (b"\x22" * 32, b"\x33" * 32),
        "polite": True,
        "severity": Severity.OPTIONAL,
        "max_deferral": 0,
        "deadline": None,
    }
    return ManifestBody(**(fields | changes))


def signature(protected: bytes, data: bytes, key: Any, *, high_s: bool = False) -> bytes:
    to_sign = cbor2.dumps(["Signature1", protected, b"", data])
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(to_sign)
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    s = min(s, N - s)
    if high_s:
        s = N - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def envelope(
    header: Any = None,
    data: bytes | None = None,
    *,
    key: Any = ED,
    unprotected: Any = None,
    high_s: bool = False,
    protected: bytes | None = None,
) -> bytes:
    """A tagged COSE_Sign1, validly signed over whatever ``header`` and ``data`` are."""
    if protected is None:
        kid = EC_KID if isinstance(key, ec.EllipticCurvePrivateKey) else ED_KID
        alg = -7 if isinstance(key, ec.EllipticCurvePrivateKey) else -8
        protected = cbor2.dumps({1: alg, 4: kid} if header is None else header)
    data = body().to_cbor() if data is None else data
    sig = signature(protected, data, key, high_s=high_s)
    parts = [protected, {} if unprotected is None else unprotected, data, sig]
    return cbor2.dumps(cbor2.CBORTag(18, parts))


def refused(raw: bytes, kind: str, field: str, words: str = "") -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        mf.accept(raw, TRUST, device_class="gw", installed=None)
    assert (caught.value.kind, caught.value.field) == (kind, field), str(caught.value)
    assert words in str(caught.value)
    return caught.value


def test_the_envelope_builder_makes_acceptable_manifests() -> None:
    # So every refusal below is the one change each test makes.
    for key in (ED, EC):
        assert mf.accept(envelope(key=key), TRUST, device_class="gw", installed=None).body == body()


# -- uint means CBOR major type 0 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name"),
    [(2, "sequence"), (6, "image_size"), (9, "fragment_size"), (13, "max_deferral"),
     (14, "deadline"), (3, "component"), (12, "severity"), (1, "format")],
)  # fmt: skip
def test_a_bignum_is_not_a_uint_even_holding_a_small_number(key: int, name: str) -> None:
    value = int(cbor2.loads(body(deadline=5).to_cbor())[key])
    # The same number, as a tag 2 bignum: cbor2 (and the code before) read it as that int.
    small = cbor2.CBORTag(2, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))
    refused(envelope(data=_with(key, small)), "malformed", name, "bignum")


def _with(key: int, value: Any) -> bytes:
    """The body's CBOR (with a deadline) with the value under ``key`` replaced as it is."""
    as_map = cbor2.loads(body(deadline=5).to_cbor())
    as_map[key] = value
    return cbor2.dumps(as_map)


def test_a_negative_bignum_is_not_a_uint() -> None:
    refused(envelope(data=_with(2, cbor2.CBORTag(3, b"\x00"))), "malformed", "sequence", "bignum")


@pytest.mark.parametrize(
    "value", [True, False, 7.0, cbor2.CBORSimpleValue(7), None, cbor2.undefined]
)
def test_bool_float_simple_null_are_not_a_uint(value: Any) -> None:
    refused(envelope(data=_with(2, value)), "malformed", "sequence", "expected int")


def test_a_bignum_map_key_is_not_an_integer_key() -> None:
    as_map = cbor2.loads(body().to_cbor())
    as_map[cbor2.CBORTag(2, b"\x03\xe8")] = 1  # 1000, an extension key, as a bignum
    refused(envelope(data=cbor2.dumps(as_map)), "malformed", "key 2(b'\\x03\\xe8')", "integers")


def test_true_and_one_as_payload_keys_are_a_duplicate() -> None:
    as_map = cbor2.loads(body().to_cbor())
    del as_map[1]
    # {true: 1, 2: ..}: true must not stand in for the format key 1 (nor collide quietly).
    refused(envelope(data=cbor2.dumps({True: 1, **as_map})), "malformed", "key True", "integers")


# -- protected-header labels are ints (major 0/1), matched by type -----------------------------


@pytest.mark.parametrize(
    "header",
    [
        {True: -8, 4: ED_KID},
        {cbor2.CBORSimpleValue(1): -8, 4: ED_KID},
        {1.0: -8, 4: ED_KID},
        {cbor2.CBORTag(2, b"\x01"): -8, 4: ED_KID},
        {1: -8, cbor2.CBORTag(2, b"\x04"): ED_KID},
        {1: -8, 4.0: ED_KID},
    ],
    ids=["true", "simple-1", "float-1.0", "bignum-1", "bignum-4", "float-4.0"],
)
def test_a_label_that_only_equals_an_int_is_refused(header: dict[Any, Any]) -> None:
    refused(envelope(header), "malformed", "protected", "is not an integer")


def test_an_alg_as_a_tag_3_bignum_is_refused() -> None:
    refused(envelope({1: cbor2.CBORTag(3, b"\x07"), 4: ED_KID}), "malformed", "alg")


def test_a_label_the_cddl_does_not_name_is_refused() -> None:
    refused(envelope({1: -8, 4: ED_KID, 3: 0}), "malformed", "protected", "[3]")


# -- crit (RFC 9052 §3.1) ---------------------------------------------------------------------


def test_crit_naming_an_unknown_label_is_refused() -> None:
    refused(envelope({1: -8, 4: ED_KID, 2: [99], 99: 1}), "malformed", "crit", "not understood")


@pytest.mark.parametrize("crit", [[], [5], "x", [True]], ids=["empty", "absent", "text", "true"])
def test_a_crit_that_is_not_an_array_of_present_labels_is_refused(crit: Any) -> None:
    refused(envelope({1: -8, 4: ED_KID, 2: crit}), "malformed", "crit")


def test_crit_naming_understood_labels_is_accepted() -> None:
    raw = envelope({1: -8, 4: ED_KID, 2: [1, 4]})
    assert mf.accept(raw, TRUST, device_class="gw", installed=None).body == body()


# -- the unprotected header is {} -------------------------------------------------------------


@pytest.mark.parametrize(
    "unprotected", [{4: ED_KID}, {1: -8}, {1: -7, 4: EC_KID}, {33: b"x5chain"}]
)
def test_a_non_empty_unprotected_header_is_refused(unprotected: dict[int, Any]) -> None:
    refused(envelope(unprotected=unprotected), "malformed", "unprotected", "must be empty")


# -- ES256: low S only --------------------------------------------------------------------------


def test_high_s_is_refused_and_the_low_s_twin_accepted() -> None:
    protected = cbor2.dumps({1: -7, 4: EC_KID})
    low = envelope(key=EC, protected=protected)
    high = envelope(key=EC, protected=protected, high_s=True)
    outer_low = cbor2.loads(low).value
    refused(high, "bad_signature", "signature", "high-S")
    mf.verify(low, TRUST)
    # Flipping the very signature that verified gives the twin: refused too.
    r, s = outer_low[3][:32], int.from_bytes(outer_low[3][32:], "big")
    twin = cbor2.dumps(
        cbor2.CBORTag(18, [protected, {}, outer_low[2], r + (N - s).to_bytes(32, "big")])
    )
    refused(twin, "bad_signature", "signature", "high-S")


def test_a_stored_high_s_manifest_still_verifies_on_load() -> None:
    # fota signed either form before issue 16 §3: the running image's manifest must load.
    high = envelope(key=EC, high_s=True)
    assert mf.verify(high, TRUST, revoked_ok=True).body == body()


def test_fota_signs_es256_in_the_low_s_form() -> None:
    for _ in range(64):  # half of raw ECDSA signatures are high-S: 64 draws all low
        sig = cbor2.loads(mf.sign(body(), EC, EC_KID)).value[3]
        assert int.from_bytes(sig[32:], "big") <= N // 2


# -- image URIs never put "." or ".." on the wire ---------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [DOT_URI, "../img/%2E", "coap://h/a/.%2e/b", "coap://h/%2e%2E", "img/%2e%2e"],
)
def test_an_image_uri_with_an_encoded_dot_segment_is_invalid(uri: str) -> None:
    refused(envelope(data=body(image_uri=uri).to_cbor()), "invalid_uri", "image_uri", "dot segment")


def test_literal_dot_segments_resolve_away_even_in_an_absolute_uri() -> None:
    assert resolve("coap://h/fota/m/x", "../img/1") == "coap://h/fota/img/1"
    assert resolve("coap://h/fota/m/x", "coap://h/a/../../b/./c") == "coap://h/b/c"
    assert dot_segment("../img/1") is None and dot_segment("a%2eb/c") is None


@pytest.mark.parametrize(
    "uri",
    [
        "coap://127.0.0.1:9/a/%2e%2e/b",
        "coap://127.0.0.1:9/a/./b",
        "coap://127.0.0.1:9/a/../b",
        "coap://127.0.0.1:9/%2E",
    ],
)
def test_no_transport_builds_a_dot_uri_path(uri: str) -> None:
    with pytest.raises(ValueError, match="dot segment"):
        path_segments(uri)
    with pytest.raises(PermanentServerError, match="dot segment"):
        WindowFetcher.for_uri(uri)
    with pytest.raises(PermanentServerError, match="dot segment"):
        TcpFetcher.for_uri("coap+tcp" + uri[len("coap") :])


async def test_the_coap_transport_sends_no_dot_uri_path() -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    port = peer.getsockname()[1]
    transport = CoapTransport(f"coap://127.0.0.1:{port}", "dev1", ack_timeout=0.1)
    try:
        with pytest.raises(PermanentServerError, match="dot segment"):
            await transport.fetch(f"coap://127.0.0.1:{port}/fota/img/%2e%2e/x", limit=100)
    finally:
        await transport.aclose()
        # Refused before any datagram was built: the peer's queue is empty.
        with pytest.raises(BlockingIOError):
            peer.recv(2048)
        peer.close()


# -- one identity -----------------------------------------------------------------------------


def _reencode(raw: bytes) -> bytes:
    """The same COSE_Sign1 with longer CBOR heads: tag 18 in two bytes, the array and every
    byte string's length in a wider head than needed (still well-formed, still signed)."""
    protected, unprotected, data, sig = cbor2.loads(raw).value
    assert dict(unprotected) == {}

    def bstr(b: bytes) -> bytes:
        return b"\x5a" + len(b).to_bytes(4, "big") + b

    return b"\xd8\x12" + b"\x98\x04" + bstr(protected) + b"\xb8\x00" + bstr(data) + bstr(sig)


@pytest.mark.parametrize("key", [ED, EC], ids=["ed25519", "es256"])
def test_a_reencoded_envelope_has_the_same_identity(key: Any) -> None:
    raw = mf.sign(body(), key, EC_KID if key is EC else ED_KID)
    again = _reencode(raw)
    assert again != raw and hashlib.sha256(again).digest() != hashlib.sha256(raw).digest()
    first, second = mf.verify(raw, TRUST), mf.verify(again, TRUST)
    assert first.digest == second.digest and first.update_id == second.update_id
    protected, _, data, _ = cbor2.loads(raw).value
    assert first.digest == hashlib.sha256(cbor2.dumps([protected, data])).digest()
    assert mf.envelope_id(again) == mf.envelope_id(raw) == first.digest
    assert mf.inspect(again)["update_id"] == first.update_id


def test_a_new_ecdsa_signature_keeps_the_identity() -> None:
    one, two = mf.sign(body(), EC, EC_KID), mf.sign(body(), EC, EC_KID)
    assert one != two  # a fresh nonce each time
    assert mf.verify(one, TRUST).digest == mf.verify(two, TRUST).digest


def test_a_pending_update_reencoded_is_the_same_update_not_a_replay() -> None:
    raw = mf.sign(body(), ED, ED_KID)
    pending = mf.verify(raw, TRUST)
    again = mf.accept(_reencode(raw), TRUST, device_class="gw", installed=None, pending=pending)
    assert again.digest == pending.digest


def test_fetched_bytes_are_filed_under_their_identity_only_with_a_good_signature() -> None:
    raw = mf.sign(body(), ED, ED_KID)
    identity = mf.verify(raw, TRUST).digest
    assert mf.fetched_key(raw, TRUST) == mf.fetched_key(_reencode(raw), TRUST) == identity
    # The identity with a bad signature: filed under its own bytes, so refusing it does not
    # refuse the good manifest.
    protected, _, data, _ = cbor2.loads(raw).value
    forged = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, data, bytes(64)]))
    assert mf.envelope_id(forged) == identity
    assert mf.fetched_key(forged, TRUST) == hashlib.sha256(forged).digest()
    high = envelope(key=EC, high_s=True)
    assert mf.fetched_key(high, TRUST) == hashlib.sha256(high).digest()
    # An unknown key's manifest is a property of what was signed: its identity.
    stranger = ed25519.Ed25519PrivateKey.generate()
    unknown = mf.sign(body(), stranger, b"stranger")
    assert mf.fetched_key(unknown, TRUST) == mf.envelope_id(unknown)
    assert mf.fetched_key(b"\xff not cbor", TRUST) == hashlib.sha256(b"\xff not cbor").digest()


# -- the strict decoder ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xbf\x01\x01\xff", "indefinite length"),
        (b"\x5f\x41\x00\xff", "indefinite length"),
        (b"\xa2\xf5\x01\x01\x01", "appears twice"),
        (b"\x81" * 40 + b"\x00", "nested deeper"),
        (b"\xa0\x00", "bytes after"),
        (b"\x62\xff\xfe", "not UTF-8"),
        (b"\xf8\x01", "simple value 1 in two bytes"),
        (b"\x9b" + b"\xff" * 8, "longer than the bytes left"),
        (b"\x1c", "reserved"),
    ],
)
def test_the_strict_decoder_refuses(data: bytes, words: str) -> None:
    with pytest.raises(ManifestError, match=words) as caught:
        mf.decode_body(data, max_image_size=1 << 32)
    assert caught.value.kind == "malformed"


def test_the_strict_decoder_keeps_major_types_apart() -> None:
    item = mf._loads(
        cbor2.dumps([1, -1, True, 1.0, cbor2.CBORSimpleValue(1), cbor2.CBORTag(2, b"\x01")]), "x"
    )
    assert [type(v).__name__ for v in item] == [
        "int",
        "int",
        "bool",
        "CborFloat",
        "CborSimple",
        "CborTag",
    ]
    assert item[3] != 1 and item[4] != 1 and item[5] != 1


def test_extension_values_stay_free() -> None:
    # "* extension-key => any": a float, a tag or a simple value there is ignored, not refused.
    as_map = cbor2.loads(body().to_cbor())
    as_map[1000] = [2.5, cbor2.CBORTag(1, 0), cbor2.CBORSimpleValue(5), {"k": None}]
    raw = envelope(data=cbor2.dumps(as_map))
    assert mf.accept(raw, TRUST, device_class="gw", installed=None).body == body()


# -- journals from before: manifests named by the SHA-256 of their bytes -----------------------


def test_a_journal_naming_manifests_by_their_bytes_loads_and_moves_to_identities(
    tmp_path: Path,
) -> None:
    raw = mf.sign(body(), ED, ED_KID)
    legacy = hashlib.sha256(raw).digest()
    identity = mf.verify(raw, TRUST).digest
    state = tmp_path / "state"
    state.mkdir()
    (state / f"manifest-{legacy.hex()}.cose").write_bytes(raw)
    (state / RECORD_NAME).write_bytes(Record(State.IDLE, installed=legacy).to_bytes())

    journal = Journal(state, TRUST)
    loaded = journal.load()
    assert loaded.installed is not None and loaded.installed.digest == identity
    assert loaded.record.installed == identity
    # Until the next save the old pair stays on disk, consistent.
    assert (state / f"manifest-{legacy.hex()}.cose").exists()
    journal.save(loaded.record, (None, loaded.installed))
    # The previous generation (journal.prev.cbor) still names the old file, and a damaged
    # record falls back to it: the save after the next removes it.
    both = {f"manifest-{legacy.hex()}.cose", f"manifest-{identity.hex()}.cose"}
    assert {p.name for p in state.glob("manifest-*")} == both
    journal.save(loaded.record, (None, loaded.installed))
    assert sorted(p.name for p in state.glob("manifest-*")) == [f"manifest-{identity.hex()}.cose"]
    again = Journal(state, TRUST).load()
    assert again.record.installed == identity and again.installed is not None


def test_an_update_installing_across_the_upgrade_keeps_its_update_id(tmp_path: Path) -> None:
    # fota updating the image it runs in: the new fota finds the update in AWAIT_COMMIT, and
    # the installer's state names the old update id; the commit or rollback must find it.
    raw = mf.sign(body(), ED, ED_KID)
    legacy = hashlib.sha256(raw).digest()
    state = tmp_path / "state"
    state.mkdir()
    (state / f"manifest-{legacy.hex()}.cose").write_bytes(raw)
    (state / RECORD_NAME).write_bytes(Record(State.AWAIT_COMMIT, pending=legacy).to_bytes())

    journal = Journal(state, TRUST)
    loaded = journal.load()
    assert loaded.pending is not None and loaded.record.pending == legacy
    assert loaded.pending.digest == legacy and loaded.pending.update_id == legacy.hex()[:16]
    journal.save(loaded.record, (loaded.pending, None))
    assert Journal(state, TRUST).load().record.pending == legacy
    # Committed, it becomes the installed manifest, and the next load names it by identity.
    journal.save(Record(State.IDLE, installed=legacy), (None, loaded.pending))
    after = Journal(state, TRUST).load()
    assert after.record.installed == mf.verify(raw, TRUST).digest
