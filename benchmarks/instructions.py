"""Figures 2, 3 and 4 again, counted in instructions: the same calls through the wrappers
and bare, run under ``valgrind --tool=callgrind``.

Figure 4's storm of 10,000 concurrent ``ainvoke`` is counted the same way (one event
loop, so one thread), the garbage collector's work included; its 16 threads too (valgrind
runs one thread at a time, so this counts the work the threads do, not how they contend
for the GIL: the wall-clock figure shows that; how often they hand the GIL over depends on
timing, so that count alone varies a little between runs).

Wall-clock ratios on a shared machine move with the neighbours (a 1.10 target against a
+-20 % spread); an instruction count does not: the same binary, inputs and hash seed give
the same count whatever else the machine is doing. The suite checks this every run: it
counts each framework's bare call in two processes and prints how far apart they came
(a LangChain invoke: a few instructions; a LlamaIndex chat: ~3,000 of ~880,000, because
importing llama_index varies by ~3 million instructions, spread over 1,000 calls).

Each variant runs in its own process: every process imports its framework, builds every
model and warms each up with the same calls, then calls one of them ``N`` times; a
process that makes no timed call gives the baseline, so ``(count(N) - count(0)) / N`` is
the instructions of one call. Callgrind runs Python about 50 times slower, so this suite
takes ~14 minutes, the processes two at a time; it is left out of ``--quick`` and says so
when valgrind is missing.
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

THREADS = 16

# Run in a fresh interpreter: imports and builds everything of its framework and warms
# every path up (so every process pays the same set-up, the baseline's included), then
# makes CALLS calls of the variant named on the command line. The LangChain and
# LlamaIndex variants run in separate programs: importing llama_index alone varies by a
# few million instructions from one process to the next (langchain_core's import by ~20),
# which in a shared set-up would blur every baseline.
_PROGRAM = """
import asyncio
import gc
import sys

from langchain_core.language_models import FakeListChatModel

from benchmarks._fakes import AsyncEchoChatModel
from benchmarks._harness import ThreadGang
from langchain_breaker import CircuitBreakerChatModel

variant, calls, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bare = FakeListChatModel(responses=["ok"])
fallback = FakeListChatModel(responses=["fallback"])
breaker = CircuitBreakerChatModel(inner=bare)
breaker_fallback = CircuitBreakerChatModel(inner=bare, fallback=fallback, fallback_key="fb::fake")
echo = AsyncEchoChatModel()
echo_breaker = CircuitBreakerChatModel(inner=echo)
single = {
    "bare": lambda: bare.invoke("hi"),
    "breaker": lambda: breaker.invoke("hi"),
    "breaker_fallback": lambda: breaker_fallback.invoke("hi"),
}
storms = {"storm_bare": echo, "storm_breaker": echo_breaker}
threaded = {"threads_bare": single["bare"], "threads_breaker": single["breaker"]}


async def storm(model, count):
    await asyncio.gather(*(model.ainvoke("hi") for _ in range(count)))


for _ in range(50):  # warm-up: every path, in every process
    for call in single.values():
        call()
for model in storms.values():
    asyncio.run(storm(model, 50))
# The set-up's objects (the same in every process) out of the collector's sight: it then
# walks only what the calls keep alive, which is what differs between variants.
gc.collect()
gc.freeze()
if variant in single:
    call = single[variant]
    for _ in range(calls):
        call()
elif variant in storms:
    if calls:
        asyncio.run(storm(storms[variant], calls))
