"""The benchmark suite starts and prints its table (figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_benchmark_prints_a_ratio_row() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "engine"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: a target missed on a noisy machine
    row = next(line for line in done.stdout.splitlines() if line.startswith("| engine:"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    low, median, high = (float(cell) for cell in cells[1:4])
    assert 0 < low <= median <= high


def test_the_instruction_count_program_runs_each_variant() -> None:
    # What callgrind runs in the full suite, run here without valgrind (a broken program
    # would otherwise only show minutes into a full benchmark run).
    from benchmarks.instructions import _PROGRAM

    for variant in ("bare", "breaker", "breaker_fallback", "storm_bare", "storm_breaker"):
        done = subprocess.run(
            [sys.executable, "-c", _PROGRAM, variant, "3"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
