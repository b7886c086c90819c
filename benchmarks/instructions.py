"""Figure 2 again, counted in instructions: the same ``invoke`` through the wrapper and
bare, run under ``valgrind --tool=callgrind``.

Figure 4's storm of 10,000 concurrent ``ainvoke`` is counted the same way (one event
loop, so one thread: callgrind serializes nothing), the garbage collector's work included.

Wall-clock ratios on a shared machine move with the neighbours (a 1.10 target against a
+-10 % spread); an instruction count does not: the same binary, inputs and hash seed give
the same count whatever else the machine is doing. Each variant runs in its own process:
the models are built and warmed up with the same calls in every process, then one of them
is called ``N`` times; a process that makes no timed call gives the baseline, so
``(count(N) - count(0)) / N`` is the instructions of one call. Callgrind runs Python about
50 times slower, so this suite takes a few minutes, the processes two at a time; it is
left out of ``--quick`` and says so when valgrind is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ._harness import Result

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: builds every model (so every process pays the same set-up),
# warms each up, then calls the one named on the command line CALLS times.
_PROGRAM = """
import sys
from langchain_core.language_models import FakeListChatModel
from langchain_breaker import CircuitBreakerChatModel

variant, calls = sys.argv[1], int(sys.argv[2])
bare = FakeListChatModel(responses=["ok"])
fallback = FakeListChatModel(responses=["fallback"])
models = {
    "bare": bare,
    "breaker": CircuitBreakerChatModel(inner=bare),
    "breaker_fallback": CircuitBreakerChatModel(
        inner=bare, fallback=fallback, fallback_key="fb::fake"
    ),
}
for _ in range(50):
    for model in models.values():
        model.invoke("hi")
if variant.startswith("storm_"):
    # Figure 4's storm: CALLS concurrent ainvoke on one loop, through the wrapper or not.
    import asyncio
    import gc

    from benchmarks._fakes import AsyncEchoChatModel

    echo = AsyncEchoChatModel()
    storm_models = {"storm_bare": echo, "storm_breaker": CircuitBreakerChatModel(inner=echo)}
    model = storm_models[variant]

    async def storm(count: int) -> None:
        await asyncio.gather(*(model.ainvoke("hi") for _ in range(count)))

    asyncio.run(storm(50))  # warm-up, as the sync variants get
    gc.collect()
    if calls:
        asyncio.run(storm(calls))
else:
    model = models[variant]
    for _ in range(calls):
        model.invoke("hi")
"""

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _instructions(variant: str, calls: int) -> int:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                _PROGRAM,
                variant,
                str(calls),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # same dict layouts every run
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run {variant}/{calls} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def run(*, quick: bool) -> list[Result]:
    if quick:
        return []
    if shutil.which("valgrind") is None:
        return [
            Result(
                "instructions: valgrind not installed, figure not measured",
                [0.0],
                "-",
                True,
                "apt-get install valgrind",
                info=True,
            )
        ]
    calls, tasks = 200, 10_000
    jobs = {
        "zero": ("bare", 0),
        "bare": ("bare", calls),
        "breaker": ("breaker", calls),
        "breaker_fallback": ("breaker_fallback", calls),
        "storm_zero": ("storm_bare", 0),
        "storm_bare": ("storm_bare", tasks),
        "storm_breaker": ("storm_breaker", tasks),
    }
    with ThreadPoolExecutor(2) as pool:  # two valgrinds at a time: the machine's cores
        counts = dict(
            zip(jobs, pool.map(lambda job: _instructions(*job), jobs.values()), strict=True)
        )
    per_call = {
        name: (counts[name] - counts["zero"]) / calls
        for name in ("bare", "breaker", "breaker_fallback")
    }
    storm = {
        name: (counts[name] - counts["storm_zero"]) / tasks
        for name in ("storm_bare", "storm_breaker")
    }
    rows = []
    for name, label in (
        ("breaker", "breaker"),
        ("breaker_fallback", "breaker+fallback"),
    ):
        ratio = per_call[name] / per_call["bare"]
        rows.append(
            Result(
                f"instructions: invoke, {label}, healthy / bare FakeListChatModel.invoke",
                [ratio],
                "<= 1.10",
                ratio <= 1.10,
                f"callgrind, deterministic: {per_call[name]:,.0f} vs "
                f"{per_call['bare']:,.0f} instructions a call",
            )
        )
    ratio = storm["storm_breaker"] / storm["storm_bare"]
    rows.append(
        Result(
            f"instructions: {tasks:,} concurrent ainvoke, one loop / without the wrapper",
            [ratio],
            "<= 1.10",
            ratio <= 1.10,
            f"callgrind, deterministic, collector included: {storm['storm_breaker']:,.0f} "
            f"vs {storm['storm_bare']:,.0f} instructions a call",
        )
    )
    return rows
