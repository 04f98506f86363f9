"""The `fota` command as a user runs it: keys, manifests, and the test server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fota.core import manifest as mf
from fota.keys import load_private, load_public

pytestmark = pytest.mark.timeout(60)


def fota(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fota", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("alg", ["ed25519", "es256"])
def test_keygen_create_inspect_round_trip(tmp_path: Path, alg: str) -> None:
    key = tmp_path / "release.key"
    out = fota("manifest", "keygen", "--out", str(key), "--alg", alg)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (key.stat().st_mode & 0o777) == 0o600
    pub = Path(info["public"])
    assert mf.kid_for(load_public(pub)).hex() == info["kid"]
    assert load_private(key)

    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(200_000))
    manifest = tmp_path / "fw.cose"
    out = fota(
        "manifest",
        "create",
        "--key",
        str(key),
        "--image",
        str(image),
        "--version",
        "3.1",
        "--device-class",
        "gw",
        "--sequence",
        "7",
        "--severity",
        "critical",
        "--impolite",
        "--fragment-size",
        "65536",
        "--deadline",
        "2027-01-31T02:00:00Z",
        "--out",
        str(manifest),
    )
    assert out.returncode == 0, out.stderr

    out = fota("manifest", "inspect", str(manifest), "--trust", str(pub))
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["signature"] == "valid"
    assert shown["alg"] == {"ed25519": "EdDSA", "es256": "ES256"}[alg]
    assert shown["sequence"] == 7 and shown["version"] == "3.1" and shown["polite"] is False
    assert shown["severity"] == "critical" and shown["fragments"] == 4
    assert shown["deadline"] == 1_801_360_800  # 2027-01-31T02:00:00Z
    assert shown["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert shown["image_uri"] == f"../img/{shown['image_sha256']}"


def test_inspect_with_the_wrong_key_fails_with_a_typed_message(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert fota("manifest", "keygen", "--out", str(tmp_path / name)).returncode == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(b"x" * 5000)
    manifest = tmp_path / "fw.cose"
    created = fota(
        "manifest",
        "create",
        "--key",
        str(tmp_path / "a"),
        "--image",
        str(image),
        "--version",
        "1",
        "--device-class",
        "gw",
        "--sequence",
        "1",
        "--out",
        str(manifest),
    )
    assert created.returncode == 0, created.stderr
    out = fota("manifest", "inspect", str(manifest), "--trust", str(tmp_path / "b.pub"))
    assert out.returncode == 2
    assert "ManifestError: manifest kid:" in out.stderr and "not in the trust store" in out.stderr
    assert "Traceback" not in out.stderr


def test_inspect_of_garbage_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cose"
    bad.write_bytes(b"\x83\x01\x02\x03")  # a complete CBOR array, untagged
    out = fota("manifest", "inspect", str(bad))
    assert out.returncode == 2
    assert "manifest cose_sign1: expected CBOR tag 18" in out.stderr


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fota_server_publishes_and_serves_to_coap_client(tmp_path: Path) -> None:
    import shutil

    import cbor2

    client = shutil.which("coap-client-notls")
    assert client, "coap-client-notls is missing: apt-get install libcoap3-bin (scripts/test does)"
    assert fota("manifest", "keygen", "--out", str(tmp_path / "k")).returncode == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(30_000))
    port = free_udp_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fota",
            "server",
            "--root",
            str(tmp_path / "srv"),
            "--key",
            str(tmp_path / "k"),
            "--port",
            str(port),
            "--device-class",
            "gw",
            "--publish",
            f"{image}=4.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        published = json.loads(proc.stdout.readline())
        ready = json.loads(proc.stdout.readline())  # printed once the socket is bound
        assert ready["uri"] == f"coap://127.0.0.1:{port}"
        out = tmp_path / "ann.cbor"
        got = subprocess.run(
            [client, "-B", "10", "-o", str(out), f"{ready['uri']}/fota/ann/any-device"],
            capture_output=True,
            timeout=20,
            check=False,
        )
        assert got.returncode == 0, got.stderr
        ann = cbor2.loads(out.read_bytes())
        assert ann[1] == 1 and ann[2].hex().startswith(published["update_id"])
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_cli_choices_name_every_component_and_severity() -> None:
    from fota.app import cli
    from fota.core.manifest import Component, Severity

    assert [c.name.lower() for c in Component] == cli.COMPONENTS
    assert [s.name.lower() for s in Severity] == cli.SEVERITIES


def test_fetch_path_stays_light() -> None:
    # `fota fetch` is benchmarked on start-up and memory: it must not pull in the state
    # machine, aiocoap or cryptography.
    code = (
        "import sys, fota.app.cli, fota.fetch; "
        "print(sorted(m for m in ('aiocoap', 'cryptography', 'transitions') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("deadline", "problem"),
    [("2027-01-31T02:00", "has no time zone"), ("next tuesday", "neither epoch seconds")],
)
def test_create_refuses_a_deadline_it_cannot_place(
    tmp_path: Path, deadline: str, problem: str
) -> None:
    key = tmp_path / "k"
    assert fota("manifest", "keygen", "--out", str(key)).returncode == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(b"x" * 100)
    out = fota(
        "manifest",
        "create",
        *("--key", str(key), "--image", str(image), "--version", "1", "--device-class", "gw"),
        *("--sequence", "1", "--deadline", deadline, "--out", str(tmp_path / "m")),
    )
    assert out.returncode == 2
    assert "--deadline" in out.stderr and problem in out.stderr
    assert not (tmp_path / "m").exists()
