"""A private, real RAUC system for tests: keys, bundles, two file slots, a private D-Bus.

Everything lives under a test's directory: a CA and a signing certificate (EKU
emailProtection: RAUC 1.8 refuses codeSigning), bundles made with ``rauc bundle``, two plain
files as ``type=raw`` slots, a ``bootloader=custom`` backend script that keeps the boot state
in files, a private D-Bus "system" bus (the packaged system bus configuration with its own
socket, so the policy of ``rauc-service`` applies) and ``rauc service
--override-boot-slot=<bootname>``: this machine has no ``rauc.slot=`` on its kernel command
line. :meth:`RaucSystem.reboot` stands for a device restart: the service is started again with
the slot the bootloader would boot.

Every daemon is a direct child of the test process (``dbus-daemon --nofork``), stopped and
reaped by :meth:`RaucSystem.stop`: PID 1 here does not reap orphans.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.installing import SigningKeys, make_signing_keys, setup_run

COMPATIBLE = "test-board"

PROGRAMS = {
    "rauc": "rauc",
    "dbus-daemon": "dbus-daemon",
    "gdbus": "libglib2.0-bin",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "openssl": "openssl",
}
FILES = {
    "/usr/share/dbus-1/system.conf": "dbus-system-bus-common",
    "/usr/share/dbus-1/system.d/de.pengutronix.rauc.conf": "rauc-service",
}


def require_tools() -> None:
    """Fail (never skip) when a tool the RAUC tests need is missing, naming its Debian package."""
    missing = [f"{p} (Debian package {pkg})" for p, pkg in PROGRAMS.items() if not shutil.which(p)]
    missing += [f"{f} (Debian package {pkg})" for f, pkg in FILES.items() if not Path(f).exists()]
    if missing:
        pytest.fail(
            "the RAUC tests need the real tools: missing "
            + ", ".join(missing)
            + "; apt-get install rauc rauc-service dbus libglib2.0-bin squashfs-tools openssl",
            pytrace=False,
        )


Keys = SigningKeys


def make_keys(root: Path) -> Keys:
    """The RAUC keyring and signers (see :class:`tests.installing.SigningKeys`)."""
    return make_signing_keys(root, SigningKeys)


def make_bundle(
    root: Path,
    keys: Keys,
    name: str,
    image: bytes,
    version: str,
    *,
    compatible: str = COMPATIBLE,
    fmt: str = "plain",
    rogue: bool = False,
) -> Path:
    """``rauc bundle`` of one ``rootfs`` image (a fresh content directory: rauc rewrites it)."""
    content = root / f"{name}.content"
    shutil.rmtree(content, ignore_errors=True)
    content.mkdir(parents=True)
    (content / "rootfs.img").write_bytes(image)
    (content / "manifest.raucm").write_text(
        f"[update]\ncompatible={compatible}\nversion={version}\n"
        f"description=test bundle {version}\n\n[bundle]\nformat={fmt}\n\n"
        "[image.rootfs]\nfilename=rootfs.img\n"
    )
    out = root / f"{name}.raucb"
    cert, key = (keys.rogue_cert, keys.rogue_key) if rogue else (keys.signer_cert, keys.signer_key)
    setup_run(["rauc", "bundle", f"--cert={cert}", f"--key={key}", str(content), str(out)])
    shutil.rmtree(content)
    return out


BACKEND = """#!/bin/sh
# RAUC custom bootloader backend, file-backed.
# get-primary | set-primary B | get-state B | set-state B good|bad
D={dir}
echo "$*" >> "$D/calls"
case "$1" in
  get-primary) cat "$D/primary" ;;
  set-primary) echo "$2" > "$D/primary"; echo good > "$D/state.$2" ;;
  get-state)   cat "$D/state.$2" 2>/dev/null || echo good ;;
  set-state)   echo "$3" > "$D/state.$2" ;;
  *) echo "unknown command $1" >&2; exit 1 ;;
