"""Shared fixtures: a signing key, a real UpdateServer on 127.0.0.1:0, client configs, handlers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import BaseHandler, Config, Decision, ResultCode, TrustStore, UpdateInfo
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import ACK_TIMEOUT, DEVICE_CLASS, device_config
from fota.testing.pytest_plugin import Signing as PluginSigning

# The fixtures fota ships for integrators' tests (fota_server, fota_client, ...), loaded from
# here rather than from the installed entry point (blocked in pyproject.toml): the suite runs
# from a checkout without fota installed.
pytest_plugins = ["fota.testing.pytest_plugin"]
__all__ = ["ACK_TIMEOUT", "DEVICE_CLASS"]


@dataclass
class Signing:
    """A signing key and a trust store holding it: the plugin's ``Signing`` without its PEM
    file, so that a test can build one from any key."""

    key: ed25519.Ed25519PrivateKey
    kid: bytes
    trust: TrustStore


@pytest.fixture
def signing(fota_signing: PluginSigning) -> Signing:
    """The plugin's signing key (``fota_signing``): one key per test, for both fixture sets."""
    return Signing(fota_signing.key, fota_signing.kid, fota_signing.trust)


@pytest.fixture
def server(fota_server: UpdateServer) -> UpdateServer:
    """The plugin's started test server (``fota_server``), which signs with ``signing``'s key."""
    return fota_server


def make_config(
    tmp_path: Path, server: UpdateServer, signing: Signing, device: str = "dev1", **kw: Any
) -> Config:
    return device_config(server, signing.trust, tmp_path, device, **kw)


@dataclass
class RecordingHandler(BaseHandler):
    """Answers from scripted lists (default: authorize) and records every call.

    Tests await ``asks`` / ``completions`` instead of sleeping.
    """

    download: list[Decision] = field(default_factory=list)
    install: list[Decision] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    progress: list[tuple[int, int]] = field(default_factory=list)
    asks: asyncio.Queue[tuple[str, UpdateInfo]] = field(default_factory=asyncio.Queue)
    completions: asyncio.Queue[tuple[UpdateInfo, ResultCode, str]] = field(
        default_factory=asyncio.Queue
    )

    async def _answer(self, step: str, update: UpdateInfo, script: list[Decision]) -> Decision:
        self.calls.append((step, update.update_id))
        self.asks.put_nowait((step, update))
        return script.pop(0) if script else Decision.authorize()

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        return await self._answer("download", update, self.download)

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        return await self._answer("install", update, self.install)

    async def on_progress(self, update: UpdateInfo, done: int, total: int) -> None:
        self.progress.append((done, total))

    async def on_complete(self, update: UpdateInfo, result: ResultCode, detail: str) -> None:
        self.calls.append(("complete", result.name))
        self.completions.put_nowait((update, result, detail))


TIERS = ("core", "integration", "e2e", "interop")
"""The folders of tests/, from the fastest to the ones that need most (docs/architecture.md)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier, its folder: ``-m core``, ``-m "not interop"``."""
    for item in items:
        parts = item.path.parts
        tier = next((p for p in parts[-3:-1] if p in TIERS), None)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
