"""fota: a polite firmware-over-the-air update client over CoAP, for embedded Linux gateways.

The device, not the server, decides when an update is downloaded and when it is installed.
Start with :class:`Client`, :class:`Config` and an :class:`UpdateHandler`.
"""

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
)
from fota.install import FileInstaller, Installer

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
]
