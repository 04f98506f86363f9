"""Fuzz run: the properties of tests/fuzz_strategies.py with 100 000 cases and more.

    nice .venv/bin/python bench/fuzz.py [--cases 100000] [--seed 1] [--only a,b]
                                        [--target NAME=COUNT ...] [--json FILE]

The same targets and checks as the seeded CI set (tests/integration/test_fuzz.py), but
random, seeded per run (``--seed``; target i runs with seed + i, so a run is reproducible),
and many more cases:
``--cases`` is split over the targets by their weight (the slow ones, like the loopback UDP
fetcher, get a smaller share), and ``--target NAME=COUNT`` sets one target's count. Each case
must return a valid value or raise a typed ``fota.errors.FotaError``; a failure is shrunk and
reported (hypothesis' falsifying example), and the run goes on with the next target. Prints a
Markdown table of cases, seconds and failures per target; exits 1 if anything failed. Not a
test: numbers go to the docs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests import fuzz_strategies as fs  # noqa: E402


@dataclass
class Result:
    name: str
    asked: int
    cases: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def counts(total: int, overrides: dict[str, int], only: set[str] | None) -> dict[str, int]:
    chosen = [t for t in fs.TARGETS if only is None or t.name in only]
    weight = sum(t.weight for t in chosen if t.name not in overrides) or 1.0
    rest = total - sum(overrides.get(t.name, 0) for t in chosen)
    return {
        t.name: overrides.get(t.name, max(1, round(max(0, rest) * t.weight / weight)))
        for t in chosen
    }


def _errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _errors(sub)]
    return [exc]


def run_target(target: fs.Target, cases: int, run_seed: int) -> Result:
    result = Result(target.name, cases)

    def case(value: Any) -> None:
        result.cases += 1
        target.check(value)

    test = seed(run_seed)(
        settings(
            max_examples=cases,
            deadline=timedelta(seconds=2),
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate, Phase.shrink],
            report_multiple_bugs=True,
            print_blob=True,
        )(given(target.strategy)(case))
    )
    start = time.perf_counter()
    try:
        test()
    except Exception as exc:
        for error in _errors(exc):
            text = "".join(traceback.format_exception_only(type(error), error)).strip()
            notes = "\n".join(getattr(error, "__notes__", []))
            result.failures.append(f"{text}\n{notes}".strip())
    result.seconds = time.perf_counter() - start
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=100_000, help="cases in total (default 100000)")
    p.add_argument("--seed", type=int, default=1, help="target i runs with seed + i")
    p.add_argument("--only", default="", help="comma-separated target names")
    p.add_argument("--target", action="append", default=[], metavar="NAME=COUNT")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    # The code under test logs every refusal (announcement_unusable, server_busy, ...): at
    # 100 000 cases that is the run's whole cost. Only the results are printed.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.disable(logging.CRITICAL)

    names = {t.name for t in fs.TARGETS}
    only = {n for n in args.only.split(",") if n} or None
    overrides = {}
    for item in args.target:
        name, _, count = item.partition("=")
        if name not in names or not count.isdigit():
            p.error(f"--target {item}: expected NAME=COUNT with NAME one of {sorted(names)}")
        overrides[name] = int(count)
    if only and only - names:
        p.error(f"--only: unknown {sorted(only - names)}; known: {sorted(names)}")
    plan = counts(args.cases, overrides, only)

    print(f"fuzz run: seed {args.seed}, {sum(plan.values())} cases asked, pid {os.getpid()}")
    results = []
    for index, target in enumerate(fs.TARGETS):
        if target.name not in plan:
            continue
        result = run_target(target, plan[target.name], args.seed + index)
        results.append(result)
        print(
            f"  {result.name}: {result.cases} cases in {result.seconds:.1f} s,"
            f" {len(result.failures)} failures",
            flush=True,
        )

    print()
    print("| target | cases | seconds | cases/s | failures |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        rate = r.cases / r.seconds if r.seconds else 0.0
        print(f"| {r.name} | {r.cases} | {r.seconds:.1f} | {rate:.0f} | {len(r.failures)} |")
    cases = sum(r.cases for r in results)
    seconds = sum(r.seconds for r in results)
    failed = sum(len(r.failures) for r in results)
    print(f"| **total** | {cases} | {seconds:.1f} | {cases / seconds:.0f} | {failed} |")
    for r in results:
        for failure in r.failures:
            print(f"\n### {r.name}\n\n```\n{failure}\n```")
    if args.json:
        args.json.write_text(
            json.dumps({"seed": args.seed, "results": [asdict(r) for r in results]}, indent=2)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
