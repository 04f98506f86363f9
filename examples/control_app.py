"""An application in its own process that takes part in polite deployment over the socket.

It answers the daemon's authorization requests: while its "busy" file exists (a recording, a
batch job, a customer session) it defers by ``--defer`` seconds, otherwise it authorizes. With
``--once`` it exits when an update ends (status 0 on success). Point it at a running
``fota daemon``:

    python examples/control_app.py --socket /run/fota/control.sock --busy-file /run/app/busy
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from fota.app.control import ControlClient, ControlError, default_socket


async def run(socket: Path, busy: Path, defer: float, once: bool) -> int:
    async with ControlClient(socket) as fota:
        # answers=True: "an application that answers is here" (docs/control.md).
        status = await fota.subscribe(
            ["authorization_needed", "deferred", "forced", "completed", "failed"], answers=True
        )
        print(f"app: connected, device runs {status['installed_version']}", flush=True)
        async for event in fota.events():
            kind, uid = event["event"], event["update_id"]
            if kind == "authorization_needed":
                step, version = event["step"], event["version"]
                try:
                    if await asyncio.to_thread(busy.exists):
                        until = await fota.defer(seconds=defer, reason="busy", update_id=uid)
                        said = "not granted, it proceeds" if until is None else f"{defer:g} s"
                        print(f"app: busy, {step} of {version} deferred: {said}", flush=True)
                    else:
                        await fota.authorize(uid)
                        print(f"app: {step} of {version} authorized", flush=True)
                except ControlError as exc:
                    # Someone else answered first (another application, `fota authorize`).
                    print(f"app: {step} of {version}: {exc.code}: {exc}", flush=True)
            elif kind == "forced":
                print(f"app: {event['step']} forced by {event['reason']}", flush=True)
            elif kind in ("completed", "failed"):
                print(f"app: {event['version']}: {event['result']}", flush=True)
                if once:
                    return 0 if kind == "completed" else 1
    return 1  # the daemon went away


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", type=Path, default=default_socket())
    p.add_argument("--busy-file", type=Path, required=True)
    p.add_argument("--defer", type=float, default=600.0, help="seconds per deferral")
    p.add_argument("--once", action="store_true", help="exit when an update ends")
    args = p.parse_args()
    return asyncio.run(run(args.socket, args.busy_file, args.defer, args.once))


if __name__ == "__main__":
    sys.exit(main())
