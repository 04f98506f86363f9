"""Fleet benchmark: N fota clients against one server, paired with N coap-client fetches.

    .venv/bin/python bench/fleet.py [--devices 200] [--windows 16] [--rounds 3] [--size 65536]

For each fleet size N and downloader window W, one fleet (fota.testing.fleet: the server in a
process of its own, the devices in worker processes) installs 1.0 everywhere, then runs
``--rounds`` times, in turn on the same server:

A. a polite round: the default mix of decisions (authorize, defer 0.2..2 s, reject 5 %);
B. an authorize-all round: every device downloads and installs at once (pure throughput);
C. the baseline: N ``coap-client-notls -b 1024`` processes started together, fetching B's
   image from the same fota server (CON, one request at a time each, as libcoap does), and
   their outputs checked against the image's digest.

A round is timed from the publish (fota) or the first spawn (coap-client) to the last final
report (fota) or the last exit (coap-client); per device from the same start to its own final
report or exit. The server's CPU seconds come from /proc/PID/stat around each round; the
coap-clients' from wait4()'s rusage. The table shows medians over the rounds, with the
B / C ratio. Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fota.testing.fleet import (  # noqa: E402  (after the path set-up, like a script)
    AUTHORIZE_ALL,
    Fleet,
    FleetOptions,
    Mix,
    RoundResult,
    percentile,
)


@dataclass
class Baseline:
    wall: float
    p50: float
    p95: float
    server_cpu: float
    clients_cpu: float
    failed: int


@dataclass
class Row:
    devices: int
    window: int
    first: RoundResult
    polite: list[RoundResult]
    fast: list[RoundResult]
    base: list[Baseline]


def coap_client() -> str:
    path = shutil.which("coap-client-notls")
    if not path:
        raise SystemExit("coap-client-notls missing: apt-get install libcoap3-bin")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_all(uri: str, n: int, out: Path, sha: str) -> tuple[float, list[float], float, int]:
    """Start N coap-clients at once; return wall, per-client times, their CPU, failures."""
    client = coap_client()
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [client, "-b", "1024", "-B", "300", "-o", str(out / f"c{i}.bin"), uri],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(n)
    ]

    def reap(proc: subprocess.Popen[bytes]) -> tuple[float, float, int]:
        # wait4 on this pid alone: its exit time and its own rusage (not our other children's).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return time.monotonic() - start, usage.ru_utime + usage.ru_stime, proc.returncode

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(reap, procs))
    wall = time.monotonic() - start
    failed = 0
    for i, (_, _, code) in enumerate(results):
        path = out / f"c{i}.bin"
        digest = file_sha256(path) if path.exists() else "missing"
        if code != 0 or digest != sha:
            failed += 1
            print(f"  coap-client {i}: exit status {code}, digest {digest[:16]}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    return wall, [t for t, _, _ in results], sum(c for _, c, _ in results), failed


async def run_one(
    devices: int, window: int, rounds: int, size: int, workers: int | None, work: Path
) -> Row:
    options = FleetOptions(
        devices=devices,
        size=size,
        workers=workers,
        window=window,
        work_dir=work / f"n{devices}-w{window}",
    )
    assert options.work_dir is not None
    options.work_dir.mkdir(parents=True)

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    async with Fleet(options, progress) as fleet:
        first = await fleet.round("first install", "1.0", AUTHORIZE_ALL)
        row = Row(devices, window, first, [], [], [])
        for k in range(rounds):
            row.polite.append(await fleet.round("polite", f"{k + 2}.0", Mix()))
            fast = await fleet.round("authorize all", f"{k + 2}.1", AUTHORIZE_ALL)
            row.fast.append(fast)
            # The image B just installed; every device that completed holds its digest.
            sha = next(v for v in fleet.installed.values() if v is not None)
            before = fleet.server_cpu()
            wall, times, cpu, failed = await asyncio.to_thread(
                fetch_all, fleet.image_uri(sha), devices, work / "coap-client", sha
            )
            row.base.append(
                Baseline(
                    wall,
                    percentile(times, 0.5) or 0.0,
                    percentile(times, 0.95) or 0.0,
                    fleet.server_cpu() - before,
                    cpu,
                    failed,
                )
            )
            print(f"  coap-client x{devices}: {wall:.2f} s, {failed} failed", file=sys.stderr)
    shutil.rmtree(options.work_dir, ignore_errors=True)
    return row


def med(values: list[float]) -> float:
    return statistics.median(values)


def wall_of(r: RoundResult) -> float:
    return r.wall if r.wall is not None else float("nan")


def table(rows: list[Row], rounds: int, size: int) -> str:
    lines = [
        f"image {size // 1024} KiB, 1 KiB blocks, {rounds} rounds A/B/C per fleet, medians; "
        "times from the publish (fota) or the first spawn (coap-client)",
        "",
        "| devices | window | first install | polite: done | p50 / p95 | authorize all: done "
        "| p50 / p95 | N coap-clients: done | p50 / p95 | all / coap-client "
        "| server CPU: polite / all / coap-client | devices' CPU: all / coap-client "
        "| image retries / retransmissions (all) | errors: fota / coap-client |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fw = med([wall_of(r) for r in row.fast])
        bw = med([b.wall for b in row.base])
        errors = row.first.errors + sum(r.errors for r in row.polite + row.fast)
        failed = sum(b.failed for b in row.base)
        lines.append(
            f"| {row.devices} | {row.window} | {wall_of(row.first):.2f} s "
            f"| {med([wall_of(r) for r in row.polite]):.2f} s "
            f"| {med([r.completion_p50 or 0 for r in row.polite]):.2f} / "
            f"{med([r.completion_p95 or 0 for r in row.polite]):.2f} s "
            f"| {fw:.2f} s "
            f"| {med([r.completion_p50 or 0 for r in row.fast]):.2f} / "
            f"{med([r.completion_p95 or 0 for r in row.fast]):.2f} s "
            f"| {bw:.2f} s "
            f"| {med([b.p50 for b in row.base]):.2f} / {med([b.p95 for b in row.base]):.2f} s "
            f"| {fw / bw:.2f}x "
            f"| {med([r.server_cpu for r in row.polite]):.2f} / "
            f"{med([r.server_cpu for r in row.fast]):.2f} / "
            f"{med([b.server_cpu for b in row.base]):.2f} s "
            f"| {med([r.devices_cpu for r in row.fast]):.2f} / "
            f"{med([b.clients_cpu for b in row.base]):.2f} s "
            f"| {med([r.image_retries for r in row.fast]):.0f} / "
            f"{med([r.client_retransmits for r in row.fast]):.0f} "
            f"| {errors} / {failed} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", default="200", help="fleet sizes, comma separated")
    p.add_argument("--windows", default="16", help="downloader windows, comma separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=64 * 1024, help="image bytes")
    p.add_argument("--workers", type=int, default=None, help="device processes (default: CPUs)")
    args = p.parse_args()
    coap_client()
    work = Path(tempfile.mkdtemp(prefix="fota-bench-fleet-"))
    rows = []
    try:
        for devices in (int(x) for x in args.devices.split(",")):
            for window in (int(x) for x in args.windows.split(",")):
                print(f"{devices} devices, window {window}", file=sys.stderr, flush=True)
                rows.append(
                    asyncio.run(
                        run_one(devices, window, args.rounds, args.size, args.workers, work)
                    )
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, args.rounds, args.size))


if __name__ == "__main__":
    main()
