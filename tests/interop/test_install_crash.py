"""Every crash point of install, commit and rollback: kill -9 there, restart, end on one image.

``fota run`` runs as a real subprocess with ``FOTA_CRASH_AT=<point>``
(:mod:`fota.crashpoints`): it SIGKILLs itself the first time it passes the point, exactly as a
power cut would stop it there. It is started again (without the variable) until the update
ends. Then:

* the device runs exactly one complete image: the new one after a commit, the old one after a
  rollback (byte for byte, through the backend's own pointer: the file, the symlink, the slot
  the simulated bootloader booted);
* the journal is readable and agrees (IDLE with the new manifest installed, or FAILED with the
  old one);
* the server recorded exactly one final report for the update (SUCCESS or ROLLED_BACK), and no
  other final report.

A backend that needs a restart (A/B through a bootloader) gets one: its ``restart_command``
records the request and stops fota (SIGTERM); the test "reboots" the simulated bootloader and
starts fota again. For that device a kill is a power cut: the bootloader reboots too, into
whatever slot it was told to boot.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fota import ResultCode, State
from fota.core.record import Record
from fota.crashpoints import POINTS
from fota.keys import save_keypair
from fota.testing import UpdateServer
from tests.conftest import ACK_TIMEOUT, DEVICE_CLASS, Signing
from tests.installing import Bootloader, write_script
from tests.rauc_env import RaucSystem, make_bundle
from tests.rauc_env import make_keys as rauc_keys
from tests.rauc_env import require_tools as rauc_tools
from tests.swupdate_env import make_keys as swupdate_keys
from tests.swupdate_env import make_swu
from tests.swupdate_env import require_tools as swupdate_tools

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

KiB = 1024
OLD, NEW = os.urandom(48 * KiB), os.urandom(80 * KiB)
BOUND = 60.0
FINAL = (ResultCode.SUCCESS, ResultCode.ROLLED_BACK, ResultCode.ROLLBACK_FAILED)


# -- backends as the device sees them ----------------------------------------------------------


@dataclass
class Device:
    """One device's files: its installer settings and a way to read the image it runs.

    ``running()`` equals ``old`` before the update and ``new`` after it; ``image`` is what the
    server publishes.
    """

    settings: dict[str, Any]
    running: Callable[[], bytes]
    boot: Bootloader | RaucSystem | None = None
    image: bytes = NEW
    old: bytes = OLD
    new: bytes = NEW
    close: Callable[[], None] = lambda: None


def file_device(tmp: Path) -> Device:
    target = tmp / "fw.bin"
    target.write_bytes(OLD)
    return Device(
        {"installers": {"default": {"kind": "file", "target": str(target)}}}, target.read_bytes
    )


def ab_link_device(tmp: Path) -> Device:
    slots = {"a": tmp / "slot-a", "b": tmp / "slot-b"}
    slots["a"].write_bytes(OLD)
    link = tmp / "current"
    link.symlink_to(slots["a"])
    table = {
        "kind": "ab",
        "slots": {k: str(v) for k, v in slots.items()},
        "link": str(link),
    }
    return Device({"installers": {"default": table}}, link.read_bytes)


def ab_boot_device(tmp: Path) -> Device:
    boot = Bootloader(tmp / "boot")
    slots = {"a": tmp / "slot-a", "b": tmp / "slot-b"}
    slots["a"].write_bytes(OLD)
    table = {
        "kind": "ab",
        "slots": {k: str(v) for k, v in slots.items()},
        "switch_command": boot.switch_command(),
        "booted_command": boot.booted_command(),
    }
    # The restart command asks for the reboot and stops fota, as `systemctl reboot` would.
    reboot = write_script(tmp / "reboot", f"touch {tmp}/reboot-asked\nkill -TERM $PPID\n")
    return Device(
        {
            "installers": {"default": table},
            "boot_id_path": str(boot.boot_id_path),
            "restart_command": [str(reboot)],
        },
        lambda: slots[boot.booted].read_bytes(),
        boot,
    )


def command_device(tmp: Path) -> Device:
    """An integrator's install program: copies with a backup, like a vendor flasher would."""
    target = tmp / "fw.bin"
    target.write_bytes(OLD)
    program = write_script(
        tmp / "flasher",
        f't={target}\ncase "$1" in\n'
        '  install) [ -e "$t.bak" ] || cp "$t" "$t.bak"; cp "$FOTA_CANDIDATE" "$t.new";'
        ' mv "$t.new" "$t" ;;\n'
        '  commit) rm -f "$t.bak" ;;\n'
        '  rollback) if [ -e "$t.bak" ]; then mv "$t.bak" "$t"; fi ;;\n'
        "esac\n",
    )
    table = {"kind": "command", "command": [str(program)]}
    return Device({"installers": {"default": table}}, target.read_bytes)


