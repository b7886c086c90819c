"""The benchmark suite starts and prints its table (figures are not judged here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


# Thirteen processes, each importing LangChain or LlamaIndex: on a loaded 2-core machine
# that alone can pass the suite's default 120 s.
@pytest.mark.timeout(600)
def test_the_instruction_count_program_runs_each_variant() -> None:
    # What callgrind runs in the full suite, run here without valgrind (a broken program
    # would otherwise only show minutes into a full benchmark run).
    from benchmarks.instructions import _LLAMAINDEX_PROGRAM, _PROGRAM, _STREAM_PROGRAM, THREADS

    runs = [(_PROGRAM, variant) for variant in ("bare", "breaker", "breaker_fallback")]
    runs += [(_PROGRAM, variant) for variant in ("storm_bare", "storm_breaker")]
    runs += [(_PROGRAM, variant) for variant in ("threads_bare", "threads_breaker")]
    runs += [(_LLAMAINDEX_PROGRAM, variant) for variant in ("li_bare", "li_wrapper")]
    runs += [
        (_STREAM_PROGRAM, variant)
        for variant in ("first_bare", "first_breaker", "whole_bare", "whole_breaker")
    ]
    for program, variant in runs:
        done = subprocess.run(
            [sys.executable, "-c", program, variant, "32", str(THREADS)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr


# Four peer libraries imported, and one process per figure group: slow on a loaded machine.
@pytest.mark.timeout(600)
def test_peers_benchmark_prints_every_peer() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "peers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: a target missed on a noisy machine
    rows = [line for line in done.stdout.splitlines() if line.startswith("| peers:")]
    for peer in ("pybreaker", "circuitbreaker", "aiobreaker", "purgatory"):
        named = [row for row in rows if row.split("|")[1].strip().endswith(f"/ {peer}")]
        assert named, f"no row beside {peer}"
        for row in named:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            low, median, high = (float(cell) for cell in cells[1:4])
            assert 0 < low <= median <= high
