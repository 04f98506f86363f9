"""Resume under loss (issue 17 §6): kill -9 a download N times, restart it, count what it lost.

    .venv/bin/python bench/resume.py [--mode fetch,run] [--size 10] [--loss 5] [--kills 10]
                                     [--seed 1] [--pythonpath DIR]

``fetch``: `fota fetch` against libcoap's `coap-server-notls` (the image PUT into a `-d`
resource). ``run``: `fota run --auto-authorize` against `fota server --publish` (64 KiB
fragments, signed). Between client and server runs a seeded lossy relay (`bench/lossproxy.py`'s
``Proxy``, here in this process so that it can watch the answers): every datagram, either way,
is dropped with ``--loss`` percent.

The client is started, SIGKILLed when the image blocks it has received reach a seeded random
share of the image (``--kills`` moments, drawn uniformly in 5..95 % and sorted), started
again, and so on; the last run finishes (``fetch``: the process exits with the file checked;
``run``: the journal reaches VERIFYING, and the process is stopped there).

How it counts, at the relay, for image answers (a 2.05 with a Block2 option and the windowed
fetcher's 8-byte token, whose last 5 bytes are the block's offset) that reached the client:

* re-fetched bytes of a restart: blocks delivered after it that had been delivered before
  (each block once): what the kill cost. Blocks whose answer was lost are not "held", so
  asking again for them is the loss's cost, not the kill's.
* restart to first new byte: from starting the process to the first delivered answer of a
  block not delivered before (interpreter start-up included), and split in two at the
  process's first image request as the relay saw it: start-up (interpreter, imports, the
  journal; in ``run`` also the engine's start and its first exchanges with the server) and
  the client's own wait (first image request to first new byte: a probe's timeout, a lost
  request's retry).
* write amplification: bytes the client processes wrote (``ru_oublock`` of each, from GNU
  time's ``%O``, killed ones too) over the image size. The client's tree is byte-compiled
  first (``compileall``), so no process writes ``.pyc`` files that would count here.

``--pythonpath DIR`` runs the client from another tree (``git archive`` of an older commit):
the paired "before" numbers. Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from download import MiB, file_sha256, free_port, pinned, put_libcoap, start_libcoap  # noqa: E402
from lossproxy import Proxy, _Front  # noqa: E402

from fota.transport import wire  # noqa: E402

BLOCK = 1024


@dataclass
class Epoch:
    """One client process: from its start to its kill (or its end)."""

    started: float
    pid: int = 0
    delivered: list[tuple[float, int]] = field(default_factory=list)
    written: int = 0
    first_request: float | None = None  # the first image request the relay saw


class CountingProxy(Proxy):
    """The lossy relay, noting every image answer that reaches the client."""

    def __init__(self, upstream: tuple[str, int], loss: float, seed: int) -> None:
        super().__init__(upstream, loss, seed)
        self.epoch: Epoch | None = None
        self.held: set[int] = set()
        self.changed = asyncio.Event()
        self.dead: set[Any] = set()

    def from_client(self, data: bytes, client: Any) -> None:
        epoch = self.epoch
        if epoch is not None and epoch.first_request is None and client not in self.dead:
            request = wire.decode(data)
            if request is not None and request.block2 is not None and len(request.token) == 8:
                epoch.first_request = time.monotonic()
        super().from_client(data, client)

    def bury(self) -> None:
        """The client is about to be killed: answers to its addresses reach nobody."""
        self.dead |= set(self.backs) | set(self.pending)

    def from_server(self, data: bytes, client: Any) -> None:
        if self.front is None or self.lost():
            return
        self.front.sendto(data, client)
        if client in self.dead:
            return  # an answer to a killed process: not received
        response = wire.decode(data)
        if response is None or response.code != wire.CONTENT or response.block2 is None:
            return
        num, _, szx = response.block2
        offset = num * (1 << (szx + 4))
        token = response.token
        if len(token) != 8 or int.from_bytes(token[3:], "big") != offset:
            return  # not the windowed fetcher's (a manifest or an announcement)
        if self.epoch is not None:
            self.epoch.delivered.append((time.monotonic(), offset))
        self.held.add(offset)
        self.changed.set()


async def start_proxy(upstream: int, loss: float, seed: int) -> tuple[CountingProxy, int, Any]:
    proxy = CountingProxy(("127.0.0.1", upstream), loss, seed)
    loop = asyncio.get_running_loop()
    front, _ = await loop.create_datagram_endpoint(
        lambda: _Front(proxy), local_addr=("127.0.0.1", 0)
    )
    return proxy, front.get_extra_info("sockname")[1], front


def child_of(pid: int) -> int | None:
    """The PID of GNU time's child (the client)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


