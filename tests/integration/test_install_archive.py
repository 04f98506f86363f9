"""The archive installer: real bundles, real directories in tmp_path, real subprocesses.

Crash points are real too: a child Python process runs install (or commit, or rollback) with
``FOTA_CRASH_AT`` set and is killed by SIGKILL there; this process then runs the idempotent
re-run on the same directories and state, and the trees must be exactly old or exactly new.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import crashpoints
from fota.core import manifest as mf
from fota.core.manifest import Component, Manifest, ManifestBody, TrustStore
from fota.errors import ConfigError, InstallError
from fota.install import Context, build
from fota.install.archive import RECIPE_CBOR, RECIPE_TOML, ArchiveInstaller, parse_recipe
from tests.installing import ends_within

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KID = b"archive-test-key"
FRAGMENT = 64 * 1024
REPO = Path(__file__).parents[2]

Tree = dict[str, tuple[Any, ...]]

# -- helpers --------------------------------------------------------------------------------


def make_manifest(candidate: Path, sequence: int) -> Manifest:
    data = candidate.read_bytes()
    body = ManifestBody(
        sequence=sequence,
        component=Component.APPLICATION,
        version=f"{sequence}.0",
        device_class="gw",
        image_size=len(data),
        image_sha256=hashlib.sha256(data).digest(),
        image_uri="../img/x",
        fragment_size=FRAGMENT,
        fragment_sha256=tuple(
            hashlib.sha256(data[i : i + FRAGMENT]).digest()
            for i in range(0, max(1, len(data)), FRAGMENT)
        ),
    )
    return mf.verify(mf.sign(body, KEY, KID), TrustStore({KID: KEY.public_key()}))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(recipe: Mapping[str, Any]) -> str:
    lines, tables = [], []
    for key, value in recipe.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    for key, items in tables:
        for item in items:
            lines.append(f"[[{key}]]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


def tar_file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def make_bundle(
    path: Path,
    recipe: Mapping[str, Any] | None,
    payload: Mapping[str, bytes | tuple[bytes, int]],
    *,
    cbor: bool = False,
    gz: bool = False,
    extra: Sequence[tuple[tarfile.TarInfo, bytes | None]] = (),
) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        members: list[tuple[tarfile.TarInfo, bytes | None]] = []
        if recipe is not None:
            text = cbor2.dumps(dict(recipe)) if cbor else to_toml(recipe).encode()
            members.append(tar_file(RECIPE_CBOR if cbor else RECIPE_TOML, text))
        for name, value in payload.items():
            content, mode = value if isinstance(value, tuple) else (value, 0o644)
            members.append(tar_file(name, content, mode))
        members.extend(extra)
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


SIDE = re.compile(r"^\..*\.fota-[0-9a-f]{16}(\.tmp)?$")


def tree(root: Path, *, hide_sides: bool = False) -> Tree:
    """Every entry under root: type, permission bits, content (or link target)."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if hide_sides:
            dirnames[:] = [d for d in dirnames if not SIDE.match(d)]
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def sides(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if SIDE.match(p.name))


LAYOUT: dict[str, Any] = {
    "app": 0o755,
    "app/main.py": (b"print('v0')\n", 0o644),
    "app/obsolete.txt": (b"old\n", 0o600),
    "app/lib": 0o750,
    "app/lib/helper.py": (b"helper0\n", 0o644),
    "app/current": "main.py",  # a symlink
    "etc": 0o755,
    "etc/app.conf": (b"level=0\n", 0o640),
    "data": 0o700,
    "data/keep.db": (b"untouched\n", 0o600),
}


def make_layout(root: Path) -> Tree:
    root.mkdir(parents=True)
    for name, spec in LAYOUT.items():
        path = root / name
        if isinstance(spec, int):
            path.mkdir()
            path.chmod(spec)
        elif isinstance(spec, str):
            path.symlink_to(spec)
        else:
            path.write_bytes(spec[0])
            path.chmod(spec[1])
    return tree(root)


def expected(old: Tree, files: Mapping[str, tuple[bytes, int]], gone: Sequence[str] = ()) -> Tree:
    new = dict(old)
    for target, (data, mode) in files.items():
        parts = target.split("/")
        for k in range(1, len(parts)):
            new.setdefault("/".join(parts[:k]), ("dir", 0o755))
        new[target] = ("file", mode, data)
    for name in gone:
        del new[name]
    return new


# The first update: two existing directories (app, etc) and one that does not exist (plugins).
U1_PAYLOAD: dict[str, bytes | tuple[bytes, int]] = {
    "payload/main.py": b"print('v1')\n",
    "payload/new.py": (b"new1\n", 0o640),
    "payload/app.conf": b"level=1\n",
    "payload/x.so": b"\x7fELF plugin\n",
}
U1_FILES = [
    {"source": "payload/main.py", "target": "app/main.py", "mode": 0o755},
    {"source": "payload/new.py", "target": "app/lib/new.py"},  # the member's mode: 0640
    {"source": "payload/app.conf", "target": "etc/app.conf", "mode": 0o640},
    {"source": "payload/x.so", "target": "plugins/extra/x.so", "mode": 0o755},
]
U1_RESULT = {
    "app/main.py": (b"print('v1')\n", 0o755),
    "app/lib/new.py": (b"new1\n", 0o640),
    "etc/app.conf": (b"level=1\n", 0o640),
    "plugins/extra/x.so": (b"\x7fELF plugin\n", 0o755),
}


