"""Issue 16 §2: package steps and hooks run only what the bundle brings.

Package names are files of the unpacked bundle with the manager's own suffix, passed as
absolute paths; allow-list entries are whole argument-list prefixes; commands get an explicit
environment, never the daemon's; unpacking is bounded (size, ratio, free space) and takes only
the compressions the docs name. The package managers are stand-in scripts that record how they
were run (a real pip would run a project's ``setup.py`` as root: exactly what must not happen).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fota import hooks
from fota.errors import ConfigError, InstallError
from fota.install import Context, build
from fota.install.archive import RECIPE_TOML, ArchiveInstaller, UnpackLimitError
from tests.integration.test_install_archive import (
    Setup,
    make_bundle,
    make_manifest,
    recipe,
    tar_file,
    to_toml,
)

MAIN = {"payload/main.py": b"print('v1')\n"}
FILES = [{"source": "payload/main.py", "target": "app/main.py"}]

RECORD = """#!/bin/sh
{{
  echo "argv0=$(basename "$0")"
  for a in "$@"; do echo "arg=$a"; done
}} >> {log}
env > {log}.env
"""


def tool(bindir: Path, name: str, log: Path) -> Path:
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text(RECORD.format(log=log))
    path.chmod(0o755)
    return path


def installer(setup: Setup, **table: Any) -> ArchiveInstaller:
    table = {"kind": "archive", "root": str(setup.root), **table}
    inst = build("installers.app", table, Context(setup.state, 30.0))
    assert isinstance(inst, ArchiveInstaller)
    return inst


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    root, state = tmp_path / "root", tmp_path / "state"
    (root / "app").mkdir(parents=True)
    state.mkdir()
    return Setup(tmp_path, root, state, {})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines(path) if "=" in line)


# -- package names ------------------------------------------------------------------------------

PROJECT = {"proj/setup.py": b"import os; os.system('touch /tmp/pwned')\n"}


@pytest.mark.parametrize(
    ("manager", "name", "extra", "message"),
    [
        # A project directory: pip builds it, running its setup.py, whatever --only-binary says.
        ("pip", "proj", PROJECT, "'proj' is not a .whl file of the bundle"),
        ("pip", "./proj", PROJECT, "'./proj' is not a .whl file of the bundle"),
        # A directory that looks like a wheel: still a project pip would build.
        ("pip", "d.whl", {"d.whl/setup.py": b"x"}, "'d.whl' is not a file in the bundle"),
        ("pip", "/tmp/evil.whl", {}, "'/tmp/evil.whl' is an absolute path"),
        ("pip", "../evil.whl", {}, "'../evil.whl' goes up a directory"),
        ("pip", "file:/etc", {}, "'file:/etc' is not a .whl file of the bundle"),
        ("pip", "requests", {}, "'requests' is not a .whl file of the bundle"),
        ("apt", "/var/cache/apt/archives/x.deb", {}, "is an absolute path"),
        ("apt", "curl", {}, "'curl' is not a .deb file of the bundle"),
        ("apt", "curl.deb", {}, "'curl.deb' is not a file in the bundle"),
        ("npm", "owner/repo", {}, "'owner/repo' is not a .tgz file of the bundle"),
        ("npm", "github:o/r", {}, "'github:o/r' is not a .tgz file of the bundle"),
        ("npm", "left-pad", {}, "'left-pad' is not a .tgz file of the bundle"),
    ],
)
async def test_package_names_that_are_not_the_bundles_own_files_are_refused(
    setup: Setup, manager: str, name: str, extra: Mapping[str, bytes], message: str
) -> None:
    log = setup.tmp / "tool.log"
    program = tool(setup.tmp / "bin", manager, log)
    inst = installer(setup, allowed_managers=[manager], **{manager: [str(program)]})
    rec = recipe(files=FILES, packages=[{"manager": manager, "names": [name]}])
    candidate = make_bundle(setup.tmp / "u.tar", rec, {**MAIN, **extra})
    with pytest.raises(InstallError) as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert message in str(info.value)
    assert "packages[0].names[0]" in str(info.value)
    assert not log.exists()  # the package manager never ran
    assert list((setup.root / "app").iterdir()) == []


async def test_bundle_files_go_to_the_package_manager_as_absolute_paths(setup: Setup) -> None:
    log = setup.tmp / "pip.log"
    pip = tool(setup.tmp / "bin", "pip", log)
    inst = installer(setup, allowed_managers=["pip"], pip=[str(pip)])
    wheel = "wheels/dep-1.0-py3-none-any.whl"
    rec = recipe(files=FILES, packages=[{"manager": "pip", "names": [f"./{wheel}"]}])
    candidate = make_bundle(setup.tmp / "u.tar", rec, {**MAIN, wheel: b"PK"})
    await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    bundle = os.path.realpath(setup.state / "archive" / "bundle")
    assert lines(log) == [
        "argv0=pip",
        *(f"arg={a}" for a in ["install", "--no-input", "--no-index", "--find-links", bundle]),
        "arg=--only-binary=:all:",
        f"arg={bundle}/{wheel}",
    ]


# -- allow-lists: whole argument-list prefixes ---------------------------------------------------

# The documented configuration (docs/installers.md, examples/fota.toml).
DOCUMENTED: dict[str, Any] = {
    "allowed_commands": [
        ["systemctl", "stop", "app"],
        ["systemctl", "start", "app"],
        ["systemctl", "restart", "app"],
        ["/usr/local/libexec/app-migrate"],
    ],
    "allowed_managers": ["pip", "apt"],
}


@pytest.fixture
def tools(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """Stand-ins for systemctl, pip3 and apt-get, first on PATH; all record into one log."""
    log = setup.tmp / "tools.log"
    found = {n: tool(setup.tmp / "bin", n, log) for n in ("systemctl", "pip3", "apt-get")}
    monkeypatch.setenv("PATH", f"{setup.tmp / 'bin'}:{os.environ['PATH']}")
    yield {**found, "log": log}


async def test_the_documented_hooks_run(setup: Setup, tools: dict[str, Path]) -> None:
    inst = installer(setup, **DOCUMENTED, pip=[str(tools["pip3"])], apt=["apt-get"])
    rec = recipe(
        files=FILES,
        before=["systemctl", "stop", "app"],
        after=["systemctl", "start", "app"],
        rollback=["systemctl", "restart", "app"],
    )
    candidate = make_bundle(setup.tmp / "u.tar", rec, MAIN)
    await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert lines(tools["log"]) == [
        *("argv0=systemctl", "arg=stop", "arg=app"),
        *("argv0=systemctl", "arg=start", "arg=app"),
    ]


@pytest.mark.parametrize(
    "hook",
    [
        # pip builds the project, running its setup.py as root.
        ["PIP3", "install", "./proj"],
        # Links a unit file from the (user-writable) application directory and starts it.
        ["systemctl", "enable", "--now", "/opt/app/x.service"],
        # apt runs the Pre-Invoke command through a shell.
        ["apt-get", "-o", "APT::Update::Pre-Invoke::=touch /tmp/pwned", "update"],
        # The right prefix, then options.
        ["systemctl", "restart", "app", "--root=/opt/app"],
        ["systemctl", "restart", "--", "app"],
        # A prefix of an entry is not the entry.
        ["systemctl", "stop"],
    ],
)
async def test_the_documented_allow_list_cannot_be_turned_into_arbitrary_code(
    setup: Setup, tools: dict[str, Path], hook: list[str]
) -> None:
    hook = [str(tools["pip3"]) if a == "PIP3" else a for a in hook]
    inst = installer(setup, **DOCUMENTED, pip=[str(tools["pip3"])], apt=["apt-get"])
    rec = recipe(files=FILES, before=hook)
    candidate = make_bundle(setup.tmp / "u.tar", rec, {**MAIN, **PROJECT})
    with pytest.raises(InstallError) as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert "recipe before: command" in str(info.value)
    assert "is not allowed by installers.app.allowed_commands" in str(info.value)
    assert not tools["log"].exists()  # nothing ran
    assert list((setup.root / "app").iterdir()) == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["systemctl"], "'systemctl' is a program name; an entry is now the argument list"),
        ([["./bin/migrate"]], "'./bin/migrate' is relative to root"),
        ([["{root}/bin/migrate"]], "is under root"),
        ([["pip"]], "'pip' is a package manager; allow package steps with"),
        ([["apt-get", "install"]], "'apt-get' is a package manager"),
        ([[]], "expected a non-empty list of strings"),
        ("systemctl", "expected a list of argument lists"),
    ],
)
def test_allow_list_entries_are_checked_at_start(setup: Setup, entries: Any, message: str) -> None:
    if entries and isinstance(entries[0], list):
        entries = [[a.format(root=setup.root) for a in entry] for entry in entries]
    with pytest.raises(ConfigError) as info:
        installer(setup, allowed_commands=entries)
    assert "installers.app.allowed_commands" in str(info.value)
    assert message in str(info.value)


# -- the environment --------------------------------------------------------------------------


async def test_hooks_and_package_steps_get_an_explicit_environment(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOTA_SECRET_TOKEN", "hunter2")  # the daemon's: a FOTA_ it did not set
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("LANG", "C.UTF-8")
    out = setup.tmp / "hook.env"
    pip = tool(setup.tmp / "bin", "pip", setup.tmp / "pip.log")
    inst = installer(
        setup,
        allowed_commands=[["sh", "-c"]],
        allowed_managers=["pip"],
        pip=[str(pip)],
        env={"APP_MODE": "gateway"},
    )
    wheel = "dep-1.0-py3-none-any.whl"
    rec = recipe(
        files=FILES,
        after=["sh", "-c", f"env > {out}"],
        packages=[{"manager": "pip", "names": [wheel]}],
    )
    candidate = make_bundle(setup.tmp / "u.tar", rec, {**MAIN, wheel: b"PK"})
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    for env, fota in [
        (read_env(out), {"FOTA_STEP": "after", "FOTA_VERSION": "1.0"}),
        (read_env(setup.tmp / "pip.log.env"), {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
    ]:
        assert "FOTA_SECRET_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert env["PATH"] == os.environ["PATH"]
        assert env["LANG"] == "C.UTF-8"
        assert env["APP_MODE"] == "gateway"  # what the setting adds
        assert env["FOTA_UPDATE_ID"] == m.update_id
        assert env["DEBIAN_FRONTEND"] == "noninteractive"
        for key, value in fota.items():
            assert env[key] == value
        # Nothing else: the shell adds PWD, SHLVL and _ of its own.
        allowed = {*hooks.PASSED, *hooks.NONINTERACTIVE, *fota, "APP_MODE", "PWD", "SHLVL", "_"}
        assert {k for k in env if not k.startswith("FOTA_")} <= allowed


async def test_every_command_fota_runs_gets_the_explicit_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hooks.run is what the daemon's authorization command, self-tests, conditions and every
    # installer backend use: none of them sees the daemon's own variables.
    monkeypatch.setenv("FOTA_SECRET_TOKEN", "hunter2")
    monkeypatch.delenv("LC_ALL", raising=False)
    out = tmp_path / "env"
    done = await hooks.run(
        ["sh", "-c", f"env > {out}"], name="test", timeout=30, env={"FOTA_STEP": "download"}
    )
    assert done.ok
    env = read_env(out)
    assert "FOTA_SECRET_TOKEN" not in env and "LC_ALL" not in env
    assert env["FOTA_STEP"] == "download" and env["PATH"] == os.environ["PATH"]
    monkeypatch.delenv("PATH")
    assert hooks.environment()["PATH"] == hooks.DEFAULT_PATH


# -- unpacking ----------------------------------------------------------------------------------


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's bomb: about 522 KB of gzip that expands to 513 MiB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        text = to_toml(recipe(files=[{"source": "zeros", "target": "app/zeros"}])).encode()
        add(tar, RECIPE_TOML, text)
        info = tarfile.TarInfo("zeros")
        info.size = 513 << 20
        tar.addfile(info, Zeros(info.size))
    return path


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info, _ = tar_file(name, data)
    tar.addfile(info, io.BytesIO(data))


def written() -> int:
    """Bytes this process has passed to write() so far (every thread)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


