"""``fota demo``: an update server and a client on loopback doing a polite update."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fota import keys
from fota.client import Client
from fota.config import Config
from fota.core import manifest as mf
from fota.core.states import State
from fota.errors import ResultCode
from fota.handler import BaseHandler, Decision, UpdateInfo
from fota.testing.server import UpdateServer

_NOT_FINAL = (ResultCode.INITIAL, ResultCode.DEFERRED, ResultCode.AUTHORIZED, ResultCode.FORCED)


class DemoHandler(BaseHandler):
    """Asks on the terminal; unattended, it defers once (a busy device) and then authorizes."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.deferred_once = False

    async def _ask(self, step: str, update: UpdateInfo) -> Decision:
        print(
            f"  ? {step} authorization for {update.version} ({update.component.name.lower()}, "
            f"{update.image_size} bytes, running {update.installed_version})"
        )
        if self.interactive:
            answer = await asyncio.to_thread(input, "    [a]uthorize / [d]efer 3 s / [r]eject: ")
            answer = answer.strip().lower()[:1]
        else:
            answer = "a" if self.deferred_once or step == "install" else "d"
        if answer == "d":
            self.deferred_once = True
            print("    -> deferred 3 s: the device is busy")
            return Decision.defer(datetime.now(UTC) + timedelta(seconds=3), "device busy")
        if answer == "r":
            print("    -> rejected")
            return Decision.reject("operator said no")
        print("    -> authorized")
        return Decision.authorize()

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        """See :class:`fota.UpdateHandler`."""
        return await self._ask("download", update)

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        """See :class:`fota.UpdateHandler`."""
        return await self._ask("install", update)

    async def on_progress(self, update: UpdateInfo, done: int, total: int) -> None:
        """See :class:`fota.UpdateHandler`."""
        percent = done * 100 // max(1, total)
        bar = "#" * (percent // 5)
        print(f"    [{bar:<20}] {percent:3d} %  {done}/{total} bytes", flush=True)

    async def on_complete(self, update: UpdateInfo, result: ResultCode, detail: str) -> None:
        """See :class:`fota.UpdateHandler`."""
        print(f"  * {update.version}: {result.name.lower()} {detail}".rstrip(), flush=True)


async def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 only when the new image is installed and the server has its report."""
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fota-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    key = keys.generate("ed25519")
    kid = mf.kid_for(key.public_key())
    trust = mf.TrustStore({kid: key.public_key()})
    interactive = sys.stdin.isatty() and not args.yes
    v1_image, v2_image = os.urandom(64 * 1024), os.urandom(args.size)
    print(f"fota demo in {work} ({'interactive' if interactive else 'unattended'})")
    async with UpdateServer(work / "server", key, kid) as server:
        print(f"- update server on {server.uri}, signing key {kid.hex()}")
        config = Config(
            server=server.uri,
            device_id="demo-gw-1",
            device_class="demo-gateway",
            state_dir=work / "device",
            trust=trust,
            target=work / "firmware.bin",
            ack_timeout=0.5,
        )
        server.publish(v1_image, "1.0.0", device_class=config.device_class, polite=True)
        print(
            "- published 1.0.0: the device is empty, so the first install is immediate (not asked)"
        )
        async with Client(config, handler=DemoHandler(interactive)) as client:
            await client.wait_for(lambda s: s.installed_version == "1.0.0", timeout=60)
            print("- 1.0.0 is running; it declares itself polite, so the next update asks first")
            v2 = server.publish(v2_image, "2.0.0", device_class=config.device_class, polite=True)
            print(f"- published 2.0.0 ({len(v2_image)} bytes), update id {v2.update_id}")
            # Done when the server hears how 2.0.0 ended (success, rejected or failed).
            final = await server.wait_for_report(
                lambda r: r.get(5) == v2.update_id and r[4] not in _NOT_FINAL, timeout=args.timeout
            )
            await client.wait_for(lambda s: s.reports_pending == 0, timeout=30)
        print("- reports the server received (state, result):")
        for report in server.reports:
            state, result = State(report[3]).name, ResultCode(report[4]).name
            print(f"    #{report[2]:<3} {state:<20} {result:<12} {report.get(8, '')}")
        if final[4] != ResultCode.SUCCESS:
            print(f"RESULT: 2.0.0 ended with {ResultCode(final[4]).name}; nothing new installed")
            return 1
        installed = hashlib.sha256((work / "firmware.bin").read_bytes()).digest()
        success = any(
            r.get(5) == v2.update_id and r[4] == ResultCode.SUCCESS for r in server.reports
        )
        ok = installed == v2.image_sha256 and success
        print(
            f"RESULT: installed digest {'matches' if installed == v2.image_sha256 else 'DIFFERS'}, "
            f"success report {'recorded' if success else 'MISSING'} -> {'OK' if ok else 'FAILED'}"
        )
        return 0 if ok else 1
