"""Installer settings as data: one table per installer, checked key by key.

``Config.installers`` (and the TOML file of ``fota run --install-config``) holds tables such as
``{"kind": "ab", "slots": {"a": "/dev/mmcblk0p2", "b": "/dev/mmcblk0p3"}, ...}``. Each backend
reads its keys through :class:`Spec`, so a wrong type, a missing key or an unknown key fails at
start with a message naming ``installers.<name>.<key>`` and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fota.errors import ConfigError

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Context:
    """What every installer may need besides its own table.

    Attributes:
        state_dir: fota's state directory; each installer keeps its files in a subdirectory.
        timeout: default seconds for a command (``Config.hook_timeout``).
    """

    state_dir: Path
    timeout: float


class Spec:
    """Typed reads of one installer table; :meth:`done` refuses keys nobody read."""

    def __init__(self, where: str, table: Mapping[str, Any]) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(table).__name__}")
        self.where = where
        self.table = table
        self._read: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        if key in self.table:
            return self.table[key]
        if default is _MISSING:
            raise ConfigError(f"{self.where}.{key}: missing")
        return default

    def _bad(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: expected {expected}, got {value!r}")

    def string(self, key: str, default: Any = _MISSING) -> Any:
        """A string (or ``default``)."""
        value = self._get(key, default)
        if value is not default and not (isinstance(value, str) and value):
            raise self._bad(key, "a non-empty string", value)
        return value

    def path(self, key: str, default: Any = _MISSING) -> Any:
        """An absolute path (or ``default``)."""
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, str | Path) or not Path(value).is_absolute():
            raise self._bad(key, "an absolute path", value)
        return Path(value)

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = True) -> Any:
        """A number (positive unless told otherwise), or ``default``."""
        value = self._get(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number", value)
        if positive and value <= 0:
            raise self._bad(key, "a positive number", value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """A boolean."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def argv(self, key: str, default: Any = _MISSING) -> Any:
        """A command as a non-empty list of strings (never a shell string), or ``default``."""
        value = self._get(key, default)
        if value is default:
            return value
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(a, str) and a for a in value)
        ):
            raise self._bad(key, "a non-empty list of strings (an argument list)", value)
        return list(value)

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings (may be empty), or ``default``."""
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
            raise self._bad(key, "a list of strings", value)
        return list(value)

    def mapping(self, key: str, default: Any = _MISSING) -> Any:
        """A table (its own keys are the caller's to check), or ``default``."""
        value = self._get(key, default)
        if value is not default and not isinstance(value, Mapping):
            raise self._bad(key, "a table", value)
        return value

    def done(self) -> None:
        """Refuse keys that no read asked for (a typo must not be silently ignored)."""
        unknown = sorted(set(self.table) - self._read)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key {unknown[0]!r}")
