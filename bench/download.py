"""Download benchmark: `fota fetch` against libcoap's `coap-client-notls`, in turn, same server.

    .venv/bin/python bench/download.py [--sizes 1,10,50] [--rounds 5] [--server libcoap|fota]

Each round runs A (fota) then B (coap-client) on the same image from the same server
(libcoap's `coap-server-notls -d`, the image PUT into it; or fota's own test server), the
server pinned to CPU 0 and the clients to CPU 1. Per run it records wall time, CPU seconds,
peak RSS and bytes written to storage, all from `wait4()`'s rusage of the child (Linux fills
ru_oublock from the task's write_bytes, in 512-byte units), and prints a Markdown table of
medians with fota/coap-client ratios. Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@dataclass
class Run:
    wall: float
    cpu: float
    rss_mib: float
    written_mib: float


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    if taskset and (os.cpu_count() or 1) > 1:
        return [taskset, "-c", str(cpu), *argv]
    return argv


def measure(argv: list[str], out: Path) -> Run:
    """Run ``argv`` under GNU time and return what it measured of that command alone.

    Not ``wait4`` from here: Linux starts a forked child's peak-RSS count at its parent's (the
    mm is copied, high-water mark included), so a child of this Python process would report at
    least our own RSS. GNU time is small; its child's numbers are the command's own.
    """
    out.unlink(missing_ok=True)
    gnu_time = shutil.which("time") or "/usr/bin/time"
    if not Path(gnu_time).exists():
        raise SystemExit("GNU time is missing: apt-get install time")
    start = time.perf_counter()
    proc = subprocess.run(
        [gnu_time, "-f", "FOTA-BENCH %U %S %M %O", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    wall = time.perf_counter() - start
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {err}")
    line = next(x for x in err.splitlines() if x.startswith("FOTA-BENCH "))
    user, system, max_kib, outputs = line.split()[1:]
    return Run(
        wall=wall,
        cpu=float(user) + float(system),
        rss_mib=int(max_kib) / 1024,
        written_mib=int(outputs) * 512 / MiB,
    )


def wait_ready(uri: str) -> None:
    client = shutil.which("coap-client-notls")
    assert client
    for _ in range(100):
        if (
            subprocess.run([client, "-B", "1", uri], capture_output=True, check=False).returncode
            == 0
        ):
            return
        time.sleep(0.05)  # polling a server that cannot say it is ready; bench only
    raise SystemExit(f"server at {uri} did not answer")


def start_libcoap(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("coap-server-notls")
    if not server:
        raise SystemExit("coap-server-notls missing: apt-get install libcoap3-bin")
    proc = subprocess.Popen(
        pinned(0, [server, "-A", "127.0.0.1", "-p", str(port), "-d", "10"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"coap://127.0.0.1:{port}/.well-known/core")
    return proc


def put_libcoap(port: int, name: str, image: Path) -> str:
    uri = f"coap://127.0.0.1:{port}/{name}"
    subprocess.run(
        ["coap-client-notls", "-m", "put", "-b", "1024", "-B", "300", "-f", str(image), uri],
        check=True,
        capture_output=True,
    )
    return uri


def start_fota_server(port: int, root: Path, *extra: str) -> subprocess.Popen[bytes]:
    """fota's test server on ``port``, serving ``root/srv`` (``extra``: more options)."""
    key = root / "bench.key"
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "fota", "manifest", "keygen", "--out", str(key)],
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        pinned(
            0,
            [
                sys.executable,
                "-m",
                "fota",
                "--log-level",
                "warning",
                "server",
                "--root",
                str(root / "srv"),
                "--key",
                str(key),
                "--port",
                str(port),
                *extra,
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # {"uri": ...}: bound and serving
    return proc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,10,50", help="MiB, comma separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--server", choices=["libcoap", "fota"], default="libcoap")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--fsync-every", type=int, default=1)
    p.add_argument(
        "--transport",
        choices=["udp", "tcp"],
        default="udp",
        help="tcp: coap+tcp:// with BERT for both tools (libcoap server only)",
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fota-bench-"))
    port = free_port()
    server = start_libcoap(port) if args.server == "libcoap" else start_fota_server(port, work)
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            image = work / f"img{size}"
            digest_of = hashlib.sha256()
            with open(image, "wb") as f:
                for _ in range(size):
                    chunk = os.urandom(MiB)
                    digest_of.update(chunk)
                    f.write(chunk)
            sha = digest_of.hexdigest()
            if args.server == "libcoap":
                uri = put_libcoap(port, f"img{size}", image)
                if args.transport == "tcp":
                    uri = uri.replace("coap://", "coap+tcp://")
            else:
                digest = bytes.fromhex(sha)
                dest = work / "srv" / "img" / digest.hex()
                shutil.copyfile(image, dest)
                uri = f"coap://127.0.0.1:{port}/fota/img/{digest.hex()}"
            fota_argv = pinned(
                1,
                [
                    str(Path(sys.executable).parent / "fota"),
                    "--log-level",
                    "warning",
                    "fetch",
                    uri,
                    "--out",
                    str(work / "a.bin"),
                    "--sha256",
                    sha,
                    "--window",
                    str(args.window),
                    "--fsync-every",
                    str(args.fsync_every),
                    "--restart",
                ],
            )
            # Over TCP, coap-client uses BERT unless -b says otherwise.
            block = ["-b", "1024"] if args.transport == "udp" else []
            coap_argv = pinned(
                1,
                [
                    "coap-client-notls",
                    *block,
                    "-B",
                    "300",
                    "-o",
                    str(work / "b.bin"),
                    uri,
                ],
            )
            a_runs, b_runs = [], []
            for _ in range(args.rounds):
                a_runs.append(measure(fota_argv, work / "a.bin"))
                b_runs.append(measure(coap_argv, work / "b.bin"))
                assert file_sha256(work / "b.bin") == sha, "coap-client fetched other bytes"
            rows.append((size, a_runs, b_runs))
            print(f"{size} MiB done", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    med = statistics.median
    print(
        f"server: {args.server} ({args.transport}), window {args.window}, "
        f"fsync every {args.fsync_every} "
        f"fragment(s), {args.rounds} rounds A/B, medians"
    )
    print()
    print(
        "| image | fota wall | coap-client wall | ratio | fota CPU | coap-client CPU | CPU ratio "
        "| fota peak RSS | coap-client peak RSS | fota written | write ampl. |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, a, b in rows:
        aw, bw = med(r.wall for r in a), med(r.wall for r in b)
        ac, bc = med(r.cpu for r in a), med(r.cpu for r in b)
        aws = med(r.written_mib for r in a)
        print(
            f"| {size} MiB | {aw:.3f} s | {bw:.3f} s | {aw / bw:.2f}x | {ac:.3f} s | {bc:.3f} s "
            f"| {ac / max(bc, 0.01):.2f}x | {med(r.rss_mib for r in a):.1f} MiB "
            f"| {med(r.rss_mib for r in b):.1f} MiB | {aws:.2f} MiB | {aws / size:.3f} |"
        )


if __name__ == "__main__":
    main()