def recipe(**kw: Any) -> dict[str, Any]:
    return {"format": 1, **kw}


@dataclass
class Setup:
    tmp: Path
    root: Path
    state: Path
    old: Tree

    @property
    def txn(self) -> Path:
        return self.state / "archive" / "transaction.json"

    def installer(self, **table: Any) -> ArchiveInstaller:
        table = {"kind": "archive", "root": str(self.root), **table}
        inst = build("installers.app", table, Context(self.state, 30.0))
        assert isinstance(inst, ArchiveInstaller)
        return inst

    def bundle(
        self, name: str, rec: Mapping[str, Any] | None, payload: Any = None, **kw: Any
    ) -> Path:
        return make_bundle(self.tmp / name, rec, U1_PAYLOAD if payload is None else payload, **kw)

    def unchanged(self) -> None:
        assert tree(self.root) == self.old
        assert not self.txn.exists()
        assert not (self.state / "archive" / "bundle").exists()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    root = tmp_path / "root"
    state = tmp_path / "state"
    state.mkdir()
    return Setup(tmp_path, root, state, make_layout(root))


def marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- install, commit, rollback ------------------------------------------------------------------


async def test_install_two_directories_commit_and_second_update(setup: Setup) -> None:
    inst = setup.installer()
    candidate = setup.bundle("u1.tar", recipe(files=U1_FILES))
    m1 = make_manifest(candidate, 1)
    seen: list[int] = []
    assert await inst.install(candidate, m1, seen.append) == inst_done()
    assert seen == sorted(seen) and seen[-1] == 100
    new = expected(setup.old, U1_RESULT)
    assert tree(setup.root, hide_sides=True) == new
    # Untouched files keep their modes, the symlink is still a symlink; the old trees are kept.
    assert new["app/obsolete.txt"] == ("file", 0o600, b"old\n")
    assert new["app/current"] == ("link", "main.py")
    assert sorted(Path(s).name for s in sides(setup.root)) == [
        f".app.fota-{m1.update_id}",
        f".etc.fota-{m1.update_id}",
    ]
    assert (setup.root / f".app.fota-{m1.update_id}" / "main.py").read_bytes() == b"print('v0')\n"
    assert await inst.booted(m1) is True
    await inst.commit(m1)
    assert tree(setup.root) == new  # the old trees are gone
    assert not setup.txn.exists()
    await inst.commit(m1)  # again: nothing left to do
    assert await inst.rollback(m1) == inst_done()  # after commit: nothing to undo
    assert tree(setup.root) == new

    # A second update on top of the first.
    u2 = {"payload/main.py": b"print('v2')\n", "payload/tool": b"#!/bin/sh\n"}
    files = [
        {"source": "payload/main.py", "target": "app/main.py", "mode": 0o700},
        {"source": "payload/tool", "target": "plugins/extra/tool", "mode": 0o755},
    ]
    candidate2 = setup.bundle("u2.tar", recipe(files=files), u2)
    m2 = make_manifest(candidate2, 2)
    await inst.install(candidate2, m2, lambda p: None)
    await inst.commit(m2)
    assert tree(setup.root) == expected(
        new,
        {"app/main.py": (b"print('v2')\n", 0o700), "plugins/extra/tool": (b"#!/bin/sh\n", 0o755)},
    )
    assert not setup.txn.exists()


def inst_done() -> Any:
    from fota.install.base import DONE

    return DONE


async def test_rollback_restores_both_directories_exactly(setup: Setup) -> None:
    marker = setup.tmp / "rolled-back"
    inst = setup.installer(allowed_commands=[["rm"], ["sh", "-c"]])
    rec = recipe(
        files=U1_FILES,
        # The update deletes a file that the old tree had: rollback must bring it back.
        after=["rm", str(setup.root / "app" / "obsolete.txt")],
        rollback=["sh", "-c", f'echo "$FOTA_STEP $FOTA_UPDATE_ID" >> {marker}'],
    )
    candidate = setup.bundle("u1.tar", rec)
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    assert tree(setup.root, hide_sides=True) == expected(
        setup.old, U1_RESULT, gone=["app/obsolete.txt"]
    )
    assert (setup.root / "plugins").is_dir()
    assert await inst.rollback(m) == inst_done()
    setup.unchanged()  # full trees: deleted file back, added files and plugins/ gone, no sides
    assert marker_lines(marker) == [f"rollback {m.update_id}"]
    assert await inst.rollback(m) == inst_done()  # twice: a no-op
    setup.unchanged()
    assert marker_lines(marker) == [f"rollback {m.update_id}"]
    await inst.commit(m)  # nothing to commit any more
    setup.unchanged()


