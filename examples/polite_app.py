"""An application that takes part in polite deployment in-process.

It runs its own update server (``fota.testing.UpdateServer``) so it is self-contained: a real
deployment points ``Config.server`` at the fleet's server instead. The application defers the
download while it is "busy", then authorizes; it authorizes the install once the download is
verified. Exit status 0 when 2.0 is installed.

    python examples/polite_app.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from fota import BaseHandler, Client, Config, Decision, ResultCode, TrustStore, UpdateInfo
from fota.core.manifest import kid_for
from fota.testing import UpdateServer


class BusyApp(BaseHandler):
    """Defers the first download request (work in progress), authorizes everything after."""

    def __init__(self) -> None:
        self.busy = True

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        print(f"app: {update.version} available ({update.component.name.lower()})")
        if self.busy:
            self.busy = False
            print("app: busy, ask me again in 1 s")
            return Decision.defer(datetime.now(UTC) + timedelta(seconds=1), "job running")
        return Decision.authorize()

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        print(f"app: {update.version} verified, install now")
        return Decision.authorize()

    async def on_complete(self, update: UpdateInfo, result: ResultCode, detail: str) -> None:
        print(f"app: {update.version} -> {result.name}")


async def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fota-example-"))
    key = ed25519.Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    async with UpdateServer(work / "server", key, kid) as server:
        config = Config(
            server=server.uri,
            device_id="example-1",
            device_class="example",
            state_dir=work / "state",
            trust=TrustStore({kid: key.public_key()}),
            target=work / "app.bin",
            ack_timeout=0.5,
        )
        server.publish(os.urandom(20_000), "1.0", device_class="example")
        async with Client(config, handler=BusyApp()) as client:
            await client.wait_for(lambda s: s.installed_version == "1.0", timeout=30)
            server.publish(os.urandom(300_000), "2.0", device_class="example")
            status = await client.wait_for(
                lambda s: s.installed_version == "2.0" and s.reports_pending == 0, timeout=60
            )
    print(f"installed {status.installed_version}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
