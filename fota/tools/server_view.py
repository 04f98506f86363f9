"""``fota server`` for manual testing: a directory of images, and the devices seen, live.

``fota server --images DIR`` publishes every image file of a directory:
:class:`ImageDirectory` reads the files and the optional ``DIR/fota-images.toml``,
:class:`Publisher` signs a manifest for each (sequence numbers in version order) and announces
the newest to every device, and with ``--watch`` publishes new and changed files while the
server runs. :func:`make_view` chooses how the devices the server sees are shown: a live
`rich` table on a terminal, else one plain line or one JSON object per change. docs/cli.md
("``fota server`` (for manual testing)") is the user's description: the naming convention,
the TOML keys and their limits, the output.
"""

from __future__ import annotations

import asyncio
import difflib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as daytime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TextIO

from fota.app.cli_control import have_rich, iso, relative

# The daemon's TOML reader: its parser puts the line first in a syntax error, and its locator
# knows the line each key is written on, so these messages read like the daemon's.
from fota.app.settings import TomlSource, show_toml
from fota.core.manifest import (
    FRAGMENT_UNIT,
    MAX_FRAGMENT_SIZE,
    MAX_FRAGMENTS,
    MAX_TEXT,
    Component,
    Severity,
)
from fota.core.states import State
from fota.errors import ConfigError, ResultCode
from fota.testing.server import ALL_DEVICES, DEFAULT_FRAGMENT

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from fota.testing.server import DeviceSeen, Published, UpdateServer

IMAGES_TOML = "fota-images.toml"
"""The optional file of per-image options in an images directory."""

SKIPPED_ENDINGS = ("~", ".tmp", ".part", ".swp")
"""Names that are not images: a file still being written, an editor's backup."""

MAX_DEFERRAL = 2**32 - 1
"""Largest ``max_deferral`` accepted, seconds (136 years: no limit in practice)."""

MAX_DEADLINE = 2**40 - 1
"""Largest ``deadline`` a device accepts, epoch seconds (``docs/protocol.md``)."""

_NAME = re.compile(r"(?P<name>.+?)-(?P<version>v?\d.*?)(?P<ext>(?:\.[A-Za-z][A-Za-z0-9]*)*)")
"""``NAME-VERSION.EXT``: the version starts at the first ``-`` followed by a digit (or ``v``
and a digit) and ends where the extension starts (the first ``.`` followed by a letter, so
``.tar.gz`` is one extension)."""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

IMAGE_KEYS = (
    "version",
    "device_class",
    "polite",
    "severity",
    "component",
    "devices",
    "max_deferral",
    "deadline",
    "fragment_size",
)
"""The keys of an ``[images."NAME"]`` table."""

DEFAULT_KEYS = tuple(k for k in IMAGE_KEYS if k != "version")
"""The keys of the ``[defaults]`` table (one version for every file would make no sense)."""

VersionKey = tuple[tuple[int, int | str], ...]


# -- the directory ------------------------------------------------------------------------


def version_from_name(name: str) -> str | None:
    """The version in a file name ``NAME-VERSION.EXT``, or None when it has none.

    ``gw-2.1.0.bin`` -> ``2.1.0``, ``gw-2.1.0-rc1.bin`` -> ``2.1.0-rc1``,
    ``acme-gw-3.0.tar.gz`` -> ``3.0``, ``firmware.bin`` -> None.
    """
    match = _NAME.fullmatch(name)
    return match.group("version") if match else None


