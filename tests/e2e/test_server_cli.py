"""`fota server` for manual testing: a directory of images, and the devices seen, live.

The server runs as a real subprocess on 127.0.0.1 port 0; a real fota client runs in the test
process. Every wait is on a line the server prints, never on a sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from fota import AutoAuthorize, Client, Config, Severity
from fota.core.manifest import TrustStore, kid_for
from fota.errors import ConfigError
from fota.keys import generate, save_keypair
from fota.testing import DeviceSeen
from fota.tools.server_view import (
    IMAGES_TOML,
    ImageDirectory,
    Served,
    device_table,
    plain_line,
    version_from_name,
    version_key,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

DEVICE_CLASS = "test-gw"
WAIT = 20.0
"""Bound of one wait for a line: only a bug gets near it on loopback."""


class ServerProcess:
    """``fota server ... --json`` as a subprocess, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.lines: list[dict[str, Any]] = []

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> dict[str, Any]:
        """Read lines until one matches; every line read is kept in ``lines``."""

        async def read() -> dict[str, Any]:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    code = await self.proc.wait()
                    raise AssertionError(
                        f"fota server exited {code}: {self.stderr.read_text()[-2000:]}"
                    )
                line: dict[str, Any] = json.loads(raw)
                self.lines.append(line)
                if predicate(line):
                    return line

        return await asyncio.wait_for(read(), timeout)

    def of(self, device: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("device") == device]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), WAIT)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "release.key"
    save_keypair(generate(), path)
    return path


def trust_of(key: Path) -> TrustStore:
    from fota.keys import load_private

    public = load_private(key).public_key()
    return TrustStore({kid_for(public): public})


def server_args(tmp_path: Path, key: Path, images: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fota",
        "--log-level",
        "warning",
        "server",
        *("--root", str(tmp_path / "srv"), "--key", str(key), "--port", "0"),
        *("--device-class", DEVICE_CLASS, "--images", str(images), *extra),
    ]


