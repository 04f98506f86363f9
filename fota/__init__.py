"""fota: a polite firmware-over-the-air update client over CoAP, for embedded Linux gateways.

The device, not the server, decides when an update is downloaded and when it is installed.
Start with :class:`Client`, :class:`Config` and an :class:`UpdateHandler`.

Names are imported on first use (PEP 562), so ``fota fetch`` and other light entry points do
not pay for the state machine, aiocoap and cryptography they never touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fota.client import Client, Status
    from fota.command_handler import CommandHandler
    from fota.config import Config
    from fota.control import ControlClient
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
    from fota.install import ByComponent, FileInstaller, Installer, Outcome
    from fota.install.ab import ABInstaller
    from fota.install.archive import ArchiveInstaller
    from fota.install.command import CommandInstaller
    from fota.install.rauc import RaucInstaller
    from fota.install.swupdate import SwupdateInstaller
    from fota.notices import Notice

_WHERE = {
    "Client": "fota.client",
    "Status": "fota.client",
    "Config": "fota.config",
    "CommandHandler": "fota.command_handler",
    "ControlClient": "fota.control",
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
    "ByComponent": "fota.install",
    "FileInstaller": "fota.install",
    "Installer": "fota.install",
    "Outcome": "fota.install",
    "ABInstaller": "fota.install.ab",
    "ArchiveInstaller": "fota.install.archive",
    "CommandInstaller": "fota.install.command",
    "RaucInstaller": "fota.install.rauc",
    "SwupdateInstaller": "fota.install.swupdate",
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
    "ABInstaller",
    "ArchiveInstaller",
    "AutoAuthorize",
    "BaseHandler",
    "ByComponent",
    "Client",
    "CommandHandler",
    "CommandInstaller",
    "Component",
    "Config",
    "ConfigError",
    "ControlClient",
    "ControlError",
    "Decision",
    "DecisionKind",
    "DiskFull",
    "FileInstaller",
    "FotaError",
    "ImageChanged",
    "InstallError",
    "Installer",
    "IntegrityError",
    "InvalidTransition",
    "JournalError",
    "Manifest",
    "ManifestBody",
    "ManifestError",
    "Notice",
    "Outcome",
    "PermanentServerError",
    "PolicyError",
    "RaucInstaller",
    "ResourceMissing",
    "ResultCode",
    "Severity",
    "State",
    "StateDirError",
    "StateDirLocked",
    "Status",
    "StorageError",
    "SwupdateInstaller",
    "TaskCrashed",
    "TransportError",
    "TrustStore",
    "UpdateHandler",
    "UpdateInfo",
    "UpdateReason",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fota' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
