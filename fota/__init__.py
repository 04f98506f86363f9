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
    from fota.config import Config
    from fota.core.manifest import Component, Manifest, ManifestBody, Severity, TrustStore
    from fota.core.states import State
    from fota.errors import (
        ConfigError,
        FotaError,
        ImageChanged,
        InstallError,
        IntegrityError,
        InvalidTransition,
        JournalError,
        ManifestError,
        PermanentServerError,
        PolicyError,
        ResultCode,
        StorageError,
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
    from fota.install import FileInstaller, Installer

_WHERE = {
    "Client": "fota.client",
    "Status": "fota.client",
    "Config": "fota.config",
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
    "FileInstaller": "fota.install",
    "Installer": "fota.install",
    **{
        name: "fota.errors"
        for name in (
            "ConfigError",
            "FotaError",
            "ImageChanged",
            "InstallError",
            "IntegrityError",
            "InvalidTransition",
            "JournalError",
            "ManifestError",
            "PermanentServerError",
            "PolicyError",
            "ResultCode",
            "StorageError",
            "TransportError",
        )
    },
}

__all__ = [
    "AutoAuthorize",
    "BaseHandler",
    "Client",
    "Component",
    "Config",
    "ConfigError",
    "Decision",
    "DecisionKind",
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
    "PermanentServerError",
    "PolicyError",
    "ResultCode",
    "Severity",
    "State",
    "Status",
    "StorageError",
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
