"""Long runs of the power-loss harness (see docs/powerloss.md)::

    python -m tests.store.powerloss --crash-points 2000 --seed 7
    python -m tests.store.powerloss --scenarios churn --crash-points 500 --keep-failed /tmp/pl

Each scenario is recorded ``crash-points / per-run`` times (seeds ``seed``,
``seed + 1``, ...), and each recording is checked at ``per-run`` crash
points in every mode. Exits 1 if any image breaks an invariant.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from tests.store.powerloss.harness import check_points, choose_points, record, scratch_root
from tests.store.powerloss.workload import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.store.powerloss", description=__doc__)
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)",
    )
    ap.add_argument("--crash-points", type=int, default=200, help="per scenario and mode")
    ap.add_argument("--per-run", type=int, default=100, help="crash points per recorded run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="strict,torn", help="strict, torn or both")
    ap.add_argument("--keep-failed", type=Path, help="copy failing images here")
    ap.add_argument("--verbose", action="store_true", help="broker logs too")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    if args.keep_failed is not None:
        args.keep_failed.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    failed = 0
    started = time.monotonic()
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        if scenario not in SCENARIOS:
            print(f"unknown scenario {scenario!r}", file=sys.stderr)
            return 2
        checked = bad = runs = ops = 0
        t0 = time.monotonic()
        seed = args.seed
        while checked < args.crash_points * len(modes):
            with tempfile.TemporaryDirectory(prefix="powerloss-", dir=scratch_root()) as td:
                run = record(scenario, seed, Path(td))
                runs += 1
                ops += len(run.recorder.ops)
                want = min(args.per_run, args.crash_points - checked // len(modes))
                points = choose_points(run, want, random.Random(seed))
                for mode in modes:
                    for result in check_points(
                        run, points, mode == "torn", Path(td), seed, args.keep_failed
                    ):
                        checked += 1
                        if result.problems:
                            bad += 1
                            print(result, flush=True)
            seed += 1
        failed += bad
        print(
            f"{scenario}: {runs} runs ({ops} ops recorded), {checked} crash images checked "
            f"({', '.join(modes)}), {bad} failed, {time.monotonic() - t0:.0f}s",
            flush=True,
        )
    print(f"total {time.monotonic() - started:.0f}s, {failed} failing images")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
