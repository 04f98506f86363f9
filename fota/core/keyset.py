"""Signed key updates: rotating and revoking manifest-signing keys without re-flashing.

A keyset is a COSE_Sign1 (the manifest's format) signed by a **root key**: an offline key
that signs nothing but keysets, configured on the device as ``trust_roots``. Its payload
lists the manifest-signing keys the device trusts from then on, in place of those configured
(``trust``) and of the previous keyset's, and the key ids it must no longer trust, configured
ones included::

    keyset = {
      1 => uint,                 ; version: a device takes only a higher one than it has
      2 => [* trusted-key],      ; manifest-signing keys added
      ? 3 => [* bstr .size (1..64)], ; revoked key ids
      ? 4 => uint,               ; floor-reset: the anti-rollback floor from now on
    }
    trusted-key = [
      kid: bstr .size (1..64),
      alg: -8 / -7,              ; EdDSA (Ed25519) or ES256 (P-256)
      key: bstr,                 ; Ed25519: 32 raw bytes; P-256: 65 bytes, SEC1 uncompressed
    ]

A keyset lists every manifest-signing key trusted from then on: a configured key it leaves
out is retired like any other (it verifies only the manifests stored before). ``floor-reset``
recovers from a stolen key that signed a huge sequence number (2**64-1 would block every
later update): the running image's sequence number stops being the anti-rollback floor, the
reset value is (a new manifest must have a higher one), until the next update commits.

A root key id may be revoked too, but a keyset cannot add root keys: the roots change only
with the configuration (a compromised manifest key must not be able to mint new roots). This
module is pure: decoding, verifying and signing. ``fota.trust`` persists and applies keysets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fota.core import manifest as mf
from fota.core.manifest import ALG_EDDSA, ALG_ES256, PrivateKey, PublicKey, TrustStore
from fota.errors import ManifestError

MAX_KEYSET_BYTES = 16 * 1024
"""Largest keyset accepted, bytes (room for about 150 keys)."""

MAX_KEYS = 128
"""Most keys (and most revoked key ids) in one keyset."""

MAX_VERSION = 2**63 - 1

MAX_FLOOR = 2**64 - 1
"""Largest ``floor-reset`` (a manifest's sequence number is a uint of up to 64 bits)."""


@dataclass(frozen=True, slots=True)
class Keyset:
    """A verified keyset.

    Attributes:
        version: its version number.
        keys: the manifest-signing keys it adds, by key id.
        revoked: the key ids it revokes.
        raw: the signed bytes (kept to store, and to verify again on load).
        digest: SHA-256 of ``raw``.
        signer: the root key id that signed it.
        floor_reset: the anti-rollback floor it sets (``floor-reset``), None if none.
    """

    version: int
    keys: dict[bytes, PublicKey]
    revoked: frozenset[bytes]
    raw: bytes
    digest: bytes
    signer: bytes
    floor_reset: int | None = None


def _bad(field: str, message: str) -> ManifestError:
    return ManifestError("malformed", f"keyset {field}", message)


def key_from_raw(alg: int, raw: bytes, where: str) -> PublicKey:
    """The public key of a ``trusted-key`` entry (``where`` names it in errors).

    Raises:
        ManifestError: not a key of that algorithm.
    """
    try:
        if alg == ALG_EDDSA:
            if len(raw) != 32:
                raise _bad(where, f"an Ed25519 key has 32 bytes, not {len(raw)}")
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        if len(raw) != 65 or raw[0] != 4:
            raise _bad(where, "a P-256 key has 65 bytes, SEC1 uncompressed (0x04 first)")
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
    except ValueError as exc:  # not a point on the curve
        raise _bad(where, f"not a valid public key ({exc})") from exc


def decode(raw: bytes, roots: TrustStore, *, revoked_ok: bool = False) -> Keyset:
    """Verify a keyset's signature against the root keys and decode it.

    Args:
        raw: the COSE_Sign1 bytes.
        roots: the root keys (``Config.trust_roots``), revocations applied.
        revoked_ok: accept a revoked root (for the stored keyset: it was good when taken, and
            setting it aside would let older keysets be replayed).

    Raises:
        ManifestError: with kind ``oversize``, ``malformed``, ``unknown_key``,
            ``revoked_key`` or ``bad_signature``, naming the field at fault.
    """
    if len(raw) > MAX_KEYSET_BYTES:
        raise ManifestError(
            "oversize", "keyset bytes", f"{len(raw)} bytes exceeds the limit {MAX_KEYSET_BYTES}"
        )
    protected, header, payload, signature = mf._split_cose(raw)
    signer = mf._verify_signature(
        protected, header, payload, signature, roots, revoked_ok=revoked_ok
    )
    body = mf._loads(payload, "keyset")
    if not isinstance(body, dict):
        raise _bad("payload", "expected a map")
    unknown = set(body) - {1, 2, 3, 4}
    if unknown:
        raise _bad("payload", f"unknown keys {sorted(map(repr, unknown))}")
    version = body.get(1)
    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        raise _bad("version", f"expected an integer in 1..{MAX_VERSION}")
    entries = body.get(2)
    if not isinstance(entries, list) or len(entries) > MAX_KEYS:
        raise _bad("keys", f"expected an array of at most {MAX_KEYS} keys")
    keys: dict[bytes, PublicKey] = {}
    for i, entry in enumerate(entries):
        where = f"keys[{i}]"
        if not isinstance(entry, list) or len(entry) != 3:
            raise _bad(where, "expected [kid, alg, key]")
        kid, alg, key = entry
        if not isinstance(kid, bytes) or not 1 <= len(kid) <= 64:
            raise _bad(f"{where}.kid", "expected a byte string of 1 to 64 bytes")
        if type(alg) is not int or alg not in (ALG_EDDSA, ALG_ES256):
            raise _bad(f"{where}.alg", "expected -8 (EdDSA) or -7 (ES256)")
        if not isinstance(key, bytes):
            raise _bad(f"{where}.key", "expected a byte string")
        if kid in keys:
            raise _bad(f"{where}.kid", f"key id {kid.hex()} is listed twice")
        keys[kid] = key_from_raw(alg, key, f"{where}.key")
    revoked_list = body.get(3, [])
    if not isinstance(revoked_list, list) or len(revoked_list) > MAX_KEYS:
        raise _bad("revoked", f"expected an array of at most {MAX_KEYS} key ids")
    revoked: set[bytes] = set()
    for i, kid in enumerate(revoked_list):
        if not isinstance(kid, bytes) or not 1 <= len(kid) <= 64:
            raise _bad(f"revoked[{i}]", "expected a byte string of 1 to 64 bytes")
        revoked.add(kid)
    both = revoked & set(keys)
    if both:
        raise _bad("revoked", f"key id {sorted(both)[0].hex()} is both added and revoked")
    floor = body.get(4)
    # A uint: not a bool (an int subclass in Python); bignums are the decoder's to refuse.
    if floor is not None and (type(floor) is not int or not 0 <= floor <= MAX_FLOOR):
        raise _bad("floor-reset", f"expected an unsigned integer in 0..{MAX_FLOOR}")
    digest = hashlib.sha256(raw).digest()
    return Keyset(version, keys, frozenset(revoked), raw, digest, signer, floor)


def raw_of_key(key: PublicKey) -> tuple[int, bytes]:
    """A public key as a ``trusted-key`` entry's ``(alg, key)``."""
    from cryptography.hazmat.primitives import serialization

    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return ALG_EDDSA, raw
    raw = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return ALG_ES256, raw


def sign(
    version: int,
    keys: Iterable[tuple[bytes, PublicKey]],
    root: PrivateKey,
    root_kid: bytes,
    *,
    revoked: Iterable[bytes] = (),
    floor_reset: int | None = None,
) -> bytes:
    """Sign a keyset with a root key and return its bytes (for servers and tests).

    ``floor_reset`` sets the device's anti-rollback floor (see the module docstring).
    """
    entries = [[kid, *raw_of_key(key)] for kid, key in keys]
    body: dict[int, object] = {1: version, 2: entries}
    gone = list(revoked)
    if gone:
        body[3] = gone
    if floor_reset is not None:
        body[4] = floor_reset
    payload = cbor2.dumps(body)
    return mf.sign_payload(payload, root, root_kid)
