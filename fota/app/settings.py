"""The daemon's TOML configuration file (``fota daemon --config /etc/fota/fota.toml``).

The top-level keys are :class:`fota.Config`'s settings; the tables ``[control]``,
``[authorization]`` and ``[log]`` are the daemon's own (:class:`ControlSettings`,
:class:`AuthorizationSettings`, :class:`LogSettings`). The whole file is checked before
anything starts, and every problem is a :class:`fota.errors.ConfigError` whose message names
the file, the line, the dotted key, what was expected and what was found::

    /etc/fota/fota.toml:12: block_size: expected an integer, got "big"

The expected types are not listed here a second time: they are read from ``Config``'s type
hints, so a setting added to ``Config`` is a key of the file at once (docs/configuration.md).

``tomllib`` reports no positions for the values it returns, so :class:`_Locator` scans the
text once to map each dotted key (and each array element) to the line it is written on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import grp
import json
import math
import os
import re
import tomllib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from fota.config import Config
from fota.core.manifest import TrustStore
from fota.errors import ConfigError

SECTIONS = ("control", "authorization", "log")
"""The daemon's own tables; every other top-level key is a :class:`fota.Config` setting."""

REQUIRED = ("server", "device_class", "state_dir", "trust")
"""Settings the file must give (``device_id`` defaults to the host name)."""

AUTHORIZATION_MODES = ("control", "command", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
MAX_MESSAGE_RANGE = (256, 16 * 1024 * 1024)
MAX_CLIENTS_RANGE = (1, 4096)
CONTROL_TIMEOUT_RANGE = (0.1, 86400.0)
"""``control.request_timeout`` and ``control.idle_timeout``, seconds."""
GID_RANGE = (0, 2**32 - 2)
"""A gid the socket can be given: ``2**32 - 1`` is ``(gid_t) -1``, which ``chown`` reads as
"leave the group unchanged"."""


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """The ``[control]`` table: the local control socket (docs/control.md).

    Attributes:
        socket: the Unix socket's path.
        mode: its file mode; in TOML an octal string (``"0660"``) or an integer
            (``0o660``), at most ``0o777``.
        group: the gid the socket is given; in TOML a group name (resolved when the file is
            read) or a gid, 0..4294967294. None: the daemon's own group.
        max_clients: most connections at once, 1..4096.
        max_message: longest control message line, bytes, 256..16 MiB.
        request_timeout: seconds a message may take from its first byte to its newline (a
            new connection: from the connect), 0.1..86400; then it is closed.
        idle_timeout: seconds a connection that subscribed to nothing may stay silent
            between messages, 0.1..86400; then it is closed.
        enabled: False: no control socket (then the authorization ``mode`` must not be
            ``control``: nobody could answer).
    """

    socket: Path = Path("/run/fota/control.sock")
    mode: int = 0o660
    group: int | None = None
    max_clients: int = 64
    max_message: int = 65536
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class AuthorizationSettings:
    """The ``[authorization]`` table: who answers the download and install questions.

    Attributes:
        mode: ``control`` (applications answer over the control socket or with the ``fota``
            command), ``command`` (``command`` is run, docs/callbacks.md) or ``auto``
            (every update is authorized at once).
        command: the authorization command's argument list; required with ``command``.
        timeout: seconds one run of ``command`` may take; positive and finite.
        defer: seconds an exit status 21 ("retry later") defers; positive and finite.
        retry: seconds before asking again after ``command`` could not run or timed out;
            positive and finite.
        event_command: optional argument list run when an update completes or is forced.
    """

    mode: str = "control"
    command: tuple[str, ...] = ()
    timeout: float = 30.0
    defer: float = 3600.0
    retry: float = 300.0
    event_command: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LogSettings:
    """The ``[log]`` table.

    Attributes:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        format: ``auto`` (JSON lines unless stderr is a terminal), ``json`` or ``console``.
    """

    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon's configuration file says.

    Attributes:
        config: the client's settings, from the top-level keys.
        control: the ``[control]`` table.
        authorization: the ``[authorization]`` table.
        log: the ``[log]`` table.
        path: the file read (None when parsed from a string).
        trust_keys: ``(key id in hex, key file)`` for each ``trust`` entry, in file order
            (a :class:`~fota.core.manifest.TrustStore` does not list its keys).
    """

    config: Config
    control: ControlSettings
    authorization: AuthorizationSettings
    log: LogSettings
    path: Path | None = None
    trust_keys: tuple[tuple[str, Path], ...] = ()


def load_settings(path: Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check the daemon's configuration file.

    Args:
        path: the TOML file.
        environ: the environment the daemon runs in. Nothing in the file is expanded from
            it today; it is accepted so that callers (and tests) pass the environment
            explicitly once a setting needs it.

    Returns:
        The settings, with relative paths resolved against the file's directory.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML, or a key is unknown, missing,
            of the wrong type or out of range; the message names the file, the line and the key.
    """
    del environ  # see the docstring: reserved, nothing reads it yet
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason})") from exc
    return parse_settings(text, path=Path(path))


