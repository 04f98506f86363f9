"""OSCORE's cost: `fota fetch` plain, `fota fetch --oscore`, and `coap-client-notls`, in turn.

    .venv/bin/python bench/oscore.py [--sizes 1,10] [--rounds 3] [--window 16]

Two fota test servers (`fota server`, one plain, one `--oscore`), pinned to CPU 0; the clients
on CPU 1. Each round runs fota plain (the raw windowed fetcher), fota over OSCORE (aiocoap's
OSCORE, `window` CON requests at a time) and coap-client-notls against the plain server
(libcoap 4.3.1 has no OSCORE, so it is the plain baseline). Medians of wall and CPU time from
GNU time, with ratios against coap-client. Not a test: numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import MiB, Run, file_sha256, free_port, measure, pinned, start_fota_server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,10", help="MiB, comma separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=16)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fota-bench-oscore-"))
    plain_port, secured_port = free_port(), free_port()
    plain = start_fota_server(plain_port, work / "plain")
    secured = start_fota_server(secured_port, work / "secured", "--oscore", f"bench={work / 'ctx'}")
    plain_uri = f"coap://127.0.0.1:{plain_port}"
    secured_uri = f"coap://127.0.0.1:{secured_port}"
    fota = str(Path(sys.executable).parent / "fota")
    rows: list[tuple[int, list[Run], list[Run], list[Run]]] = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            image = work / f"img{size}"
            image.write_bytes(os.urandom(size * MiB))
            sha = hashlib.sha256(image.read_bytes()).hexdigest()
            for root in (work / "plain", work / "secured"):
                shutil.copyfile(image, root / "srv" / "img" / sha)

            def fetch(uri: str, *extra: str, sha: str = sha) -> list[str]:
                return pinned(
                    1,
                    [
                        fota, "--log-level", "warning", "fetch", f"{uri}/fota/img/{sha}",
                        "--out", str(work / "a.bin"), "--sha256", sha,
                        "--window", str(args.window), "--restart", *extra,
                    ],
                )  # fmt: skip

            coap = pinned(
                1,
                [
                    "coap-client-notls", "-b", "1024", "-B", "300",
                    "-o", str(work / "b.bin"), f"{plain_uri}/fota/img/{sha}",
                ],
            )  # fmt: skip
            a, s, b = [], [], []
            for _ in range(args.rounds):
                a.append(measure(fetch(plain_uri), work / "a.bin"))
                s.append(measure(fetch(secured_uri, "--oscore", str(work / "ctx")), work / "a.bin"))
                b.append(measure(coap, work / "b.bin"))
                assert file_sha256(work / "b.bin") == sha, "coap-client fetched other bytes"
            rows.append((size, a, s, b))
            print(f"{size} MiB done", file=sys.stderr)
    finally:
        for proc in (plain, secured):
            proc.terminate()
            proc.wait()
    med = statistics.median
    print(f"window {args.window}, {args.rounds} rounds, medians (ratios against coap-client)")
    print()
    print(
        "| image | fota plain | fota OSCORE | coap-client (plain) | plain ratio | OSCORE ratio "
        "| OSCORE / plain | fota plain CPU | fota OSCORE CPU | coap-client CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, a, s, b in rows:
        aw, sw, bw = (med(r.wall for r in x) for x in (a, s, b))
        ac, sc, bc = (med(r.cpu for r in x) for x in (a, s, b))
        print(
            f"| {size} MiB | {aw:.3f} s | {sw:.3f} s | {bw:.3f} s | {aw / bw:.2f}x "
            f"| {sw / bw:.2f}x | {sw / aw:.1f}x | {ac:.3f} s | {sc:.3f} s | {bc:.3f} s |"
        )


if __name__ == "__main__":
    main()