async def spawn(argv: list[str], env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    """The client under GNU time, in ``cwd`` (``python -m`` puts the working directory first
    on the path: from the source tree it would shadow ``--pythonpath``)."""
    gnu_time = shutil.which("time") or "/usr/bin/time"
    return await asyncio.create_subprocess_exec(
        gnu_time,
        "-f",
        "FOTA-BENCH %O",
        *pinned(1, argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )


async def kill_child(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the client (not GNU time, which then reports what the client wrote)."""
    for _ in range(200):
        pid = child_of(proc.pid)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return
        await asyncio.sleep(0.01)  # bench only: taskset has not exec'd the client yet
    raise SystemExit("no client process under GNU time")


def written(stderr: bytes) -> int:
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("FOTA-BENCH "):
            return int(line.split()[1]) * 512
    return 0


async def lines_until(stream: asyncio.StreamReader, predicate: Any, keep: list[bytes]) -> bool:
    """Read stderr lines until ``predicate(line)``; False at end of stream."""
    while True:
        line = await stream.readline()
        if not line:
            return False
        keep.append(line)
        if predicate(line):
            return True


async def bench(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"fota-bench-resume-{mode}-"))
    image = work / "image.bin"
    rng = random.Random(args.seed)
    image.write_bytes(random.Random(args.seed).randbytes(args.size * MiB))
    sha = file_sha256(image)
    blocks = -(-image.stat().st_size // BLOCK)
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    # .pyc files written by the first client would count as its writes.
    tree = Path(args.pythonpath) if args.pythonpath else HERE.parent
    subprocess.run(  # noqa: ASYNC221 - set-up, before anything is timed
        [sys.executable, "-m", "compileall", "-q", str(tree / "fota")], check=True
    )
    server: subprocess.Popen[bytes]
    if mode == "fetch":
        server = start_libcoap(port)
        put_libcoap(port, "img", image)
    else:
        key = work / "bench.key"
        subprocess.run(  # noqa: ASYNC221 - set-up, before anything is timed
            [sys.executable, "-m", "fota", "manifest", "keygen", "--out", str(key)],
            check=True,
            capture_output=True,
        )
        server = subprocess.Popen(  # noqa: ASYNC220 - set-up, before anything is timed
            pinned(
                0,
                [
                    sys.executable, "-m", "fota", "--log-level", "warning", "server",
                    "--root", str(work / "srv"), "--key", str(key), "--port", str(port),
                    "--device-class", "bench", "--publish", f"{image}=1.0", "--json",
                ],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert server.stdout is not None
        while b'"uri"' not in server.stdout.readline():
            pass
    proxy, pport, front = await start_proxy(port, args.loss, args.seed)
    if mode == "fetch":
        argv = [
            sys.executable, "-m", "fota", "--log-level", "warning", "fetch",
            f"coap://127.0.0.1:{pport}/img", "--out", str(work / "out.bin"), "--sha256", sha,
        ]  # fmt: skip
    else:
        argv = [
            sys.executable, "-m", "fota", "--log-level", "info", "run",
            "--server", f"coap://127.0.0.1:{pport}", "--state-dir", str(work / "state"),
            "--trust", str(work / "bench.key.pub"), "--device-class", "bench",
            "--device-id", "bench-dev", "--auto-authorize", "--target", str(work / "fw.bin"),
        ]  # fmt: skip
    moments = sorted(int(blocks * rng.uniform(0.05, 0.95)) for _ in range(args.kills))
    epochs: list[Epoch] = []
    try:
        for k in range(args.kills + 1):
            epoch = Epoch(time.monotonic())
            proxy.epoch = epoch
            epochs.append(epoch)
            proc = await spawn(argv, env, work)
            assert proc.stderr is not None
            err: list[bytes] = []
            if k < args.kills:
                # At least 32 new blocks per run, so every kill lands in a live transfer.
                target = max(moments[k], len(proxy.held) + 32)
                reader = asyncio.create_task(lines_until(proc.stderr, lambda _: False, err))
                while len(proxy.held) < target and proc.returncode is None:
                    proxy.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proxy.changed.wait(), 1.0)
                proxy.bury()
                await kill_child(proc)
                await proc.wait()
                await reader
            elif mode == "fetch":
                rest = await proc.stderr.read()
                err.append(rest)
                await proc.wait()
                if file_sha256(work / "out.bin") != sha:
                    raise SystemExit(f"fetch ended without the image: {b''.join(err)[-2000:]!r}")
            else:
                done = await lines_until(
                    proc.stderr,
                    lambda line: b'"state_changed"' in line and b'"VERIFYING"' in line,
                    err,
                )
                if not done:
                    raise SystemExit(f"run ended before VERIFYING: {b''.join(err)[-2000:]!r}")
                await kill_child(proc)
                err.append(await proc.stderr.read())
                await proc.wait()
            epoch.written = written(b"".join(err))
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - after the run
                (Path(args.logs) / f"{mode}-{k}.log").write_bytes(b"".join(err))
                state = work / ("out.bin.fota-fetch" if mode == "fetch" else "state")
                if state.is_file():
                    shutil.copy(state, Path(args.logs) / f"{mode}-{k}.journal")
            print(f"{mode}: run {k} ended, {len(proxy.held)}/{blocks} blocks", file=sys.stderr)
    finally:
        front.close()
        server.terminate()
        server.wait()
    rows = []
    seen: set[int] = set()
    for k, epoch in enumerate(epochs):
        again = {o for _, o in epoch.delivered if o in seen}
        first_new = next((t for t, o in epoch.delivered if o not in seen), None)
        asked = epoch.first_request
        rows.append(
            {
                "run": k,
                "refetched_kib": len(again) * BLOCK / 1024,
                "first_new_s": None if first_new is None else first_new - epoch.started,
                "startup_s": None if asked is None else asked - epoch.started,
                "wait_s": None if first_new is None or asked is None else first_new - asked,
                "new_blocks": len({o for _, o in epoch.delivered} - seen),
                "written": epoch.written,
            }
        )
        seen |= {o for _, o in epoch.delivered}
    total_answers = sum(len(e.delivered) for e in epochs)
    return {
        "mode": mode,
        "blocks": blocks,
        "rows": rows,
        "answers": total_answers,
        "write_amplification": sum(e.written for e in epochs) / (args.size * MiB),
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    mode, rows = result["mode"], result["rows"]
    fragment = 256 if mode == "fetch" else 64
    print(
        f"\n{mode}: {args.size} MiB, {args.loss:g} % loss each way, {args.kills} kills, "
        f"seed {args.seed}, {fragment} KiB fragments"
        + (f", client from {args.pythonpath}" if args.pythonpath else "")
    )
    print()
    print(
        "| run | re-fetched after the restart | restart to first new byte "
        "| of it start-up | of it the client's wait | new blocks |"
    )
    print("|---|---|---|---|---|---|")

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    for row in rows:
        again = "(first run)" if row["run"] == 0 else f"{row['refetched_kib']:.0f} KiB"
        print(
            f"| {row['run']} | {again} | {secs(row['first_new_s'])} | {secs(row['startup_s'])}"
            f" | {secs(row['wait_s'])} | {row['new_blocks']} |"
        )
    restarts = rows[1:]
    if not restarts:
        print(f"\nno kills; write amplification {result['write_amplification']:.3f}")
        print("JSON " + json.dumps(result))
        return
    refetched = [r["refetched_kib"] for r in restarts]
    firsts = [r["first_new_s"] for r in restarts if r["first_new_s"] is not None]
    waits = [r["wait_s"] for r in restarts if r["wait_s"] is not None]
    startups = [r["startup_s"] for r in restarts if r["startup_s"] is not None]
    print()
    print(
        f"re-fetched per kill: median {statistics.median(refetched):.0f} KiB, "
        f"max {max(refetched):.0f} KiB ({max(refetched) / fragment:.2f} fragments); "
        f"restart to first new byte: median {statistics.median(firsts):.2f} s, "
        f"max {max(firsts):.2f} s (start-up median {statistics.median(startups):.2f} s, "
        f"client's wait median {statistics.median(waits):.2f} s, max {max(waits):.2f} s); "
        f"image answers delivered {result['answers']} for "
        f"{result['blocks']} blocks; write amplification "
        f"{result['write_amplification']:.3f}"
    )
    print("JSON " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="fetch,run", help="fetch, run, or both (comma separated)")
    p.add_argument("--size", type=int, default=10, help="MiB")
    p.add_argument("--loss", type=float, default=5.0, help="percent, each way")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pythonpath", help="run the client from this tree (the 'before' numbers)")
    p.add_argument("--logs", help="keep each client's stderr in this directory")
    args = p.parse_args()
    if not shutil.which("time") and not Path("/usr/bin/time").exists():
        raise SystemExit("GNU time is missing: apt-get install time")
    for mode in args.mode.split(","):
        report(asyncio.run(bench(mode, args)), args)


if __name__ == "__main__":
    main()