def parse_settings(text: str, *, path: Path | None = None) -> Settings:
    """Check the daemon's configuration given as TOML text.

    Args:
        text: the file's content.
        path: where it came from: named in messages, and relative paths are resolved against
            its directory (without it, against the working directory).

    Returns:
        The settings.

    Raises:
        ConfigError: as :func:`load_settings`.
    """
    source = TomlSource(text, path)
    table = source.parse()
    sections = {name: table.pop(name, {}) for name in SECTIONS}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise source.error((name,), f"expected a table, got {show_toml(section)}")
    kwargs, trust_keys = _config_kwargs(source, table, known_extra=SECTIONS, full=True)
    config = _make_config(source, kwargs, defaulted_id="device_id" not in table)
    _check_installers(source, config)
    control = _control(source, sections["control"])
    authorization = _authorization(source, sections["authorization"])
    if not control.enabled and authorization.mode == "control":
        written = "mode" in sections["authorization"]
        raise source.error(
            ("control", "enabled"),
            'false, but authorization.mode is "control"'
            + ("" if written else " (the default)")
            + ": nobody could answer a polite update; enable the control socket or set"
            ' authorization.mode to "command" or "auto"',
        )
    return Settings(
        config=config,
        control=control,
        authorization=authorization,
        log=_log(source, sections["log"]),
        path=path,
        trust_keys=trust_keys,
    )


def parse_config_keys(
    text: str, *, path: Path | None, keys: Iterable[str], resolve_paths: bool = True
) -> dict[str, Any]:
    """Check a TOML file holding some of ``Config``'s settings; return them as keyword arguments.

    This is the validator of :func:`parse_settings` for a subset of the keys, without the
    required keys, the daemon's tables or building a ``Config``
    (``fota run --install-config``).

    Args:
        text: the TOML text.
        path: the file, for messages and relative paths.
        keys: the settings allowed.
        resolve_paths: resolve relative paths against the file's directory; False keeps them
            as written.

    Raises:
        ConfigError: naming the file, the line and the key.
    """
    source = TomlSource(text, path, resolve_paths=resolve_paths)
    table = source.parse()
    allowed = tuple(keys)
    for key in table:
        if key not in allowed:
            raise source.unknown((), key, allowed)
    kwargs, _ = _config_kwargs(source, table, known_extra=(), full=False)
    return kwargs


