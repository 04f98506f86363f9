"""Signed announcements and freshness: a frozen device knows it (TUF's timestamp role, Uptane).

Theory of operation:

* An announcement may come as a tagged COSE_Sign1 (the manifest's envelope, the same keys and
  ``kid`` lookup) whose payload is the announcement map plus ``7`` (issued at) and ``8``
  (expires), epoch seconds (CDDL ``signed-announcement`` in docs/protocol.md). The server
  signs it again at least every so often, so a device that keeps getting fresh ones knows
  that what it sees is current, and one that stops getting them knows it may be frozen.
* :func:`open_envelope` splits and checks the envelope's form (no trust yet); :func:`check`
  decides what the device does with an announcement: take it or ignore it (with the reason),
  and whether taking it renews freshness. Nothing here reads a clock: ``now`` comes in.
* A signed announcement is always checked (a signature that does not verify, or one that
  expired, is tampering or a stale replay, whatever the settings say); an unsigned one is
  taken only while signed ones are not required.
* Replay: one issued before the newest taken is refused (the device keeps that instant in
  memory, never later than its clock plus :data:`MAX_CLOCK_SKEW`, so one dated in the future
  cannot shut out the rest; after a restart, expiry alone bounds a replay). Only a *newer*
  issue renews freshness, so a replay of the newest one keeps nothing fresh past the device's
  window, even with a wrong wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from fota.core import manifest as mf
from fota.core.manifest import TrustStore
from fota.core.text import show
from fota.errors import ManifestError

MAX_SIGNED_ANNOUNCEMENT_BYTES = 1024
"""Largest signed announcement accepted, checked before decoding (it fits one CoAP block)."""
K_ISSUED_AT = 7
K_EXPIRES = 8
MAX_TIME = (1 << 40) - 1
"""Latest instant accepted for ``issued_at`` and ``expires``, epoch seconds (as a deadline)."""
MAX_CLOCK_SKEW = 300
"""Seconds an issue instant may lie ahead of the device's clock and still be remembered as it
is. The replay bar (the newest issue instant taken) is never set later than ``now`` plus this:
one announcement issued far ahead (a server clock stepped forward for a moment, or a key since
rotated out signing ``2**40 - 1``) would otherwise make every later, rightly dated one a
"replay" until the device restarts or its clock gets there."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A signed announcement's envelope, split and checked for form but not yet trusted.

    Attributes:
        issued_at: key 7 of the payload, epoch seconds.
        expires: key 8 of the payload, epoch seconds; after it the announcement is expired.
    """

    protected: bytes = field(repr=False)
    header: dict[Any, Any] = field(repr=False)
    payload: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    issued_at: int
    expires: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the device does with one announcement.

    Attributes:
        reason: why it is ignored; None: it is taken.
        fresh: taking it renews freshness (unsigned while not required, or signed and issued
            after the newest taken so far).
        issued_at: its issue instant, when signed and taken; at most ``now`` plus
            :data:`MAX_CLOCK_SKEW` (what the device remembers as the newest).
        kid: the key id that signed it, when signed and taken.
    """

    reason: str | None
    fresh: bool = False
    issued_at: int | None = None
    kid: bytes | None = None


def _bad(name: str, message: str) -> ManifestError:
    return ManifestError("malformed", f"announcement {name}", message)


def _time(body: dict[Any, Any], key: int, name: str) -> int:
    value = body.get(key)
    if key not in body:
        raise _bad(name, f"(key {key}) missing")
    if type(value) is not int or not 0 <= value <= MAX_TIME:
        raise _bad(name, f"(key {key}) expected an unsigned integer up to 2**40 - 1")
    return value


