"""Downloads over a lossy link: `fota fetch` against `coap-client-notls`, through one proxy.

    .venv/bin/python bench/lossy.py [--sizes 1,10] [--losses 0,1,5,10] [--rounds 1] [--cap 60]
                                    [--fota-args "--retransmission rfc7252 --congestion fixed"]

libcoap's `coap-server-notls` holds the image (PUT into a `-d` dynamic resource); between it
and each client runs `bench/lossproxy.py`, dropping that share of datagrams both ways, seeded
(the same seed for both tools in a round, a new one per round). The server is pinned to CPU 0,
the proxy and the clients to CPU 1. coap-client gets `-B CAP` seconds and is reported as
"> CAP" when it does not finish; fota gets the same cap as a timeout. Every finished download's
SHA-256 is checked. Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import MiB, file_sha256, free_port, pinned, put_libcoap, start_libcoap

HERE = Path(__file__).resolve().parent


def start_proxy(upstream: int, loss: float, seed: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        pinned(
            1,
            [
                sys.executable,
                str(HERE / "lossproxy.py"),
                "--upstream",
                f"127.0.0.1:{upstream}",
                "--loss",
                str(loss),
                "--seed",
                str(seed),
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(json.loads(proc.stdout.readline())["port"])
    return proc, port


def stop_proxy(proc: subprocess.Popen[str]) -> dict[str, int]:
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    lines = [line for line in err.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def timed(argv: list[str], out: Path, sha: str, cap: float) -> float | None:
    """Seconds to a verified download, or None when it did not finish within ``cap``."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=cap + 5, check=False)
    except subprocess.TimeoutExpired:
        return None
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists() or file_sha256(out) != sha or wall > cap:
        return None
    return wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,10", help="MiB, comma separated")
    p.add_argument("--losses", default="0,1,5,10", help="percent, comma separated")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cap", type=float, default=60.0, help="seconds a download may take")
    p.add_argument("--fota-args", default="", help="extra `fota fetch` options")
    p.add_argument("--skip-coap-client", action="store_true")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip fota with RFC 7252 timing and a fixed window (the behaviour before CoCoA)",
    )
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fota-bench-lossy-"))
    port = free_port()
    server = start_libcoap(port)
    fota = str(Path(sys.executable).parent / "fota")
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            image = work / f"img{size}"
            image.write_bytes(os.urandom(size * MiB))
            sha = hashlib.sha256(image.read_bytes()).hexdigest()
            put_libcoap(port, f"img{size}", image)
            for loss in (float(x) for x in args.losses.split(",")):
                a: list[float | None] = []
                base: list[float | None] = []
                b: list[float | None] = []
                dropped = 0
                for round_ in range(args.rounds):
                    seed = 1000 * round_ + int(loss * 10) + size
                    proxy, pport = start_proxy(port, loss, seed)
                    uri = f"coap://127.0.0.1:{pport}/img{size}"
                    fota_argv = pinned(
                        1,
                        [
                            fota, "--log-level", "warning", "fetch", uri,
                            "--out", str(work / "a.bin"), "--sha256", sha, "--restart",
                            *shlex.split(args.fota_args),
                        ],
                    )  # fmt: skip
                    a.append(timed(fota_argv, work / "a.bin", sha, args.cap))
                    dropped += stop_proxy(proxy).get("dropped", 0)
                    if not args.no_baseline:
                        proxy, pport = start_proxy(port, loss, seed)
                        old = [
                            *fota_argv[: fota_argv.index(uri)],
                            f"coap://127.0.0.1:{pport}/img{size}",
                            *fota_argv[fota_argv.index(uri) + 1 :],
                            "--retransmission", "rfc7252", "--congestion", "fixed",
                        ]  # fmt: skip
                        base.append(timed(old, work / "a.bin", sha, args.cap))
                        stop_proxy(proxy)
                    if args.skip_coap_client:
                        continue
                    proxy, pport = start_proxy(port, loss, seed)
                    uri = f"coap://127.0.0.1:{pport}/img{size}"
                    coap_argv = pinned(
                        1,
                        [
                            "coap-client-notls", "-b", "1024", "-B", str(int(args.cap)),
                            "-o", str(work / "b.bin"), uri,
                        ],
                    )  # fmt: skip
                    b.append(timed(coap_argv, work / "b.bin", sha, args.cap))
                    stop_proxy(proxy)
                rows.append((size, loss, a, base, b, dropped))
                print(f"{size} MiB at {loss:g} % done", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()

    def show(runs: list[float | None]) -> str:
        done = [r for r in runs if r is not None]
        if not runs:
            return "-"
        if len(done) < len(runs):
            return f"> {args.cap:g} s ({len(done)}/{len(runs)} done)"
        return f"{statistics.median(done):.2f} s"

    print(f"cap {args.cap:g} s, {args.rounds} round(s), fota options: {args.fota_args or '-'}")
    print()
    print(
        "| image | loss | fota (CoCoA, AIMD) | fota (RFC 7252, fixed window) | coap-client "
        "| coap-client / fota | datagrams dropped (fota) |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, loss, a, base, b, dropped in rows:
        ratio = "-"
        done_a = [r for r in a if r is not None]
        done_b = [r for r in b if r is not None]
        if done_a and b:
            if len(done_b) == len(b):
                ratio = f"{statistics.median(done_b) / statistics.median(done_a):.1f}x"
            else:
                ratio = f"> {args.cap / statistics.median(done_a):.0f}x"
        print(
            f"| {size} MiB | {loss:g} % | {show(a)} | {show(base)} | {show(b)} | {ratio} "
            f"| {dropped // max(1, args.rounds)} |"
        )


if __name__ == "__main__":
    main()