async def test_failing_after_hook_restores_and_runs_rollback(setup: Setup) -> None:
    marker = setup.tmp / "rolled-back"
    inst = setup.installer(allowed_commands=[["sh", "-c"]])
    rec = recipe(
        files=U1_FILES,
        before=["sh", "-c", "echo stopping"],
        after=["sh", "-c", "echo starting; echo 'service failed to start' >&2; exit 3"],
        rollback=["sh", "-c", f"echo rolled >> {marker}"],
    )
    candidate = setup.bundle("u1.tar", rec)
    m = make_manifest(candidate, 1)
    with pytest.raises(InstallError, match=r"after hook failed: exit status 3 \(service failed"):
        await inst.install(candidate, m, lambda p: None)
    setup.unchanged()
    assert marker_lines(marker) == ["rolled"]
    assert await inst.rollback(m) == inst_done()  # the engine's rollback that follows: no-op
    assert marker_lines(marker) == ["rolled"]
    setup.unchanged()


def session_members(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize(("recipe_timeout", "config_timeout"), [(1, 30), (60, 1)])
async def test_hanging_hook_is_killed_with_its_children(
    setup: Setup, recipe_timeout: int, config_timeout: int
) -> None:
    pidfile = setup.tmp / "hook.pid"
    inst = setup.installer(allowed_commands=[["sh", "-c"]], timeout=config_timeout)
    rec = recipe(
        files=U1_FILES,
        timeout=recipe_timeout,  # the effective timeout is the smaller one: 1 s
        after=["sh", "-c", f"echo $$ > {pidfile}; sleep 60 & sleep 60"],
    )
    candidate = setup.bundle("u1.tar", rec)
    m = make_manifest(candidate, 1)
    with pytest.raises(InstallError, match=r"after hook failed: timed out after 1 s"):
        await inst.install(candidate, m, lambda p: None)
    setup.unchanged()
    sid = int(pidfile.read_text())  # the hook's shell leads a session of its own
    leftovers = [pid for pid in session_members(sid) if not ends_within(pid, 10)]
    assert leftovers == []
    assert session_members(sid) == []


async def test_prompting_hook_reads_eof_and_fails_fast(setup: Setup) -> None:
    inst = setup.installer(allowed_commands=[["sh", "-c"]], timeout=120)
    rec = recipe(files=U1_FILES, before=["sh", "-c", 'read answer; test "$answer" = yes'])
    candidate = setup.bundle("u1.tar", rec)
    m = make_manifest(candidate, 1)
    # "exit status 1", not "timed out after 120 s": it read end-of-file and gave up.
    with pytest.raises(InstallError, match=r"before hook failed: exit status 1"):
        await inst.install(candidate, m, lambda p: None)
    setup.unchanged()


# -- refusals before anything changes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "extra", "what"),
    [
        ([], {"before": ["touch", "MARKER"]}, "recipe before: command ['touch'"),
        ([["sh", "-c"]], {"after": ["touch", "MARKER"]}, "recipe after: command ['touch'"),
        ([["touch"]], {"rollback": ["/bin/sh", "-c", "touch MARKER"]}, "command ['/bin/sh'"),
        ([["sh", "-c"]], {"before": ["sh", "MARKER"]}, "recipe before: command ['sh'"),
        ([["touch"]], {"before": ["touch", "-h", "MARKER"]}, "recipe before: command ['touch'"),
    ],
)
async def test_commands_not_allowed_are_refused_before_anything_changes(
    setup: Setup, allowed: list[list[str]], extra: dict[str, Any], what: str
) -> None:
    marker = setup.tmp / "marker"
    text = json.dumps(extra).replace("MARKER", str(marker))
    inst = setup.installer(allowed_commands=allowed)
    candidate = setup.bundle("u1.tar", recipe(files=U1_FILES, **json.loads(text)))
    m = make_manifest(candidate, 1)
    with pytest.raises(InstallError) as info:
        await inst.install(candidate, m, lambda p: None)
    assert what in str(info.value)
    assert "not allowed by installers.app.allowed_commands" in str(info.value)
    setup.unchanged()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("managers", "manager"), [([], "pip"), (["pip"], "npm"), (["npm", "pip"], "apt")]
)
async def test_package_managers_not_allowed_are_refused_before_anything_changes(
    setup: Setup, managers: list[str], manager: str
) -> None:
    suffix = {"pip": ".whl", "apt": ".deb", "npm": ".tgz"}[manager]
    marker = setup.tmp / "marker"
    payload = {**U1_PAYLOAD, f"pkg/x{suffix}": b"x"}
    packages = [{"manager": manager, "names": [f"pkg/x{suffix}"]}]
    inst = setup.installer(allowed_managers=managers)
    candidate = setup.bundle("u1.tar", recipe(files=U1_FILES, packages=packages), payload)
    m = make_manifest(candidate, 1)
    with pytest.raises(InstallError) as info:
        await inst.install(candidate, m, lambda p: None)
    assert f"the package manager {manager!r} is not allowed by installers.app.allowed_managers" in (
        str(info.value)
    )
    setup.unchanged()
    assert not marker.exists()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tar_file("../evil", b"x"), "'../evil': refused"),
        (tar_file("payload/../../evil", b"x"), "goes up a directory"),
        (tar_file("/tmp/evil-abs", b"x"), "'/tmp/evil-abs': refused"),
        (link("payload/passwd", "/etc/passwd"), "symbolic link to '/etc/passwd' pointing outside"),
        (link("payload/up", "../../evil"), "pointing outside the bundle"),
        (link("payload/hard", "payload/main.py", tarfile.LNKTYPE), "'payload/hard': a hard link"),
        (special("payload/null", tarfile.CHRTYPE), "'payload/null': a device file"),
        (special("payload/sda", tarfile.BLKTYPE), "'payload/sda': a device file"),
        (special("payload/fifo", tarfile.FIFOTYPE), "'payload/fifo': a FIFO"),
    ],
)
async def test_unsafe_bundle_members_are_refused(
    setup: Setup, member: tuple[tarfile.TarInfo, bytes | None], message: str
) -> None:
    inst = setup.installer()
    candidate = setup.bundle("bad.tar", recipe(files=U1_FILES), extra=[member])
    m = make_manifest(candidate, 1)
    with pytest.raises(InstallError) as info:
        await inst.install(candidate, m, lambda p: None)
    assert message in str(info.value)
    setup.unchanged()
    assert not (setup.tmp / "evil").exists()
    assert not Path("/tmp/evil-abs").exists()


