"""Signed announcements and freshness (issue 16 §5): the codec and the decision, pure.

``fota.core.announce_sig`` splits a signed announcement, and decides whether the device takes
it (signature by a trusted key, expiry against the wall clock, no replay of an older one) and
whether it renews freshness. End to end, through a real client and the real test server:
tests/e2e/test_freshness_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import Config
from fota.core import announce_sig as sig
from fota.core import manifest as mf
from fota.core.manifest import TrustStore, kid_for
from fota.errors import ConfigError, ManifestError
from fota.transport.coap import CF_CBOR, CF_COSE_SIGN1, _parse_announcement

KEY = ed25519.Ed25519PrivateKey.generate()
KID = kid_for(KEY.public_key())
OTHER = ed25519.Ed25519PrivateKey.generate()
OTHER_KID = kid_for(OTHER.public_key())
NOW = 1_800_000_000
BASE = "coap://127.0.0.1:61616/fota/ann/dev1"
DIGEST = bytes(range(32))
BODY = {1: 7, 2: DIGEST, 3: f"../m/{DIGEST.hex()}"}


def trust() -> TrustStore:
    return TrustStore({KID: KEY.public_key()})


def signed(body: dict[int, object] = BODY, issued: int = NOW, lifetime: int = 3600) -> bytes:
    return sig.sign(body, KEY, KID, issued, issued + lifetime)


def envelope(raw: bytes) -> sig.Envelope:
    return sig.open_envelope(raw)[0]


def resign(payload: bytes, key: ed25519.Ed25519PrivateKey = KEY, kid: bytes = KID) -> bytes:
    """Any payload bytes, signed by ``key`` (a forger's or a broken server's encoding)."""
    return mf.sign_payload(payload, key, kid)


# -- the codec --------------------------------------------------------------------------------


def test_a_signed_announcement_opens_to_its_fields_and_times() -> None:
    env, body = sig.open_envelope(signed())
    assert (env.issued_at, env.expires) == (NOW, NOW + 3600)
    assert {k: body[k] for k in (1, 2, 3)} == BODY


def test_the_transport_decodes_a_signed_announcement_from_its_payload() -> None:
    ann = _parse_announcement(signed(), CF_COSE_SIGN1, BASE)
    assert ann.sequence == 7 and ann.manifest_digest == DIGEST
    assert ann.manifest_uri == f"coap://127.0.0.1:61616/fota/m/{DIGEST.hex()}"
    assert ann.signed is not None and ann.signed.expires == NOW + 3600
    unsigned = _parse_announcement(cbor2.dumps(BODY), CF_CBOR, BASE)
    assert unsigned.signed is None and unsigned.manifest_digest == DIGEST


def test_cose_content_format_without_a_cose_sign1_is_unusable() -> None:
    with pytest.raises(ValueError, match="not a COSE_Sign1"):
        _parse_announcement(cbor2.dumps(BODY), CF_COSE_SIGN1, BASE)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        pytest.param(cbor2.dumps({**BODY, 8: NOW + 60}), "issued_at", id="no-issued-at"),
        pytest.param(cbor2.dumps({**BODY, 7: NOW}), "expires", id="no-expiry"),
        pytest.param(cbor2.dumps({**BODY, 7: NOW, 8: NOW}), "not after", id="expires-at-issue"),
        pytest.param(cbor2.dumps({**BODY, 7: -1, 8: NOW}), "issued_at", id="negative"),
        pytest.param(cbor2.dumps({**BODY, 7: NOW, 8: 1 << 40}), "expires", id="past-2**40"),
        pytest.param(cbor2.dumps({**BODY, 7: True, 8: NOW}), "issued_at", id="bool"),
        pytest.param(cbor2.dumps([1, 2]), "expected a map", id="not-a-map"),
        # A uint is major type 0: 7 as a bignum (tag 2) is refused, though it decodes to 7.
        pytest.param(
            cbor2.dumps({**BODY, 7: NOW, 8: NOW + 60})[:-5] + b"\xc2\x44" + (NOW + 60).to_bytes(4),
            "preferred serialization",
            id="bignum-expiry",
        ),
        # The same map with a non-minimal integer (1 as 0x18 0x01).
        pytest.param(
            b"\xa5\x01\x18\x07" + cbor2.dumps({2: DIGEST, 3: BODY[3], 7: NOW, 8: NOW + 60})[1:],
            "preferred serialization",
            id="non-minimal-uint",
        ),
    ],
)
def test_malformed_signed_payloads_are_refused_naming_the_field(payload: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as caught:
        sig.open_envelope(resign(payload))
    assert caught.value.kind == "malformed"


def test_the_bignum_case_really_is_a_bignum_that_decodes_to_the_same_number() -> None:
    # The bignum case above must differ only in encoding, or it would not test the rule.
    raw = cbor2.dumps({**BODY, 7: NOW, 8: NOW + 60})[:-5] + b"\xc2\x44" + (NOW + 60).to_bytes(4)
    assert cbor2.loads(raw) == {**BODY, 7: NOW, 8: NOW + 60}
    assert raw != cbor2.dumps({**BODY, 7: NOW, 8: NOW + 60})


def test_an_oversize_signed_announcement_is_refused_before_decoding() -> None:
    raw = signed({**BODY, 1000: "x" * 2000})
    with pytest.raises(ManifestError, match="1024") as caught:
        sig.open_envelope(raw)
    assert caught.value.kind == "oversize"


# -- the decision --------------------------------------------------------------------------------


def test_a_fresh_signed_announcement_is_taken_and_renews_freshness() -> None:
    verdict = sig.check(envelope(signed()), trust(), required=True, now=NOW + 10, newest=None)
    assert verdict == sig.Verdict(None, fresh=True, issued_at=NOW, kid=KID)


def test_unsigned_is_ignored_when_required_and_taken_otherwise() -> None:
    refused = sig.check(None, trust(), required=True, now=NOW, newest=None)
    assert refused.reason is not None and "unsigned" in refused.reason
    assert sig.check(None, trust(), required=False, now=NOW, newest=None) == sig.Verdict(
        None, fresh=True
    )


@pytest.mark.parametrize("required", [True, False])
def test_an_expired_announcement_is_ignored_whatever_the_setting(required: bool) -> None:
    env = envelope(signed(lifetime=60))
    verdict = sig.check(env, trust(), required=required, now=NOW + 60, newest=None)
    assert verdict.reason is not None and "expired" in verdict.reason
    assert sig.check(env, trust(), required=required, now=NOW + 59, newest=None).reason is None


def test_an_older_announcement_is_a_replay_and_the_same_one_renews_nothing() -> None:
    env = envelope(signed(issued=NOW))
    replay = sig.check(env, trust(), required=True, now=NOW + 1, newest=NOW + 1)
    assert replay.reason is not None and "replay" in replay.reason
    again = sig.check(env, trust(), required=True, now=NOW + 1, newest=NOW)
    assert again.reason is None and not again.fresh
    newer = sig.check(env, trust(), required=True, now=NOW + 1, newest=NOW - 1)
    assert newer.reason is None and newer.fresh


@pytest.mark.parametrize("how", ["unknown_key", "bad_signature", "revoked_key", "retired"])
def test_a_signature_the_trust_store_does_not_vouch_for_is_ignored(how: str) -> None:
    store = trust()
    raw = signed()
    if how == "unknown_key":
        raw = sig.sign(BODY, OTHER, OTHER_KID, NOW, NOW + 60)
    elif how == "bad_signature":
        raw = sig.sign(BODY, OTHER, KID, NOW, NOW + 60)  # names KID, signed by another key
    elif how == "revoked_key":
        store.revoke(KID)
    else:
        store.retire(KID)  # rotated out: for stored manifests only
    verdict = sig.check(envelope(raw), store, required=False, now=NOW, newest=None)
    expected = "unknown_key" if how == "retired" else how
    assert verdict.reason is not None and verdict.reason.startswith(f"signature: {expected}")


def test_a_payload_changed_after_signing_does_not_verify() -> None:
    tag = cbor2.loads(signed())
    protected, unprotected, _, signature = tag.value
    other = cbor2.dumps({**BODY, 2: bytes(32), 7: NOW, 8: NOW + 3600})
    forged = cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, other, signature]))
    verdict = sig.check(envelope(forged), trust(), required=False, now=NOW, newest=None)
    assert verdict.reason is not None and "bad_signature" in verdict.reason


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, -1.0, float("nan"), float("inf")])
def test_the_freshness_window_must_be_a_positive_number(window: float) -> None:
    with pytest.raises(ConfigError, match="freshness_window"):
        Config(
            server="coap://127.0.0.1:61616",
            device_id="d",
            device_class="c",
            state_dir="/nonexistent",  # type: ignore[arg-type]
            freshness_window=window,
        )


# -- the page's CDDL against what the test server signs -----------------------------------------


def test_signed_announcements_match_the_page(tmp_path: Path) -> None:
    from fota.testing import UpdateServer
    from tests.integration.test_protocol_cddl import SUBSET_TEXT, invalid, valid

    server = UpdateServer(tmp_path, KEY, KID, sign_announcements=True, clock=lambda: NOW)
    for body in (BODY, {1: 0}, {1: 9, 4: DIGEST}, {**BODY, 5: 2, 6: "../k/2"}):
        raw = server.signed_announcement(body)
        # pycddl cannot check `.cbor` inside an array (tests/integration/test_protocol_cddl.py): the
        # envelope against the subset, the payload against its own rule.
        valid("signed-announcement", raw, SUBSET_TEXT)
        payload = cbor2.loads(raw).value[2]
        valid("announcement-payload", payload)
        assert sig.open_envelope(raw)[0].expires == NOW + 3600
    invalid("announcement-payload", cbor2.dumps(BODY))  # no issue and expiry: not signed form
    invalid("announcement-payload", cbor2.dumps({**BODY, 7: NOW, 8: -1}))


def test_the_settings_come_from_the_daemons_toml(tmp_path: Path) -> None:
    from fota.app.settings import parse_settings
    from fota.keys import save_keypair

    save_keypair(ed25519.Ed25519PrivateKey.generate(), tmp_path / "k.key")
    text = (
        'server = "coap://127.0.0.1"\ndevice_class = "x"\n'
        f'state_dir = "{tmp_path / "state"}"\ntrust = ["{tmp_path / "k.key.pub"}"]\n'
        f'target = "{tmp_path / "fw.bin"}"\n'
        "require_signed_announcements = true\nfreshness_window = 600\n"
    )
    config = parse_settings(text, path=tmp_path / "fota.toml").config
    assert config.require_signed_announcements and config.freshness_window == 600.0
    with pytest.raises(ConfigError, match=r"fota.toml:7: freshness_window: -1.0 must be positive"):
        parse_settings(text.replace("600", "-1"), path=tmp_path / "fota.toml")
