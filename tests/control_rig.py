"""A real Client and ControlServer in the test's event loop, for the control socket's tests.

tests/integration/test_control.py (the protocol) and tests/e2e/test_cli_control.py (the CLI
as subprocesses) share it. The socket lives in a short, world-traversable directory: sun_path
holds 108 bytes,
pytest's tmp_path is long and mode 0700 (an unprivileged peer could not reach the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fota import Client, State
from fota.app.control import ControlClient
from fota.app.control.server import ControlServer
from fota.handler import BaseHandler
from fota.testing import ManualClock, UpdateServer
from tests.conftest import DEVICE_CLASS, Signing, make_config

BOUND = 20.0
KiB = 1024


@contextlib.contextmanager
def short_dir(prefix: str) -> Iterator[Path]:
    """A new directory under /tmp, mode 0755, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Rig:
    """The client, its control server, the update server and the clock they share."""

    def __init__(
        self, client: Client, control: ControlServer, server: UpdateServer, clock: ManualClock
    ) -> None:
        self.client, self.control, self.server, self.clock = client, control, server, clock
        self.answerers: list[int] = []
        """Every count of answering connections the server reported, in order."""
        self.answerers_changed = asyncio.Event()

    @property
    def sock(self) -> str:
        return str(self.control.path)

    def publish(self, version: str, size: int = 8 * KiB, **kw: Any) -> str:
        return self.server.publish(
            os.urandom(size), version, device_class=DEVICE_CLASS, **kw
        ).update_id

    async def provisioned(self) -> None:
        """1.0 installed (a first install does not ask)."""
        self.publish("1.0")
        await self.client.wait_for(
            lambda s: s.installed_version == "1.0" and s.state is State.IDLE, BOUND
        )

    async def offered(self, version: str = "2.0", size: int = 8 * KiB) -> str:
        """After :meth:`provisioned`: ``version`` published and waiting for authorization."""
        uid = self.publish(version, size)
        await self.client.wait_for(
            lambda s: s.update_id == uid and s.state is State.AWAIT_DOWNLOAD_AUTH, BOUND
        )
        return uid

    def connect(self) -> ControlClient:
        return ControlClient(self.control.path, timeout=BOUND)

    def on_answerers(self, count: int) -> None:
        # As the daemon does in [authorization] mode = "control".
        self.answerers.append(count)
        self.answerers_changed.set()
        self.client.set_handler(BaseHandler() if count else None)


@contextlib.asynccontextmanager
async def running_rig(
    tmp_path: Path, server: UpdateServer, signing: Signing, sockdir: Path, **control: Any
) -> AsyncIterator[Rig]:
    """A started client and control server (``control``: ControlServer options)."""
    clock = ManualClock()
    client = Client(make_config(tmp_path, server, signing), clock=clock)
    rig: Rig | None = None

    def on_answerers(count: int) -> None:
        assert rig is not None
        rig.on_answerers(count)

    server_ = ControlServer(client, sockdir / "ctl.sock", on_answerers=on_answerers, **control)
    rig = Rig(client, server_, server, clock)
    async with client:
        await server_.start()
        try:
            yield rig
        finally:
            await server_.aclose()
