"""Signed manifests: COSE_Sign1 (RFC 9052) around a CBOR map with integer keys.

The wire format and every limit are documented in ``docs/protocol.md``. Decoding is defensive:
the raw bytes are size-checked before they are decoded, and every failure becomes a
:class:`~fota.errors.ManifestError` that names the field, never a decoder or cryptography
traceback. No I/O here: keys come in as objects, bytes come in as bytes.

Theory of operation (issue 16 §3): the format's own words decide, not Python's equality.
cbor2 turns a bignum (tag 2) into an ``int``, ``true`` into a value equal to 1 and a float
``1.0`` into a dict key that finds ``1``; each of those let a validly signed but lenient
encoding through. So envelopes, headers and payloads are read by :func:`_strict_loads`, which
keeps CBOR's major types apart: an ``int`` comes only from major types 0 and 1, and tags,
floats and simple values come back as :class:`CborTag`, :class:`CborFloat` and
:class:`CborSimple`, which equal no ``int``. A manifest has one identity,
:func:`manifest_id` over what the signature covers, so re-encoding the envelope (another
ECDSA signature, fresh or high-S; longer CBOR heads) never makes a new update.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from fota.core.text import show
from fota.core.uri import check_uri_reference, dot_segment
from fota.errors import ManifestError

MAX_MANIFEST_BYTES = 327_680
"""Largest signed manifest accepted, checked before decoding (room for MAX_FRAGMENTS digests)."""
MAX_FRAGMENTS = 8192
"""Most fragments one manifest may list."""
MAX_FRAGMENT_SIZE = 1 << 20
FRAGMENT_UNIT = 1024
"""Fragment sizes are multiples of this, so every CoAP block size (16..1024) divides them."""
MAX_TEXT = 64
MANIFEST_FORMAT = 1
EXTENSION_KEYS = range(1000, 65536)

COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
ALG_ES256 = -7
_HDR_ALG = 1
_HDR_CRIT = 2
_HDR_KID = 4
_HEADER_LABELS = frozenset({_HDR_ALG, _HDR_CRIT, _HDR_KID})
"""Protected-header labels this verifier understands (the CDDL's map names 1 and 4; ``crit``
may list them, RFC 9052 §3.1)."""
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
"""n of P-256: an ES256 ``s`` above ``n // 2`` is the malleable twin of a low-S signature."""
MAX_DEPTH = 16
"""Deepest nesting of arrays, maps and tags decoded (a manifest needs 3)."""

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class Component(IntEnum):
    """What an image replaces; it is also the reason the application is given."""

    FIRMWARE = 0
    APPLICATION = 1
    OTHER = 2


class Severity(IntEnum):
    """How much the update matters; later policy bounds deferral by it."""

    OPTIONAL = 0
    MANDATORY = 1
    CRITICAL = 2


# Manifest map keys (docs/protocol.md, rule "manifest").
K_FORMAT, K_SEQ, K_COMPONENT, K_VERSION, K_CLASS = 1, 2, 3, 4, 5
K_SIZE, K_SHA256, K_URI, K_FRAG_SIZE, K_FRAGS = 6, 7, 8, 9, 10
K_POLITE, K_SEVERITY, K_MAX_DEFERRAL, K_DEADLINE = 11, 12, 13, 14
_KNOWN_KEYS = frozenset(range(1, 15))
_FIELD_NAMES = {
    K_FORMAT: "format",
    K_SEQ: "sequence",
    K_COMPONENT: "component",
    K_VERSION: "version",
    K_CLASS: "device_class",
    K_SIZE: "image_size",
    K_SHA256: "image_sha256",
    K_URI: "image_uri",
    K_FRAG_SIZE: "fragment_size",
    K_FRAGS: "fragment_sha256",
    K_POLITE: "polite",
    K_SEVERITY: "severity",
    K_MAX_DEFERRAL: "max_deferral",
    K_DEADLINE: "deadline",
}


