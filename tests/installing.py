"""Helpers for installer tests: signed manifests for local images, and a simulated bootloader.

The bootloader is two small shell scripts on disk, as a U-Boot environment would be driven by
``fw_setenv`` / ``fw_printenv``: ``setenv SLOT`` writes the slot to boot next, ``booted``
prints the slot that booted. A test "reboots" the device with :meth:`Bootloader.reboot`: the
next slot becomes the booted one (or, for a failed boot, the bootloader falls back), and the
boot id file gets a new id, as ``/proc/sys/kernel/random/boot_id`` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import crashpoints
from fota.core import manifest as mf
from fota.core.manifest import Component, Manifest, ManifestBody, TrustStore

KEY = ed25519.Ed25519PrivateKey.generate()
KID = mf.kid_for(KEY.public_key())
TRUST = TrustStore({KID: KEY.public_key()})
FRAGMENT = 64 * 1024


def manifest_for(
    image: bytes,
    version: str,
    *,
    sequence: int = 2,
    component: Component = Component.FIRMWARE,
    device_class: str = "test-gw",
) -> Manifest:
    """A verified manifest describing ``image`` (signed with this module's key)."""
    count = max(1, -(-len(image) // FRAGMENT))
    body = ManifestBody(
        sequence=sequence,
        component=component,
        version=version,
        device_class=device_class,
        image_size=len(image),
        image_sha256=hashlib.sha256(image).digest(),
        image_uri=f"../img/{version}",
        fragment_size=FRAGMENT,
        fragment_sha256=tuple(
            hashlib.sha256(image[i * FRAGMENT : (i + 1) * FRAGMENT]).digest() for i in range(count)
        ),
    )
    return mf.verify(mf.sign(body, KEY, KID), TRUST)


class Progress:
    """An installer's progress callback that records what it was told."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def __call__(self, percent: int) -> None:
        self.values.append(percent)


def proc_gone(pid: int) -> bool:
    """The process is gone or a zombie (its parent, init in a container, may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def ends_within(pid: int, seconds: float) -> bool:
    """Wait (on a pidfd, not a sleep) until the process ends: SIGKILL is delivered async."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return proc_gone(pid) or bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


CHILD = """
import asyncio, json, pickle, sys
from pathlib import Path
from fota.install import Context, build
table, state_dir, candidate, manifest = sys.argv[1:5]
inst = build("installers.crash", json.loads(table), Context(Path(state_dir), 30.0))
m = pickle.loads(Path(manifest).read_bytes())
asyncio.run(inst.install(Path(candidate), m, lambda percent: None))
"""


def install_until_crash(
    table: dict[str, Any], state_dir: Path, candidate: Path, manifest: Manifest, point: str
) -> None:
    """Run ``install`` in a child process with ``FOTA_CRASH_AT=point``; check it died there."""
    pickled = state_dir.parent / "manifest.pickle"
    pickled.write_bytes(pickle.dumps(manifest))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(table), str(state_dir), str(candidate),
         str(pickled)],
        capture_output=True, text=True, timeout=120, cwd=root, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(root), crashpoints.ENV: point},
    )  # fmt: skip
    if done.returncode != -signal.SIGKILL:
        pytest.fail(
            f"install did not die at {point}: {done.returncode}\n{done.stdout}{done.stderr}"
        )


@dataclass(frozen=True)
class SigningKeys:
    """A CA, a signer it certifies (EKU emailProtection: what RAUC and SWUpdate accept for
    CMS), and an unrelated self-signed "rogue" signer. PEM files."""

    ca_cert: Path
    signer_cert: Path
    signer_key: Path
    rogue_cert: Path
    rogue_key: Path


K = TypeVar("K", bound=SigningKeys)


def setup_run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run a setup command; fail the test with its output if it fails."""
    done = subprocess.run(argv, capture_output=True, timeout=120, **kw)
    if done.returncode != 0:
        pytest.fail(f"{argv}: exit {done.returncode}\n{done.stdout!r}\n{done.stderr!r}")
    return done


def openssl(words: str, **paths: Path) -> None:
    """``openssl`` with ``words`` split at spaces; ``@name`` stands for the path ``name``."""
    setup_run(["openssl", *(str(paths[w[1:]]) if w.startswith("@") else w for w in words.split())])


def make_signing_keys(root: Path, cls: type[K]) -> K:
    """Make the key set of :class:`SigningKeys` (or a subclass) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    k = cls(root / "ca.cert.pem", root / "signer.cert.pem", root / "signer.key.pem",
            root / "rogue.cert.pem", root / "rogue.key.pem")  # fmt: skip
    ca_key, csr, ext = root / "ca.key.pem", root / "signer.csr", root / "signer.ext"
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -keyout @key -out @cert -days 3650 -subj /CN=test-ca "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        key=ca_key,
        cert=k.ca_cert,
    )
    openssl(
        "req -newkey rsa:2048 -nodes -keyout @key -out @csr -subj /CN=test-signer",
        key=k.signer_key,
        csr=csr,
    )
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=emailProtection\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    openssl(
        "x509 -req -in @csr -CA @ca -CAkey @cakey -CAcreateserial -out @cert -days 3650 "
        "-extfile @ext",
        csr=csr,
        ca=k.ca_cert,
        cakey=ca_key,
        cert=k.signer_cert,
        ext=ext,
    )
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -keyout @key -out @cert -days 3650 -subj /CN=rogue",
        key=k.rogue_key,
        cert=k.rogue_cert,
    )
    return k


def write_script(path: Path, body: str) -> Path:
    """An executable POSIX shell script."""
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(0o755)
    return path


class Bootloader:
    """A simulated A/B bootloader environment under ``root``.

    Files: ``next`` (the slot to boot), ``booted`` (the slot that booted), ``boot_id`` (changes
    at every reboot) and ``calls`` (every setenv, one per line).
    """

    def __init__(self, root: Path, booted: str = "a") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        (root / "next").write_text(booted)
        (root / "booted").write_text(booted)
        self.boot_id_path = root / "boot_id"
        self.boot_id_path.write_text(str(uuid.uuid4()))
        self.setenv = write_script(
            root / "fw_setenv",
            f'echo "$1" >> {root}/calls\nprintf %s "$1" > {root}/next.tmp\n'
            f"mv {root}/next.tmp {root}/next\n",
        )
        self.printenv = write_script(root / "fw_printenv", f"cat {root}/booted\n")

    @property
    def next(self) -> str:
        """The slot the bootloader boots next."""
        return (self.root / "next").read_text()

    @property
    def booted(self) -> str:
        """The slot that booted."""
        return (self.root / "booted").read_text()

    @property
    def calls(self) -> list[str]:
        """Every slot name ``setenv`` was called with."""
        path = self.root / "calls"
        return path.read_text().split() if path.exists() else []

    def reboot(self, *, boots: bool = True) -> None:
        """Restart the device: boot ``next`` (or fall back to the booted slot)."""
        if boots:
            (self.root / "booted").write_text(self.next)
        self.boot_id_path.write_text(str(uuid.uuid4()))

    def switch_command(self) -> list[str]:
        """``switch_command`` for :class:`~fota.install.ab.ABInstaller`."""
        return [str(self.setenv), "{slot}"]

    def booted_command(self) -> list[str]:
        """``booted_command`` for :class:`~fota.install.ab.ABInstaller`."""
        return [str(self.printenv)]
