"""
``make soak``: the reliability scenarios of bench/soak/scenario_*.py, one
after the other, each against real processes on loopback, and their
figures appended to bench/RELIABILITY.md as one table (date, commit, each
scenario's figures, its target, met or not). At most 15 minutes on a
2-core machine; every phase of every scenario is bounded in time and count.

    make soak                              # every scenario
    make soak SCENARIOS="sigterm flapping" # some (by module name, without scenario_)
    make soak QUICK=1                      # shortened phases: a try-out, figures not comparable, not appended

Exit status 1 when a scenario missed its target or failed to run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, Result, Soak  # noqa: E402

RESULTS = ROOT / "bench" / "RELIABILITY.md"
ORDER = ["idle", "slow_readers", "sigterm", "redis_outage", "kill9_durable", "flapping", "hostile", "sentinel"]


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help=f"default: all, in this order: {' '.join(ORDER)}")
    ap.add_argument("--quick", action="store_true", help="shortened phases; nothing appended to RELIABILITY.md")
    args = ap.parse_args()
    names = args.scenarios or ORDER
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}: choose from {ORDER}")
    started = time.monotonic()
    rows: list[tuple[str, str, Result | None, float]] = []
    for i, name in enumerate(names, 1):
        module = importlib.import_module(f"scenario_{name}")
        print(f"# [{i}/{len(names)}] {module.NAME} ({time.monotonic() - started:.0f} s so far) ...", file=sys.stderr,
              flush=True)
        t0 = time.monotonic()
        try:
            with Soak(name) as soak:
                result: Result | None = module.run(soak, args.quick)
        except Exception:
            traceback.print_exc()
            result = None
        took = time.monotonic() - t0
        rows.append((module.NAME, module.TARGET, result, took))
        if result is not None:  # every number behind the row, for whoever wants more than the table
            print(json.dumps({"scenario": name, "passed": result.passed, "seconds": round(took, 1),
                              **result.raw}, default=str), flush=True)
        status = "no figure (it failed to run)" if result is None else ("met" if result.passed else "NOT MET")
        print(f"#     {status} in {took:.0f} s: {json.dumps(result.figures if result else {})}", file=sys.stderr,
              flush=True)
    total = time.monotonic() - started
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {when}, commit {commit()}{' (QUICK: not comparable)' if args.quick else ''}\n",
        f"`make soak`, {os.cpu_count()} cores, {total / 60:.1f} min in all.\n",
        "| scenario | figures | target | verdict | time |",
        "|---|---|---|---|---|",
    ]
    for name, target, result, took in rows:
        if result is None:
            lines.append(f"| {name} | - | {target} | **failed to run** | {took:.0f} s |")
            continue
        figures = "; ".join(f"{k}: {v}" for k, v in result.figures.items())
        if result.notes:
            figures += f" ({result.notes})"
        lines.append(f"| {name} | {figures} | {target} | {'met' if result.passed else '**not met**'} | {took:.0f} s |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.quick:
        with RESULTS.open("a") as f:
            f.write(table)
        print(f"# appended to {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    if any(r is None or not r.passed for _, _, r, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
