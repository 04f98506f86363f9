"""The daemon's TOML file: real files in tmp_path, every error pointing at file, line and key."""

from __future__ import annotations

import grp
import math
import os
import re
import tomllib
import types
from pathlib import Path

import pytest

from fota import keys
from fota.app.settings import (
    AuthorizationSettings,
    ControlSettings,
    LogSettings,
    Settings,
    _Locator,
    describe,
    load_install_settings,
    load_settings,
    parse_settings,
)
from fota.config import Config
from fota.core.manifest import kid_for
from fota.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "fota.toml"
EXAMPLE_KEY = "/etc/fota/keys/release.pub"

BASE = """\
server = "coap://updates.example.com:61616"
device_class = "gw"
state_dir = "state"
trust = ["k.pub"]
target = "fw.bin"
"""
"""The required keys (and a target): five lines, so a key appended is on line 6 or later."""


@pytest.fixture
def pub(tmp_path: Path) -> Path:
    return keys.save_keypair(keys.generate(), tmp_path / "k")


def my_group() -> tuple[str, int]:
    gid = os.getgid()
    return grp.getgrgid(gid).gr_name, gid


def write(tmp_path: Path, text: str, name: str = "fota.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, marker: str) -> int:
    """The 1-based line on which ``marker`` first appears (found by plain text search)."""
    return text[: text.index(marker)].count("\n") + 1


def fails(tmp_path: Path, body: str, *, base: str = BASE) -> tuple[str, str]:
    """Load BASE + body from a file; return the error message and the full text."""
    text = base + body
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value), text


def at(tmp_path: Path, text: str, marker: str) -> str:
    """The ``file:line: `` prefix an error about the key written at ``marker`` must have."""
    return f"{tmp_path / 'fota.toml'}:{line_of(text, marker)}: "


# -- the example file and a full round trip --------------------------------------------------


def test_the_example_file_parses_with_its_own_keys(pub: Path) -> None:
    # The real file, as shipped: only the trust key (a file on the integrator's device) and
    # the group (which this machine may not have) are replaced.
    name, gid = my_group()
    text = EXAMPLE.read_text()
    assert EXAMPLE_KEY in text and 'group = "fota"' in text
    text = text.replace(EXAMPLE_KEY, str(pub)).replace('group = "fota"', f'group = "{name}"')
    settings = parse_settings(text, path=Path("/etc/fota/fota.toml"))

    config = settings.config
    assert config.server == "coap://updates.example.com"
    assert config.device_class == "acme-gw-2"
    assert config.device_id == os.uname().nodename
    assert config.state_dir == Path("/var/lib/fota")
    assert config.trust.get(kid_for(keys.load_public(pub))) is not None
    assert config.installers["firmware"]["kind"] == "ab"
    assert config.installers["firmware"]["slots"] == {"a": "/dev/mmcblk0p2", "b": "/dev/mmcblk0p3"}
    assert config.installers["application"]["kind"] == "archive"
    assert config.maintenance_windows == ["Mon-Fri 02:00-04:00", "Sat,Sun 00:00-06:00"]
    assert config.max_deferral == {"optional": None, "mandatory": 259200.0, "critical": 3600.0}
    assert config.self_test_command == ["/usr/local/bin/gateway-healthy"]
    assert config.restart_command == ["systemctl", "reboot"]
    assert settings.control == ControlSettings(
        socket=Path("/run/fota/control.sock"), mode=0o660, group=gid
    )
    assert settings.authorization == AuthorizationSettings(mode="control")
    assert settings.log == LogSettings(level="info", format="auto")
    assert settings.path == Path("/etc/fota/fota.toml")


