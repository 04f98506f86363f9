"""URI references: checks and resolution (RFC 3986 section 5) for CoAP schemes.

``urllib.parse.urljoin`` only resolves schemes it knows, and it does not know ``coap``; we
resolve with a scheme it knows and put ours back, which is exact because RFC 3986 resolution is
scheme-independent.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

MAX_URI = 255
SCHEMES = ("coap", "coap+tcp")


def check_uri_reference(ref: str) -> str | None:
    """Return why ``ref`` is unacceptable as a URI reference, or None when it is fine."""
    if not 1 <= len(ref) <= MAX_URI:
        return f"length {len(ref)} outside 1..{MAX_URI}"
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in ref):
        return "contains spaces, control or non-ASCII characters"
    scheme = urlsplit(ref).scheme
    if scheme and scheme not in SCHEMES:
        return f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}"
    return None


def resolve(base: str, ref: str) -> str:
    """Resolve ``ref`` against the absolute CoAP URI ``base``."""
    scheme = urlsplit(base).scheme
    if urlsplit(ref).scheme:
        return ref
    joined = urljoin("http" + base[len(scheme) :], ref)
    return scheme + joined[len("http") :]