BAD_RECIPES: list[tuple[dict[str, Any], str]] = [
    ({"files": [{"source": "payload/main.py", "target": "../x"}]}, "files[0].target: '../x'"),
    ({"files": [{"source": "payload/main.py", "target": "app/../../x"}]}, "goes up a directory"),
    ({"files": [{"source": "payload/main.py", "target": "/etc/x"}]}, "is an absolute path"),
    ({"files": [{"source": "../main.py", "target": "app/x"}]}, "files[0].source: '../main.py'"),
    ({"files": [{"source": "payload/nope", "target": "app/x"}]}, "not a file in the bundle"),
    ({"files": [{"source": "payload/main.py", "target": "app/x", "owner": 0}]}, "key 'owner'"),
    ({"files": [{"source": "payload/main.py", "target": "app/x", "mode": "755"}]}, "mode"),
    ({"files": [{"source": "payload/main.py", "target": "app/x", "mode": 0o10000}]}, "mode"),
    ({"files": [{"source": "payload/main.py"}]}, "files[0]: missing key 'target'"),
    ({"files": [{"target": "a/" + "x" * 256, "source": "payload/main.py"}]}, "255 bytes"),
    (
        {
            "files": [
                {"source": "payload/main.py", "target": "app/x"},
                {"source": "payload/new.py", "target": "app/./x"},
            ]
        },
        "'app/x' is named twice",
    ),
    (
        {
            "files": [
                {"source": "payload/main.py", "target": "app/x"},
                {"source": "payload/new.py", "target": "app/x/y"},
            ]
        },
        "'app/x' is a file and the directory of 'app/x/y'",
    ),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"format": 2}, "format: only format 1"),
    ({"format": True}, "format: only format 1"),
    ({"before": "systemctl stop app"}, "before: expected a non-empty list of strings"),
    ({"after": []}, "after: expected a non-empty list"),
    ({"timeout": 0}, "timeout: expected a positive number"),
    ({"timeout": "10"}, "timeout: expected a positive number"),
    ({"packages": [{"manager": "yum", "names": ["x"]}]}, "'yum' is not one of apt, pip, npm"),
    ({"packages": [{"manager": "pip", "names": ["x"], "index": "u"}]}, "unknown key 'index'"),
    ({"packages": [{"manager": "pip", "names": []}]}, "packages[0].names"),
    (
        {"packages": [{"manager": "pip", "names": ["--index-url=http://x"]}]},
        "looks like an option",
    ),
    (
        {"packages": [{"manager": "pip", "names": ["evil @ https://example.org/e.tar.gz"]}]},
        "names a download",
    ),
    (
        {"packages": [{"manager": "npm", "names": ["git+https://example.org/x"]}]},
        "names a download",
    ),
    ({"packages": {"manager": "pip"}}, "packages: expected an array of tables"),
    ({"files": [{"source": "payload/main.py", "target": "app/x"}] * 10_001}, "limit of 10000"),
]


@pytest.mark.parametrize(("change", "message"), BAD_RECIPES)
async def test_bad_recipes_are_refused_naming_the_key(
    setup: Setup, change: dict[str, Any], message: str
) -> None:
    inst = setup.installer(allowed_commands=[["sh", "-c"]], allowed_managers=["pip"])
    candidate = setup.bundle("bad.tar", {**recipe(files=U1_FILES), **change})
    m = make_manifest(candidate, 1)
    with pytest.raises(InstallError) as info:
        await inst.install(candidate, m, lambda p: None)
    assert message in str(info.value)
    setup.unchanged()


