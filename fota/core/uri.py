"""URI references: checks and resolution (RFC 3986 section 5) for CoAP schemes.

``urllib.parse.urljoin`` only resolves schemes it knows, and it does not know ``coap``; we
resolve with a scheme it knows and put ours back, which is exact because RFC 3986 resolution is
scheme-independent.
"""

from __future__ import annotations

from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

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


def dot_segment(ref: str) -> str | None:
    """Return why ``ref`` would put a ``.`` or ``..`` Uri-Path on the wire, or None.

    RFC 3986 resolution removes literal dot segments, but not percent-encoded ones
    (``%2e%2e``); a CoAP client decodes those into Uri-Path options, and RFC 7252 §5.10.1
    (and §6.4, which builds the options) leaves no place for a ``.`` or ``..`` option: a
    server that maps paths to files would be walked out of its tree. A reference that
    spells a dot segment in percent-encoding is refused, never normalised.
    """
    try:
        path = urlsplit(ref).path
    except ValueError:
        return None  # check_uri_reference names it
    for segment in path.split("/"):
        if "%" in segment and unquote(segment) in (".", ".."):
            return f"path segment {segment!r} is a percent-encoded dot segment"
    return None


def path_segments(uri: str) -> tuple[str, ...]:
    """The Uri-Path options (RFC 7252 §6.4) of an absolute URI, percent-decoded.

    Empty segments are skipped, as the transports always did.

    Raises:
        ValueError: a segment is ``.`` or ``..`` (literal or percent-encoded): no transport
            sends one (RFC 7252 §5.10.1); the message names the segment.
    """
    out = []
    for raw in urlsplit(uri).path.split("/")[1:]:
        segment = unquote(raw)
        if segment in (".", ".."):
            raise ValueError(f"Uri-Path segment {raw!r} is a dot segment (RFC 7252 §5.10.1)")
        if segment:
            out.append(segment)
    return tuple(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on a path (percent-encoded dots are left alone, as the RFC says)."""
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out)


def resolve(base: str, ref: str) -> str:
    """Resolve ``ref`` against the absolute CoAP URI ``base`` (RFC 3986 §5.2).

    An absolute ``ref`` has its literal dot segments removed too (§5.2.2 says so for
    every reference with a scheme), so none reaches a Uri-Path.
    """
    scheme = urlsplit(base).scheme
    parts = urlsplit(ref)
    if parts.scheme:
        return urlunsplit(parts._replace(path=_remove_dot_segments(parts.path)))
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