@pytest.fixture
async def run_server(tmp_path: Path, key: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[ServerProcess] = []

    async def start(images: Path, *extra: str) -> ServerProcess:
        stderr = tmp_path / f"server{len(started)}.log"
        with open(stderr, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *server_args(tmp_path, key, images, *extra),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        server = ServerProcess(proc, stderr)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()


def write_atomically(path: Path, data: bytes) -> None:
    # Under a hidden name first, then renamed into place: a watching server never reads half
    # a file (nor an empty one between truncate and write).
    tmp = path.with_name(f".{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_image(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    write_atomically(path, data)
    return data


def config(tmp_path: Path, uri: str, trust: TrustStore, device: str = "dev1") -> Config:
    # The pytest plugin's test timing (fota_config): loopback answers in microseconds.
    return Config(
        server=uri,
        device_id=device,
        device_class=DEVICE_CLASS,
        state_dir=tmp_path / device / "state",
        trust=trust,
        target=tmp_path / device / "firmware.bin",
        ack_timeout=0.25,
        retry_base=0.05,
        boot_id_path=None,
    )


# -- the whole thing: a directory, a device, the live record ------------------------------


async def test_server_publishes_a_directory_and_shows_a_device_install_the_newest(
    tmp_path: Path, key: Path, run_server: Callable[..., Any]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "gw-1.0.bin", 8 * 1024)
    write_image(images / "gw-1.9.bin", 24 * 1024)
    newest = write_image(images / "gw-1.10.0.bin", 40 * 1024)  # 1.10.0 is newer than 1.9

    server = await run_server(images, "--json")
    ready = await server.wait_for(lambda line: "uri" in line)
    published = [line for line in server.lines if "published" in line]
    assert [(Path(p["published"]).name, p["sequence"]) for p in published] == [
        ("gw-1.0.bin", 1),
        ("gw-1.9.bin", 2),
        ("gw-1.10.0.bin", 3),
    ]
    assert [p["announced"] for p in published] == [[], [], ["*"]]
    offered = published[-1]
    assert offered["sha256"] == hashlib.sha256(newest).hexdigest()
    assert ready["uri"].startswith("coap://127.0.0.1:")

    async with Client(config(tmp_path, ready["uri"], trust_of(key)), handler=AutoAuthorize()):
        final = await server.wait_for(
            lambda line: line.get("device") == "dev1" and line.get("result") == "SUCCESS"
        )

    lines = server.of("dev1")
    assert lines[0]["observing"] is True and lines[0]["state"] is None  # observes before reporting
    assert lines[0]["address"].startswith("127.0.0.1:")
    states = [line["state"] for line in lines if line["state"]]
    lifecycle = ["DOWNLOADING", "VERIFYING", "INSTALLING", "AWAIT_COMMIT", "IDLE"]
    assert {"DOWNLOADING", "INSTALLING", "IDLE"} <= set(states) <= set(lifecycle)
    assert states == sorted(states, key=lifecycle.index)  # in the lifecycle's order
    assert final["state"] == "IDLE" and final["update_id"] == offered["update_id"]
    assert final["version"] == "1.10.0" and final["size"] == 40 * 1024
    assert final["progress"] == 100 and final["verified"] == 40 * 1024
    progress = [line["progress"] for line in lines if line["progress"] is not None]
    assert progress == sorted(progress)  # never goes back
    installed = (tmp_path / "dev1" / "firmware.bin").read_bytes()
    assert hashlib.sha256(installed).hexdigest() == offered["sha256"]
    assert await server.stop() == 0


async def test_watch_publishes_files_added_while_running(
    tmp_path: Path, run_server: Callable[..., Any]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "gw-1.0.bin", 4096)
    server = await run_server(images, "--json", "--watch", "--watch-interval", "0.05")
    await server.wait_for(lambda line: "uri" in line)

    def published(name: str) -> Callable[[dict[str, Any]], bool]:
        return lambda line: Path(line.get("published", "")).name == name

    # Newer than everything: announced to every device, with the next sequence number.
    data = write_image(images / "gw-2.0.bin", 5000)
    line = await server.wait_for(published("gw-2.0.bin"))
    assert line["announced"] == ["*"] and line["sequence"] == 2 and line["version"] == "2.0"
    assert line["sha256"] == hashlib.sha256(data).hexdigest()

    # Older than 2.0: signed and stored, but every device stays offered 2.0.
    write_image(images / "gw-1.5.bin", 3000)
    line = await server.wait_for(published("gw-1.5.bin"))
    assert line["announced"] == [] and line["sequence"] == 3

    # A bad options file is reported (naming file and key) and the server keeps running ...
    options = images / IMAGES_TOML
    write_atomically(options, b'[images."gw-1.5.bin"]\ndevices = "lab-1"\n')
    error = await server.wait_for(lambda line: "error" in line)
    assert f"{options}:2: " in error["error"]
    assert 'images."gw-1.5.bin".devices: expected a list of device ids' in error["error"]
    # ... and once fixed, the image whose options changed is published again.
    write_atomically(options, b'[images."gw-1.5.bin"]\ndevices = ["lab-1"]\n')
    line = await server.wait_for(published("gw-1.5.bin"))
    assert line["announced"] == ["lab-1"] and line["sequence"] == 4
    assert await server.stop() == 0


# -- a bad directory stops the server before it binds ---------------------------------------


def test_a_bad_images_toml_exits_2_naming_the_file_and_the_key(tmp_path: Path, key: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "gw-1.0.bin", 1024)
    options = images / IMAGES_TOML
    options.write_text('[defaults]\npolite = false\n\n[images."gw-1.0.bin"]\nmax_deferral = -1\n')
    out = subprocess.run(
        server_args(tmp_path, key, images, "--json"),
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f'fota: ConfigError: {options}:5: images."gw-1.0.bin".max_deferral: '
        "expected whole seconds in 0..4294967295, got -1"
    )
    assert out.stdout == ""  # nothing published, nothing bound


def scan(tmp_path: Path, toml: str | None, *names: str, watching: bool = False) -> list[Any]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in names:
        (images / name).write_bytes(b"x" * 100)
    if toml is not None:
        (images / IMAGES_TOML).write_text(toml)
    directory = ImageDirectory(images, device_class=DEVICE_CLASS, watching=watching)
    return [spec for spec, _ in directory.scan()]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[images."gw-1.0.bin"]\nseverity = "urgent"\n',
            ':2: images."gw-1.0.bin".severity: expected one of "optional", "mandatory", '
            '"critical", got "urgent"',
        ),
        (
            '[images."gw-1.0.bin"]\nseverty = "critical"\n',
            ':2: images."gw-1.0.bin".severty: unknown key in images."gw-1.0.bin"; '
            'did you mean "severity"?',
        ),
        (
            '[images."gw-1.0.bin"]\nversion = "' + "9" * 65 + '"\n',
            ':2: images."gw-1.0.bin".version: expected text of 1..64 bytes, got',
        ),
        (
            '[defaults]\ndevices = ["lab-1", "a/b"]\n',
            ":2: defaults.devices[1]: expected a device id of 1..64 characters without '/', "
            'got "a/b"',
        ),
        (
            "[defaults]\ndeadline = 2027-01-31T02:00:00\n",
            ":2: defaults.deadline: expected an offset date-time (2027-01-31T02:00:00Z) or "
            "epoch seconds 0..1099511627775, got 2027-01-31T02:00:00 (no zone)",
        ),
        (
            "[defaults]\nfragment_size = 1000\n",
            ":2: defaults.fragment_size: expected a multiple of 1024 bytes up to 1048576, got 1000",
        ),
        ("[defaults]\npolite = 1\n", ":2: defaults.polite: expected true or false, got 1"),
        ('[defaults]\nversion = "2.0"\n', ":2: defaults.version: unknown key in defaults"),
        ('[images."gw-9.bin"]\npolite = true\n', ':1: images."gw-9.bin": no image file'),
        ("[image]\n", ': image: unknown key; did you mean "images"?'),
        ("[defaults\n", ": not valid TOML"),
    ],
)
def test_bad_entries_name_the_file_the_key_and_the_limit(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        scan(tmp_path, toml, "gw-1.0.bin")
    assert str(caught.value).startswith(str(tmp_path / "images" / IMAGES_TOML))
    assert message in str(caught.value)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"firmware\.bin: no version: name the file"):
        scan(tmp_path, None, "firmware.bin")
    (tmp_path / "images" / "firmware.bin").unlink()
    with pytest.raises(ConfigError, match=r"the same version \(2\.0, v2\.0\)"):
        scan(tmp_path, None, "a-2.0.bin", "b-v2.0.bin")