def test_parse_recipe_directly() -> None:
    r = parse_recipe(
        {
            "format": 1,
            "before": ["a"],
            "timeout": 5,
            "files": [{"source": "./p//x", "target": "d/./x", "mode": 0o755}],
            "packages": [{"manager": "apt", "names": ["debs/curl.deb"]}],
        }
    )
    assert r.before == ("a",) and r.after is None and r.timeout == 5.0
    assert r.files[0].source == "p/x" and r.files[0].target == ("d", "x")
    assert r.packages[0].names == ("debs/curl.deb",)
    with pytest.raises(InstallError, match="recipe: missing key 'format'"):
        parse_recipe({})
    with pytest.raises(InstallError, match="recipe: expected a table"):
        parse_recipe([1])


async def test_bundle_without_recipe_or_not_a_tar(setup: Setup) -> None:
    inst = setup.installer()
    candidate = setup.bundle("none.tar", None)
    with pytest.raises(InstallError, match=r"has no fota-recipe\.toml or fota-recipe\.cbor"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    junk = setup.tmp / "junk.bin"
    junk.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(InstallError, match="not a readable tar archive"):
        await inst.install(junk, make_manifest(junk, 2), lambda p: None)
    setup.unchanged()


async def test_symlinked_target_directory_is_refused(setup: Setup) -> None:
    outside = setup.tmp / "outside"
    outside.mkdir()
    (setup.root / "link").symlink_to(outside)
    old = tree(setup.root)
    inst = setup.installer()
    rec = recipe(files=[{"source": "payload/main.py", "target": "link/main.py"}])
    candidate = setup.bundle("u1.tar", rec)
    with pytest.raises(InstallError, match="is a symbolic link"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    assert tree(setup.root) == old
    assert list(outside.iterdir()) == []


async def test_cbor_recipe_in_a_gzip_bundle(setup: Setup) -> None:
    inst = setup.installer()
    candidate = setup.bundle("u1.tar.gz", recipe(files=U1_FILES), cbor=True, gz=True)
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    await inst.commit(m)
    assert tree(setup.root) == expected(setup.old, U1_RESULT)


async def test_file_directly_in_root_swaps_root_itself(setup: Setup) -> None:
    inst = setup.installer()
    rec = recipe(files=[{"source": "payload/main.py", "target": "top.py", **{"mode": 0o644}}])
    candidate = setup.bundle("u1.tar", rec)
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    new = expected(setup.old, {"top.py": (b"print('v1')\n", 0o644)})
    assert tree(setup.root) == new
    assert (setup.tmp / f".root.fota-{m.update_id}").is_dir()  # the old root, beside it
    await inst.rollback(m)
    setup.unchanged()
    assert not (setup.tmp / f".root.fota-{m.update_id}").exists()


async def test_an_unfinished_transaction_of_another_update_is_rolled_back_first(
    setup: Setup,
) -> None:
    inst = setup.installer()
    c1 = setup.bundle("u1.tar", recipe(files=U1_FILES))
    await inst.install(c1, make_manifest(c1, 1), lambda p: None)  # neither committed nor undone
    u2 = {"payload/other": b"other\n"}
    c2 = setup.bundle("u2.tar", recipe(files=[{"source": "payload/other", "target": "etc/o"}]), u2)
    m2 = make_manifest(c2, 2)
    await inst.install(c2, m2, lambda p: None)
    await inst.commit(m2)
    assert tree(setup.root) == expected(setup.old, {"etc/o": (b"other\n", 0o644)})


# -- package steps ---------------------------------------------------------------------------


def hand_built_wheel(
    out: Path, name: str, files: Mapping[str, bytes], requires: Sequence[str]
) -> Path:
    """A wheel is a zip: the package, METADATA, WHEEL and a RECORD of hashes."""
    info = f"{name}-1.0.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    content = {
        **files,
        f"{info}/METADATA": meta.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fota-test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in content.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    content[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in content.items():
            z.writestr(path, data)
    return wheel


def build_wheel(tmp: Path, name: str, code: str, requires: Sequence[str]) -> Path:
    """Build with pip when the venv can (setuptools with wheel support), else by hand."""
    out = tmp / "wheels"
    out.mkdir(exist_ok=True)
    files = {f"{name}/__init__.py": code.encode()}
    try:
        major, minor = (int(x) for x in metadata.version("setuptools").split(".")[:2])
        can = (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None
    except metadata.PackageNotFoundError:
        can = False
    if can:
        src = tmp / f"src-{name}"
        (src / name).mkdir(parents=True)
        (src / name / "__init__.py").write_text(code)
        deps = ", ".join(json.dumps(r) for r in requires)
        (src / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "1.0"\ndependencies = [{deps}]\n'
            f'[tool.setuptools]\npackages = ["{name}"]\n'
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "-q", "-w", str(out), str(src)],
            check=True,
        )  # fmt: skip
        return out / f"{name}-1.0-py3-none-any.whl"
    return hand_built_wheel(out, name, files, requires)


def test_pip_step_for_real_offline(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing can reach the network
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    demo = build_wheel(tmp_path, "fotademo", "from fotadep import VALUE as DEP\n", ["fotadep"])
    dep = build_wheel(tmp_path, "fotadep", "VALUE = 'from the bundle'\n", [])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    inst = setup.installer(pip=[pip], allowed_managers=["pip"], timeout=120)
    payload: dict[str, bytes | tuple[bytes, int]] = {
        **U1_PAYLOAD,
        f"wheels/{demo.name}": demo.read_bytes(),  # named by its path in the bundle
        dep.name: dep.read_bytes(),  # at the top: found through --find-links, by name
    }
    rec = recipe(files=U1_FILES, packages=[{"manager": "pip", "names": [f"wheels/{demo.name}"]}])
    candidate = setup.bundle("u1.tar", rec, payload)
    m = make_manifest(candidate, 1)
    asyncio.run(inst.install(candidate, m, lambda p: None))
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import fotademo; print(fotademo.DEP)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "from the bundle"
    asyncio.run(inst.commit(m))
    assert tree(setup.root) == expected(setup.old, U1_RESULT)


FAKE = """#!/bin/sh
{{
  echo "argv0=$(basename "$0")"
  for a in "$@"; do echo "arg=$a"; done
  echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND"
  echo "CI=$CI"
  if read -r line; then echo "stdin=data"; else echo "stdin=eof"; fi
  echo "cwd=$(pwd)"
}} >> {log}
exit {code}
"""


def fake_tool(bindir: Path, name: str, log: Path, code: int = 0) -> Path:
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text(FAKE.format(log=log, code=code))
    path.chmod(0o755)
    return path


async def test_apt_and_npm_steps_run_noninteractively(setup: Setup) -> None:
    log = setup.tmp / "tools.log"
    apt = fake_tool(setup.tmp / "bin", "apt-get", log)
    npm = fake_tool(setup.tmp / "bin", "npm", log)
    inst = setup.installer(apt=[str(apt)], npm=[str(npm)], allowed_managers=["apt", "npm"])
    payload = {
        **U1_PAYLOAD,
        "debs/curl_8.0_all.deb": b"!<arch>\n",
        "debs/tool_1.0_all.deb": b"!<arch>\n",
        "npm/pkg.tgz": b"tgz",
        "left-pad.tgz": b"tgz",
    }
    rec = recipe(
        files=U1_FILES,
        packages=[
            {"manager": "apt", "names": ["debs/curl_8.0_all.deb", "debs/tool_1.0_all.deb"]},
            {"manager": "npm", "names": ["left-pad.tgz", "./npm/pkg.tgz"]},
        ],
    )
    candidate = setup.bundle("u1.tar", rec, payload)
    m = make_manifest(candidate, 1)
    await inst.install(candidate, m, lambda p: None)
    bundle = setup.state / "archive" / "bundle"
    root = os.path.realpath(setup.root)
    assert log.read_text().splitlines() == [
        "argv0=apt-get",
        *(f"arg={a}" for a in ["install", "-y", "-q", "--no-install-recommends", "--no-download"]),
        f"arg={bundle}/debs/curl_8.0_all.deb",
        f"arg={bundle}/debs/tool_1.0_all.deb",
        "DEBIAN_FRONTEND=noninteractive",
        "CI=1",
        "stdin=eof",
        f"cwd={root}",
        "argv0=npm",
        *(f"arg={a}" for a in ["install", "--no-audit", "--no-fund", "--yes"]),
        *(f"arg={a}" for a in ["--ignore-scripts", "--offline"]),
        f"arg={bundle}/left-pad.tgz",
        f"arg={bundle}/npm/pkg.tgz",
        "DEBIAN_FRONTEND=noninteractive",
        "CI=1",
        "stdin=eof",
        f"cwd={root}",
    ]
    await inst.commit(m)
    assert tree(setup.root) == expected(setup.old, U1_RESULT)


async def test_failing_package_step_restores(setup: Setup) -> None:
    log = setup.tmp / "tools.log"
    apt = fake_tool(setup.tmp / "bin", "apt-get", log, code=100)
    inst = setup.installer(apt=[str(apt)], allowed_managers=["apt"])
    rec = recipe(files=U1_FILES, packages=[{"manager": "apt", "names": ["curl.deb"]}])
    candidate = setup.bundle("u1.tar", rec, {**U1_PAYLOAD, "curl.deb": b"!<arch>\n"})
    with pytest.raises(InstallError, match="apt step failed: exit status 100"):
        await inst.install(candidate, make_manifest(candidate, 1), lambda p: None)
    setup.unchanged()


# -- configuration -------------------------------------------------------------------------------


def test_build_reads_the_table(tmp_path: Path) -> None:
    table = {
        "kind": "archive",
        "root": str(tmp_path),
        "allowed_commands": [["systemctl", "restart", "app"], ["/usr/bin/true"]],
        "allowed_managers": ["pip"],
        "pip": ["/usr/bin/pip3"],
        "timeout": 12,
    }
    inst = build("installers.app", table, Context(tmp_path / "state", 30.0))
    assert isinstance(inst, ArchiveInstaller)
    assert inst.managers == {"pip": ["/usr/bin/pip3"], "apt": ["apt-get"], "npm": ["npm"]}
    assert inst.timeout == 12.0 and inst.where == "installers.app"
    assert inst.allowed == {("systemctl", "restart", "app"), ("/usr/bin/true",)}
    assert inst.allowed_managers == {"pip"}
    default = build("x", {"kind": "archive", "root": str(tmp_path)}, Context(tmp_path, 7.0))
    assert isinstance(default, ArchiveInstaller) and default.timeout == 7.0
    with pytest.raises(ConfigError, match=r"installers\.app: unknown key 'colour'"):
        build("installers.app", {**table, "colour": 1}, Context(tmp_path, 30.0))
    with pytest.raises(ConfigError, match=r"installers\.app\.root: expected an absolute path"):
        build("installers.app", {**table, "root": "rel"}, Context(tmp_path, 30.0))
    with pytest.raises(ConfigError, match=r"installers\.app\.apt: expected a non-empty list"):
        build("installers.app", {**table, "apt": "apt-get -y"}, Context(tmp_path, 30.0))


# -- crash points ----------------------------------------------------------------------------------

CHILD = r"""
import asyncio, json, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ed25519
from fota.core import manifest as mf
from fota.install.archive import ArchiveInstaller

cfg = json.loads(sys.argv[1])
key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
trust = mf.TrustStore({bytes.fromhex(cfg["kid"]): key.public_key()})
manifest = mf.verify(Path(cfg["manifest"]).read_bytes(), trust)
installer = ArchiveInstaller(
    Path(cfg["root"]), Path(cfg["state"]), allowed_commands=cfg["allowed"], apt=cfg["apt"],
    allowed_managers=["apt"], use_exchange=cfg["exchange"],
)

async def main():
    for action in cfg["actions"]:
        if action == "install":
            await installer.install(Path(cfg["candidate"]), manifest, lambda p: None)
        elif action == "commit":
            await installer.commit(manifest)
        else:
            await installer.rollback(manifest)

asyncio.run(main())
"""


@dataclass
class CrashRig:
    setup: Setup
    candidate: Path
    manifest: Manifest
    hooklog: Path
    apt: Path
    exchange: bool

    def installer(self) -> ArchiveInstaller:
        return ArchiveInstaller(
            self.setup.root,
            self.setup.state,
            allowed_commands=[["sh", "-c"]],
            allowed_managers=["apt"],
            apt=[str(self.apt)],
            use_exchange=self.exchange,
        )

    def child(self, actions: list[str], crash_at: str) -> int:
        manifest_file = self.setup.tmp / "manifest.cose"
        manifest_file.write_bytes(self.manifest.raw)
        cfg = {
            "kid": KID.hex(),
            "manifest": str(manifest_file),
            "root": str(self.setup.root),
            "state": str(self.setup.state),
            "candidate": str(self.candidate),
            "allowed": [["sh", "-c"]],
            "apt": [str(self.apt)],
            "exchange": self.exchange,
            "actions": actions,
        }
        env = {**os.environ, crashpoints.ENV: crash_at}
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, cwd=REPO, timeout=120
        )
        return done.returncode

    def hook_runs(self, step: str) -> int:
        return marker_lines(self.hooklog).count(step)

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)


def crash_rig(tmp_path: Path, exchange: bool = True) -> CrashRig:
    root, state = tmp_path / "root", tmp_path / "state"
    state.mkdir()
    setup = Setup(tmp_path, root, state, make_layout(root))
    hooklog = tmp_path / "hooks.log"
    apt = fake_tool(tmp_path / "bin", "apt-get", tmp_path / "apt.log")
    rec = recipe(
        files=U1_FILES,
        before=["sh", "-c", f"echo before >> {hooklog}"],
        after=["sh", "-c", f"echo after >> {hooklog}"],
        rollback=["sh", "-c", f"echo rollback >> {hooklog}"],
        packages=[{"manager": "apt", "names": ["curl.deb"]}],
    )
    candidate = setup.bundle("u1.tar", rec, {**U1_PAYLOAD, "curl.deb": b"!<arch>\n"})
    return CrashRig(setup, candidate, make_manifest(candidate, 1), hooklog, apt, exchange)


INSTALL_POINTS = [
    "archive:staged",
    "archive:before_done",
    "archive:swapped_one",
    "archive:swapped",
    "archive:packages_done",
    "archive:after_done",
]
ROLLBACK_POINTS = ["archive:restored_one", "archive:rolled_back"]


def test_every_archive_crash_point_is_covered() -> None:
    declared = {p for p in crashpoints.POINTS if p.startswith("archive:")}
    assert declared == {*INSTALL_POINTS, *ROLLBACK_POINTS, "archive:committed"}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "three-renames"])