def describe(settings: Settings) -> list[tuple[str, str]]:
    """What ``fota config check`` prints: one ``(key, value)`` per line.

    Args:
        settings: as loaded.

    Returns:
        The file, the server, the device, the state directory, the trust key ids, the
        installer for each component, the control socket, the authorization mode and the log
        settings.
    """
    config = settings.config
    out: list[tuple[str, str]] = []
    if settings.path is not None:
        out.append(("file", str(settings.path)))
    out += [
        ("server", config.server),
        ("device_id", config.device_id),
        ("device_class", config.device_class),
        ("state_dir", str(config.state_dir)),
    ]
    for kid, key_path in settings.trust_keys:
        out.append(("trust", f"{kid} ({key_path})"))
    if not settings.trust_keys:  # Settings built in code: the store cannot list its ids
        out.append(("trust", f"{len(config.trust)} key(s)"))
    if config.installers:
        for component, table in config.installers.items():
            out.append((f"installers.{component}", str(table.get("kind", "?"))))
    else:
        out.append(("installers", f"none: a file installer for {config.target}"))
    if config.maintenance_windows:
        out.append(("maintenance_windows", ", ".join(config.maintenance_windows)))
    control = settings.control
    if control.enabled:
        out += [
            ("control.socket", str(control.socket)),
            ("control.mode", f"{control.mode:04o}"),
            ("control.group", _group_name(control.group)),
        ]
    else:
        out.append(("control", "disabled"))
    auth = settings.authorization
    mode = auth.mode
    if auth.mode == "command":
        mode += ": " + " ".join(auth.command)
    out.append(("authorization.mode", mode))
    out.append(("log", f"level {settings.log.level}, format {settings.log.format}"))
    return out


# -- where a key is written ------------------------------------------------------------------

_Key = tuple[str | int, ...]
"""A dotted key as parts; an int is an array index (``trust[1]``)."""


