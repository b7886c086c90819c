"""``python -m benchmarks [--quick] [--only NAME ...]``: run the suite, print one table."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

from ._harness import Result

SUITES = [
    "engine",
    "langchain",
    "llamaindex",
    "memory",
    "peers",
    "outage",
    "redis_store",
    "redis_fleet",
    "instructions",
]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few loops: a smoke run")
    parser.add_argument("--only", nargs="*", choices=SUITES, help="suites to run")
    args = parser.parse_args(argv)
    results: list[Result] = []
    started = time.perf_counter()
    for name in args.only or SUITES:
        module = importlib.import_module(f"benchmarks.{name}")
        results.extend(module.run(quick=args.quick))
    header = ("figure", "min", "median", "max", "target", "met", "absolute (median)")
    rows = [header, *(r.row for r in results)]
    print(
        f"machine: {_machine()}; {time.strftime('%Y-%m-%d')}; "
        f"{'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