@pytest.mark.parametrize("point", INSTALL_POINTS)
@pytest.mark.parametrize("then", ["install-commit", "rollback"])
def test_crash_during_install(tmp_path: Path, point: str, then: str, exchange: bool) -> None:
    rig = crash_rig(tmp_path, exchange)
    assert rig.child(["install"], point) == -signal.SIGKILL
    assert rig.setup.txn.exists()
    inst = rig.installer()
    new = expected(rig.setup.old, U1_RESULT)
    if then == "install-commit":
        rig.run(inst.install(rig.candidate, rig.manifest, lambda p: None))
        assert tree(rig.setup.root, hide_sides=True) == new
        rig.run(inst.commit(rig.manifest))
        assert tree(rig.setup.root) == new
        assert rig.hook_runs("after") >= 1
        assert rig.hook_runs("rollback") == 0
    else:
        assert rig.run(inst.rollback(rig.manifest)) == inst_done()
        assert tree(rig.setup.root) == rig.setup.old
        # The recipe's rollback runs once hooks have started (from the before hook on).
        assert rig.hook_runs("rollback") == (0 if point == "archive:staged" else 1)
    assert not rig.setup.txn.exists()
    assert not (rig.setup.state / "archive" / "bundle").exists()
    if point == "archive:after_done":
        assert rig.hook_runs("after") == 1  # finished: the re-run did not run it again


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "three-renames"])
def test_crash_during_commit(tmp_path: Path, exchange: bool) -> None:
    rig = crash_rig(tmp_path, exchange)
    assert rig.child(["install", "commit"], "archive:committed") == -signal.SIGKILL
    new = expected(rig.setup.old, U1_RESULT)
    assert tree(rig.setup.root, hide_sides=True) == new
    inst = rig.installer()
    rig.run(inst.commit(rig.manifest))
    assert tree(rig.setup.root) == new
    assert not rig.setup.txn.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "three-renames"])