def _dotted(key: _Key) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Locator:
    """The line each key (and each array element) of a TOML text is written on.

    Not a TOML parser: it runs after ``tomllib`` accepted the text and only has to follow
    table headers, (dotted, quoted) keys, inline tables, arrays and strings well enough not to
    mistake a ``=`` or ``[`` inside a string for structure. If it gets lost anyway, keys it has
    not seen simply have no line.
    """

    _BARE = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines: dict[_Key, int] = {}
        self._arrays: dict[_Key, int] = {}
        self._starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        # Best effort: if the scan gets lost, what it recorded so far stays usable.
        with contextlib.suppress(IndexError, ValueError, tomllib.TOMLDecodeError):
            self._document()

    def line(self, key: _Key) -> int | None:
        """The line of ``key``, else of the nearest enclosing key or table that is written."""
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None

    def _line_at(self, pos: int) -> int:
        from bisect import bisect_right

        return bisect_right(self._starts, pos)

    def _record(self, key: _Key, pos: int) -> None:
        # The first mention wins: ``[a]`` then ``[a.b]`` keeps ``a`` at its own header.
        for end in range(1, len(key) + 1):
            self.lines.setdefault(key[:end], self._line_at(pos))

    def _blank(self, i: int, newlines: bool = True) -> int:
        text = self.text
        while i < len(text):
            c = text[i]
            if c in " \t\r" or (newlines and c == "\n"):
                i += 1
            elif newlines and c == "#":
                end = text.find("\n", i)
                i = len(text) if end < 0 else end
            else:
                break
        return i

    def _key(self, i: int) -> tuple[list[str], int]:
        parts: list[str] = []
        text = self.text
        while True:
            i = self._blank(i, newlines=False)
            if text[i] in "\"'":
                end = self._string(i)
                # tomllib decodes the quoted key exactly as it did for the table (escapes).
                parts.append(tomllib.loads(f"k = {text[i:end]}")["k"])
                i = end
            else:
                match = self._BARE.match(text, i)
                if match is None:
                    raise ValueError(f"no key at {i}")
                parts.append(match.group())
                i = match.end()
            i = self._blank(i, newlines=False)
            if i < len(text) and text[i] == ".":
                i += 1
                continue
            return parts, i

    def _string(self, i: int) -> int:
        """The position after the string that starts at ``i``."""
        text = self.text
        quote = text[i]
        if text.startswith(quote * 3, i):
            j = i + 3
            while not text.startswith(quote * 3, j):
                j += 2 if quote == '"' and text[j] == "\\" else 1
                if j >= len(text):
                    raise ValueError("unterminated string")
            # Up to two quotes right before the closing three belong to the content.
            extra = 0
            while extra < 2 and text.startswith(quote, j + 3 + extra):
                extra += 1
            return j + 3 + extra
        j = i + 1
        while text[j] != quote:
            j += 2 if quote == '"' and text[j] == "\\" else 1
        return j + 1

    def _value(self, i: int, key: _Key) -> int:
        text = self.text
        i = self._blank(i, newlines=False)
        c = text[i]
        if c in "\"'":
            return self._string(i)
        if c == "[":
            i, index = i + 1, 0
            while True:
                i = self._blank(i)
                if text[i] == "]":
                    return i + 1
                self._record((*key, index), i)
                i = self._blank(self._value(i, (*key, index)))
                index += 1
                if text[i] == ",":
                    i += 1
                elif text[i] != "]":
                    raise ValueError(f"lost in an array at {i}")
        if c == "{":
            i += 1
            while True:
                i = self._blank(i)
                if text[i] == "}":
                    return i + 1
                parts, after = self._key(i)
                self._record((*key, *parts), i)
                i = self._blank(self._value(self._equals(after), (*key, *parts)))
                if text[i] == ",":
                    i += 1
                elif text[i] != "}":
                    raise ValueError(f"lost in an inline table at {i}")
        # A number, a boolean or a date: up to the next delimiter.
        while i < len(text) and text[i] not in ",]}\n#":
            i += 1
        return i

    def _resolve(self, parts: list[str]) -> _Key:
        """A header's key, with the current index of every array of tables on the way."""
        out: _Key = ()
        for part in parts:
            out = (*out, part)
            if out in self._arrays:
                out = (*out, self._arrays[out])
        return out

    def _equals(self, i: int) -> int:
        """The position after the ``=`` that must follow a key at ``i``."""
        if self.text[i] != "=":
            raise ValueError(f"no '=' at {i}")
        return i + 1

    def _close(self, i: int, bracket: str) -> int:
        """The position after a header's closing ``]`` or ``]]`` at ``i``."""
        if not self.text.startswith(bracket, i):
            raise ValueError(f"no {bracket!r} at {i}")
        return i + len(bracket)

    def _document(self) -> None:
        text, i = self.text, 0
        current: _Key = ()
        while True:
            i = self._blank(i)
            if i >= len(text):
                return
            if text.startswith("[[", i):
                parts, i = self._key(i + 2)
                array = (*self._resolve(parts[:-1]), parts[-1])
                index = self._arrays.get(array, -1) + 1
                self._arrays[array] = index
                current = (*array, index)
                self._record(current, i)
                i = self._close(i, "]]")
            elif text[i] == "[":
                start = i
                parts, i = self._key(i + 1)
                current = self._resolve(parts)
                self._record(current, start)
                i = self._close(i, "]")
            else:
                parts, after = self._key(i)
                self._record((*current, *parts), i)
                i = self._value(self._equals(after), (*current, *parts))


# -- the file being read ---------------------------------------------------------------------


