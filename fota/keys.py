"""Key files: PEM private keys for signing, PEM public keys for the trust store."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fota.core.manifest import PrivateKey, PublicKey, TrustStore, kid_for
from fota.errors import ConfigError


def generate(alg: str = "ed25519") -> PrivateKey:
    """A new signing key: ``ed25519`` (EdDSA) or ``es256`` (ECDSA P-256)."""
    if alg == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "es256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigError(f"alg: {alg!r} is not ed25519 or es256")


def save_keypair(key: PrivateKey, path: Path) -> Path:
    """Write ``path`` (private, mode 0600) and ``path.pub`` (public); return the public path."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = Path(f"{path}.pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub


def load_private(path: Path) -> PrivateKey:
    """Load a PEM signing key (Ed25519 or P-256)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"signing key {path}: {exc}") from exc
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigError(f"signing key {path}: only Ed25519 and P-256 keys are supported")


def load_public(path: Path) -> PublicKey:
    """Load a PEM verification key (Ed25519 or P-256)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"trust key {path}: {exc}") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigError(f"trust key {path}: only Ed25519 and P-256 keys are supported")


def trust_store(paths: list[Path]) -> TrustStore:
    """A trust store of public key files; each key's id is :func:`kid_for` of the key."""
    store = TrustStore()
    for path in paths:
        key = load_public(path)
        store.add(kid_for(key), key)
    return store