@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_crash_during_rollback(tmp_path: Path, point: str, exchange: bool) -> None:
    rig = crash_rig(tmp_path, exchange)
    assert rig.child(["install", "rollback"], point) == -signal.SIGKILL
    inst = rig.installer()
    assert rig.run(inst.rollback(rig.manifest)) == inst_done()
    assert tree(rig.setup.root) == rig.setup.old
    assert not rig.setup.txn.exists()
    # Crashed after the recipe's rollback ran: it runs again (documented: at least once).
    assert rig.hook_runs("rollback") == (2 if point == "archive:rolled_back" else 1)
    assert rig.run(inst.rollback(rig.manifest)) == inst_done()  # and again: a no-op
    assert rig.hook_runs("rollback") == (2 if point == "archive:rolled_back" else 1)


def test_crash_in_the_failure_path_finishes_the_undo(tmp_path: Path) -> None:
    """A failed install cut short while it puts things back: the re-run finishes and raises."""
    rig = crash_rig(tmp_path)
    apt = fake_tool(tmp_path / "bin", "apt-get", tmp_path / "apt.log", code=1)
    assert apt == rig.apt  # the package step now fails
    assert rig.child(["install"], "archive:restored_one") == -signal.SIGKILL
    with pytest.raises(InstallError, match="apt step failed: exit status 1"):
        rig.run(rig.installer().install(rig.candidate, rig.manifest, lambda p: None))
    assert tree(rig.setup.root) == rig.setup.old
    assert not rig.setup.txn.exists()
    assert rig.run(rig.installer().rollback(rig.manifest)) == inst_done()