def version_key(version: str) -> VersionKey:
    """A sort key that orders versions as people do.

    Numbers compare as numbers (``2.10`` is newer than ``2.9``), separators do not count, a
    leading ``v`` is ignored, and a part with letters marks a pre-release: ``2.1.0-rc1`` is
    older than ``2.1.0``, ``2.1.0-rc2`` newer than ``2.1.0-rc1``.
    """
    text = version[1:] if re.match(r"v\d", version) else version
    parts: list[tuple[int, int | str]] = [
        (2, int(p)) if p.isdecimal() else (0, p.lower()) for p in re.findall(r"\d+|[^\W\d_]+", text)
    ]
    # The end sorts after letters and before numbers: 2.1.0-rc1 < 2.1.0 < 2.1.0.1.
    parts.append((1, ""))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """One image file and the manifest options it is published with.

    Attributes:
        path: the file.
        version: from ``version`` in ``fota-images.toml``, else from the file name.
        device_class: the device class the manifest names.
        polite: whether updates after this image ask the device first.
        severity: the manifest's severity.
        component: what the image replaces.
        devices: the device ids it is announced to; None: every device when it is the
            newest image without ``devices``, else none.
        max_deferral: the longest cumulative deferral allowed, seconds (0: the device's bound).
        deadline: UTC epoch seconds after which the update proceeds without asking.
        fragment_size: bytes per signed fragment.
    """

    path: Path
    version: str
    device_class: str
    polite: bool = True
    severity: Severity = Severity.OPTIONAL
    component: Component = Component.FIRMWARE
    devices: tuple[str, ...] | None = None
    max_deferral: int = 0
    deadline: int | None = None
    fragment_size: int = DEFAULT_FRAGMENT

    @property
    def order(self) -> VersionKey:
        """The version's sort key (:func:`version_key`)."""
        return version_key(self.version)

    def manifest_options(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`fota.testing.UpdateServer.make_manifest`."""
        return {
            "device_class": self.device_class,
            "polite": self.polite,
            "severity": self.severity,
            "component": self.component,
            "max_deferral": self.max_deferral,
            "deadline": self.deadline,
            "fragment_size": self.fragment_size,
        }


Stamp = tuple[int, int, int, int]
"""A file's size, mtime (ns), inode and device: when one changes, the file changed."""


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _dotted(key: Sequence[str | int]) -> str:
    """A key as TOML writes it: ``images."gw-2.1.0.bin".devices[1]``."""
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        out += f".{name}" if out else name
    return out


class _Options:
    """``fota-images.toml``, checked: the ``[defaults]`` and the ``[images."NAME"]`` tables."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.defaults: dict[str, Any] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self._source: TomlSource | None = None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # the file is optional
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason})") from exc
        self._source = TomlSource(text, path, resolve_paths=False)
        table = self._source.parse()
        for name, value in table.items():
            if name not in ("defaults", "images"):
                raise self._unknown((), name, ("defaults", "images"))
            if not isinstance(value, dict):
                raise self._bad((name,), "a table", value)
        self.defaults = self._table(("defaults",), table.get("defaults", {}), DEFAULT_KEYS)
        for name, entry in table.get("images", {}).items():
            if not isinstance(entry, dict):
                raise self._bad(("images", name), "a table", entry)
            self.images[name] = self._table(("images", name), entry, IMAGE_KEYS)

    def error(self, key: Sequence[str | int], message: str) -> ConfigError:
        """``file:line: dotted.key: message``."""
        line = self._source.line(tuple(key)) if key and self._source is not None else None
        where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        return ConfigError(f"{where}{_dotted(key)}: {message}")

    def _bad(self, key: Sequence[str | int], expected: str, value: Any) -> ConfigError:
        return self.error(key, f"expected {expected}, got {show_toml(value)}")

    def _unknown(self, where: Sequence[str], key: str, known: Sequence[str]) -> ConfigError:
        # A typo must not be silently ignored: name the key, the closest one and the rest.
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {show_toml(close[0])}?" if close else ""
        scope = f" in {_dotted(where)}" if where else ""
        return self.error((*where, key), f"unknown key{scope}{hint} (known: {', '.join(known)})")

    def _table(
        self, where: tuple[str, ...], table: dict[str, Any], allowed: Sequence[str]
    ) -> dict[str, Any]:
        out = {}
        for key, value in table.items():
            if key not in allowed:
                raise self._unknown(where, key, allowed)
            out[key] = self._value((*where, key), key, value)
        return out

    def _value(self, key: tuple[str, ...], name: str, value: Any) -> Any:
        if name in ("version", "device_class"):
            problem = text_problem(value)
            if problem:
                raise self._bad(key, problem, value)
            return value
        if name == "polite":
            if not isinstance(value, bool):
                raise self._bad(key, "true or false", value)
            return value
        if name in ("severity", "component"):
            enum: type[Severity] | type[Component] = Severity if name == "severity" else Component
            names = [e.name.lower() for e in enum]
            if not isinstance(value, str) or value not in names:
                raise self._bad(key, "one of " + ", ".join(show_toml(n) for n in names), value)
            return enum[value.upper()]
        if name == "devices":
            if not isinstance(value, list):
                raise self._bad(key, "a list of device ids", value)
            for i, device in enumerate(value):
                if not isinstance(device, str) or not 1 <= len(device) <= 64 or "/" in device:
                    raise self._bad(
                        (*key, i), "a device id of 1..64 characters without '/'", device
                    )
            return tuple(value)
        if name == "max_deferral":
            if not _whole(value) or not 0 <= value <= MAX_DEFERRAL:
                raise self._bad(key, f"whole seconds in 0..{MAX_DEFERRAL}", value)
            return value
        if name == "deadline":
            return self._deadline(key, value)
        # fragment_size
        if not _whole(value) or value <= 0 or value % FRAGMENT_UNIT or value > MAX_FRAGMENT_SIZE:
            raise self._bad(
                key, f"a multiple of {FRAGMENT_UNIT} bytes up to {MAX_FRAGMENT_SIZE}", value
            )
        return value

    def _deadline(self, key: tuple[str, ...], value: Any) -> int:
        expected = f"an offset date-time (2027-01-31T02:00:00Z) or epoch seconds 0..{MAX_DEADLINE}"
        if isinstance(value, datetime):
            if value.tzinfo is None:
                # A local date-time would be this machine's zone, not the device's: refuse it.
                raise self.error(key, f"expected {expected}, got {value.isoformat()} (no zone)")
            instant = int(value.timestamp())
        elif _whole(value):
            instant = value
        elif isinstance(value, date | daytime):
            raise self.error(key, f"expected {expected}, got {value.isoformat()}")
        else:
            raise self._bad(key, expected, value)
        if not 0 <= instant <= MAX_DEADLINE:
            raise self.error(key, f"expected {expected}, got {instant}")
        return instant


def _whole(value: Any) -> bool:
    # bool is an int in Python; true where a number belongs is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def text_problem(value: Any) -> str | None:
    """What is wrong with a manifest text (version, device class), or None.

    The limits a device checks (``docs/protocol.md``): 1..64 bytes of UTF-8, no control
    characters.
    """
    if not isinstance(value, str) or not 1 <= len(value.encode()) <= MAX_TEXT:
        return f"text of 1..{MAX_TEXT} bytes"
    if not value.isprintable():
        return f"text of 1..{MAX_TEXT} bytes without control characters"
    return None


class ImageDirectory:
    """The images of one directory, with the options of its ``fota-images.toml``.

    Every regular file is an image except ``fota-images.toml``, hidden files (``.name``) and
    names ending in ``~``, ``.tmp``, ``.part`` or ``.swp``: write a file under such a name and
    rename it into place, and no half-written image is ever published.

    Args:
        path: the directory.
        device_class: the device class of images that ``fota-images.toml`` gives none.
        polite: the politeness of images that it gives none.
        watching: an ``[images."NAME"]`` table for a file not (yet) in the directory is an
            error unless watching (then it applies when the file arrives).
    """

    def __init__(
        self, path: Path, *, device_class: str, polite: bool = True, watching: bool = False
    ) -> None:
        self.path = Path(path)
        self.device_class = device_class
        self.polite = polite
        self.watching = watching

    @property
    def options_file(self) -> Path:
        """``DIR/fota-images.toml``."""
        return self.path / IMAGES_TOML

    def scan(self) -> list[tuple[ImageSpec, Stamp]]:
        """Every image, oldest version first, with the stamp of its file.

        Raises:
            ConfigError: the directory cannot be read, ``fota-images.toml`` is bad, a file has
                no version, two files have the same version, or an image needs more fragments
                than a manifest holds; the message names the file (and the key).
        """
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the directory: {exc.strerror}") from exc
        options = _Options(self.options_file)
        found: list[tuple[ImageSpec, Stamp]] = []
        names = set()
        for entry in entries:
            if not self._is_image(entry):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # removed since the listing: it is not there
            names.add(entry.name)
            found.append((self._spec(Path(entry.path), st.st_size, options), _stamp(st)))
        if not self.watching:
            for name in options.images:
                if name not in names:
                    raise options.error(("images", name), f"no image file {name!r} in {self.path}")
        found.sort(key=lambda item: item[0].order)
        for (a, _), (b, _) in itertools.pairwise(found):
            if a.order == b.order:
                raise ConfigError(
                    f"{a.path} and {b.path}: the same version ({a.version}, {b.version}): "
                    f"the images must be in a clear order (set a version in {IMAGES_TOML})"
                )
        return found

    @staticmethod
    def _is_image(entry: os.DirEntry[str]) -> bool:
        name = entry.name
        if name == IMAGES_TOML or name.startswith(".") or name.endswith(SKIPPED_ENDINGS):
            return False
        try:
            return entry.is_file()
        except OSError:
            return False

    def _spec(self, path: Path, size: int, options: _Options) -> ImageSpec:
        given = {**options.defaults, **options.images.get(path.name, {})}
        version = given.pop("version", None)
        if version is None:
            version = version_from_name(path.name)
            if version is None:
                raise ConfigError(
                    f"{path}: no version: name the file NAME-VERSION.EXT (like gw-2.1.0.bin) "
                    f"or set {_dotted(('images', path.name, 'version'))} in {options.path}"
                )
            problem = text_problem(version)
            if problem:
                raise ConfigError(
                    f"{path}: the version in the name, {version!r}, is not {problem}: set "
                    f"{_dotted(('images', path.name, 'version'))} in {options.path}"
                )
        given.setdefault("device_class", self.device_class)
        given.setdefault("polite", self.polite)
        spec = ImageSpec(path=path, version=version, **given)
        fragments = max(1, math.ceil(size / spec.fragment_size))
        if fragments > MAX_FRAGMENTS:
            raise ConfigError(
                f"{path}: {size} bytes are {fragments} fragments of {spec.fragment_size} "
                f"bytes, more than a manifest holds ({MAX_FRAGMENTS}): set a larger "
                f"{_dotted(('images', path.name, 'fragment_size'))} in {options.path} "
                f"(up to {MAX_FRAGMENT_SIZE})"
            )
        return spec


# -- publishing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Served:
    """A manifest the server made for one image.

    Attributes:
        path: the image file as given.
        version: the manifest's version.
        update_id: the manifest's update id.
        sequence: its sequence number.
        size: the image's size in bytes.
        image_sha256: the image's digest.
        announced: the device ids it was announced to (``*``: every device; empty: none,
            the manifest is only stored).
    """

    path: Path
    version: str
    update_id: str
    sequence: int
    size: int
    image_sha256: bytes
    announced: tuple[str, ...]

    @classmethod
    def of(
        cls, published: Published, path: Path, version: str, announced: tuple[str, ...]
    ) -> Served:
        """The record of what :meth:`fota.testing.UpdateServer.make_manifest` made."""
        return cls(
            path,
            version,
            published.update_id,
            published.sequence,
            published.image_path.stat().st_size,
            published.image_sha256,
            announced,
        )

    def line(self) -> dict[str, Any]:
        """The JSON line ``fota server --images`` prints for it."""
        return {
            "published": str(self.path),
            "update_id": self.update_id,
            "version": self.version,
            "sequence": self.sequence,
            "size": self.size,
            "sha256": self.image_sha256.hex(),
            "announced": list(self.announced),
        }


class Publisher:
    """Signs and announces the images of an :class:`ImageDirectory` on an update server.

    Each image gets a manifest; sequence numbers follow version order at start-up, and every
    later manifest gets the next number. An image with ``devices`` is announced to those
    devices; the newest image without ``devices`` to every device; the others are only
    stored (their manifests can be fetched, nobody is told).

    Args:
        server: the update server (started or not).
        directory: the images.
    """

    def __init__(self, server: UpdateServer, directory: ImageDirectory) -> None:
        self.server = server
        self.directory = directory
        self._done: dict[Path, tuple[Stamp, ImageSpec]] = {}
        self._last_poll: dict[Path, Stamp] = {}
        self._newest: VersionKey | None = None
        """The version of the image last announced to every device."""
        self._problem: str | None = None

    def publish_all(self, found: Sequence[tuple[ImageSpec, Stamp]]) -> list[Served]:
        """Publish what :meth:`ImageDirectory.scan` found, oldest version first."""
        to_all = [spec for spec, _ in found if spec.devices is None]
        newest = to_all[-1] if to_all else None
        out = []
        for spec, stamp in found:
            published = self.server.make_manifest(
                spec.path, spec.version, **spec.manifest_options()
            )
            out.append(self._announce(spec, stamp, published, spec is newest))
        self._last_poll = {spec.path: stamp for spec, stamp in found}
        return out

    async def poll(self) -> tuple[list[Served], str | None]:
        """Publish the files that are new or changed since the last look (``--watch``).

        A file is published once it looked the same twice in a row (size, mtime, inode), so
        a file copied in slowly is not signed half-written; a changed ``fota-images.toml``
        republishes the images whose options it changed. An image without ``devices`` is
        announced to every device when its version is the newest so far.

        Returns:
            What was published, and a problem to report (a bad ``fota-images.toml``, a file
            without a version): None when there is none, or it was reported already. Nothing
            is published while the directory has a problem.
        """
        try:
            found = self.directory.scan()
        except ConfigError as exc:
            return [], self._report(str(exc))
        self._problem = None
        ready = [
            (spec, stamp)
            for spec, stamp in found
            if self._last_poll.get(spec.path) == stamp
            and self._done.get(spec.path) != (stamp, spec)
        ]
        self._last_poll = {spec.path: stamp for spec, stamp in found}
        out: list[Served] = []
        for spec, stamp in ready:
            to_all = spec.devices is None and (self._newest is None or spec.order >= self._newest)
            try:
                # Hashing and signing a large image takes a while: not on the loop that serves
                # the downloads being shown.
                published = await asyncio.to_thread(
                    self.server.make_manifest, spec.path, spec.version, **spec.manifest_options()
                )
            except OSError as exc:
                return out, self._report(f"{spec.path}: cannot read: {exc.strerror or exc}")
            out.append(self._announce(spec, stamp, published, to_all))
        return out, None

    def _report(self, problem: str) -> str | None:
        # Once per problem: a bad file looked at every second must not flood the terminal.
        if problem == self._problem:
            return None
        self._problem = problem
        return problem

    def _announce(
        self, spec: ImageSpec, stamp: Stamp, published: Published, to_all: bool
    ) -> Served:
        devices = (ALL_DEVICES,) if to_all else (spec.devices or ())
        # With no devices this only stores the manifest, so that it can be fetched.
        self.server.announce_raw(published.raw, published.sequence, devices)
        if devices:
            self.server.published.append(published)
        if to_all:
            self._newest = spec.order
        self._done[spec.path] = (stamp, spec)
        return Served.of(published, spec.path, spec.version, devices)


# -- what a device's record says ----------------------------------------------------------


def _name(enum: type[State] | type[ResultCode], code: int | None) -> str | None:
    if code is None:
        return None
    try:
        return enum(code).name
    except ValueError:
        return str(code)  # a code this version does not know: shown, not dropped


def progress(seen: DeviceSeen, images: Mapping[str, Served]) -> int | None:
    """Percent of its update's image the device reported verified (None: unknown)."""
    image = images.get(seen.update_id or "")
    if image is None or seen.verified is None:
        return None
    if image.size == 0:
        return 100
    # Floor: 100 % only when every byte is verified.
    return min(100, 100 * seen.verified // image.size)


def device_record(seen: DeviceSeen, images: Mapping[str, Served]) -> dict[str, Any]:
    """A device's record as the JSON object ``fota server --json`` prints on each change.

    Args:
        seen: the server's record of the device.
        images: what was published, by update id (for the version and the image size).
    """
    image = images.get(seen.update_id or "")
    return {
        "device": seen.device,
        "address": seen.address,
        "observing": seen.observing > 0,
        "observations": seen.observing,
        "state": _name(State, seen.state),
        "result": _name(ResultCode, seen.result),
        "update_id": seen.update_id,
        "version": image.version if image else None,
        "verified": seen.verified,
        "size": image.size if image else None,
        "progress": progress(seen, images),
        "reports": seen.reports,
        "detail": seen.detail,
        "first_seen": seen.first_seen,
        "last_seen": seen.last_seen,
    }


def plain_line(seen: DeviceSeen, images: Mapping[str, Served], now: float) -> str:
    """A device's record as the line ``fota server --plain`` prints on each change.

    ``2027-01-15T08:00:00Z device=gw-1 address=127.0.0.1:40000 observing=yes
    state=DOWNLOADING result=INITIAL update=1a2b3c4d5e6f7a8b version=2.1.0 progress=27%``
    (one line), then ``detail="..."`` when the last report had one.

    Args:
        seen: the server's record of the device.
        images: what was published, by update id.
        now: the time of the change (``time.time()``).
    """
    r = device_record(seen, images)
    fields = [
        iso(now),
        f"device={r['device']}",
        f"address={r['address']}",
        f"observing={'yes' if r['observing'] else 'no'}",
        f"state={r['state'] or '-'}",
        f"result={r['result'] or '-'}",
        f"update={r['update_id'] or '-'}",
        f"version={r['version'] or '-'}",
        f"progress={'-' if r['progress'] is None else str(r['progress']) + '%'}",
    ]
    if r["detail"]:
        fields.append(f"detail={json.dumps(r['detail'], ensure_ascii=False)}")
    return " ".join(fields)


def device_table(
    devices: Mapping[str, DeviceSeen],
    images: Mapping[str, Served],
    now: float,
    title: str = "fota server",
) -> Table:
    """The live view's table: one row per device, sorted by device id.

    Args:
        devices: the server's records (``UpdateServer.devices``).
        images: what was published, by update id.
        now: the time the "last seen" ages are counted to.
        title: the table's title.
    """
    from rich import box
    from rich.table import Table

    count = f"{len(devices)} device" + ("" if len(devices) == 1 else "s")
    table = Table(title=f"{title}: {count}", box=box.ROUNDED, caption=_caption(images))
    columns = ("Device", "Address", "Observing", "State", "Result", "Update", "Progress", "Seen")
    for column in columns:
        # On a narrow terminal a long cell folds onto a second line: an id or an address cut
        # short with an ellipsis would be useless.
        justify: Literal["left", "right"] = "right" if column == "Progress" else "left"
        table.add_column(column, justify=justify, overflow="fold")
    for name in sorted(devices):
        seen = devices[name]
        r = device_record(seen, images)
        update = "-"
        if r["update_id"]:
            update = f"{r['update_id']} {r['version']}" if r["version"] else r["update_id"]
        result = r["result"] or "-"
        table.add_row(
            r["device"],
            r["address"],
            "yes" if r["observing"] else "no",
            r["state"] or "-",
            f"[green]{result}[/]" if result == "SUCCESS" else result,
            update,
            "-" if r["progress"] is None else f"{r['progress']}%",
            relative(seen.last_seen, now),
        )
    return table


def _caption(images: Mapping[str, Served]) -> str | None:
    everyone = [image for image in images.values() if ALL_DEVICES in image.announced]
    if not everyone:
        return None
    last = max(everyone, key=lambda image: image.sequence)
    return f"every device is offered {last.version} (update {last.update_id})"


# -- the views ----------------------------------------------------------------------------


class View:
    """Where ``fota server`` writes: JSON lines for what it published, and the devices.

    The base class prints one JSON object per device change (``--json``); :class:`PlainView`
    and :class:`LiveView` show the devices for people. Every view prints the published images
    and the ``{"uri": ...}`` line as JSON lines, so a script reads them the same way in every
    mode.

    Args:
        devices: the server's records (``UpdateServer.devices``), read by the live table.
        out: where lines go (default ``sys.stdout``).
    """

    def __init__(self, devices: Mapping[str, DeviceSeen], out: TextIO | None = None) -> None:
        self.devices = devices
        self.out = out or sys.stdout
        self.images: dict[str, Served] = {}
        """Every manifest made, by update id (for versions and progress)."""

    def __enter__(self) -> View:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def add(self, image: Served) -> None:
        """Know this image (its version and size) when a device reports its update id."""
        self.images[image.update_id] = image

    def line(self, message: dict[str, Any]) -> None:
        """Print one JSON line (a published image, the URI)."""
        self._print(json.dumps(message))

    def changed(self, seen: DeviceSeen) -> None:
        """A device's record changed (the server's ``device_hook``)."""
        self.line(device_record(seen, self.images))

    def problem(self, text: str) -> None:
        """Something to fix, found while running (``--watch``): said on stderr."""
        print(f"fota: {text}", file=sys.stderr, flush=True)

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


class JsonView(View):
    """``--json``: one JSON object per device change; problems also as ``{"error": ...}``."""

    def problem(self, text: str) -> None:
        """Say it on stderr and as a JSON line, so a script reading stdout sees it too."""
        super().problem(text)
        self.line({"error": text})


class PlainView(View):
    """``--plain`` (and stdout not a terminal): one line per device change."""

    def changed(self, seen: DeviceSeen) -> None:
        """Print the device's line (:func:`plain_line`)."""
        self._print(plain_line(seen, self.images, time.time()))


class LiveView(View):
    """A terminal with `rich`: a table of the devices, redrawn on every change and each second.

    The second-by-second redraw keeps the "last seen" ages true (a poll changes the record
    without a change notice).
    """

    def __init__(self, devices: Mapping[str, DeviceSeen], out: TextIO | None = None) -> None:
        super().__init__(devices, out)
        from rich.console import Console

        # No highlighting: ids and versions are shown as given.
        self.console: Console = Console(file=self.out, highlight=False)
        self.title = "fota server"
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        from rich.live import Live

        self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=1)
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()  # the last table stays on the screen
            self._live = None

    def line(self, message: dict[str, Any]) -> None:
        """Print a JSON line above the table; the URI also goes into the table's title."""
        if "uri" in message:
            self.title = f"fota server {message['uri']}"
        super().line(message)

    def changed(self, seen: DeviceSeen) -> None:
        """Redraw now rather than at the next tick."""
        if self._live is not None:
            self._live.refresh()

    def _print(self, text: str) -> None:
        # Through rich: printed above the live table, which is redrawn below it.
        self.console.print(text, markup=False, soft_wrap=True)

    def _render(self) -> Table:
        return device_table(self.devices, self.images, time.time(), self.title)


def choose_mode(*, json_lines: bool, plain: bool, terminal: bool) -> str:
    """``json``, ``plain`` or ``live``: the flags first, else a live table on a terminal.

    The live table also needs `rich` (``fota[cli]``) and ``FOTA_NO_RICH`` unset; without rich
    on a terminal the mode is ``plain`` and stderr says once how to get the table.
    """
    if json_lines:
        return "json"
    if plain or not terminal:
        return "plain"
    if have_rich():
        return "live"
    print(
        "fota: plain lines; `pip install 'fota[cli]'` gives a live table of the devices",
        file=sys.stderr,
    )
    return "plain"


def make_view(mode: str, devices: Mapping[str, DeviceSeen], out: TextIO | None = None) -> View:
    """The view for a mode of :func:`choose_mode`."""
    views: dict[str, type[View]] = {"json": JsonView, "plain": PlainView, "live": LiveView}
    return views[mode](devices, out)