def archive_device(tmp: Path) -> Device:
    """Two directories updated together from a tar bundle with a recipe and hooks."""
    root = tmp / "app"
    files = {"bin/app": b"old app " * 500, "etc/app.conf": b"old = 1\n"}
    new_files = {"bin/app": b"new app " * 900, "etc/app.conf": b"new = 2\n"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    hooks = 'format = 1\nbefore = ["true"]\nafter = ["true"]\nrollback = ["true"]\n'
    placed = "".join(f'[[files]]\nsource = "p/{n}"\ntarget = "{n}"\n' for n in new_files)
    wheel = "wheels/app_extras-1.0-py3-none-any.whl"  # named by its path in the bundle
    recipe = hooks + placed + f'[[packages]]\nmanager = "pip"\nnames = ["{wheel}"]\n'
    pip = write_script(tmp / "pip", f'echo "$@" >> {tmp}/pip-calls\n')  # an offline stand-in
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {
            "fota-recipe.toml": recipe.encode(),
            **{f"p/{n}": d for n, d in new_files.items()},
            wheel: b"PK\x05\x06" + bytes(18),  # an empty zip: the stand-in never opens it
        }.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

    def tree() -> bytes:
        return b"|".join((root / n).read_bytes() for n in sorted(files))

    table = {
        "kind": "archive",
        "root": str(root),
        "allowed_commands": [["true"]],
        "allowed_managers": ["pip"],
        "pip": [str(pip)],
    }
    return Device(
        {"installers": {"default": table}},
        tree,
        image=buf.getvalue(),
        old=tree(),
        new=b"|".join(new_files[n] for n in sorted(new_files)),
    )


def swupdate_device(tmp: Path) -> Device:
    """A single-copy SWUpdate install of a rawfile, with fota's backup for rollback."""
    swupdate_tools()
    keys = swupdate_keys(tmp / "swu-keys")
    app = tmp / "target" / "app.bin"
    app.parent.mkdir()
    app.write_bytes(OLD)
    image = make_swu(tmp / "v2.swu", keys, NEW, app, version="2.0").read_bytes()
    table = {"kind": "swupdate", "args": keys.args(), "backup": [str(app)]}
    return Device({"installers": {"default": table}}, app.read_bytes, image=image)


def rauc_device(tmp: Path) -> Device:
    """Two file slots under a real ``rauc service`` on a private bus; rebooting restarts it."""
    rauc_tools()
    keys = rauc_keys(tmp / "rauc-keys")
    image = make_bundle(tmp, keys, "v2", NEW, "2.0").read_bytes()
    system = RaucSystem(tmp / "sys", keys, OLD)
    system.start()
    boot_id = tmp / "boot_id"
    boot_id.write_text("boot-1")
    reboot = write_script(tmp / "reboot", f"touch {tmp}/reboot-asked\nkill -TERM $PPID\n")
    table = {"kind": "rauc", "env": dict(system.env), "timeout": 60}
    return Device(
        {
            "installers": {"default": table},
            "boot_id_path": str(boot_id),
            "restart_command": [str(reboot)],
        },
        lambda: system.slot(system.booted)[: len(NEW) if system.booted == "B" else len(OLD)],
        system,
        image=image,
        close=system.stop,
    )


def reboot_device(dev: Device, tmp: Path) -> None:
    """Restart the device: its bootloader boots what it was told; the boot id changes."""
    if isinstance(dev.boot, RaucSystem):
        dev.boot.reboot()
        path = tmp / "boot_id"
        path.write_text(path.read_text() + "+")
    elif dev.boot is not None:
        dev.boot.reboot()


DEVICES: dict[str, Callable[[Path], Device]] = {
    "file": file_device,
    "ab-link": ab_link_device,
    "ab-boot": ab_boot_device,
    "command": command_device,
    "archive": archive_device,
    "swupdate": swupdate_device,
    "rauc": rauc_device,
}

# (device, scenario, crash point). "commit": the self-test passes; "rollback": it fails.
CASES = [
    *(
        ("file", "commit", p)
        for p in (
            "journal:installing",
            "file:previous_saved",
            "file:temp_written",
            "file:replaced",
            "journal:await_commit",
            "journal:tested",
            "file:committed",
            "journal:idle",
            "report:acknowledged",
        )
    ),
    *(
        ("file", "rollback", p)
        for p in ("journal:rolling_back", "file:rolled_back", "journal:failed")
    ),
    *(
        ("ab-link", "commit", p)
        for p in ("ab:planned", "ab:slot_written", "ab:switched", "ab:committed")
    ),
    ("ab-link", "rollback", "ab:switched_back"),
    *(
        ("ab-boot", "commit", p)
        for p in ("ab:switched", "journal:await_restart", "journal:await_commit")
    ),
    *(("ab-boot", "rollback", p) for p in ("ab:switched_back", "journal:rolling_back")),
    ("command", "commit", "command:installed"),
    ("command", "rollback", "journal:rolling_back"),
    *(
        ("archive", "commit", p)
        for p in (
            "archive:staged",
            "archive:before_done",
            "archive:swapped_one",
            "archive:swapped",
            "archive:packages_done",
            "archive:after_done",
            "archive:committed",
        )
    ),
    *(("archive", "rollback", p) for p in ("archive:restored_one", "archive:rolled_back")),
    ("swupdate", "commit", "swupdate:installed"),
    ("swupdate", "rollback", "journal:rolling_back"),
    ("rauc", "commit", "rauc:installed"),
    ("rauc", "commit", "journal:await_restart"),
    ("rauc", "rollback", "journal:rolling_back"),
]


# -- running fota ------------------------------------------------------------------------------


def toml(settings: dict[str, Any]) -> str:
    """The install settings as TOML (strings, numbers, lists, and tables of those)."""
    top, tables = [], []
    for key, value in settings.items():
        if key == "installers":
            for name, table in value.items():
                tables.append(f"[installers.{name}]")
                tables += [f"{k} = {_value(v)}" for k, v in table.items()]
        else:
            top.append(f"{key} = {_value(value)}")
    return "\n".join([*top, *tables]) + "\n"


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)  # strings, numbers and lists of them are valid TOML as JSON


