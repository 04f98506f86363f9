"""Seeded chaos: hundreds of update cycles of the real daemon under mixed faults (issue 17).

Runs :class:`tests.chaos_rig.ChaosRig` (``fota daemon`` as a subprocess, the test update server
in this process) for ``--cycles`` cycles and prints a summary: cycles, faults of each kind,
daemon restarts, invariant violations by invariant, and time per cycle. Every failed cycle is
printed with its seed, number and faults so it can be looked at again. Needs root (a tmpfs for
ENOSPC) and libfaketime (Debian package ``faketime``), as the CI test does.

    sudo .venv/bin/python bench/chaos.py --seed 17 --cycles 200

Exit status 1 when an invariant was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.chaos_rig import KINDS, ChaosRig, CycleResult


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=17, help="seeds every draw (default 17)")
    parser.add_argument("--cycles", type=int, default=200, help="faulty cycles (default 200)")
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"fault kinds to draw from, comma-separated (default: all of {', '.join(KINDS)})",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the rig's files here (default: a temp dir)"
    )
    parser.add_argument("--quiet", action="store_true", help="no line per cycle")
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    kinds = tuple(k for k in args.kinds.split(",") if k)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fota-chaos-"))
    started = time.monotonic()

    def show(result: CycleResult) -> None:
        if not args.quiet or result.violations:
            mark = "FAIL" if result.violations else "ok"
            print(
                f"cycle {result.cycle:4d} {mark:4s} {result.seconds:5.1f} s "
                f"restarts {result.restarts}  {'; '.join(result.faults)}",
                flush=True,
            )

    async with ChaosRig(workdir / "rig", args.seed, kinds=kinds) as rig:
        results = await rig.run(args.cycles, show)
        hints = [rig.replay_hint(r) for r in results if r.violations]
        counts = Counter(rig.fault_counts)
        recovered = (
            sum(1 for r in rig.server.reports_for("chaos-gw") if r.get(4) == 115)
            if rig.server
            else 0
        )
    elapsed = time.monotonic() - started
    seconds = [r.seconds for r in results]
    broken: Counter[str] = Counter(v.split(":", 1)[0] for r in results for v in r.violations)
    print()
    print(f"chaos seed {args.seed}: {len(results)} cycles in {elapsed:.0f} s (work dir {workdir})")
    print("faults: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in KINDS))
    print(
        f"daemon restarts after kills: {sum(r.restarts for r in results)}; "
        f"STATE_RECOVERED reports: {recovered}"
    )
    if seconds:
        ordered = sorted(seconds)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(
            f"time per cycle: mean {statistics.mean(seconds):.2f} s, median "
            f"{statistics.median(seconds):.2f} s, p95 {p95:.2f} s, max {max(seconds):.2f} s"
        )
    failed = sum(1 for r in results if r.violations)
    print(
        f"invariant violations: {sum(broken.values())} in {failed} cycles"
        + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(broken.items())) + ")" if broken else "")
    )
    for hint in hints:
        print(hint)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the chaos bench; exit status 1 when an invariant was broken."""
    return asyncio.run(_main(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