def test_options_apply_per_image_over_defaults(tmp_path: Path) -> None:
    specs = scan(
        tmp_path,
        '[defaults]\nseverity = "mandatory"\npolite = false\n\n'
        '[images."gw-2.0.bin"]\nversion = "2.0-final"\nseverity = "critical"\n'
        'devices = ["lab-1"]\ndeadline = 2027-01-31T02:00:00Z\nmax_deferral = 3600\n',
        "gw-2.0.bin",
        "gw-1.0.bin",
        ".gw-3.0.bin",  # hidden: being written
        "gw-3.0.bin.part",
        "gw-3.0.bin~",
        watching=True,
    )
    assert [(s.path.name, s.version) for s in specs] == [
        ("gw-1.0.bin", "1.0"),
        ("gw-2.0.bin", "2.0-final"),
    ]
    old, new = specs
    assert (old.severity, old.polite, old.devices, old.deadline) == (
        Severity.MANDATORY,
        False,
        None,
        None,
    )
    assert (new.severity, new.devices, new.deadline, new.max_deferral) == (
        Severity.CRITICAL,
        ("lab-1",),
        1_801_360_800,
        3600,
    )
    assert new.device_class == DEVICE_CLASS


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("gw-2.1.0.bin", "2.1.0"),
        ("gw-2.1.0-rc1.bin", "2.1.0-rc1"),
        ("acme-gw-3.0.tar.gz", "3.0"),
        ("gw-v2.bin", "v2"),
        ("gw-2.1.0", "2.1.0"),
        ("firmware.bin", None),
        ("gw-latest.bin", None),
    ],
)
def test_the_version_comes_from_the_file_name(name: str, version: str | None) -> None:
    assert version_from_name(name) == version