def open_envelope(raw: bytes) -> tuple[Envelope, dict[Any, Any]]:
    """Split a signed announcement into its envelope and its payload map (not verified).

    The payload must be in CBOR's preferred serialization (re-encoding it gives the same
    bytes): a uint is major type 0, not a bignum, and lengths are definite.

    Args:
        raw: the announcement's bytes, a tagged COSE_Sign1.

    Returns:
        The envelope (for :func:`check`) and the payload's map, whose announcement fields
        the caller checks as for an unsigned announcement.

    Raises:
        ManifestError: ``oversize`` past :data:`MAX_SIGNED_ANNOUNCEMENT_BYTES`, else
            ``malformed``, naming the field.
    """
    if len(raw) > MAX_SIGNED_ANNOUNCEMENT_BYTES:
        raise ManifestError(
            "oversize",
            "announcement bytes",
            f"{len(raw)} bytes exceeds the limit of {MAX_SIGNED_ANNOUNCEMENT_BYTES}",
        )
    protected, header, payload, signature = mf._split_cose(raw)
    body = mf._loads(payload, "announcement payload")
    if not isinstance(body, dict):
        raise _bad("payload", "expected a map")
    try:
        again = cbor2.dumps(body)
    except Exception:  # a value cbor2 decodes but cannot encode back is not ours
        again = b""
    if again != payload:
        raise _bad("payload", "not in preferred serialization (a uint is major type 0)")
    issued_at = _time(body, K_ISSUED_AT, "issued_at")
    expires = _time(body, K_EXPIRES, "expires")
    if expires <= issued_at:
        raise _bad("expires", f"{expires} is not after issued_at {issued_at}")
    return Envelope(protected, header, payload, signature, issued_at, expires), body


def sign(
    body: dict[int, Any], key: mf.PrivateKey, kid: bytes, issued_at: int, expires: int
) -> bytes:
    """Sign an announcement map with its issue and expiry instants (servers and tests).

    Args:
        body: the announcement's fields (keys 1..6); keys 7 and 8 are set here.
        key: the signing key (a key the devices trust for manifests).
        kid: its key id.
        issued_at: epoch seconds.
        expires: epoch seconds, after ``issued_at``.
    """
    payload = cbor2.dumps({**body, K_ISSUED_AT: issued_at, K_EXPIRES: expires})
    return mf.sign_payload(payload, key, kid)


def check(
    envelope: Envelope | None,
    trust: TrustStore,
    *,
    required: bool,
    now: float,
    newest: int | None,
) -> Verdict:
    """Decide whether the device takes an announcement, and whether it renews freshness.

    Args:
        envelope: the signed announcement's envelope; None: it came unsigned.
        trust: the manifest keys; the signer must be one trusted for new manifests (not
            revoked, not rotated out).
        required: unsigned announcements are ignored (``require_signed_announcements``).
        now: the wall clock, epoch seconds (the device's clock must be right for expiry to
            mean anything: docs/security.md).
        newest: the issue instant of the newest signed announcement taken so far, if any.

    Returns:
        The verdict; ``reason`` says why an ignored one is ignored.
    """
    if envelope is None:
        if required:
            return Verdict("unsigned, and signed announcements are required")
        return Verdict(None, fresh=True)
    try:
        kid = mf._verify_signature(
            envelope.protected, envelope.header, envelope.payload, envelope.signature, trust
        )
    except ManifestError as exc:
        return Verdict(f"signature: {exc.kind}: {show(str(exc), 120)}")
    if envelope.expires <= now:
        return Verdict(f"expired at {envelope.expires} (the device's clock says {int(now)})")
    if newest is not None and envelope.issued_at < newest:
        return Verdict(
            f"issued at {envelope.issued_at}, before the newest taken ({newest}): a replay"
        )
    # Remembered at most MAX_CLOCK_SKEW ahead of the device's clock: an announcement from the
    # future cannot freeze the device (every later one a "replay") until a restart.
    issued = min(envelope.issued_at, max(int(now), 0) + MAX_CLOCK_SKEW)
    fresh = newest is None or issued > newest
    return Verdict(None, fresh=fresh, issued_at=issued, kid=kid)