def test_a_full_file_round_trip(tmp_path: Path, pub: Path) -> None:
    name, gid = my_group()
    (tmp_path / "keys").mkdir()
    second = keys.save_keypair(keys.generate("es256"), tmp_path / "keys" / "second")
    text = f"""\
# every section, relative paths, numbers written as integers where floats are expected
server = "coap://[2001:db8::1]:61616"
device_id = "gw-0042"
device_class = "acme-gw-2"
state_dir = "state"
trust = [
    "k.pub",           # next to the file
    "keys/second.pub",
]
block_size = 512
window = 8
ack_timeout = 3
poll_interval = 60
max_download_bytes = 1_000_000
gates_download = true
maintenance_windows = ["daily 02:00-04:00"]
condition_commands = {{ on_mains = ["/usr/bin/on-mains", "--quiet"] }}
self_test_command = ["/usr/bin/healthy"]
boot_id_path = "none"
factory_manifest = "factory.cose"

[installers.default]
kind = "file"
target = "/opt/fw.bin"

[max_deferral]
optional = "none"
critical = 60

[deadline_after]
critical = 7200

[control]
socket = "run/control.sock"
mode = "0640"
group = {gid}
max_clients = 4
max_message = 4096
enabled = true

[authorization]
mode = "command"
command = ["/usr/local/bin/fota-authorize", "--step"]
timeout = 5
defer = 600
retry = 60.5
event_command = ["/usr/local/bin/fota-event"]

[log]
level = "DEBUG"
format = "json"
"""
    path = write(tmp_path, text)
    settings = load_settings(path)
    config = settings.config
    assert config.server == "coap://[2001:db8::1]:61616"
    assert config.device_id == "gw-0042"
    assert config.state_dir == tmp_path / "state"
    assert config.trust.get(kid_for(keys.load_public(pub))) is not None
    assert config.trust.get(kid_for(keys.load_public(second))) is not None
    assert len(config.trust) == 2
    assert (config.block_size, config.window) == (512, 8)
    assert config.ack_timeout == 3.0 and isinstance(config.ack_timeout, float)
    assert config.poll_interval == 60.0
    assert config.max_download_bytes == 1_000_000
    assert config.gates_download is True
    assert config.condition_commands == {"on_mains": ["/usr/bin/on-mains", "--quiet"]}
    assert config.boot_id_path is None
    assert config.factory_manifest == tmp_path / "factory.cose"
    assert config.installers == {"default": {"kind": "file", "target": "/opt/fw.bin"}}
    assert config.max_deferral == {"optional": None, "critical": 60.0}
    assert config.policy().max_deferral == (None, 7 * 86400.0, 60.0)  # mandatory: default
    assert config.deadline_after == {"critical": 7200.0}
    assert settings.control == ControlSettings(
        socket=tmp_path / "run" / "control.sock",
        mode=0o640,
        group=gid,
        max_clients=4,
        max_message=4096,
    )
    assert settings.authorization == AuthorizationSettings(
        mode="command",
        command=("/usr/local/bin/fota-authorize", "--step"),
        timeout=5.0,
        defer=600.0,
        retry=60.5,
        event_command=("/usr/local/bin/fota-event",),
    )
    assert settings.log == LogSettings(level="debug", format="json")
    assert settings.path == path
    assert settings.trust_keys == (
        (kid_for(keys.load_public(pub)).hex(), tmp_path / "k.pub"),
        (kid_for(keys.load_public(second)).hex(), tmp_path / "keys" / "second.pub"),
    )

    lines = dict(describe(settings))
    assert lines["file"] == str(path)
    assert lines["server"] == "coap://[2001:db8::1]:61616"
    assert lines["device_id"] == "gw-0042"
    assert lines["state_dir"] == str(tmp_path / "state")
    assert lines["installers.default"] == "file"
    assert lines["control.socket"] == str(tmp_path / "run" / "control.sock")
    assert lines["control.mode"] == "0640"
    assert lines["control.group"] == f"{name} (gid {gid})"
    assert lines["authorization.mode"] == "command: /usr/local/bin/fota-authorize --step"
    assert lines["log"] == "level debug, format json"
    trust_lines = [v for k, v in describe(settings) if k == "trust"]
    assert trust_lines == [f"{kid} ({p})" for kid, p in settings.trust_keys]


def test_defaults_and_the_minimal_file(tmp_path: Path, pub: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    assert isinstance(settings, Settings)
    assert settings.config.device_id == os.uname().nodename
    assert settings.config.target == tmp_path / "fw.bin"
    assert settings.config.block_size == 1024
    assert settings.control == ControlSettings()
    assert settings.authorization == AuthorizationSettings()
    assert settings.log == LogSettings()
    lines = describe(settings)
    assert ("installers", f"none: a file installer for {tmp_path / 'fw.bin'}") in lines
    assert ("control.group", "the daemon's group") in lines
    assert ("authorization.mode", "control") in lines


def test_control_disabled_is_described(tmp_path: Path, pub: Path) -> None:
    body = '[control]\nenabled = false\n[authorization]\nmode = "auto"\n'
    settings = load_settings(write(tmp_path, BASE + body))
    assert settings.control.enabled is False
    assert ("control", "disabled") in describe(settings)


# -- unknown keys ----------------------------------------------------------------------------


def test_an_unknown_top_level_key(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, "\n# a typo\nblocksize = 512\n")
    assert message.startswith(at(tmp_path, text, "blocksize") + "blocksize: unknown key")
    assert 'did you mean "block_size"?' in message
    assert re.search(
        r"known: server, device_id, .*block_size.*, control, authorization, log\)$", message
    )


def test_an_unknown_table(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, '[contrl]\nsocket = "/run/x.sock"\n')
    assert message.startswith(at(tmp_path, text, "[contrl]") + "contrl: unknown key")
    assert 'did you mean "control"?' in message


def test_an_unknown_key_in_a_section(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, '[control]\nmode = "0660"\nsokcet = "/run/x.sock"\n')
    assert message.startswith(
        at(tmp_path, text, "sokcet")
        + 'control.sokcet: unknown key in control; did you mean "socket"?'
    )
    known = "socket, mode, group, max_clients, max_message, request_timeout, idle_timeout, enabled"
    assert f"(known: {known})" in message


def test_an_unknown_severity_in_max_deferral(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, "max_deferral = { critical = 60, urgent = 10 }\n")
    assert message.startswith(
        at(tmp_path, text, "max_deferral") + "max_deferral.urgent: unknown key"
    )
    assert "(known: optional, mandatory, critical)" in message


def test_an_unknown_installer_component(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, '[installers.bootloader]\nkind = "file"\n')
    assert message.startswith(
        at(tmp_path, text, "[installers.bootloader]") + "installers.bootloader:"
    )
    assert "known: firmware, application, other, default" in message


# -- wrong types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('block_size = "big"', 'block_size: expected an integer, got "big"'),
        ("block_size = true", "block_size: expected an integer, got true"),
        ("block_size = 1.5", "block_size: expected an integer, got 1.5"),
        ("ack_timeout = false", "ack_timeout: expected a number, got false"),
        ('ack_timeout = "2"', 'ack_timeout: expected a number, got "2"'),
        ("gates_download = 1", "gates_download: expected true or false, got 1"),
        ("timezone = 1", "timezone: expected a string, got 1"),
        ("factory_manifest = 7", "factory_manifest: expected a path (a string), got 7"),
        ('maintenance_windows = "daily 02:00-04:00"', "maintenance_windows: expected a list of"),
        ("max_deferral = 5", "max_deferral: expected a table, got 5"),
        (
            "max_deferral = { critical = true }",
            "max_deferral.critical: expected a number, got true",
        ),
        (
            'condition_commands = { ac = ["a", 2] }',
            "condition_commands.ac[1]: expected a string, got 2",
        ),
        ("installers = { firmware = 3 }", "installers.firmware: expected a table, got 3"),
    ],
)
def test_a_wrong_top_level_type(tmp_path: Path, pub: Path, line: str, expected: str) -> None:
    message, text = fails(tmp_path, f"window = 4\n{line}\n")
    key = line.split(" ", 1)[0]
    assert message.startswith(at(tmp_path, text, key) + expected), message


