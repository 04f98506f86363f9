"""A UDP proxy that drops datagrams at random (seeded), both ways: a lossy link on loopback.

    .venv/bin/python bench/lossproxy.py --upstream 127.0.0.1:PORT --loss 5 [--seed 1]

It prints ``{"port": N}`` once bound (``--listen 0`` lets the system pick), then relays: each
client address gets its own upstream socket, so the server's answers find their way back.
Every datagram, either way, is dropped with probability ``--loss`` percent, drawn from one
``random.Random(seed)`` in arrival order. On SIGTERM it prints its counts as JSON on stderr.
Used by ``bench/lossy.py``; not a test tool (the test server has its own loss injection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from typing import Any, cast


class Proxy:
    """Relays datagrams between clients and one upstream server, losing some."""

    def __init__(self, upstream: tuple[str, int], loss: float, seed: int) -> None:
        self.upstream = upstream
        self.loss = loss / 100
        self.random = random.Random(seed)
        self.front: asyncio.DatagramTransport | None = None
        self.backs: dict[Any, asyncio.DatagramTransport] = {}
        self.counts = {"relayed": 0, "dropped": 0}
        self.pending: dict[Any, list[bytes]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def lost(self) -> bool:
        if self.loss and self.random.random() < self.loss:
            self.counts["dropped"] += 1
            return True
        self.counts["relayed"] += 1
        return False

    def from_client(self, data: bytes, client: Any) -> None:
        back = self.backs.get(client)
        if back is not None:
            if not self.lost():
                back.sendto(data)
            return
        waiting = self.pending.setdefault(client, [])
        waiting.append(data)
        if len(waiting) == 1:  # the first datagram from this client: open its upstream
            task = asyncio.get_running_loop().create_task(self._open(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _open(self, client: Any) -> None:
        loop = asyncio.get_running_loop()
        back, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self, client), remote_addr=self.upstream
        )
        self.backs[client] = back
        for data in self.pending.pop(client, []):
            if not self.lost():
                back.sendto(data)

    def from_server(self, data: bytes, client: Any) -> None:
        if self.front is not None and not self.lost():
            self.front.sendto(data, client)


class _Front(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.proxy.front = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy.from_client(data, addr)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy, client: Any) -> None:
        self.proxy = proxy
        self.client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy.from_server(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a server that went away: a loss like any other


async def serve(listen: int, upstream: tuple[str, int], loss: float, seed: int) -> None:
    proxy = Proxy(upstream, loss, seed)
    loop = asyncio.get_running_loop()
    front, _ = await loop.create_datagram_endpoint(
        lambda: _Front(proxy), local_addr=("127.0.0.1", listen)
    )
    print(json.dumps({"port": front.get_extra_info("sockname")[1]}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(json.dumps(proxy.counts), file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", type=int, default=0)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the server")
    p.add_argument("--loss", type=float, default=0.0, help="percent of datagrams dropped")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve(args.listen, (host, int(port)), args.loss, args.seed))


if __name__ == "__main__":
    main()