@dataclass(frozen=True, slots=True)
class ManifestBody:
    """The signed content of a manifest (what a publisher fills in)."""

    sequence: int
    component: Component
    version: str
    device_class: str
    image_size: int
    image_sha256: bytes
    image_uri: str
    fragment_size: int
    fragment_sha256: tuple[bytes, ...]
    polite: bool = True
    severity: Severity = Severity.OPTIONAL
    max_deferral: int = 0
    """Longest cumulative deferral in seconds the publisher allows; 0: the device's bound for
    the severity applies (see :mod:`fota.core.policy`)."""
    deadline: int | None = None
    """UTC instant (epoch seconds) after which the update proceeds without asking or waiting."""

    def to_cbor(self) -> bytes:
        """Encode the body as the CBOR map of ``docs/protocol.md``."""
        optional = {} if self.deadline is None else {K_DEADLINE: self.deadline}
        return cbor2.dumps(
            {
                K_FORMAT: MANIFEST_FORMAT,
                K_SEQ: self.sequence,
                K_COMPONENT: int(self.component),
                K_VERSION: self.version,
                K_CLASS: self.device_class,
                K_SIZE: self.image_size,
                K_SHA256: self.image_sha256,
                K_URI: self.image_uri,
                K_FRAG_SIZE: self.fragment_size,
                K_FRAGS: list(self.fragment_sha256),
                K_POLITE: self.polite,
                K_SEVERITY: int(self.severity),
                K_MAX_DEFERRAL: self.max_deferral,
                **optional,
            }
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest whose signature and limits have been checked.

    Attributes:
        body: the signed content.
        raw: the signed bytes exactly as received (kept on disk and re-verified on load).
        digest: the manifest's identity, :func:`manifest_id`: SHA-256 over what the
            signature covers, the same however the envelope is encoded. The update id,
            the journal's record and every list of manifests (cancelled, refused,
            rejected, known) use it.
        kid: the key id that signed it.
    """

    body: ManifestBody
    raw: bytes = field(repr=False)
    digest: bytes
    kid: bytes

    @property
    def update_id(self) -> str:
        """The id an application uses to answer for this update."""
        return update_id_of(self.digest)

    @property
    def fragment_count(self) -> int:
        """Number of fragments the image is split into."""
        return len(self.body.fragment_sha256)

    def fragment_span(self, index: int) -> tuple[int, int]:
        """Return ``(offset, length)`` of fragment ``index`` in the image."""
        offset = index * self.body.fragment_size
        return offset, min(self.body.fragment_size, self.body.image_size - offset)


def update_id_of(manifest_digest: bytes) -> str:
    """Return the update id for a manifest digest (first 16 hex digits)."""
    return manifest_digest.hex()[:16]


def manifest_id(protected: bytes, payload: bytes) -> bytes:
    """The identity of a signed manifest: SHA-256 of the CBOR array ``[protected, payload]``.

    Both byte strings are exactly what the signature covers (the Sig_structure adds only
    constants), and the array is encoded here, definite-length with the shortest heads,
    so the signature (a high-S twin, a fresh ECDSA nonce) and the envelope's own encoding
    change nothing.
    """
    return hashlib.sha256(cbor2.dumps([protected, payload])).digest()


def envelope_id(raw: bytes) -> bytes | None:
    """:func:`manifest_id` of a strictly encoded COSE_Sign1 envelope, or None.

    The signature is not checked: this names what the bytes claim to be (the announced
    digest, a report about a refused manifest); it vouches for nothing until
    :func:`verify` checked the signature.
    """
    try:
        protected, _, payload, _ = _split_cose(raw)
    except ManifestError:
        return None
    return manifest_id(protected, payload)


def fetched_key(raw: bytes, trust: TrustStore) -> bytes:
    """The digest under which the core files fetched manifest bytes (known, refused, cancelled).

    The identity (:func:`manifest_id`) of a strictly encoded envelope, unless its signature
    is what fails (``bad_signature``: forged, corrupted, or the high-S twin): then the
    SHA-256 of the bytes. The identity covers everything but the signature, so anyone can
    pair a good manifest's identity with a bad signature; filing that refusal under the
    identity would refuse the good manifest too. Every other refusal is a property of the
    signed content (header or body) or of the key that signed it, and holds for every
    envelope of that identity.
    """
    try:
        protected, header, payload, signature = _split_cose(raw)
    except ManifestError:
        return hashlib.sha256(raw).digest()
    try:
        _verify_signature(protected, header, payload, signature, trust, revoked_ok=True)
    except ManifestError as exc:
        if exc.kind == "bad_signature":
            return hashlib.sha256(raw).digest()
    return manifest_id(protected, payload)


class TrustStore:
    """Verification keys by key id, and the key ids revoked.

    A revoked key id verifies no new manifest (``revoked_key``), even while its key is still
    in the store: configured keys are revoked by a keyset (``fota.core.keyset``) or by
    ``Config.revoked_keys`` without editing the key files. Manifests stored before the
    revocation (the running image's) still verify on load: revocation stops new updates; it
    does not make the device forget what it runs.
    """

    def __init__(
        self, keys: Mapping[bytes, PublicKey] | None = None, *, revoked: Iterable[bytes] = ()
    ) -> None:
        self._keys: dict[bytes, PublicKey] = {}
        self._retired: dict[bytes, PublicKey] = {}  # rotated out: for stored manifests only
        self._revoked: set[bytes] = set(revoked)
        for kid, key in (keys or {}).items():
            self.add(kid, key)

    def revoke(self, kid: bytes) -> None:
        """Trust no new manifest signed with ``kid``."""
        self._revoked.add(kid)

    def is_revoked(self, kid: bytes) -> bool:
        """Whether ``kid`` was revoked."""
        return kid in self._revoked

    @property
    def revoked(self) -> frozenset[bytes]:
        """The revoked key ids."""
        return frozenset(self._revoked)

    def kids(self) -> list[bytes]:
        """The key ids in the store (revoked ones included), in the order they were added."""
        return list(self._keys)

    def add(self, kid: bytes, key: PublicKey) -> None:
        """Trust ``key`` for manifests whose protected header names ``kid``."""
        if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"key {kid.hex()}: only P-256 is supported for ES256")
        self._keys[kid] = key

    def retire(self, kid: bytes) -> None:
        """Trust ``kid`` for no new manifest (a key rotated out; it is not revoked).

        It still verifies the manifests stored before (the running image's, on load).
        """
        key = self._keys.pop(kid, None)
        if key is not None:
            self._retired[kid] = key

    def add_retired(self, kid: bytes, key: PublicKey) -> None:
        """Remember a key that once signed manifests, for stored ones only."""
        if kid not in self._keys:
            self._retired[kid] = key

    def get(self, kid: bytes, *, retired: bool = False) -> PublicKey | None:
        """Return the key for ``kid`` (with ``retired``, a rotated-out one too), or None."""
        key = self._keys.get(kid)
        if key is None and retired:
            key = self._retired.get(kid)
        return key

    def __len__(self) -> int:
        return len(self._keys)


def kid_for(key: PublicKey) -> bytes:
    """A default key id: the first 8 bytes of SHA-256 over the raw public key."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(raw).digest()[:8]


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign(body: ManifestBody, key: PrivateKey, kid: bytes) -> bytes:
    """Sign ``body`` as a tagged COSE_Sign1 and return the manifest bytes."""
    return sign_payload(body.to_cbor(), key, kid)


def sign_payload(payload: bytes, key: PrivateKey, kid: bytes) -> bytes:
    """Sign ``payload`` as a tagged COSE_Sign1 (manifests, keysets) and return the bytes."""
    alg = ALG_EDDSA if isinstance(key, ed25519.Ed25519PrivateKey) else ALG_ES256
    protected = cbor2.dumps({_HDR_ALG: alg, _HDR_KID: kid})
    to_sign = _sig_structure(protected, payload)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(to_sign)
    else:
        r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
        if s > _P256_ORDER // 2:
            s = _P256_ORDER - s  # the low-S form: verifiers (ours too) refuse the other
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def loads_exact(raw: bytes) -> Any:
    """Decode exactly one CBOR item that spans all of ``raw``; duplicate map keys are refused.

    Raises:
        ValueError: trailing bytes after the item (cbor2 errors pass through).
    """
    fp = io.BytesIO(raw)
    item = cbor2.CBORDecoder(fp, allow_duplicate_keys=False).decode()
    if fp.tell() != len(raw):
        raise ValueError(f"{len(raw) - fp.tell()} bytes after the CBOR item")
    return item


@dataclass(frozen=True, slots=True, repr=False)
class CborTag:
    """A CBOR tag (major type 6) as decoded strictly: a bignum (tag 2 or 3) stays one."""

    tag: int
    value: Any

    def __repr__(self) -> str:  # RFC 8949 diagnostic notation, for messages
        return f"{self.tag}({self.value!r})"


@dataclass(frozen=True, slots=True, repr=False)
class CborSimple:
    """A CBOR simple value other than false, true and null (``undefined`` is 23)."""

    value: int

    def __repr__(self) -> str:
        return "undefined" if self.value == 23 else f"simple({self.value})"


@dataclass(frozen=True, slots=True, repr=False)
class CborFloat:
    """A CBOR float: equal to no ``int``, so ``1.0`` never passes for the label 1."""

    value: float

    def __repr__(self) -> str:
        return repr(self.value)


class _CborError(ValueError):
    pass


_FLOATS = {25: (2, ">e"), 26: (4, ">f"), 27: (8, ">d")}


class _StrictDecoder:
    """One CBOR item, well-formed per RFC 8949, with major types kept apart.

    Definite lengths only (no fota encoder writes others); a map key twice (by Python
    equality, so ``true`` and ``1`` collide too) is refused; nesting is bounded by
    :data:`MAX_DEPTH`; a length is checked against the bytes left before anything is
    allocated. Never raises anything but :class:`_CborError` on hostile input.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.raw):
            raise _CborError(f"truncated: {n} bytes needed at offset {self.pos}")
        out = self.raw[self.pos : end]
        self.pos = end
        return out

    def _head(self) -> tuple[int, int, int]:
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info <= 27:
            return major, info, int.from_bytes(self._take(1 << (info - 24)), "big")
        if info == 31 and major in (2, 3, 4, 5):
            raise _CborError(f"indefinite length (major type {major}) at offset {self.pos - 1}")
        raise _CborError(f"reserved or misplaced additional info {info} at offset {self.pos - 1}")

    def item(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise _CborError(f"nested deeper than {MAX_DEPTH}")
        major, info, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(arg)
        if major == 3:
            try:
                return self._take(arg).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _CborError(f"text is not UTF-8 ({exc.reason})") from None
        if major == 4:
            if arg > len(self.raw) - self.pos:
                raise _CborError(f"array of {arg} items is longer than the bytes left")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            if 2 * arg > len(self.raw) - self.pos:
                raise _CborError(f"map of {arg} pairs is longer than the bytes left")
            out: dict[Any, Any] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                try:
                    seen = key in out
                except TypeError:
                    raise _CborError(f"map key of type {type(key).__name__}") from None
                if seen:
                    raise _CborError(f"map key {show(key)} appears twice")
                out[key] = self.item(depth + 1)
            return out
        if major == 6:
            return CborTag(arg, self.item(depth + 1))
        # major 7: simple values and floats
        if info in _FLOATS:
            size, fmt = _FLOATS[info]
            return CborFloat(struct.unpack(fmt, arg.to_bytes(size, "big"))[0])
        if info == 24 and arg < 32:
            raise _CborError(f"simple value {arg} in two bytes (RFC 8949 §3.3)")
        return {20: False, 21: True, 22: None}.get(arg, CborSimple(arg))


def _strict_loads(raw: bytes) -> Any:
    decoder = _StrictDecoder(raw)
    item = decoder.item()
    if decoder.pos != len(raw):
        raise _CborError(f"{len(raw) - decoder.pos} bytes after the CBOR item")
    return item


def _loads(raw: bytes, what: str) -> Any:
    """Decode exactly one CBOR item strictly (:class:`_StrictDecoder`), naming ``what``."""
    try:
        return _strict_loads(raw)
    except _CborError as exc:
        raise ManifestError("malformed", what, f"not valid CBOR ({show(str(exc), 80)})") from None


def _check_header(header: dict[Any, Any]) -> None:
    """The protected header's labels are ints this verifier knows; ``crit`` names known ones."""
    for label in header:
        if type(label) is not int:
            # true, 1.0, simple(1) or a bignum must not pass for a label by equality.
            raise ManifestError("malformed", "protected", f"label {show(label)} is not an integer")
    crit = header.get(_HDR_CRIT)
    if _HDR_CRIT in header:
        if not isinstance(crit, list) or not crit:
            raise ManifestError("malformed", "crit", "expected a non-empty array of labels")
        for label in crit:
            if type(label) is not int or label not in header:
                raise ManifestError(
                    "malformed", "crit", f"label {show(label)} is not in the protected header"
                )
            if label not in _HEADER_LABELS or label == _HDR_CRIT:
                # RFC 9052 §3.1: a critical parameter the recipient does not understand
                # makes the message unprocessable.
                raise ManifestError(
                    "malformed", "crit", f"label {label} is critical and not understood"
                )
    unknown = sorted(set(header) - _HEADER_LABELS)
    if unknown:
        raise ManifestError(
            "malformed", "protected", f"labels {unknown} are not in the CDDL (1: alg, 4: kid)"
        )


def _split_cose(raw: bytes) -> tuple[bytes, dict[Any, Any], bytes, bytes]:
    """Split a tagged COSE_Sign1 into (protected bytes, protected header, payload, signature)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            "oversize", "bytes", f"{len(raw)} bytes exceeds the limit of {MAX_MANIFEST_BYTES}"
        )
    outer = _loads(raw, "cose_sign1")
    if not isinstance(outer, CborTag) or outer.tag != COSE_SIGN1_TAG:
        raise ManifestError("malformed", "cose_sign1", "expected CBOR tag 18 (COSE_Sign1)")
    parts = outer.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise ManifestError("malformed", "cose_sign1", "expected an array of 4 elements")
    protected, unprotected, payload, signature = parts
    if not isinstance(protected, bytes):
        raise ManifestError("malformed", "protected", "expected a byte string")
    if not isinstance(unprotected, dict):
        raise ManifestError("malformed", "unprotected", "expected a map")
    if unprotected:
        # The CDDL says {}: nothing unsigned may ride along, not even a copy of a protected
        # label (which a lenient reader might prefer).
        raise ManifestError(
            "malformed", "unprotected", f"must be empty, has {len(unprotected)} entries"
        )
    if not isinstance(payload, bytes):
        raise ManifestError(
            "malformed", "payload", "expected a byte string (detached payloads are refused)"
        )
    if not isinstance(signature, bytes):
        raise ManifestError("malformed", "signature", "expected a byte string")
    header = _loads(protected, "protected") if protected else {}
    if not isinstance(header, dict):
        raise ManifestError("malformed", "protected", "expected a map")
    _check_header(header)
    return protected, header, payload, signature


def _verify_signature(
    protected: bytes,
    header: dict[Any, Any],
    payload: bytes,
    signature: bytes,
    trust: TrustStore,
    *,
    revoked_ok: bool = False,
    high_s_ok: bool = False,
) -> bytes:
    alg = header.get(_HDR_ALG)
    kid = header.get(_HDR_KID)
    if type(alg) is not int or alg not in (ALG_EDDSA, ALG_ES256):
        raise ManifestError(
            "malformed", "alg", f"algorithm {show(alg)} is not EdDSA (-8) or ES256 (-7)"
        )
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= 64:
        raise ManifestError("malformed", "kid", "expected a byte string of 1 to 64 bytes")
    if not revoked_ok and trust.is_revoked(kid):
        # First: a revoked key is said to be revoked, whether or not a keyset still lists it.
        raise ManifestError("revoked_key", "kid", f"key id {kid.hex()} was revoked")
    key = trust.get(kid, retired=revoked_ok)
    if key is None:
        raise ManifestError("unknown_key", "kid", f"key id {kid.hex()} is not in the trust store")
    to_verify = _sig_structure(protected, payload)
    try:
        if alg == ALG_EDDSA:
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise InvalidSignature
            key.verify(signature, to_verify)
        else:
            if not isinstance(key, ec.EllipticCurvePublicKey) or len(signature) != 64:
                raise InvalidSignature
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            if s > _P256_ORDER // 2 and not high_s_ok:
                # (r, n - s) verifies as well as (r, s): anyone could mint a second valid
                # envelope. One form only, as Bitcoin's BIP 62 and libsecp256k1 require.
                raise ManifestError(
                    "bad_signature", "signature", "ES256 s is not in the low half (high-S form)"
                )
            der = encode_dss_signature(r, s)
            key.verify(der, to_verify, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ManifestError(
            "bad_signature", "signature", f"does not verify with key {kid.hex()}"
        ) from None
    return kid


def _field(body: dict[Any, Any], key: int, kind: type | tuple[type, ...]) -> Any:
    name = _FIELD_NAMES[key]
    if key not in body:
        raise ManifestError("malformed", name, "missing")
    value = body[key]
    if kind is int and isinstance(value, CborTag) and value.tag in (2, 3):
        # The CDDL says uint: a CBOR bignum is not one, whatever number it holds (the
        # strict decoder keeps it a tag, where cbor2 made it an int).
        raise ManifestError(
            "malformed",
            name,
            f"expected int (a uint, CBOR major type 0), not a tag {value.tag} bignum",
        )
    # bool is an int in Python; a bool where a number belongs is malformed and vice versa.
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ManifestError("malformed", name, f"expected {getattr(kind, '__name__', kind)}")
    if kind is int and isinstance(value, int) and value < 0:
        raise ManifestError("malformed", name, "must not be negative")
    return value


def _text(body: dict[Any, Any], key: int, limit: int) -> str:
    value: str = _field(body, key, str)
    if not 1 <= len(value.encode()) <= limit:  # the CDDL .size counts UTF-8 bytes
        raise ManifestError("malformed", _FIELD_NAMES[key], f"length must be 1..{limit} bytes")
    if not value.isprintable():
        # A version or class ends up in logs, reports and the environment of hooks (where a
        # NUL byte cannot go): no control characters.
        raise ManifestError("malformed", _FIELD_NAMES[key], "must not contain control characters")
    return value


def _enum(body: dict[Any, Any], key: int, enum: type[IntEnum]) -> Any:
    value = _field(body, key, int)
    try:
        return enum(value)
    except ValueError:
        raise ManifestError(
            "malformed", _FIELD_NAMES[key], f"{show(value)} is not one of {[int(e) for e in enum]}"
        ) from None


def decode_body(payload: bytes, *, max_image_size: int) -> ManifestBody:
    """Decode and check a manifest payload (no signature check; see :func:`verify`)."""
    body = _loads(payload, "payload")
    if not isinstance(body, dict):
        raise ManifestError("malformed", "payload", "expected a map")
    for key in body:
        if not isinstance(key, int) or isinstance(key, bool):
            raise ManifestError("malformed", f"key {show(key)}", "keys must be integers")
        if key not in _KNOWN_KEYS and key not in EXTENSION_KEYS:
            raise ManifestError(
                "malformed",
                f"key {show(key)}",
                "unknown key outside the extension range 1000..65535",
            )
    if _field(body, K_FORMAT, int) != MANIFEST_FORMAT:
        raise ManifestError("malformed", "format", f"only format {MANIFEST_FORMAT} is supported")
    size = _field(body, K_SIZE, int)
    if size > max_image_size:
        raise ManifestError(
            "oversize", "image_size", f"{show(size)} bytes exceeds the limit of {max_image_size}"
        )
    frag_size = _field(body, K_FRAG_SIZE, int)
    if frag_size == 0 or frag_size % FRAGMENT_UNIT or frag_size > MAX_FRAGMENT_SIZE:
        raise ManifestError(
            "malformed",
            "fragment_size",
            f"{show(frag_size)} must be a multiple of {FRAGMENT_UNIT} up to {MAX_FRAGMENT_SIZE}",
        )
    frags = _field(body, K_FRAGS, list)
    if len(frags) > MAX_FRAGMENTS:
        raise ManifestError(
            "oversize",
            "fragment_sha256",
            f"{len(frags)} fragments exceeds the limit of {MAX_FRAGMENTS}",
        )
    expected = max(1, math.ceil(size / frag_size))
    if len(frags) != expected:
        raise ManifestError(
            "malformed", "fragment_sha256", f"has {len(frags)} digests, image_size needs {expected}"
        )
    if not all(isinstance(d, bytes) and len(d) == 32 for d in frags):
        raise ManifestError("malformed", "fragment_sha256", "every digest must be 32 bytes")
    image_sha = _field(body, K_SHA256, bytes)
    if len(image_sha) != 32:
        raise ManifestError("malformed", "image_sha256", "must be 32 bytes")
    uri = _field(body, K_URI, str)
    problem = check_uri_reference(uri)
    if problem:
        raise ManifestError("malformed", "image_uri", problem)
    problem = dot_segment(uri)
    if problem:
        raise ManifestError("invalid_uri", "image_uri", problem)
    max_deferral = _field(body, K_MAX_DEFERRAL, int)
    deadline = _field(body, K_DEADLINE, int) if K_DEADLINE in body else None
    if deadline is not None and deadline >= 1 << 40:
        raise ManifestError("malformed", "deadline", f"{show(deadline)} is past 2**40 seconds")
    return ManifestBody(
        sequence=_field(body, K_SEQ, int),
        component=_enum(body, K_COMPONENT, Component),
        version=_text(body, K_VERSION, MAX_TEXT),
        device_class=_text(body, K_CLASS, MAX_TEXT),
        image_size=size,
        image_sha256=image_sha,
        image_uri=uri,
        fragment_size=frag_size,
        fragment_sha256=tuple(frags),
        polite=_field(body, K_POLITE, bool),
        severity=_enum(body, K_SEVERITY, Severity),
        max_deferral=max_deferral,
        deadline=deadline,
    )


def verify(
    raw: bytes, trust: TrustStore, *, max_image_size: int = 1 << 32, revoked_ok: bool = False
) -> Manifest:
    """Check a signed manifest's structure, signature and limits.

    Device class and anti-rollback depend on the device; :func:`accept` adds them.

    Args:
        raw: the signed manifest bytes.
        trust: the verification keys.
        max_image_size: the largest image accepted, bytes.
        revoked_ok: accept a revoked or rotated-out key id (for manifests stored before,
            re-verified on load); a new manifest never gets this.

    Raises:
        ManifestError: naming the field at fault.
    """
    protected, header, payload, signature = _split_cose(raw)
    kid = _verify_signature(
        protected,
        header,
        payload,
        signature,
        trust,
        revoked_ok=revoked_ok,
        # fota signed ES256 in either form before it made low-S: a stored manifest (the
        # running image's) keeps verifying; a new one never is taken in the high-S form.
        high_s_ok=revoked_ok,
    )
    body = decode_body(payload, max_image_size=max_image_size)
    return Manifest(body=body, raw=raw, digest=manifest_id(protected, payload), kid=kid)


def accept(
    raw: bytes,
    trust: TrustStore,
    *,
    device_class: str,
    installed: Manifest | None,
    pending: Manifest | None = None,
    max_image_size: int = 1 << 32,
) -> Manifest:
    """Verify a manifest and decide whether this device may take it.

    Args:
        raw: the signed manifest bytes.
        trust: the verification keys.
        device_class: this device's class; the manifest must name the same.
        installed: the manifest of the running image, whose sequence number must be exceeded.
        pending: the update in progress; the same bytes again are that update, not a replay.
        max_image_size: the largest image this device accepts.

    Raises:
        ManifestError: naming the field at fault.
    """
    manifest = verify(raw, trust, max_image_size=max_image_size)
    if manifest.body.device_class != device_class:
        raise ManifestError(
            "wrong_device_class",
            "device_class",
            f"{manifest.body.device_class!r} is not this device's {device_class!r}",
        )
    if pending is not None and manifest.digest == pending.digest:
        return manifest
    floor = installed.body.sequence if installed is not None else -1
    if pending is not None:
        # Another manifest with the pending update's number is a conflicting replay.
        floor = max(floor, pending.body.sequence)
    if manifest.body.sequence <= floor:
        raise ManifestError(
            "rollback",
            "sequence",
            f"{manifest.body.sequence} is not greater than {floor} (replay or downgrade)",
        )
    return manifest


def _int_or(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) else default


def inspect(raw: bytes) -> dict[str, Any]:
    """Decode a manifest without trusting it, for ``fota manifest inspect``."""
    protected, header, payload, _ = _split_cose(raw)
    body = decode_body(payload, max_image_size=1 << 62)
    kid = header.get(_HDR_KID)
    identity = manifest_id(protected, payload)
    return {
        "alg": {ALG_EDDSA: "EdDSA", ALG_ES256: "ES256"}.get(_int_or(header.get(_HDR_ALG)), "?"),
        "kid": kid.hex() if isinstance(kid, bytes) else None,
        "digest": identity.hex(),
        "envelope_sha256": hashlib.sha256(raw).hexdigest(),
        "update_id": update_id_of(identity),
        "sequence": body.sequence,
        "component": body.component.name.lower(),
        "version": body.version,
        "device_class": body.device_class,
        "image_size": body.image_size,
        "image_sha256": body.image_sha256.hex(),
        "image_uri": body.image_uri,
        "fragment_size": body.fragment_size,
        "fragments": len(body.fragment_sha256),
        "polite": body.polite,
        "severity": body.severity.name.lower(),
        "max_deferral": body.max_deferral,
        "deadline": body.deadline,
    }