async def test_a_gzip_bomb_is_refused_before_it_is_written(setup: Setup, bomb: Path) -> None:
    assert bomb.stat().st_size < 1 << 20
    inst = installer(setup)
    before = written()
    with pytest.raises(UnpackLimitError) as info:
        await inst.install(bomb, make_manifest(bomb, 1), lambda p: None)
    assert written() - before < 16 << 20  # not 513 MiB: refused from the member's header
    assert info.value.limit == "max_ratio"
    assert "bundle member 'zeros': the bundle unpacks to more than 100 times its" in str(info.value)
    assert "(installers.app.max_ratio)" in str(info.value)
    assert not (setup.state / "archive" / "bundle").exists()
    assert list((setup.root / "app").iterdir()) == []


@pytest.mark.parametrize(
    ("table", "limit"),
    [
        ({"max_unpacked_size": 1000}, "max_unpacked_size"),
        ({"min_free_space": 1 << 60}, "min_free_space"),
    ],
)
async def test_unpacking_is_bounded_by_size_and_free_space(
    setup: Setup, table: dict[str, int], limit: str
) -> None:
    inst = installer(setup, **table)
    candidate = make_bundle(setup.tmp / "u.tar", recipe(files=FILES), {**MAIN, "big": bytes(2000)})
    with pytest.raises(UnpackLimitError) as info:
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert info.value.limit == limit
    assert f"installers.app.{limit})" in str(info.value)
    assert "bundle member '" in str(info.value)  # named where it stopped
    assert not (setup.state / "archive" / "bundle").exists()


@pytest.mark.parametrize(("mode", "name"), [("w:bz2", "bzip2"), ("w:xz", "xz")])
async def test_compressions_the_docs_do_not_name_are_refused(
    setup: Setup, mode: str, name: str
) -> None:
    candidate = setup.tmp / "u.tar.x"
    with tarfile.open(candidate, mode) as tar:  # type: ignore[call-overload]
        add(tar, RECIPE_TOML, to_toml(recipe(files=FILES)).encode())
        add(tar, "payload/main.py", MAIN["payload/main.py"])
    inst = installer(setup)
    with pytest.raises(InstallError, match=rf"the bundle is {name}-compressed; only plain tar"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert list((setup.root / "app").iterdir()) == []