class TomlSource:
    """One configuration text: its table, where messages point, the base of relative paths.

    Shared with the `fota server` view (``fota.tools.server_view``), which reads its own TOML file
    with the same errors (the field and the line they point at).
    """

    def __init__(self, text: str, path: Path | None, *, resolve_paths: bool = True) -> None:
        self.text = text
        self.path = path
        self.base: Path | None = None
        if resolve_paths:
            self.base = path.parent.absolute() if path is not None else Path.cwd()
        self._locator: _Locator | None = None

    def parse(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message ends with "(at line 3, column 9)": lift the line to the front.
            match = re.search(r"at line (\d+)", str(exc))
            raise ConfigError(
                f"{self._where(int(match.group(1)) if match else None)}not valid TOML: {exc}"
            ) from exc

    def line(self, key: _Key) -> int | None:
        if self._locator is None:
            self._locator = _Locator(self.text)
        return self._locator.line(key)

    def _where(self, line: int | None) -> str:
        if self.path is None:
            return f"line {line}: " if line is not None else ""
        return f"{self.path}:{line}: " if line is not None else f"{self.path}: "

    def error(self, key: _Key, message: str) -> ConfigError:
        """A ``ConfigError`` for ``key``: ``file:line: dotted.key: message``."""
        return ConfigError(f"{self._where(self.line(key))}{_dotted(key)}: {message}")

    def bad(self, key: _Key, expected: str, value: Any) -> ConfigError:
        """A ``ConfigError`` for a value of the wrong type or out of range."""
        return self.error(key, f"expected {expected}, got {show_toml(value)}")

    def unknown(self, where: _Key, key: str, known: Iterable[str]) -> ConfigError:
        """A ``ConfigError`` for a key nobody reads (a typo must not be silently ignored)."""
        known = list(known)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {show_toml(close[0])}?" if close else ""
        listed = ", ".join(known) if known else "none"
        scope = f" in {_dotted(where)}" if where else ""
        return ConfigError(
            f"{self._where(self.line((*where, key)))}{_dotted((*where, key))}: "
            f"unknown key{scope}{hint} (known: {listed})"
        )

    def relocate(self, exc: ConfigError, note: str = "") -> ConfigError:
        """Point an error raised by ``Config`` or an installer (``key: ...``) at its line."""
        message = str(exc)
        match = re.match(r"([A-Za-z_]\w*(?:\.[\w-]+|\[\d+\])*):", message)
        key: _Key = ()
        if match:
            for name, index in re.findall(r"([\w-]+)|\[(\d+)\]", match.group(1)):
                key = (*key, int(index) if index else name)
            # Spec.done()'s "installers.x: unknown key 'y'": the line of y, not of the table.
            unknown = re.match(r"unknown key '([^']+)'", message[match.end() :].lstrip())
            if unknown:
                key = (*key, unknown.group(1))
        return ConfigError(f"{self._where(self.line(key) if key else None)}{message}{note}")

    def path_value(self, value: str) -> Path:
        path = Path(value)
        return path if self.base is None or path.is_absolute() else self.base / path


def show_toml(value: Any) -> str:
    """A value as it is written in TOML, shortened (for messages that name a bad value)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(show_toml(v) for v in value) + "]"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- values by type hint ---------------------------------------------------------------------

_NONE = "none"
"""Where ``None`` is allowed but cannot be left out (a table's entry, a setting whose default is
not None), the string ``"none"`` stands for it: TOML has no null."""


def _convert(
    source: TomlSource, key: _Key, value: Any, hint: Any, known: Iterable[str] = ()
) -> Any:
    """``value`` checked against ``hint`` (a type from ``get_type_hints``).

    Args:
        source: for messages and relative paths.
        key: the dotted key, for messages.
        value: what tomllib returned.
        hint: the expected type.
        known: for a ``dict``: the only keys allowed (empty: any).
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        _refuse_non_finite(source, key, value)
        return value
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        # For str | None the string "none" is a value, not a null: leave the key out instead.
        if len(inner) < len(args) and value == _NONE and str not in inner:
            return None
        if len(inner) == 1:
            return _convert(source, key, value, inner[0], known)
        raise TypeError(f"{_dotted(key)}: no TOML mapping for {hint}")  # pragma: no cover
    if hint is bool:
        if not isinstance(value, bool):
            raise source.bad(key, "true or false", value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise source.bad(key, "an integer", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise source.bad(key, "a number", value)
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise source.error(key, f"{show_toml(value)} is too large for a number") from None
        _refuse_non_finite(source, key, number)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise source.bad(key, "a string", value)
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise source.bad(key, "a path (a string)", value)
        return source.path_value(value)
    if origin in (list, tuple):
        item = args[0]
        if not isinstance(value, list):
            raise source.bad(key, f"a list{_of(item)}", value)
        items = [_convert(source, (*key, i), v, item) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise source.bad(key, "a table", value)
        known = tuple(known)
        out = {}
        for name, item in value.items():
            if known and name not in known:
                raise source.unknown(key, name, known)
            out[name] = _convert(source, (*key, name), item, args[1])
        return out
    raise TypeError(f"{_dotted(key)}: no TOML mapping for {hint}")  # pragma: no cover


def _refuse_non_finite(source: TomlSource, key: _Key, value: Any) -> None:
    """TOML's ``nan`` and ``inf`` are floats, but no setting has a use for them.

    Also inside lists and tables passed on as they are (``installers``), so that nothing
    downstream sees one.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise source.error(key, f"{show_toml(value)} is not a finite number")
    if isinstance(value, dict):
        for name, item in value.items():
            _refuse_non_finite(source, (*key, name), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_non_finite(source, (*key, i), item)


def _of(item: Any) -> str:
    return " of strings" if item is str else ""


def _argv(source: TomlSource, key: _Key, value: Any) -> tuple[str, ...]:
    """A command: a list of non-empty strings, never a shell string."""
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise source.bad(key, "a non-empty list of strings (an argument list)", value)
    return tuple(value)


# -- the top-level keys: fota.Config ---------------------------------------------------------


def _config_fields() -> dict[str, tuple[Any, tuple[str, ...]]]:
    """``Config``'s settings: name -> (type hint, the keys its table allows)."""
    hints = get_type_hints(Config)
    out: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for f in dataclasses.fields(Config):
        if f.name.startswith("_") or not f.init:
            continue
        known: tuple[str, ...] = ()
        # A table whose default names every key (max_deferral, deadline_after: the
        # severities) allows only those; an empty default (condition_commands) allows any.
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if isinstance(default, dict):
                known = tuple(default)
        out[f.name] = (hints[f.name], known)
    from fota.install import COMPONENTS

    out["installers"] = (out["installers"][0], (*COMPONENTS, "default"))
    return out


def _config_kwargs(
    source: TomlSource, table: dict[str, Any], *, known_extra: tuple[str, ...], full: bool
) -> tuple[dict[str, Any], tuple[tuple[str, Path], ...]]:
    """The top-level keys as ``Config`` keyword arguments, in the file's order.

    Args:
        source: the file.
        table: its top-level keys, without the daemon's tables.
        known_extra: further top-level names to list as known (the daemon's tables).
        full: the whole daemon file: the required keys must be there, and the trust
            key files are loaded.
    """
    fields = _config_fields()
    kwargs: dict[str, Any] = {}
    trust_keys: tuple[tuple[str, Path], ...] = ()
    for name, value in table.items():
        if name not in fields:
            raise source.unknown((), name, (*fields, *known_extra))
        hint, known = fields[name]
        if name == "trust":
            kwargs[name], trust_keys = _trust(source, value)
        elif name == "trust_roots":
            kwargs[name], _ = _trust(source, value, name="trust_roots")
        elif name == "maintenance_windows":
            kwargs[name] = _windows(source, value)
        else:
            kwargs[name] = _convert(source, (name,), value, hint, known)
    if full:
        for name in REQUIRED:
            if name not in table:
                raise source.error((name,), "missing (required)")
        kwargs.setdefault("device_id", os.uname().nodename)
    return kwargs, trust_keys


def _trust(
    source: TomlSource, value: Any, *, name: str = "trust"
) -> tuple[TrustStore, tuple[tuple[str, Path], ...]]:
    """``trust`` (or ``trust_roots``): a list of PEM public key files, as a trust store."""
    from fota import keys
    from fota.core.manifest import kid_for

    if not isinstance(value, list) or not value:
        raise source.bad((name,), "a non-empty list of public key files (PEM)", value)
    store = TrustStore()
    found: list[tuple[str, Path]] = []
    for i, item in enumerate(value):
        path = _convert(source, (name, i), item, Path)
        try:
            path.read_bytes()
        except OSError as exc:
            raise source.error((name, i), f"cannot read {path}: {exc.strerror}") from exc
        try:
            key = keys.load_public(path)
        except ConfigError as exc:
            raise source.error((name, i), f"{path}: not a usable public key ({exc})") from exc
        kid = kid_for(key)
        store.add(kid, key)
        found.append((kid.hex(), path))
    return store, tuple(found)


def _windows(source: TomlSource, value: Any) -> list[str]:
    """``maintenance_windows``, each entry checked here so its message points at its line."""
    from fota.core.windows import parse_window

    texts = _convert(source, ("maintenance_windows",), value, list[str])
    for i, text in enumerate(texts):
        try:
            parse_window(text)
        except ConfigError as exc:
            problem = str(exc).removeprefix("maintenance_windows: ")
            raise source.error(("maintenance_windows", i), problem) from exc
    return list(texts)


def _make_config(source: TomlSource, kwargs: dict[str, Any], *, defaulted_id: bool) -> Config:
    """``Config(**kwargs)``, its own checks' errors pointed at the line of the key."""
    try:
        return Config(**kwargs)
    except ConfigError as exc:
        note = ""
        if defaulted_id and str(exc).startswith("device_id:"):
            note = (
                f" (device_id is not set; the host name {show_toml(kwargs['device_id'])} was used)"
            )
        raise source.relocate(exc, note) from exc


def _check_installers(source: TomlSource, config: Config) -> None:
    """Build the installers once (no side effects) so a bad table fails now, not at start."""
    from fota.install import Context, from_config

    if not config.installers:
        if config.target is None:
            raise source.error(("target",), "missing: needed when no [installers] are given")
        return
    try:
        from_config(config.installers, Context(config.state_dir, config.hook_timeout))
    except ConfigError as exc:
        raise source.relocate(exc) from exc


# -- the daemon's tables ---------------------------------------------------------------------


def _section(source: TomlSource, name: str, cls: Any, table: dict[str, Any]) -> dict[str, Any]:
    """A table's keys converted by the dataclass's type hints (mode, group: the caller's)."""
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise source.unknown((name,), key, known)
        out[key] = (
            value if (name, key) in _RAW else _convert(source, (name, key), value, hints[key])
        )
    return out


# Keys whose TOML spelling differs from their type: read by their own function.
_RAW = {("control", "mode"), ("control", "group"), ("authorization", "command")}
_RAW |= {("authorization", "event_command")}


def _control(source: TomlSource, table: dict[str, Any]) -> ControlSettings:
    values = _section(source, "control", ControlSettings, table)
    if "mode" in values:
        values["mode"] = _file_mode(source, values["mode"])
    if "group" in values:
        values["group"] = _group(source, values["group"])
    low, high = MAX_CLIENTS_RANGE
    if "max_clients" in values and not low <= values["max_clients"] <= high:
        raise source.bad(("control", "max_clients"), f"{low}..{high}", values["max_clients"])
    low, high = MAX_MESSAGE_RANGE
    if "max_message" in values and not low <= values["max_message"] <= high:
        raise source.bad(
            ("control", "max_message"), f"{low}..{high} (bytes)", values["max_message"]
        )
    low_s, high_s = CONTROL_TIMEOUT_RANGE
    for key in ("request_timeout", "idle_timeout"):
        if key in values and not low_s <= values[key] <= high_s:
            raise source.bad(("control", key), f"{low_s:g}..{high_s:g} (seconds)", values[key])
    return ControlSettings(**values)


def _file_mode(source: TomlSource, value: Any) -> int:
    """``control.mode``: ``"0660"``, ``"660"``, ``"0o660"`` or an integer (``0o660``)."""
    key = ("control", "mode")
    if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip()):
        mode = int(value.strip().removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise source.bad(key, 'an octal string such as "0660" or an integer (0o660)', value)
    if not 0 <= mode <= 0o777:
        # A decimal 660 in the file lands here: the message shows it in octal, which says why.
        shown = f"0o{mode:o}" if mode >= 0 else str(mode)
        raise source.error(key, f"{shown} is not a file mode (0..0o777)")
    return mode


def _group(source: TomlSource, value: Any) -> int:
    """``control.group``: a group name, resolved to its gid now, or a gid."""
    key = ("control", "group")
    low, high = GID_RANGE
    if isinstance(value, int) and not isinstance(value, bool):
        if not low <= value <= high:
            raise source.bad(key, f"a group name or a gid ({low}..{high})", value)
        return value
    if not isinstance(value, str) or not value:
        raise source.bad(key, "a group name or a gid", value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise source.error(key, f"no group named {show_toml(value)} on this system") from None


def _group_name(gid: int | None) -> str:
    if gid is None:
        return "the daemon's group"
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _authorization(source: TomlSource, table: dict[str, Any]) -> AuthorizationSettings:
    values = _section(source, "authorization", AuthorizationSettings, table)
    mode = values.get("mode", "control")
    if mode not in AUTHORIZATION_MODES:
        raise source.bad(("authorization", "mode"), _one_of(AUTHORIZATION_MODES), mode)
    for name in ("command", "event_command"):
        if name in values:
            if values[name] == []:
                values[name] = ()  # an empty list: no command, as when the key is left out
            else:
                values[name] = _argv(source, ("authorization", name), values[name])
    if mode == "command" and not values.get("command"):
        raise source.error(
            ("authorization", "command"),
            'missing: required with mode = "command" (an argument list)',
        )
    # As fota.app.command_handler's _positive, so that the daemon accepts what the check accepted.
    for name in ("timeout", "defer", "retry"):
        if name in values and not (math.isfinite(values[name]) and values[name] > 0):
            raise source.bad(("authorization", name), "a positive number", values[name])
    return AuthorizationSettings(**values)


def _log(source: TomlSource, table: dict[str, Any]) -> LogSettings:
    values = _section(source, "log", LogSettings, table)
    if "level" in values:
        values["level"] = values["level"].lower()
        if values["level"] not in LOG_LEVELS:
            raise source.bad(("log", "level"), _one_of(LOG_LEVELS), table["level"])
    if "format" in values and values["format"] not in LOG_FORMATS:
        raise source.bad(("log", "format"), _one_of(LOG_FORMATS), values["format"])
    return LogSettings(**values)


def _one_of(names: Iterable[str]) -> str:
    return "one of " + ", ".join(json.dumps(n) for n in names)


__all__ = [
    "AuthorizationSettings",
    "ControlSettings",
    "LogSettings",
    "Settings",
    "describe",
    "load_settings",
    "parse_config_keys",
    "parse_settings",
]


INSTALL_KEYS: tuple[str, ...] = (
    "installers",
    "self_test_command",
    "self_test_deadline",
    "self_test_interval",
    "restart_command",
    "boot_id_path",
    "hook_timeout",
    "factory_manifest",
    "restart_limit",
)
"""The settings ``fota run --install-config FILE`` reads (a subset of the daemon's TOML keys).

Their types are ``Config``'s own: :func:`fota.app.settings.parse_config_keys` reads them from the
type hints, as for the daemon's file."""


def load_install_settings(path: Path) -> dict[str, Any]:
    """Read the install settings from a TOML file, as ``Config`` keyword arguments.

    Paths are kept as written (relative ones are relative to the working directory).

    Raises:
        ConfigError: the file cannot be read or parsed, or a key is unknown or of the wrong
            type (the message names the file, the line and the key).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason})") from exc
    return parse_config_keys(text, path=Path(path), keys=INSTALL_KEYS, resolve_paths=False)
