"""OSCORE (RFC 8613) security contexts for the client and the test server.

fota protects every request to the update server with OSCORE when ``Config.oscore`` names a
security context: aiocoap's OSCORE (the ``fota[oscore]`` extra) encrypts and authenticates
each request and response end to end, with replay protection, over plain UDP. Why OSCORE and
not DTLS: ``docs/security.md``.

A context is a directory in aiocoap's format (``FilesystemSecurityContext``):
``settings.json`` with ``sender-id_hex``, ``recipient-id_hex`` and optionally ``algorithm``,
and ``secret.json`` with ``secret_hex`` (and ``salt_hex``); aiocoap keeps the sequence
numbers and the replay window in ``sequence.json`` there, so the directory must be writable
and survive restarts (a lost sequence number would reuse a nonce). :func:`provision` writes a
matching pair: one for the server, one for a device.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from fota.errors import ConfigError

EXTRA_HINT = "install fota's OSCORE extra: pip install 'fota[oscore]'"


def available() -> str | None:
    """None when aiocoap's OSCORE can be used, else what is missing (and how to get it)."""
    try:
        import aiocoap.defaults
    except ImportError as exc:  # pragma: no cover - aiocoap is a dependency
        return str(exc)
    missing = aiocoap.defaults.oscore_missing_modules()
    if missing:
        return f"aiocoap's OSCORE needs {', '.join(missing)}: {EXTRA_HINT}"
    return None


def load_context(path: Path, *, key: str = "oscore") -> Any:
    """Open the security context in directory ``path`` (aiocoap's format).

    Args:
        path: the context's directory.
        key: the setting that named it, for error messages.

    Raises:
        ConfigError: the OSCORE extra is missing, or the directory is missing, unreadable,
            incomplete, or locked by another process using the same context.
    """
    missing = available()
    if missing is not None:
        raise ConfigError(f"{key}: {missing}")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory (an OSCORE security context)")
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{key}: {path} is not writable; OSCORE keeps its sequence numbers there")
    _check_files(path, key)
    import filelock
    from aiocoap.oscore import FilesystemSecurityContext

    try:
        return FilesystemSecurityContext(str(path))
    except filelock.Timeout as exc:
        # aiocoap locks the directory: two users of one context would reuse nonces.
        raise ConfigError(
            f"{key}: {path} is in use by another process (one context, one user)"
        ) from exc
    except FilesystemSecurityContext.LoadError as exc:
        raise ConfigError(f"{key}: {path}: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:  # unreadable files, bad JSON, bad hex
        raise ConfigError(f"{key}: {path}: {exc.__class__.__name__}: {exc}") from exc


REQUIRED = ("sender-id", "recipient-id", "secret")
"""Parameters a context must have (each as ``NAME_hex`` or ``NAME_ascii``)."""


def _check_files(path: Path, key: str) -> None:
    """Check the static files first: aiocoap fails late, holding the lock, on a bad one."""
    found: set[str] = set()
    for name in ("settings.json", "secret.json"):
        try:
            data = json.loads((path / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: {path / name}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: {path / name}: not a JSON object")
        found |= {k.removesuffix("_hex").removesuffix("_ascii") for k in data}
    missing = [name for name in REQUIRED if name not in found]
    if missing:
        raise ConfigError(f"{key}: {path}: settings.json or secret.json lacks {', '.join(missing)}")


def _write_private(path: Path, data: dict[str, str]) -> None:
    # 0600 from the start: a secret must never exist world-readable, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def provision(
    server_dir: Path,
    device_dir: Path,
    *,
    server_id: bytes = b"\x00",
    device_id: bytes = b"\x01",
    secret: bytes | None = None,
) -> None:
    """Write a matching pair of security contexts: the server's and one device's.

    Args:
        server_dir: the server's context directory (created, mode 0700).
        device_dir: the device's (created, mode 0700).
        server_id: the server's sender id (the device's recipient id), at most 7 bytes.
        device_id: the device's sender id, at most 7 bytes; unique per device.
        secret: the master secret; None draws 32 random bytes.

    Raises:
        ValueError: an id longer than 7 bytes or the two ids equal.
    """
    for name, value in (("server_id", server_id), ("device_id", device_id)):
        if len(value) > 7:
            raise ValueError(f"{name}: {len(value)} bytes; at most 7 (AES-CCM-16-64-128 nonce)")
    if server_id == device_id:
        raise ValueError("server_id and device_id must differ")
    secret = secret if secret is not None else secrets.token_bytes(32)
    for folder, sender, recipient in (
        (server_dir, server_id, device_id),
        (device_dir, device_id, server_id),
    ):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings = {"sender-id_hex": sender.hex(), "recipient-id_hex": recipient.hex()}
        (folder / "settings.json").write_text(json.dumps(settings))
        _write_private(folder / "secret.json", {"secret_hex": secret.hex()})


def is_protected(request: Any) -> bool:
    """Whether an aiocoap server request came in through OSCORE."""
    from aiocoap.transports.oscore import OSCOREAddress

    return isinstance(request.remote, OSCOREAddress)


def context_of(request: Any) -> Any:
    """The security context that protected ``request`` (None for a plaintext one)."""
    if not is_protected(request):
        return None
    return request.remote.security_context


def close_context(context: Any) -> None:
    """Persist a context's sequence number and release its directory's lock.

    aiocoap does this only when the object is garbage-collected (``__del__``); a client that
    closes and another that opens the same directory in one process (a restart in place)
    must not depend on when that happens.
    """
    if context is not None and getattr(context, "lockfile", None) is not None:
        context._destroy()
