"""Real SWUpdate images for tests: CMS-signed ``.swu`` files with one ``rawfile`` image.

As /tmp/tools/swupdate/build.sh does: a CA and a signer it certifies (EKU emailProtection,
swupdate's default ``--cert-purpose``), ``sw-description`` with ``hardware-compatibility``
(the Debian build checks it; ``-H testboard:1.0``), signed with ``openssl cms -sign ... -outform
DER``, packed with ``cpio -o -H crc`` with ``sw-description`` first and its signature second.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.installing import SigningKeys, make_signing_keys, openssl, setup_run

PROGRAMS = {"swupdate": "swupdate", "openssl": "openssl", "cpio": "cpio"}
BOARD = "testboard:1.0"


def require_tools() -> None:
    """Fail (never skip) when a tool the SWUpdate tests need is missing, naming its package."""
    missing = [f"{p} (Debian package {pkg})" for p, pkg in PROGRAMS.items() if not shutil.which(p)]
    if missing:
        pytest.fail(
            "the SWUpdate tests need the real tools: missing "
            + ", ".join(missing)
            + "; apt-get install swupdate openssl cpio",
            pytrace=False,
        )


@dataclass(frozen=True)
class Keys(SigningKeys):
    """The SWUpdate trust anchor and signers."""

    def args(self) -> list[str]:
        """``args`` for the installer: trust the CA, claim the board."""
        return ["-k", str(self.ca_cert), "-H", BOARD]


def make_keys(root: Path) -> Keys:
    """The SWUpdate keys (see :class:`tests.installing.SigningKeys`)."""
    return make_signing_keys(root, Keys)


def sw_description(target: Path, sha256: str, version: str) -> str:
    return f"""software =
{{
	version = "{version}";
	description = "test";
	hardware-compatibility = [ "1.0" ];
	images: (
		{{
			filename = "app.bin";
			path = "{target}";
			type = "rawfile";
			sha256 = "{sha256}";
		}}
	);
}}
"""


def make_swu(
    out: Path,
    keys: Keys,
    payload: bytes,
    target: Path,
    *,
    version: str = "1.0",
    sha256: str | None = None,
    signed: bool = True,
    untrusted: bool = False,
    tamper: bool = False,
) -> Path:
    """A ``.swu`` whose rawfile image ``app.bin`` (``payload``) goes to ``target``.

    Args:
        sha256: the digest written in sw-description (default: the payload's).
        signed: add ``sw-description.sig``.
        untrusted: sign with the certificate the CA did not issue.
        tamper: change sw-description after signing it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        d = Path(tmp)
        (d / "app.bin").write_bytes(payload)
        desc = d / "sw-description"
        desc.write_text(
            sw_description(target, sha256 or hashlib.sha256(payload).hexdigest(), version)
        )
        members = ["sw-description", "app.bin"]
        if signed:
            cert, key = (
                (keys.rogue_cert, keys.rogue_key)
                if untrusted
                else (keys.signer_cert, keys.signer_key)
            )
            openssl(
                "cms -sign -in @desc -out @sig -signer @cert -inkey @key -outform DER "
                "-nosmimecap -binary",
                desc=desc,
                sig=d / "sw-description.sig",
                cert=cert,
                key=key,
            )
            members.insert(1, "sw-description.sig")
        if tamper:
            desc.write_text(desc.read_text().replace('"test"', '"tampered"'))
        archive = setup_run(
            ["cpio", "-o", "-H", "crc", "--quiet"],
            cwd=d,
            input="".join(f"{m}\n" for m in members).encode(),
        ).stdout
    out.write_bytes(archive)
    return out