def test_server_as_an_integer(tmp_path: Path, pub: Path) -> None:
    base = BASE.replace('"coap://updates.example.com:61616"', "61616")
    message, text = fails(tmp_path, "", base=base)
    assert message == at(tmp_path, text, "server") + "server: expected a string, got 61616"


@pytest.mark.parametrize(
    ("body", "marker", "expected"),
    [
        ("[control]\nsocket = 3\n", "socket", "control.socket: expected a path (a string), got 3"),
        (
            "[control]\nmax_clients = true\n",
            "max_clients",
            "control.max_clients: expected an integer, got true",
        ),
        (
            "[control]\nmax_clients = 0\n",
            "max_clients",
            "control.max_clients: expected 1..4096, got 0",
        ),
        (
            "[control]\nmax_clients = 4097\n",
            "max_clients",
            "control.max_clients: expected 1..4096, got 4097",
        ),
        (
            "[control]\nmax_message = 16777217\n",
            "max_message",
            "control.max_message: expected 256..16777216 (bytes), got 16777217",
        ),
        (
            "[control]\nmax_message = 100\n",
            "max_message",
            "control.max_message: expected 256..16777216 (bytes), got 100",
        ),
        (
            '[control]\nenabled = "yes"\n',
            "enabled",
            'control.enabled: expected true or false, got "yes"',
        ),
        (
            "[authorization]\ntimeout = 0\n",
            "timeout",
            "authorization.timeout: expected a positive number, got 0.0",
        ),
        (
            "[authorization]\ndefer = true\n",
            "defer",
            "authorization.defer: expected a number, got true",
        ),
        (
            '[authorization]\ncommand = "/bin/ask"\n',
            "command",
            "authorization.command: expected a non-empty list of strings (an argument list), "
            'got "/bin/ask"',
        ),
        ("[log]\nlevel = 3\n", "level", "log.level: expected a string, got 3"),
        ("control = 3\n", "control", "control: expected a table, got 3"),
    ],
)
def test_a_wrong_type_in_a_section(
    tmp_path: Path, pub: Path, body: str, marker: str, expected: str
) -> None:
    message, text = fails(tmp_path, body)
    assert message == at(tmp_path, text, marker) + expected


# -- enums, required keys, Config's own checks -----------------------------------------------


def test_a_bad_authorization_mode(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, '[authorization]\n\nmode = "ask"\n')
    assert message == at(tmp_path, text, 'mode = "ask"') + (
        'authorization.mode: expected one of "control", "command", "auto", got "ask"'
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[log]\nlevel = "verbose"\n',
            'log.level: expected one of "debug", "info", "warning", "error", got "verbose"',
        ),
        (
            '[log]\nformat = "xml"\n',
            'log.format: expected one of "auto", "json", "console", got "xml"',
        ),
    ],
)
def test_a_bad_log_setting(tmp_path: Path, pub: Path, body: str, expected: str) -> None:
    message, text = fails(tmp_path, body)
    assert message == at(tmp_path, text, body.split("\n")[1]) + expected


def test_the_command_mode_needs_a_command(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, '[authorization]\nmode = "command"\n')
    # The key is not written: the message points at its table.
    assert message == at(tmp_path, text, "[authorization]") + (
        'authorization.command: missing: required with mode = "command" (an argument list)'
    )
    message, text = fails(tmp_path, '[authorization]\nmode = "command"\ncommand = []\n')
    assert message.startswith(at(tmp_path, text, "command = []") + "authorization.command: missing")


@pytest.mark.parametrize("key", ["server", "device_class", "state_dir", "trust"])
def test_a_missing_required_key(tmp_path: Path, pub: Path, key: str) -> None:
    base = "".join(line + "\n" for line in BASE.splitlines() if not line.startswith(key))
    message, _ = fails(tmp_path, "", base=base)
    assert message == f"{tmp_path / 'fota.toml'}: {key}: missing (required)"


def test_target_or_installers_is_required(tmp_path: Path, pub: Path) -> None:
    base = BASE.replace('target = "fw.bin"\n', "")
    message, _ = fails(tmp_path, "", base=base)
    assert message == f"{tmp_path / 'fota.toml'}: " + (
        "target: missing: needed when no [installers] are given"
    )


@pytest.mark.parametrize(
    ("body", "marker", "expected"),
    [
        ("block_size = 100\n", "block_size", "block_size: 100 must be a power of two in 16..1024"),
        ("window = 0\n", "window", "window: 0 must be in 1..256"),
        ('resume = "maybe"\n', "resume", "resume: 'maybe' is not one of resume, restart, none"),
        (
            "\n[max_deferral]\ncritical = -1\n",
            "critical",
            "max_deferral.critical: -1.0 must not be negative",
        ),
        (
            'timezone = "Mars/Olympus_Mons"\n',
            "timezone",
            "timezone: 'Mars/Olympus_Mons' is not a known IANA time zone",
        ),
        (
            "self_test_command = []\n",
            "self_test_command",
            "self_test_command: must be a non-empty list of arguments",
        ),
    ],
)
def test_config_validation_errors_get_the_line(
    tmp_path: Path, pub: Path, body: str, marker: str, expected: str
) -> None:
    message, text = fails(tmp_path, "window = 4\n" + body if "window" not in body else body)
    assert message == at(tmp_path, text, marker) + expected