esac
"""


def bus_config(socket: Path) -> str:
    """The packaged system bus configuration on ``socket``: no user, pidfile, fork, activation."""
    conf = Path("/usr/share/dbus-1/system.conf").read_text()
    conf = re.sub(r"<listen>[^<]*</listen>", f"<listen>unix:path={socket}</listen>", conf)
    for drop in (
        r"<user>[^<]*</user>",
        r"<pidfile>[^<]*</pidfile>",
        r"<fork/>",
        r"<standard_system_servicedirs/>",
        r"<servicedir>[^<]*</servicedir>",
        r"<include if_selinux_enabled[^>]*>[^<]*</include>",
    ):
        conf = re.sub(drop, "", conf)
    return conf.replace(
        "<includedir>system.d</includedir>", "<includedir>/usr/share/dbus-1/system.d</includedir>"
    )


class RaucSystem:
    """Two raw file slots (A = rootfs.0, B = rootfs.1) driven by a real ``rauc service``."""

    SLOTS = {"A": "rootfs.0", "B": "rootfs.1"}

    def __init__(self, root: Path, keys: Keys, image: bytes, booted: str = "A") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.slot_files = {"A": root / "slotA.img", "B": root / "slotB.img"}
        self.slot_size = 1 << 20
        for path in self.slot_files.values():
            path.write_bytes(b"\0" * self.slot_size)
        with open(self.slot_files[booted], "r+b") as f:
            f.write(image)
        self.boot_dir = root / "boot"
        self.boot_dir.mkdir()
        (self.boot_dir / "primary").write_text(booted + "\n")
        backend = root / "backend.sh"
        backend.write_text(BACKEND.format(dir=self.boot_dir))
        backend.chmod(0o755)
        self.conf = root / "system.conf"
        self.conf.write_text(
            f"[system]\ncompatible={COMPATIBLE}\nbootloader=custom\n"
            f"statusfile={root}/status.raucs\nmountprefix={root}/mnt\n\n"
            f"[keyring]\npath={keys.ca_cert}\n\n"
            f"[handlers]\nbootloader-custom-backend={backend}\n\n"
            f"[slot.rootfs.0]\ndevice={self.slot_files['A']}\ntype=raw\nbootname=A\n\n"
            f"[slot.rootfs.1]\ndevice={self.slot_files['B']}\ntype=raw\nbootname=B\n"
        )
        # A unix socket path has at most 107 bytes: use a short directory if root is long.
        self._short: Path | None = None
        sock_dir = root
        if len(str(root / "bus.sock")) > 100:
            self._short = Path(tempfile.mkdtemp(prefix="rauc-", dir="/tmp"))
            sock_dir = self._short
        self.socket = sock_dir / "bus.sock"
        self.bus_conf = root / "bus.conf"
        self.bus_conf.write_text(bus_config(self.socket))
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.socket}"}
        self.booted = booted
        self.bus: subprocess.Popen[bytes] | None = None
        self.service: subprocess.Popen[bytes] | None = None
        self.service_log = root / "service.log"

    # -- daemons --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the private bus and the service (booted from ``self.booted``)."""
        self.bus = subprocess.Popen(
            [
                "dbus-daemon",
                f"--config-file={self.bus_conf}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.bus.stdout is not None
        address = self.bus.stdout.readline().decode()
        if not address.startswith("unix:"):
            rest = self.bus.stdout.read().decode() if self.bus.poll() is not None else ""
            self.stop()
            pytest.fail(f"dbus-daemon did not start: {address}{rest}")
        self._start_service()

    def _start_service(self) -> None:
        with open(self.service_log, "ab") as logf:
            self.service = subprocess.Popen(
                ["rauc", "-c", str(self.conf), f"--override-boot-slot={self.booted}", "service"],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        # Wait for the service to own its bus name (an event, not a poll), then check it answers.
        address = self.env["DBUS_SYSTEM_BUS_ADDRESS"]
        waited = subprocess.run(
            ["gdbus", "wait", "--address", address, "--timeout", "20", "de.pengutronix.rauc"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if waited.returncode == 0 and self.rauc("status", check=False).returncode == 0:
            return
        log = self.service_log.read_text(errors="replace")
        self.stop()
        pytest.fail(f"rauc service did not come up ({waited.stderr.strip()}):\n{log}")

    def _stop_service(self) -> None:
        if self.service is not None:
            _stop(self.service)
            self.service = None

    def stop(self) -> None:
        """Stop and reap the service and the bus; remove the short socket directory."""
        self._stop_service()
        if self.bus is not None:
            _stop(self.bus)
            if self.bus.stdout is not None:
                self.bus.stdout.close()
            self.bus = None
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)
            self._short = None

    def reboot(self, *, boots: bool = True) -> None:
        """Restart the "device": boot the primary slot (or, ``boots=False``, fall back)."""
        self._stop_service()
        if boots:
            self.booted = self.primary
        self._start_service()

    # -- looking at it ----------------------------------------------------------------------

    def rauc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The real ``rauc`` client on this system's bus."""
        done = subprocess.run(
            ["rauc", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            pytest.fail(f"rauc {args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def status(self) -> dict[str, Any]:
        """``rauc status --detailed`` as JSON, slots as a dict by slot name."""
        data: dict[str, Any] = json.loads(
            self.rauc("status", "--detailed", "--output-format=json").stdout
        )
        data["slots"] = {k: v for entry in data["slots"] for k, v in entry.items()}
        return data

    @property
    def primary(self) -> str:
        """The bootname the bootloader boots next (the backend's file)."""
        return (self.boot_dir / "primary").read_text().strip()

    def boot_state(self, bootname: str) -> str:
        """``good`` or ``bad``, as the backend keeps it."""
        path = self.boot_dir / f"state.{bootname}"
        return path.read_text().strip() if path.exists() else "good"

    def slot(self, bootname: str) -> bytes:
        """The bytes of a slot file."""
        return self.slot_files[bootname].read_bytes()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