def test_versions_sort_as_people_read_them() -> None:
    versions = ["2.10", "1.0", "2.1.0-rc2", "v2.9", "2.1.0", "2.1.0-rc1", "2.1.0.1"]
    assert sorted(versions, key=version_key) == [
        "1.0",
        "2.1.0-rc1",
        "2.1.0-rc2",
        "2.1.0",
        "2.1.0.1",
        "v2.9",
        "2.10",
    ]


# -- the two human views ------------------------------------------------------------------

NOW = 1_800_000_000.0
UID = "1a2b3c4d5e6f7a8b"


def sample() -> tuple[dict[str, DeviceSeen], dict[str, Served]]:
    image = Served(Path("gw-2.1.0.bin"), "2.1.0", UID, 3, 40_000, b"\x00" * 32, ("*",))
    busy = DeviceSeen("gw-1", "127.0.0.1:40000", NOW - 60, NOW - 2, observing=1, reports=3)
    busy.state, busy.result, busy.update_id, busy.verified = 1, 0, UID, 10_000
    done = DeviceSeen("gw-2", "[::1]:61616", NOW - 90, NOW - 300, reports=6)
    done.state, done.result, done.update_id, done.verified = 0, 1, UID, 40_000
    done.detail = 'self-test "ok"'
    fresh = DeviceSeen("gw-0", "127.0.0.1:40001", NOW, NOW, observing=1)
    return {d.device: d for d in (busy, done, fresh)}, {UID: image}


def test_plain_lines_say_everything_in_key_value_form() -> None:
    devices, images = sample()
    assert plain_line(devices["gw-1"], images, NOW) == (
        "2027-01-15T08:00:00Z device=gw-1 address=127.0.0.1:40000 observing=yes "
        f"state=DOWNLOADING result=INITIAL update={UID} version=2.1.0 progress=25%"
    )
    assert plain_line(devices["gw-2"], images, NOW) == (
        "2027-01-15T08:00:00Z device=gw-2 address=[::1]:61616 observing=no "
        f"state=IDLE result=SUCCESS update={UID} version=2.1.0 progress=100% "
        'detail="self-test \\"ok\\""'
    )
    assert plain_line(devices["gw-0"], images, NOW) == (
        "2027-01-15T08:00:00Z device=gw-0 address=127.0.0.1:40001 observing=yes "
        "state=- result=- update=- version=- progress=-"
    )


def test_the_live_table_renders_one_row_per_device() -> None:
    from rich.console import Console

    devices, images = sample()
    out = StringIO()
    Console(file=out, width=140, highlight=False).print(
        device_table(devices, images, NOW, "fota server coap://127.0.0.1:61616")
    )
    text = out.getvalue()
    rows = [line for line in text.splitlines() if "gw-" in line and "│" in line]
    assert "fota server coap://127.0.0.1:61616: 3 devices" in text
    headers = [cell.strip() for cell in text.splitlines()[2].split("│")[1:-1]]
    assert headers == [
        "Device",
        "Address",
        "Observing",
        "State",
        "Result",
        "Update",
        "Progress",
        "Seen",
    ]
    assert [row.split("│")[1].strip() for row in rows] == ["gw-0", "gw-1", "gw-2"]
    cells = [cell.strip() for cell in rows[1].split("│")[1:-1]]
    assert cells == [
        "gw-1",
        "127.0.0.1:40000",
        "yes",
        "DOWNLOADING",
        "INITIAL",
        f"{UID} 2.1.0",
        "25%",
        "2 s ago",
    ]
    assert [cell.strip() for cell in rows[2].split("│")[1:-1]][3:] == [
        "IDLE",
        "SUCCESS",
        f"{UID} 2.1.0",
        "100%",
        "5 min ago",
    ]
    assert f"every device is offered 2.1.0 (update {UID})" in text