# The three-rename fallback cut between its renames (no crash point there: the states are made
# by hand, from the paths the transaction file records).


@pytest.mark.parametrize(
    ("renames", "then"),
    [(1, "install"), (2, "install"), (1, "rollback"), (2, "rollback")],
)
def test_fallback_exchange_cut_between_renames(tmp_path: Path, renames: int, then: str) -> None:
    rig = crash_rig(tmp_path, exchange=False)
    assert rig.child(["install"], "archive:before_done") == -signal.SIGKILL
    txn = json.loads(rig.setup.txn.read_text())
    unit = next(u for u in txn["units"] if not u["absent"])
    os.rename(unit["path"], unit["tmp"])  # the first rename: the directory is missing
    if renames == 2:
        os.rename(unit["side"], unit["path"])  # the second: the side path is missing
    inst = rig.installer()
    if then == "install":
        rig.run(inst.install(rig.candidate, rig.manifest, lambda p: None))
        rig.run(inst.commit(rig.manifest))
        assert tree(rig.setup.root) == expected(rig.setup.old, U1_RESULT)
    else:
        rig.run(inst.rollback(rig.manifest))
        assert tree(rig.setup.root) == rig.setup.old
    assert not rig.setup.txn.exists()


@pytest.mark.parametrize("renames", [1, 2])
def test_fallback_swap_back_cut_between_renames(tmp_path: Path, renames: int) -> None:
    rig = crash_rig(tmp_path, exchange=False)
    inst = rig.installer()
    rig.run(inst.install(rig.candidate, rig.manifest, lambda p: None))
    txn = json.loads(rig.setup.txn.read_text())
    unit = next(u for u in txn["units"] if not u["absent"])
    os.rename(unit["path"], unit["tmp"])  # rollback's first rename (the new tree aside)
    if renames == 2:
        os.rename(unit["side"], unit["path"])  # its second (the old tree back)
    rig.run(inst.rollback(rig.manifest))
    assert tree(rig.setup.root) == rig.setup.old
    assert not rig.setup.txn.exists()
