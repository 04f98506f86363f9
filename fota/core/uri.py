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
    try:
        parts = urlsplit(ref)
        # ``port`` raises for "h:x" or "h:99999"; the fetchers read it later, so ask now.
        _ = parts.port
    except ValueError as exc:  # also "coap://[x": a malformed IPv6 literal
        return f"not a URI reference ({exc})"
    scheme = parts.scheme
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


def origin(uri: str) -> str:
    """``scheme://host[:port]`` of an absolute URI, lower-cased, the default port explicit.

    Two spellings of one server compare equal (``coap://H`` and ``coap://h:5683``), so an
    allow-list is not bypassed by, nor refuses, a different spelling.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal keeps its brackets
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = DEFAULT_PORTS.get(scheme, 0)
    return f"{scheme}://{host}:{port}"


DEFAULT_PORTS = {"coap": 5683, "coap+tcp": 5683}
"""RFC 7252 and RFC 8323 default ports."""


def allowed(uri: str, origins: tuple[str, ...]) -> bool:
    """Whether ``uri`` is on one of ``origins`` (each as :func:`origin` makes it)."""
    return origin(uri) in origins