def test_server_validation_points_at_the_server_line(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, "", base=BASE.replace("coap://", "http://"))
    assert message.startswith(at(tmp_path, text, "server") + "server: 'http://")


def test_a_defaulted_device_id_is_explained(
    tmp_path: Path, pub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "fota.app.settings.os.uname", lambda: types.SimpleNamespace(nodename="h" * 70)
    )
    message, _ = fails(tmp_path, "")
    assert message.startswith(f"{tmp_path / 'fota.toml'}: device_id: 1..64 characters")
    assert "device_id is not set; the host name" in message


def test_a_bad_maintenance_window_names_its_element(tmp_path: Path, pub: Path) -> None:
    message, text = fails(
        tmp_path,
        'maintenance_windows = [\n    "daily 02:00-04:00",\n    "Mon-Fry 02:00-04:00",\n]\n',
    )
    assert message.startswith(
        at(tmp_path, text, '"Mon-Fry')
        + "maintenance_windows[1]: 'Mon-Fry 02:00-04:00': unknown day"
    )


def test_installer_errors_get_the_file_and_line(tmp_path: Path, pub: Path) -> None:
    body = '[installers.firmware]\nkind = "ab"\nslots = { a = "/dev/p2", b = "p3" }\n'
    message, text = fails(tmp_path, body)
    assert message.startswith(
        at(tmp_path, text, "slots") + "installers.firmware.slots.b: expected an absolute path"
    )
    body = '[installers.firmware]\nkind = "file"\ntarget = "/fw.bin"\n\nowner = 1\n'
    message, text = fails(tmp_path, body)
    assert message == at(tmp_path, text, "owner") + "installers.firmware: unknown key 'owner'"
    message, text = fails(tmp_path, '[installers.firmware]\nkind = "flash"\n')
    assert message.startswith(at(tmp_path, text, "kind") + "installers.firmware.kind: 'flash'")


# -- the control socket's mode and group -----------------------------------------------------


@pytest.mark.parametrize(
    ("written", "mode"),
    [
        ('"0660"', 0o660),
        ('"660"', 0o660),
        ('"0o640"', 0o640),
        ('"0600"', 0o600),
        ("0o640", 0o640),
        ("416", 0o640),
        ('"0"', 0),
    ],
)
def test_the_mode_as_a_string_or_an_integer(
    tmp_path: Path, pub: Path, written: str, mode: int
) -> None:
    settings = load_settings(write(tmp_path, BASE + f"[control]\nmode = {written}\n"))
    assert settings.control.mode == mode


OCTAL = 'expected an octal string such as "0660" or an integer (0o660), got '


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('"01777"', "control.mode: 0o1777 is not a file mode (0..0o777)"),
        ("0o1777", "control.mode: 0o1777 is not a file mode (0..0o777)"),
        # A decimal 660 is 0o1224: the octal in the message shows the mistake.
        ("660", "control.mode: 0o1224 is not a file mode (0..0o777)"),
        ("-1", "control.mode: -1 is not a file mode (0..0o777)"),
        ('"rw-rw----"', f'control.mode: {OCTAL}"rw-rw----"'),
        ('"0869"', f'control.mode: {OCTAL}"0869"'),
        ("true", f"control.mode: {OCTAL}true"),
    ],
)
def test_a_bad_mode(tmp_path: Path, pub: Path, written: str, expected: str) -> None:
    message, text = fails(tmp_path, f"[control]\nmode = {written}\n")
    assert message == at(tmp_path, text, "mode =") + expected


def test_the_group_by_name_or_gid(tmp_path: Path, pub: Path) -> None:
    name, gid = my_group()
    settings = load_settings(write(tmp_path, BASE + f'[control]\ngroup = "{name}"\n'))
    assert settings.control.group == gid
    settings = load_settings(write(tmp_path, BASE + "[control]\ngroup = 54321\n"))
    assert settings.control.group == 54321
    try:
        shown = f"{grp.getgrgid(54321).gr_name} (gid 54321)"
    except KeyError:
        shown = "gid 54321"  # a gid need not have a name
    assert ("control.group", shown) in describe(settings)


def test_an_unknown_group_name(tmp_path: Path, pub: Path) -> None:
    message, text = fails(tmp_path, '[control]\nmode = "0660"\ngroup = "no-such-group-fota"\n')
    assert message == at(tmp_path, text, "group") + (
        'control.group: no group named "no-such-group-fota" on this system'
    )
    message, text = fails(tmp_path, "[control]\ngroup = true\n")
    assert message == at(tmp_path, text, "group") + (
        "control.group: expected a group name or a gid, got true"
    )


# -- none, relative paths --------------------------------------------------------------------


def test_none_in_max_deferral_and_for_optional_settings(tmp_path: Path, pub: Path) -> None:
    body = 'boot_id_path = "none"\nmax_deferral = { optional = "none", mandatory = "none" }\n'
    settings = load_settings(write(tmp_path, BASE + body))
    assert settings.config.max_deferral == {"optional": None, "mandatory": None}
    assert settings.config.policy().max_deferral == (None, None, 86400.0)
    assert settings.config.boot_id_path is None
    # Any other string is not a number.
    message, text = fails(tmp_path, 'max_deferral = { critical = "never" }\n')
    assert message == at(tmp_path, text, "max_deferral") + (
        'max_deferral.critical: expected a number, got "never"'
    )


