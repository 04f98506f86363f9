"""fota: a polite firmware-over-the-air update client over CoAP, for embedded Linux gateways.

The device, not the server, decides when an update is downloaded and when it is installed.
Start with :class:`Client`, :class:`Config` and an :class:`UpdateHandler`. Installers (the
``Installer`` protocol, ``FileInstaller``, ``ABInstaller``, ``RaucInstaller`` and the others)
live in :mod:`fota.install`.

Names are imported on first use (PEP 562), so ``fota fetch`` and other light entry points do
not pay for the state machine, aiocoap and cryptography they never touch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fota.app.command_handler import CommandHandler
    from fota.app.control import ControlClient
    from fota.client import Client, Status
    from fota.config import Config
    from fota.core.manifest import Component, Manifest, ManifestBody, Severity, TrustStore
    from fota.core.states import State
    from fota.errors import (
        ConfigError,
        ControlError,
        DiskFull,
        FotaError,
        ImageChanged,
        InstallError,
        IntegrityError,
        InvalidTransition,
        JournalError,
        ManifestError,
        PermanentServerError,
        PolicyError,
        ResourceMissing,
        ResultCode,
        StateDirError,
        StateDirLocked,
        StorageError,
        TaskCrashed,
        TransportError,
    )
    from fota.handler import (
        AutoAuthorize,
        BaseHandler,
        Decision,
        DecisionKind,
        UpdateHandler,
        UpdateInfo,
        UpdateReason,
    )
    from fota.notices import Notice

_WHERE = {
    "Client": "fota.client",
    "Status": "fota.client",
    "Config": "fota.config",
    "CommandHandler": "fota.app.command_handler",
    "ControlClient": "fota.app.control",
    "Notice": "fota.notices",
    "Component": "fota.core.manifest",
    "Manifest": "fota.core.manifest",
    "ManifestBody": "fota.core.manifest",
    "Severity": "fota.core.manifest",
    "TrustStore": "fota.core.manifest",
    "State": "fota.core.states",
    "AutoAuthorize": "fota.handler",
    "BaseHandler": "fota.handler",
    "Decision": "fota.handler",
    "DecisionKind": "fota.handler",
    "UpdateHandler": "fota.handler",
    "UpdateInfo": "fota.handler",
    "UpdateReason": "fota.handler",
    **{
        name: "fota.errors"
        for name in (
            "ConfigError",
            "ControlError",
            "DiskFull",
            "FotaError",
            "ImageChanged",
            "InstallError",
            "IntegrityError",
            "InvalidTransition",
            "JournalError",
            "ManifestError",
            "PermanentServerError",
            "PolicyError",
            "ResourceMissing",
            "ResultCode",
            "StateDirError",
            "StateDirLocked",
            "StorageError",
            "TaskCrashed",
            "TransportError",
        )
    },
}

__all__ = [
    "AutoAuthorize",
    "BaseHandler",
    "Client",
    "CommandHandler",
    "Component",
    "Config",
    "ConfigError",
    "ControlClient",
    "ControlError",
    "Decision",
    "DecisionKind",
    "DiskFull",
    "FotaError",
    "ImageChanged",
    "InstallError",
    "IntegrityError",
    "InvalidTransition",
    "JournalError",
    "Manifest",
    "ManifestBody",
    "ManifestError",
    "Notice",
    "PermanentServerError",
    "PolicyError",
    "ResourceMissing",
    "ResultCode",
    "Severity",
    "State",
    "StateDirError",
    "StateDirLocked",
    "Status",
    "StorageError",
    "TaskCrashed",
    "TransportError",
    "TrustStore",
    "UpdateHandler",
    "UpdateInfo",
    "UpdateReason",
]


_MOVED = frozenset(
    {
        "ABInstaller",
        "ArchiveInstaller",
        "ByComponent",
        "CommandInstaller",
        "FileInstaller",
        "Installer",
        "Outcome",
        "RaucInstaller",
        "SwupdateInstaller",
    }
)
"""Installer names that live in :mod:`fota.install` (issue 18 §4): still found here, with a
DeprecationWarning, so an application written against 0.1 keeps running."""


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"fota.{name} is fota.install.{name} now; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("fota.install"), name)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fota' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