async def start(tmp: Path, server: UpdateServer, trust: Path, crash: str | None) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "FOTA_CRASH_AT"}
    if crash:
        env["FOTA_CRASH_AT"] = crash
    log = open(tmp / "client.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "fota", "run", "--server", server.uri, "--state-dir", str(tmp / "state")),
            *("--trust", str(trust), "--device-id", "gw-crash", "--device-class", DEVICE_CLASS),
            *("--ack-timeout", str(ACK_TIMEOUT), "--auto-authorize"),
            *("--install-config", str(tmp / "install.toml")),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    finally:
        log.close()


def final_reports(server: UpdateServer, update_id: str) -> list[tuple[State, ResultCode]]:
    return [
        (State(r[3]), ResultCode(r[4]))
        for r in server.reports
        if r.get(5) == update_id and r[4] in {int(c) for c in FINAL}
    ]


@pytest.mark.parametrize(
    ("device", "scenario", "point"), CASES, ids=[f"{d}-{s}-{p}" for d, s, p in CASES]
)
async def test_kill_at_the_crash_point_then_restart_ends_on_one_image(
    tmp_path: Path,
    server: UpdateServer,
    signing: Signing,
    device: str,
    scenario: str,
    point: str,
    request: pytest.FixtureRequest,
) -> None:
    assert point in POINTS
    dev = DEVICES[device](tmp_path)
    request.addfinalizer(dev.close)
    trust = save_keypair(signing.key, tmp_path / "signing.key")
    factory = tmp_path / "factory.cose"
    factory.write_bytes(server.make_manifest(OLD, "1.0", device_class=DEVICE_CLASS).raw)
    settings = {
        **dev.settings,
        "factory_manifest": str(factory),
        "self_test_command": ["true"] if scenario == "commit" else ["false"],
        # A failing self-test is rolled back at once.
        "self_test_deadline": 300 if scenario == "commit" else 0.001,
    }
    (tmp_path / "install.toml").write_text(toml(settings))
    update = server.publish(dev.image, "2.0", device_class=DEVICE_CLASS)
    expected = ResultCode.SUCCESS if scenario == "commit" else ResultCode.ROLLED_BACK

    def final(r: dict[int, Any]) -> bool:
        return r.get(5) == update.update_id and r[4] in {int(c) for c in FINAL}

    codes: list[int] = []
    crash: str | None = point
    for _ in range(8):  # each start: until fota dies, stops for a reboot, or the update ends
        proc = await start(tmp_path, server, trust, crash)
        exited = asyncio.ensure_future(proc.wait())
        reported = asyncio.ensure_future(server.wait_for_report(final, BOUND))
        await asyncio.wait((exited, reported), return_when=asyncio.FIRST_COMPLETED)
        if not exited.done() and reported.done():
            proc.send_signal(signal.SIGTERM)
        code = await exited
        reported.cancel()
        codes.append(code)
        if code == -signal.SIGKILL:
            crash = None  # it fired; later starts run clean
            reboot_device(dev, tmp_path)  # a power cut: the device boots what it was told
            continue
        reboot = tmp_path / "reboot-asked"
        if code == 0 and reboot.exists():
            assert dev.boot is not None
            reboot.unlink()
            reboot_device(dev, tmp_path)
            continue
        assert code == 0, f"fota exited {code}; see {tmp_path / 'client.log'}"
        if final_reports(server, update.update_id):
            break
    assert -signal.SIGKILL in codes, f"crash point {point} was never reached (exits {codes})"

    # Exactly one complete image: the new one after a commit, the old one after a rollback.
    assert dev.running() == (dev.new if expected is ResultCode.SUCCESS else dev.old)
    record = Record.from_bytes((tmp_path / "state" / "journal.cbor").read_bytes())
    if expected is ResultCode.SUCCESS:
        assert record.state is State.IDLE and record.installed == update.digest
    else:
        assert record.state is State.FAILED and record.installed != update.digest
    finals = final_reports(server, update.update_id)
    assert finals == [(State.IDLE if expected is ResultCode.SUCCESS else State.FAILED, expected)]


def test_every_crash_point_in_the_code_is_declared_and_every_declared_one_is_used() -> None:
    import re

    root = Path(__file__).resolve().parents[2] / "fota"
    sources = {p: p.read_text() for p in root.rglob("*.py") if p.name != "crashpoints.py"}
    # crashpoints.py declares the points (POINTS) and passes the journal's own (after_save):
    # only what follows the declaration counts as passing one.
    own = (root / "crashpoints.py").read_text()
    sources[root / "crashpoints.py"] = own[own.index("\ndef point(") :]
    called = {n for text in sources.values() for n in re.findall(r'point\(\s*"([^"]+)"', text)}
    assert called <= set(POINTS), "a crash point used in the code is not declared"
    unused = {p for p in POINTS if not any(f'"{p}"' in text for text in sources.values())}
    assert unused == set(), "a declared crash point is never passed"


def test_every_crash_point_is_killed_at_by_a_case() -> None:
    covered = {p for _, _, p in CASES}
    assert set(POINTS) <= covered