def test_relative_paths_are_relative_to_the_files_directory(
    tmp_path: Path, pub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "fota"
    etc.mkdir(parents=True)
    pub.rename(etc / "k.pub")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    body = 'factory_manifest = "../factory.cose"\n[control]\nsocket = "ctl.sock"\n'
    settings = load_settings(write(etc, BASE + body))
    assert settings.config.state_dir == etc / "state"
    assert settings.config.target == etc / "fw.bin"
    assert settings.config.factory_manifest == etc / ".." / "factory.cose"
    assert settings.control.socket == etc / "ctl.sock"
    assert settings.trust_keys[0][1] == etc / "k.pub"
    # Absolute paths are kept.
    settings = load_settings(write(etc, BASE.replace('"state"', '"/var/lib/fota"')))
    assert settings.config.state_dir == Path("/var/lib/fota")


def test_a_relative_file_name_resolves_against_its_directory(
    tmp_path: Path, pub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("fota.toml"))
    assert settings.config.state_dir == tmp_path / "state"


# -- trust -----------------------------------------------------------------------------------


def test_trust_errors_name_the_entry_and_the_path(tmp_path: Path, pub: Path) -> None:
    base = BASE.replace('trust = ["k.pub"]', 'trust = [\n    "k.pub",\n    "missing.pub",\n]')
    message, text = fails(tmp_path, "", base=base)
    assert message == at(tmp_path, text, '"missing.pub"') + (
        f"trust[1]: cannot read {tmp_path / 'missing.pub'}: No such file or directory"
    )
    (tmp_path / "junk.pub").write_text("not a key\n")
    message, text = fails(tmp_path, "", base=BASE.replace('"k.pub"', '"junk.pub"'))
    assert message.startswith(
        at(tmp_path, text, "trust") + f"trust[0]: {tmp_path / 'junk.pub'}: not a usable public key"
    )
    message, text = fails(tmp_path, "", base=BASE.replace('["k.pub"]', "[]"))
    assert message == at(tmp_path, text, "trust") + (
        "trust: expected a non-empty list of public key files (PEM), got []"
    )
    message, text = fails(tmp_path, "", base=BASE.replace('["k.pub"]', "[3]"))
    assert message == at(tmp_path, text, "trust") + "trust[0]: expected a path (a string), got 3"


# -- the file itself -------------------------------------------------------------------------


def test_a_syntax_error(tmp_path: Path, pub: Path) -> None:
    message, _ = fails(tmp_path, "window = 4\nblock_size = = 3\n")
    assert message.startswith(f"{tmp_path / 'fota.toml'}:7: not valid TOML: ")
    assert "(at line 7, column" in message


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(tmp_path / 'nope.toml'))}: cannot read: No such file"
    ):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read: Is a directory"
    ):
        load_settings(tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'server = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid TOML: not UTF-8"):
        load_settings(tmp_path / "latin1.toml")


def test_parse_settings_without_a_path(
    tmp_path: Path, pub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(BASE)
    assert settings.path is None
    assert settings.config.state_dir == tmp_path / "state"
    with pytest.raises(ConfigError) as info:
        parse_settings(BASE + "window = 0\n")
    assert str(info.value) == "line 6: window: 0 must be in 1..256"


# -- the locator -----------------------------------------------------------------------------


def test_the_locator_follows_toml_structure() -> None:
    text = '''\
title = "x = 1 [not.a.table]"   # line 1
a.b.c = 1
"quoted.key" = 2
'lit' = """
k = 3
[fake]
"""
arr = [
  1,  # a comment with a ] and a =
  { x = 1, y = { z = 2 } },
]
[t]
u = 'it"s \\'
[t.v]
w = 4
[[jobs]]
name = "one"
[[jobs]]
name = "two"
[jobs.env]
HOME = "/"
  [ "spaced" . "header" ]
k2 = """two
lines"""
after = 1
'''
    tomllib.loads(text)  # the locator only ever sees valid TOML
    loc = _Locator(text)
    assert loc.line(("title",)) == 1
    assert loc.line(("a", "b", "c")) == 2
    assert loc.line(("a",)) == 2
    assert loc.line(("quoted.key",)) == 3
    assert loc.line(("lit",)) == 4
    assert loc.line(("k",)) is None and loc.line(("fake",)) is None
    assert loc.line(("arr",)) == 8
    assert loc.line(("arr", 0)) == 9
    assert loc.line(("arr", 1, "y", "z")) == 10
    assert loc.line(("t",)) == 12
    assert loc.line(("t", "u")) == 13
    assert loc.line(("t", "v", "w")) == 15
    assert loc.line(("jobs", 0, "name")) == 17
    assert loc.line(("jobs", 1, "name")) == 19
    assert loc.line(("jobs", 1, "env", "HOME")) == 21
    assert loc.line(("spaced", "header", "k2")) == 23
    assert loc.line(("spaced", "header", "after")) == 25
    # Not written: the nearest enclosing key that is; nothing at all: no line.
    assert loc.line(("t", "v", "missing")) == 14
    assert loc.line(("nowhere",)) is None


# -- fota run --install-config (fota.app.settings.load_install_settings, same validator) -----------


def test_install_settings_use_the_same_validator(tmp_path: Path) -> None:
    text = (
        'self_test_command = ["/bin/true"]\nself_test_deadline = 60\nboot_id_path = "boot_id"\n'
        'restart_limit = 3\n[installers.firmware]\nkind = "file"\ntarget = "/fw.bin"\n'
    )
    path = write(tmp_path, text, "install.toml")
    out = load_install_settings(path)
    assert out == {
        "self_test_command": ["/bin/true"],
        "self_test_deadline": 60.0,
        "boot_id_path": Path("boot_id"),  # as written: fota run kept relative paths
        "restart_limit": 3,
        "installers": {"firmware": {"kind": "file", "target": "/fw.bin"}},
    }
    write(tmp_path, "restart_limit = 3\nblock_size = 512\n", "install.toml")
    with pytest.raises(ConfigError) as info:
        load_install_settings(path)
    assert str(info.value).startswith(f"{path}:2: block_size: unknown key (known: installers,")
    write(tmp_path, "\nrestart_limit = true\n", "install.toml")
    with pytest.raises(ConfigError) as info:
        load_install_settings(path)
    assert str(info.value) == f"{path}:2: restart_limit: expected an integer, got true"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_install_settings(tmp_path / "nope.toml")


def test_the_locator_on_values_of_every_kind() -> None:
    text = """\
when = 1979-05-27T07:32:00Z
day = 1979-05-27
time = 07:32:00
nested = [[1, 2], ["a", "b]"]]
hex = 0xdead_beef
inf = -inf
point = { x.y = 1, "z" = 'q' }
"weird key" . plain = true
last = 'done'
"""
    tomllib.loads(text)
    loc = _Locator(text)
    assert loc.line(("day",)) == 2
    assert loc.line(("time",)) == 3
    assert loc.line(("nested", 1, 1)) == 4
    assert loc.line(("inf",)) == 6
    assert loc.line(("point", "x", "y")) == 7
    assert loc.line(("point", "z")) == 7
    assert loc.line(("weird key", "plain")) == 8
    assert loc.line(("last",)) == 9


def test_describe_settings_built_in_code(tmp_path: Path, pub: Path) -> None:
    from fota.config import Config

    config = Config(
        server="coap://h:61616",
        device_id="gw",
        device_class="c",
        state_dir=tmp_path,
        trust=keys.trust_store([pub]),
        target=tmp_path / "fw.bin",
    )
    settings = Settings(
        config, ControlSettings(mode=0), AuthorizationSettings(mode="auto"), LogSettings()
    )
    lines = describe(settings)
    assert "file" not in dict(lines)
    assert ("trust", "1 key(s)") in lines
    assert ("control.mode", "0000") in lines
    assert ("authorization.mode", "auto") in lines


# -- nan, inf and the ranges of Config's numbers ---------------------------------------------


@pytest.mark.parametrize("written", ["nan", "+nan", "-nan", "inf", "+inf", "-inf"])
@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("hook_timeout = {}\n", "hook_timeout"),
        ("poll_interval = {}\n", "poll_interval"),
        ("retry_jitter = {}\n", "retry_jitter"),
        ("\n[max_deferral]\ncritical = {}\n", "max_deferral.critical"),
        ("deadline_after = {{ mandatory = {} }}\n", "deadline_after.mandatory"),
        ("\n[authorization]\ntimeout = {}\n", "authorization.timeout"),
        ("\n[authorization]\ndefer = {}\n", "authorization.defer"),
        ("\n[authorization]\nretry = {}\n", "authorization.retry"),
    ],
)
def test_nan_and_inf_are_refused(
    tmp_path: Path, pub: Path, body: str, key: str, written: str
) -> None:
    message, text = fails(tmp_path, body.format(written))
    shown = written.lstrip("+") if "nan" not in written else "nan"
    assert message == at(tmp_path, text, written) + f"{key}: {shown} is not a finite number"