else:
    # Threads only here: how often 16 threads hand the GIL over depends on timing, so
    # their counts vary a little from run to run (and would blur every other variant's
    # baseline). CALLS calls in all, spread over the threads; their own baseline is a run
    # of this branch with CALLS = 0.
    with ThreadGang(threads) as gang:
        for call in threaded.values():
            gang.run(call, 2)
        if calls:
            gang.run(threaded[variant], calls // threads)
"""

_LLAMAINDEX_PROGRAM = """
import gc
import sys

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.llms import MockLLM

from llamaindex_breaker import CircuitBreakerLLM

variant, calls = sys.argv[1], int(sys.argv[2])
mock = MockLLM()
wrapper = CircuitBreakerLLM(inner=mock, fallback=MockLLM(), fallback_key="fb::mock")
messages = [ChatMessage(role="user", content="hi")]
single = {"li_bare": lambda: mock.chat(messages), "li_wrapper": lambda: wrapper.chat(messages)}
for _ in range(50):
    for call in single.values():
        call()
gc.collect()
gc.freeze()
call = single[variant]
for _ in range(calls):
    call()
"""

# Streams (issue 13's figures): time to the first chunk, and a 1,000-chunk stream, bare
# and through a wrapper with a fallback (healthy: the guard, not the fallback, runs).
_STREAM_PROGRAM = """
import gc
import sys
import time

from langchain_core.language_models import FakeListChatModel

from benchmarks._fakes import ChunkyChatModel
from langchain_breaker import CircuitBreakerChatModel

variant, calls = sys.argv[1], int(sys.argv[2])
timed = len(sys.argv) > 4 and sys.argv[4] == "time"
bare = ChunkyChatModel()
wrapper = CircuitBreakerChatModel(
    inner=bare, fallback=FakeListChatModel(responses=["fb"]), fallback_key="fb::fake"
)


def first(model):
    stream = model.stream("hi")
    next(stream)
    stream.close()


def whole(model):
    for _chunk in model.stream("hi"):
        pass


single = {
    "first_bare": lambda: first(bare),
    "first_breaker": lambda: first(wrapper),
    "whole_bare": lambda: whole(bare),
    "whole_breaker": lambda: whole(wrapper),
}
for _ in range(5):
    for call in single.values():
        call()
gc.collect()
gc.freeze()
call = single[variant]
started = time.perf_counter()
for _ in range(calls):
    call()
if timed:
    print((time.perf_counter() - started) / calls * 1e6)
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
                _program(variant),
                variant,
                str(calls),
                str(THREADS),
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


def _program(variant: str) -> str:
    if variant.startswith("li_"):
        return _LLAMAINDEX_PROGRAM
    if variant.startswith(("first_", "whole_", "stream_")):
        return _STREAM_PROGRAM
    return _PROGRAM


def _wall_us(variant: str, calls: int) -> float:
    """Microseconds a call of ``variant`` takes, outside valgrind: the fastest of 5 runs
    (the least disturbed by other work on the machine; a loaded machine still inflates it,
    and so the microseconds of the instructions converted at its rate)."""
    runs = []
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-c", _program(variant), variant, str(calls), "0", "time"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        runs.append(float(done.stdout.strip().splitlines()[-1]))
    return min(runs)


def stream_figures() -> list[Result]:
    """Issue 13's stream figures: a 1,000-chunk stream of a fake model through the wrapper
    (breaker+fallback, healthy) / bare, and the time to the first chunk it adds: its
    added instructions, as microseconds at the bare call's own speed (measured outside
    valgrind), so a figure of the count, not of the machine's load."""
    first_calls, whole_calls = 200, 10
    jobs = {
        "stream_zero": ("first_bare", 0),
        "first_bare": ("first_bare", first_calls),
        "first_breaker": ("first_breaker", first_calls),
        "whole_bare": ("whole_bare", whole_calls),
        "whole_breaker": ("whole_breaker", whole_calls),
    }
    with ThreadPoolExecutor(2) as pool:
        counts = dict(
            zip(jobs, pool.map(lambda job: _instructions(*job), jobs.values()), strict=True)
        )
    per_call = {
        name: (counts[name] - counts["stream_zero"]) / made
        for name, (_, made) in jobs.items()
        if made
    }
    whole = per_call["whole_breaker"] / per_call["whole_bare"]
    added = per_call["first_breaker"] - per_call["first_bare"]
    bare_us = _wall_us("first_bare", 2_000)
    added_us = added / per_call["first_bare"] * bare_us
    return [
        Result(
            "instructions: stream, 1,000 chunks, breaker+fallback, healthy / bare",
            [whole],
            "<= 1.02",
            whole <= 1.02,
            f"callgrind: {per_call['whole_breaker']:,.0f} vs {per_call['whole_bare']:,.0f} "
            "instructions a stream",
        ),
        Result(
            "instructions: stream, time to first chunk, breaker+fallback: added us",
            [added_us],
            "<= 20 us",
            added_us <= 20,
            f"callgrind: +{added:,.0f} instructions on {per_call['first_bare']:,.0f} "
            f"(bare first chunk {bare_us:.0f} us, stream closed after it)",
        ),
    ]


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
    # LlamaIndex: 1,000 calls, so its import's variation is ~3,000 instructions a call.
    calls, li_calls, tasks, threaded = 200, 1_000, 10_000, THREADS * 100
    jobs = {
        "zero": ("bare", 0),
        "li_zero": ("li_bare", 0),
        "threads_zero": ("threads_bare", 0),
        "bare": ("bare", calls),
        "bare_again": ("bare", calls),  # the same process twice: is the count repeatable?
        "breaker": ("breaker", calls),
        "breaker_fallback": ("breaker_fallback", calls),
        "li_bare": ("li_bare", li_calls),
        "li_bare_again": ("li_bare", li_calls),
        "li_wrapper": ("li_wrapper", li_calls),
        "storm_bare": ("storm_bare", tasks),
        "storm_breaker": ("storm_breaker", tasks),
        "threads_bare": ("threads_bare", threaded),
        "threads_breaker": ("threads_breaker", threaded),
    }
    with ThreadPoolExecutor(2) as pool:  # two valgrinds at a time: the machine's cores
        counts = dict(
            zip(jobs, pool.map(lambda job: _instructions(*job), jobs.values()), strict=True)
        )

    def baseline(name: str) -> int:
        family = name.split("_", maxsplit=1)[0]
        return counts[f"{family}_zero"] if family in ("li", "threads") else counts["zero"]

    per_call = {
        name: (counts[name] - baseline(name)) / made for name, (_, made) in jobs.items() if made
    }

    def row(label: str, name: str, baseline: str, how: str) -> Result:
        ratio = per_call[name] / per_call[baseline]
        return Result(
            f"instructions: {label}",
            [ratio],
            "<= 1.10",
            ratio <= 1.10,
            f"callgrind{how}: {per_call[name]:,.0f} vs {per_call[baseline]:,.0f} "
            "instructions a call",
        )

    def again(label: str, name: str) -> Result:
        drift = abs(per_call[f"{name}_again"] - per_call[name])
        return Result(
            f"instructions: {label} counted again in a second process / the first",
            [per_call[f"{name}_again"] / per_call[name]],
            "-",
            True,
            f"repeatability: {drift:,.0f} instructions a call apart",
            info=True,
        )

    return [
        *stream_figures(),
        again("bare FakeListChatModel.invoke", "bare"),
        again("bare MockLLM.chat", "li_bare"),
        row("invoke, breaker, healthy / bare FakeListChatModel.invoke", "breaker", "bare", ""),
        row(
            "invoke, breaker+fallback, healthy / bare FakeListChatModel.invoke",
            "breaker_fallback",
            "bare",
            "",
        ),
        row("chat, breaker+fallback, healthy / bare MockLLM.chat", "li_wrapper", "li_bare", ""),
        row(
            f"{tasks:,} concurrent ainvoke, one loop / without the wrapper",
            "storm_breaker",
            "storm_bare",
            ", collector included",
        ),
        row(
            f"{THREADS} threads x {threaded // THREADS} invoke / without the wrapper",
            "threads_breaker",
            "threads_bare",
            " (the threads' work, not their contention; GIL hand-overs vary a little)",
        ),
    ]