def test_nan_is_refused_inside_installer_tables(tmp_path: Path, pub: Path) -> None:
    body = '[installers.firmware]\nkind = "file"\ntarget = "/fw.bin"\nlimits = [1, nan]\n'
    message, text = fails(tmp_path, body)
    assert message == at(tmp_path, text, "limits") + (
        "installers.firmware.limits[1]: nan is not a finite number"
    )


def test_an_integer_too_large_for_a_float(tmp_path: Path, pub: Path) -> None:
    huge = "1" + "0" * 400
    message, text = fails(tmp_path, f"hook_timeout = {huge}\n")
    assert message.startswith(at(tmp_path, text, "hook_timeout") + "hook_timeout: 1000")
    assert message.endswith("... is too large for a number")


@pytest.mark.parametrize(
    ("body", "marker", "expected"),
    [
        ("poll_interval = 0\n", "poll_interval", "poll_interval: 0.0 must be positive"),
        ("observe_refresh = -1\n", "observe_refresh", "observe_refresh: -1.0 must be positive"),
        ("retry_base = 0\n", "retry_base", "retry_base: 0.0 must be positive"),
        (
            "retry_base = 10\nretry_cap = 5\n",
            "retry_cap",
            "retry_cap: 5.0 must be at least retry_base (10.0)",
        ),
        ("max_image_size = 0\n", "max_image_size", "max_image_size: 0 must be at least 1"),
        ("max_retransmit = -1\n", "max_retransmit", "max_retransmit: -1 must be in 0..20"),
        ("max_retransmit = 21\n", "max_retransmit", "max_retransmit: 21 must be in 0..20"),
        (
            "max_download_bytes = 0\n",
            "max_download_bytes",
            "max_download_bytes: 0 must be at least 1",
        ),
        (
            "max_download_time = 0\n",
            "max_download_time",
            "max_download_time: 0.0 must be positive",
        ),
        ("report_retry_cap = 0\n", "report_retry_cap", "report_retry_cap: 0.0 must be positive"),
        ("max_lock_ttl = 0\n", "max_lock_ttl", "max_lock_ttl: 0.0 must be positive"),
        ("ack_timeout = 0\n", "ack_timeout", "ack_timeout: 0.0 must be positive"),
        ("hook_timeout = 0\n", "hook_timeout", "hook_timeout: 0.0 must be positive"),
        (
            "unanswered_grace = -1\n",
            "unanswered_grace",
            "unanswered_grace: -1.0 must not be negative",
        ),
        ("quiet_period = -5\n", "quiet_period", "quiet_period: -5.0 must not be negative"),
        (
            "self_test_deadline = 0\n",
            "self_test_deadline",
            "self_test_deadline: 0.0 must be positive",
        ),
    ],
)
def test_config_ranges_get_the_line(
    tmp_path: Path, pub: Path, body: str, marker: str, expected: str
) -> None:
    message, text = fails(tmp_path, body)
    assert message == at(tmp_path, text, marker) + expected


def test_the_bounds_themselves_are_accepted(tmp_path: Path, pub: Path) -> None:
    body = (
        "retry_base = 5\nretry_cap = 5\nmax_retransmit = 0\nmax_image_size = 1\n"
        "max_download_bytes = 1\nunanswered_grace = 0\nquiet_period = 0\n"
        "[max_deferral]\ncritical = 0\n"
        "[control]\nmax_clients = 4096\ngroup = 4294967294\n"
    )
    settings = load_settings(write(tmp_path, BASE + body))
    assert (settings.config.retry_base, settings.config.retry_cap) == (5.0, 5.0)
    assert settings.config.max_retransmit == 0
    assert settings.control.max_clients == 4096
    assert settings.control.group == 2**32 - 2
    settings = load_settings(write(tmp_path, BASE + "max_retransmit = 20\n[control]\ngroup = 0\n"))
    assert settings.config.max_retransmit == 20
    assert settings.control.group == 0


@pytest.mark.parametrize("gid", ["-1", "4294967295", "4294967296"])
def test_a_gid_out_of_range(tmp_path: Path, pub: Path, gid: str) -> None:
    # 4294967295 is (gid_t) -1: chown would leave the group unchanged, silently.
    message, text = fails(tmp_path, f"[control]\ngroup = {gid}\n")
    assert message == at(tmp_path, text, "group") + (
        f"control.group: expected a group name or a gid (0..4294967294), got {gid}"
    )


def test_authorization_numbers_are_what_the_command_handler_accepts(
    tmp_path: Path, pub: Path
) -> None:
    from fota.app.command_handler import CommandHandler

    body = '[authorization]\nmode = "command"\ncommand = ["/bin/true"]\ntimeout = -1\n'
    message, text = fails(tmp_path, body)
    assert message == at(tmp_path, text, "timeout") + (
        "authorization.timeout: expected a positive number, got -1.0"
    )
    body = '[authorization]\nmode = "command"\ncommand = ["/bin/true"]\n'
    body += "timeout = 0.001\ndefer = 1e9\nretry = 1\n"
    auth = load_settings(write(tmp_path, BASE + body)).authorization
    handler = CommandHandler(  # what the daemon builds from them: it must not refuse them
        auth.command, timeout=auth.timeout, defer=auth.defer, retry=auth.retry
    )
    assert (handler.timeout, handler.defer, handler.retry) == (0.001, 1e9, 1.0)


def test_control_disabled_needs_another_authorization_mode(tmp_path: Path, pub: Path) -> None:
    tail = (
        ": nobody could answer a polite update; enable the control socket or set "
        'authorization.mode to "command" or "auto"'
    )
    message, text = fails(tmp_path, "[control]\nenabled = false\n")
    assert message == at(tmp_path, text, "enabled") + (
        'control.enabled: false, but authorization.mode is "control" (the default)' + tail
    )
    message, text = fails(
        tmp_path, '[authorization]\nmode = "control"\n\n[control]\nenabled = false\n'
    )
    assert message == at(tmp_path, text, "enabled") + (
        'control.enabled: false, but authorization.mode is "control"' + tail
    )
    for mode in ('"auto"', '"command"\ncommand = ["/bin/ask"]'):
        body = f"[control]\nenabled = false\n[authorization]\nmode = {mode}\n"
        assert load_settings(write(tmp_path, BASE + body)).control.enabled is False


# -- Config built in-process: the same checks ------------------------------------------------


def direct(tmp_path: Path, **kw: object) -> Config:
    return Config(server="coap://h", device_id="d", device_class="c", state_dir=tmp_path, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"hook_timeout": math.nan}, "hook_timeout: nan must be a finite number"),
        ({"hook_timeout": math.inf}, "hook_timeout: inf must be a finite number"),
        ({"ack_timeout": math.inf}, "ack_timeout: inf must be a finite number"),
        ({"condition_recheck": math.nan}, "condition_recheck: nan must be a finite number"),
        ({"poll_interval": 0.0}, "poll_interval: 0.0 must be positive"),
        ({"poll_interval": math.inf}, "poll_interval: inf must be a finite number"),
        ({"observe_refresh": 0}, "observe_refresh: 0 must be positive"),
        ({"observe_refresh": math.nan}, "observe_refresh: nan must be a finite number"),
        ({"retry_base": -1.0}, "retry_base: -1.0 must be positive"),
        ({"retry_base": math.nan}, "retry_base: nan must be a finite number"),
        ({"retry_cap": 0.5}, "retry_cap: 0.5 must be at least retry_base (1.0)"),
        ({"retry_cap": math.inf}, "retry_cap: inf must be a finite number"),
        ({"retry_cap": math.nan}, "retry_cap: nan must be a finite number"),
        ({"max_image_size": 0}, "max_image_size: 0 must be at least 1"),
        ({"max_image_size": 1.5}, "max_image_size: 1.5 must be an integer"),
        ({"max_retransmit": -1}, "max_retransmit: -1 must be in 0..20"),
        ({"max_retransmit": 21}, "max_retransmit: 21 must be in 0..20"),
        ({"max_retransmit": True}, "max_retransmit: True must be an integer"),
        ({"max_download_bytes": 0}, "max_download_bytes: 0 must be at least 1"),
        ({"max_download_time": 0.0}, "max_download_time: 0.0 must be positive"),
        ({"max_download_time": math.inf}, "max_download_time: inf must be a finite number"),
        ({"report_retry_cap": 0.0}, "report_retry_cap: 0.0 must be positive"),
        ({"report_retry_cap": math.nan}, "report_retry_cap: nan must be a finite number"),
        ({"max_lock_ttl": 0.0}, "max_lock_ttl: 0.0 must be positive"),
        ({"max_lock_ttl": math.inf}, "max_lock_ttl: inf must be a finite number"),
        ({"unanswered_grace": math.nan}, "unanswered_grace: nan must be a finite number"),
        ({"unanswered_grace": -1.0}, "unanswered_grace: -1.0 must not be negative"),
        ({"quiet_period": math.inf}, "quiet_period: inf must be a finite number"),
        ({"quiet_period": "1"}, "quiet_period: '1' must be a number"),
        (
            {"max_deferral": {"critical": math.inf}},
            "max_deferral.critical: inf must be a finite number",
        ),
        (
            {"max_deferral": {"mandatory": math.nan}},
            "max_deferral.mandatory: nan must be a finite number",
        ),
        ({"max_deferral": {"critical": -1.0}}, "max_deferral.critical: -1.0 must not be negative"),
        (
            {"deadline_after": {"optional": -math.inf}},
            "deadline_after.optional: -inf must be a finite number",
        ),
        ({"self_test_deadline": math.inf}, "self_test_deadline: inf must be a finite number"),
        ({"self_test_interval": math.nan}, "self_test_interval: nan must be a finite number"),
        ({"self_test_interval": 0.0}, "self_test_interval: 0.0 must be positive"),
    ],
)
def test_config_built_directly_refuses_bad_numbers(
    tmp_path: Path, kw: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        direct(tmp_path, **kw)
    assert str(info.value) == expected


def test_config_built_directly_accepts_the_bounds(tmp_path: Path) -> None:
    config = direct(
        tmp_path,
        poll_interval=0.5,
        retry_base=2.0,
        retry_cap=2.0,
        max_retransmit=20,
        max_image_size=1,
        max_download_bytes=1,
        max_download_time=0.1,
        unanswered_grace=0,
        quiet_period=0.0,
        max_deferral={"optional": 0.0, "critical": None},
        deadline_after={"critical": 0},
    )
    assert (config.retry_base, config.retry_cap, config.max_retransmit) == (2.0, 2.0, 20)
    assert direct(tmp_path, max_retransmit=0).max_retransmit == 0
    assert direct(tmp_path).policy().max_lock_ttl == 86400.0  # the defaults pass


# -- security settings (docs/security.md) ------------------------------------------------------


def test_security_settings_from_the_file(tmp_path: Path, pub: Path) -> None:
    root = keys.save_keypair(keys.generate(), tmp_path / "root")
    text = BASE + (
        'oscore = "oscore"\n'
        'trust_roots = ["root.pub"]\n'
        'revoked_keys = ["0011223344556677"]\n'
        'allowed_origins = ["coap://mirror.example:61617"]\n'
        "min_free_space = 1048576\n"
    )
    settings = load_settings(write(tmp_path, text))
    config = settings.config
    assert config.oscore == tmp_path / "oscore"
    assert config.trust_roots.get(kid_for(keys.load_public(root))) is not None
    assert config.revoked_keys == ["0011223344556677"]
    assert config.origins() == ("coap://updates.example.com:61616", "coap://mirror.example:61617")
    assert config.min_free_space == 1 << 20


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('trust_roots = ["nope.pub"]\n', "trust_roots[0]: cannot read"),
        ("trust_roots = []\n", "trust_roots: expected a non-empty list of public key files"),
        ("min_free_space = -1\n", "min_free_space"),
        ('revoked_keys = ["xyz"]\n', "revoked_keys[0]: 'xyz' is not a key id"),
        ('allowed_origins = ["https://x"]\n', "allowed_origins[0]: 'https://x' is not a coap://"),
    ],
)
def test_bad_security_settings_name_the_key(
    tmp_path: Path, pub: Path, line: str, expected: str
) -> None:
    message, _ = fails(tmp_path, line)
    assert expected in message


def test_lossy_link_settings_from_the_file(tmp_path: Path, pub: Path) -> None:
    text = BASE + 'retransmission = "rfc7252"\ncongestion = "fixed"\nmin_rto = 0.5\n'
    config = load_settings(write(tmp_path, text)).config
    assert (config.retransmission, config.congestion, config.min_rto) == ("rfc7252", "fixed", 0.5)
    message, _ = fails(tmp_path, 'congestion = "reno"\n')
    assert "congestion: 'reno' is not one of aimd, fixed" in message
    message, _ = fails(tmp_path, "min_rto = 0.001\n")
    assert "min_rto: 0.001 must be in 0.01..60" in message
