"""The cold paths beside the peers: an open circuit's refusal, an open circuit answered by
a fallback, memory per key, and (for context) the healthy call, on this machine.

Peers (pinned in the ``dev`` extra): pybreaker, circuitbreaker, aiobreaker (async only)
and purgatory (its sync factory). Each is used the cheapest way its documentation shows:

- refusal while open: ``CallPolicy.execute`` raising ``CircuitOpenError`` next to
  pybreaker's ``call()``, circuitbreaker's decorated function (its ``call()`` does not
  refuse; only the decorator does), purgatory's ``with breaker:`` (the breaker object
  kept, not looked up per call) and, async, ``aexecute`` next to aiobreaker's
  ``call_async()``. Every candidate catches its refusal in the same ``try``/``except``.
- open circuit answered by a fallback: the time added over calling the fallback
  directly. Ours is ``execute(key, call, fallback=fb)``; circuitbreaker's is its
  ``fallback_function``; the others offer none, so theirs is the ``try``/``except``
  around the refusal that calls the fallback.
- memory per key: ``tracemalloc`` over building 10,000 keys (each used by one healthy
  call, its key string included): ours is one ``CallPolicy`` on a ``MemoryStore``, theirs
  a breaker object per key in a dict (purgatory: one factory's ``get_breaker``).
- healthy call: what each adds to a call over the bare call (as ``engine``).

Each figure is a ratio ours / theirs per repeat (below 1.00: ours is ahead), with the
absolute medians beside it. Every circuit trips by failures (five), with a cooldown
far longer than the run. The refusal, fallback and healthy figures are counted again in
instructions under callgrind when valgrind is there (not in ``--quick``), as on a loaded
machine the clock swings by more than the gaps measured. Info rows split our refusal,
fallback and memory figures into the store's part and the policy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import aiobreaker
import circuitbreaker
import purgatory
import pybreaker
from purgatory.domain.model import OpenedState
from purgatory.service._sync.circuitbreaker import SyncCircuitBreaker

from callpolicy import (
    BreakerConfig,
    CallPolicy,
    CircuitOpenError,
    MemoryStore,
    Transition,
    split_key,
)

from ._harness import Result, ratio_rows

_COOLDOWN = 3_600.0  # never elapses during a run
_THRESHOLD = 5

_SYNC_PEERS = ("pybreaker", "circuitbreaker", "purgatory")


def _model_call() -> int:
    return 1


def _fallback() -> int:
    return 2


async def _amodel_call() -> int:
    return 1


async def _afallback() -> int:
    return 2


def _failing() -> int:
    raise ConnectionError("down")


async def _afailing() -> int:
    raise ConnectionError("down")


# -- the breakers, tripped ------------------------------------------------------------
def _policy() -> CallPolicy:
    return CallPolicy(breaker=BreakerConfig(failure_threshold=_THRESHOLD, cooldown=_COOLDOWN))


def _open_policy(key: str) -> CallPolicy:
    policy = _policy()
    for _ in range(_THRESHOLD):
        with contextlib.suppress(ConnectionError):
            policy.execute(key, _failing)
    return policy


def _pybreaker() -> pybreaker.CircuitBreaker:
    return pybreaker.CircuitBreaker(fail_max=_THRESHOLD, reset_timeout=_COOLDOWN)


def _open_pybreaker() -> pybreaker.CircuitBreaker:
    breaker = _pybreaker()
    for _ in range(_THRESHOLD):
        with contextlib.suppress(ConnectionError, pybreaker.CircuitBreakerError):
            breaker.call(_failing)
    return breaker


def _circuitbreaker(
    fallback: Callable[[], int] | None = None,
) -> circuitbreaker.CircuitBreaker:
    return circuitbreaker.CircuitBreaker(
        failure_threshold=_THRESHOLD,
        recovery_timeout=_COOLDOWN,
        expected_exception=ConnectionError,
        fallback_function=fallback,
        name="bench",
    )


def _open_circuitbreaker(fallback: Callable[[], int] | None = None) -> Callable[[], int]:
    """The decorated model call of a tripped circuitbreaker."""
    breaker = _circuitbreaker(fallback)
    failing = breaker(_failing)
    for _ in range(_THRESHOLD):
        with contextlib.suppress(ConnectionError):
            failing()
    guarded: Callable[[], int] = breaker(_model_call)
    return guarded


def _purgatory_breaker(name: str = "bench") -> SyncCircuitBreaker:
    factory = purgatory.SyncCircuitBreakerFactory(
        default_threshold=_THRESHOLD, default_ttl=_COOLDOWN
    )
    return factory.get_breaker(name)


def _open_purgatory() -> SyncCircuitBreaker:
    breaker = _purgatory_breaker()
    for _ in range(_THRESHOLD):
        with contextlib.suppress(ConnectionError), breaker:
            _failing()
    return breaker


def _aiobreaker() -> aiobreaker.CircuitBreaker:
    return aiobreaker.CircuitBreaker(
        fail_max=_THRESHOLD, timeout_duration=timedelta(seconds=_COOLDOWN)
    )


async def _open_aiobreaker() -> aiobreaker.CircuitBreaker:
    breaker = _aiobreaker()
    for _ in range(_THRESHOLD):
        with contextlib.suppress(ConnectionError, aiobreaker.CircuitBreakerError):
            await breaker.call_async(_afailing)
    return breaker


# -- the candidates ---------------------------------------------------------------------
def _refusals() -> dict[str, Callable[[], object]]:
    key = "bench::open"
    policy = _open_policy(key)
    pyb = _open_pybreaker()
    cb = _open_circuitbreaker()
    pg = _open_purgatory()

    def ours() -> None:
        try:
            policy.execute(key, _model_call)
        except CircuitOpenError:
            return None  # refused, as expected

    def py() -> None:
        try:
            pyb.call(_model_call)
        except pybreaker.CircuitBreakerError:
            return None  # refused, as expected

    def cbr() -> None:
        try:
            cb()
        except circuitbreaker.CircuitBreakerError:
            return None  # refused, as expected

    def pur() -> None:
        try:
            with pg:
                _model_call()
        except OpenedState as refusal:
            # purgatory raises one stored exception each time, so its traceback would
            # grow by a frame per refusal; a user's handler pays this line as well.
            refusal.__traceback__ = None

    circuit = policy.circuit(key)

    def store() -> None:  # our store's and exception's part: the circuit refusing alone
        try:
            circuit.admit()
        except CircuitOpenError:
            return None  # refused, as expected

    _check_refused(ours, py, cbr, pur, store)
    return {
        "callpolicy": ours,
        "pybreaker": py,
        "circuitbreaker": cbr,
        "purgatory": pur,
        "store": store,
    }


def _check_refused(*candidates: Callable[[], object]) -> None:
    # A candidate that answered instead of refusing would be timing the healthy path.
    for candidate in candidates:
        if candidate() is not None:
            raise AssertionError(f"{candidate.__name__}: the circuit did not refuse")


def _fallbacks() -> dict[str, Callable[[], object]]:
    key = "bench::open"
    policy = _open_policy(key)
    pyb = _open_pybreaker()
    cb = _open_circuitbreaker(_fallback)
    pg = _open_purgatory()

    def py() -> int:
        try:
            return pyb.call(_model_call)
        except pybreaker.CircuitBreakerError:
            return _fallback()

    def pur() -> int:
        try:
            with pg:
                return _model_call()
        except OpenedState as refusal:
            refusal.__traceback__ = None
            return _fallback()

    candidates: dict[str, Callable[[], object]] = {
        "bare": _fallback,
        "callpolicy": lambda: policy.execute(key, _model_call, fallback=_fallback),
        "pybreaker": py,
        "circuitbreaker": cb,
        "purgatory": pur,
    }
    for name, candidate in candidates.items():
        if candidate() != 2:
            raise AssertionError(f"{name}: the fallback did not answer")
    return candidates


def _healthy() -> dict[str, Callable[[], object]]:
    key = "bench::healthy"
    policy = _policy()
    pyb = _pybreaker()
    cb = _circuitbreaker()(_model_call)
    pg = _purgatory_breaker()

    def pur() -> int:
        with pg:
            return _model_call()

    return {
        "bare": _model_call,
        "callpolicy": lambda: policy.execute(key, _model_call),
        "pybreaker": lambda: pyb.call(_model_call),
        "circuitbreaker": cb,
        "purgatory": pur,
    }


# -- async: aexecute next to aiobreaker, timed inside one event loop --------------------
async def _async_per_call_ns(fn: Callable[[], Awaitable[object]], loops: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(loops):
            await fn()
        return (time.perf_counter_ns() - start) / loops
    finally:
        if gc_was_enabled:
            gc.enable()


async def _async_ratio_rows(
    candidates: dict[str, Callable[[], Awaitable[object]]], *, loops: int, repeats: int
) -> dict[str, list[float]]:
    """``ratio_rows`` for coroutine functions: interleaved, rotating order."""
    names = list(candidates)
    for fn in candidates.values():
        await _async_per_call_ns(fn, max(loops // 10, 1))
    found: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            found[name].append(await _async_per_call_ns(candidates[name], loops))
    return found


async def _async_figures(*, loops: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    open_key, healthy_key = "bench::open", "bench::healthy"
    policy = _policy()
    for _ in range(_THRESHOLD):
        with contextlib.suppress(ConnectionError):
            await policy.aexecute(open_key, _afailing)
    opened = await _open_aiobreaker()
    healthy = _aiobreaker()

    async def ours_refused() -> None:
        try:
            await policy.aexecute(open_key, _amodel_call)
        except CircuitOpenError:
            return None  # refused, as expected

    async def theirs_refused() -> None:
        try:
            await opened.call_async(_amodel_call)
        except aiobreaker.CircuitBreakerError:
            return None  # refused, as expected

    async def ours_fallback() -> object:
        return await policy.aexecute(open_key, _amodel_call, fallback=_afallback)

    async def theirs_fallback() -> object:
        try:
            return await opened.call_async(_amodel_call)
        except aiobreaker.CircuitBreakerError:
            return await _afallback()

    async def ours_healthy() -> object:
        return await policy.aexecute(healthy_key, _amodel_call)

    async def theirs_healthy() -> object:
        return await healthy.call_async(_amodel_call)

    for refused in (ours_refused, theirs_refused):
        if await refused() is not None:
            raise AssertionError(f"{refused.__name__}: the circuit did not refuse")
    for answered in (ours_fallback, theirs_fallback):
        if await answered() != 2:
            raise AssertionError(f"{answered.__name__}: the fallback did not answer")
    return {
        "refusal": await _async_ratio_rows(
            {"callpolicy": ours_refused, "aiobreaker": theirs_refused},
            loops=loops,
            repeats=repeats,
        ),
        "fallback": await _async_ratio_rows(
            {"bare": _afallback, "callpolicy": ours_fallback, "aiobreaker": theirs_fallback},
            loops=loops,
            repeats=repeats,
        ),
        "healthy": await _async_ratio_rows(
            {"bare": _amodel_call, "callpolicy": ours_healthy, "aiobreaker": theirs_healthy},
            loops=loops,
            repeats=repeats,
        ),
    }


# -- memory per key ---------------------------------------------------------------------
def _traced_bytes(build: Callable[[int], object], count: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build(count)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


def _ours_keys(count: int) -> object:
    policy = CallPolicy()
    for index in range(count):
        policy.execute(f"provider::model-{index}", _model_call)
    return policy


def _pybreaker_keys(count: int) -> object:
    breakers = {}
    for index in range(count):
        key = f"provider::model-{index}"
        breaker = breakers[key] = pybreaker.CircuitBreaker(name=key)
        breaker.call(_model_call)
    return breakers


def _circuitbreaker_keys(count: int) -> object:
    breakers = {}
    for index in range(count):
        key = f"provider::model-{index}"
        breaker = breakers[key] = circuitbreaker.CircuitBreaker(name=key)
        breaker.call(_model_call)
    return breakers


def _purgatory_keys(count: int) -> object:
    factory = purgatory.SyncCircuitBreakerFactory()
    for index in range(count):
        with factory.get_breaker(f"provider::model-{index}"):
            _model_call()
    return factory


def _aiobreaker_keys(count: int) -> object:
    async def build() -> dict[str, aiobreaker.CircuitBreaker]:
        breakers = {}
        for index in range(count):
            key = f"provider::model-{index}"
            breaker = breakers[key] = aiobreaker.CircuitBreaker(name=key)
            await breaker.call_async(_amodel_call)
        return breakers

    # The loop exists before tracing starts: only the breakers are counted.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(build())
    finally:
        loop.close()


def _store_keys(count: int) -> object:
    # Our store's part alone: its circuits and its table. The keys exist before tracing
    # starts (their bytes are in _ours_keys' figure, as the policy's tallies are).
    config = BreakerConfig()

    def on_transition(transition: Transition) -> None:
        pass

    store = MemoryStore()
    for key in _KEYS[:count]:
        provider, model = split_key(key)
        store.circuit(
            key, provider=provider, model=model, config=config, on_transition=on_transition
        )
    return store


_KEYS = [f"provider::model-{index}" for index in range(10_000)]


def _memory(count: int) -> dict[str, float]:
    builds: dict[str, Callable[[int], object]] = {
        "callpolicy": _ours_keys,
        "pybreaker": _pybreaker_keys,
        "circuitbreaker": _circuitbreaker_keys,
        "aiobreaker": _aiobreaker_keys,
        "purgatory": _purgatory_keys,
    }
    found = {name: _traced_bytes(build, count) / count for name, build in builds.items()}
    found["store"] = _traced_bytes(_store_keys, count) / count
    return found


# -- the table --------------------------------------------------------------------------
def _us(ns_list: list[float]) -> float:
    return statistics.median(ns_list) / 1_000


def _vs(figure: str, timings: dict[str, list[float]], peer: str, *, added: bool = False) -> Result:
    """Ours / ``peer`` per repeat: of the whole call, or (``added``) of what each adds
    over the ``bare`` row of the same repeat."""
    base = timings["bare"] if added else [0.0] * len(timings["callpolicy"])
    ratios = [
        (ours - bare) / (theirs - bare)
        for bare, ours, theirs in zip(base, timings["callpolicy"], timings[peer], strict=True)
    ]
    ours_us, theirs_us = _us(timings["callpolicy"]), _us(timings[peer])
    if added:
        bare_us = _us(timings["bare"])
        detail = f"+{ours_us - bare_us:.2f} us vs +{theirs_us - bare_us:.2f} us"
    else:
        detail = f"{ours_us:.2f} us vs {theirs_us:.2f} us"
    middle = statistics.median(ratios)
    return Result(f"peers: {figure} / {peer}", ratios, "<= 1.00", middle <= 1.00, detail)


# -- the same, counted in instructions ---------------------------------------------------
# On a loaded machine the wall-clock figures above swing by tens of percent; a count of
# instructions under callgrind does not (see benchmarks/instructions.py). Each process
# builds every candidate of its group, warms each up, then calls one of them CALLS times;
# a process that calls none gives the group's baseline.
_COUNT_PROGRAM = """
import sys
from benchmarks import peers
group, name, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
candidates = {"refusal": peers._refusals, "fallback": peers._fallbacks,
              "healthy": peers._healthy}[group]()
for candidate in candidates.values():
    for _ in range(100):
        candidate()
if calls:
    call = candidates[name]
    for _ in range(calls):
        call()
"""
_COUNTED = {
    "refusal": ("callpolicy", "pybreaker", "circuitbreaker", "purgatory", "store"),
    "fallback": ("bare", "callpolicy", "pybreaker", "circuitbreaker", "purgatory"),
    "healthy": ("bare", "callpolicy", "pybreaker", "circuitbreaker", "purgatory"),
}
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _count(group: str, name: str, calls: int, *, valgrind: bool) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", _COUNT_PROGRAM, group, name, str(calls)]
    with tempfile.TemporaryDirectory() as folder:
        if valgrind:
            out = os.path.join(folder, "callgrind.out")
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]
        done = subprocess.run(
            command,
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or (valgrind and found is None):
        raise RuntimeError(f"count {group}/{name} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1)) if found else 0


def _instruction_figures(*, quick: bool) -> list[Result]:
    jobs = [(group, name) for group, names in _COUNTED.items() for name in names]
    if quick or shutil.which("valgrind") is None:
        # The program runs (a broken one shows here, not later): one process per group
        # builds and warms every candidate of it.
        for group, names in _COUNTED.items():
            _count(group, names[0], 10, valgrind=False)
        return []
    calls = 2_000
    with ThreadPoolExecutor(2) as pool:
        zero_runs = pool.map(lambda group: _count(group, "", 0, valgrind=True), _COUNTED)
        zeros = dict(zip(_COUNTED, zero_runs, strict=True))
        runs = pool.map(lambda job: _count(*job, calls, valgrind=True), jobs)
        counts = dict(zip(jobs, runs, strict=True))
    per = {job: (count - zeros[job[0]]) / calls for job, count in counts.items()}
    results = []
    for group, figure, added in (
        ("refusal", "refusal while open, instructions per call", False),
        ("fallback", "open + fallback, added instructions", True),
        ("healthy", "healthy call, added instructions", True),
    ):
        base = per[group, "bare"] if added else 0.0
        ours = per[group, "callpolicy"] - base
        for peer in _SYNC_PEERS:
            theirs = per[group, peer] - base
            ratio = ours / theirs
            sign = "+" if added else ""
            results.append(
                Result(
                    f"peers: {figure} / {peer}",
                    [ratio],
                    "<= 1.00",
                    ratio <= 1.00,
                    f"{sign}{ours:,.0f} vs {sign}{theirs:,.0f} instructions",
                )
            )
    store = per["refusal", "store"]
    results.append(
        Result(
            "peers: ours, store's part: circuit.admit() refusing / whole refusal, instructions",
            [store / per["refusal", "callpolicy"]],
            "-",
            True,
            f"{store:,.0f} of {per['refusal', 'callpolicy']:,.0f} instructions (the policy: "
            f"{per['refusal', 'callpolicy'] - store:,.0f}); of the fallback's "
            f"+{per['fallback', 'callpolicy'] - per['fallback', 'bare']:,.0f}: the same "
            f"{store:,.0f}",
            info=True,
        )
    )
    return results


def run(*, quick: bool) -> list[Result]:
    # Blocks of 2,000 calls (a few ms each): the ~400-call blocks of the per-call figures
    # elsewhere are too short for a call of ~1 us, whose timer and loop overhead would
    # then weigh on the ratio.
    sizes = {"loops": 200, "repeats": 3} if quick else {"loops": 2_000, "repeats": 31}
    refusals = ratio_rows(_refusals(), **sizes)
    fallbacks = ratio_rows(_fallbacks(), **sizes)
    healthy = ratio_rows(_healthy(), **sizes)
    loop = asyncio.new_event_loop()
    try:
        async_timings = loop.run_until_complete(_async_figures(**sizes))
    finally:
        loop.close()
    keys = 1_000 if quick else 10_000
    memory = _memory(keys)

    results = [
        _vs("refusal while open, us per call", refusals, peer, added=False) for peer in _SYNC_PEERS
    ]
    results.append(
        _vs("refusal while open (async), us per call", async_timings["refusal"], "aiobreaker")
    )
    results += [
        _vs("open + fallback, added us", fallbacks, peer, added=True) for peer in _SYNC_PEERS
    ]
    results.append(
        _vs(
            "open + fallback (async), added us", async_timings["fallback"], "aiobreaker", added=True
        )
    )
    ours_bytes = memory["callpolicy"]
    for peer in ("pybreaker", "circuitbreaker", "aiobreaker", "purgatory"):
        ratio = ours_bytes / memory[peer]
        results.append(
            Result(
                f"peers: memory per key at {keys:,} keys / {peer}",
                [ratio],
                "<= 1.00",
                ratio <= 1.00,
                f"{ours_bytes:.0f} B vs {memory[peer]:.0f} B",
            )
        )
    results += [_vs("healthy call, added us", healthy, peer, added=True) for peer in _SYNC_PEERS]
    results.append(
        _vs("healthy call (async), added us", async_timings["healthy"], "aiobreaker", added=True)
    )
    return results + _shares(refusals, fallbacks, memory) + _instruction_figures(quick=quick)


def _shares(
    refusals: dict[str, list[float]], fallbacks: dict[str, list[float]], memory: dict[str, float]
) -> list[Result]:
    """Which part of each of our cold figures is the store's and the exception's (the
    circuit refusing, its circuits' bytes) and which the policy's (the rest)."""
    store_us = _us(refusals["store"])
    ours_us = _us(refusals["callpolicy"])
    added_us = _us(fallbacks["callpolicy"]) - _us(fallbacks["bare"])
    store_bytes, ours_bytes = memory["store"], memory["callpolicy"]
    return [
        Result(
            "peers: ours, store's part: circuit.admit() refusing / whole refusal",
            [s / o for s, o in zip(refusals["store"], refusals["callpolicy"], strict=True)],
            "-",
            True,
            f"{store_us:.2f} us of {ours_us:.2f} us (the policy: {ours_us - store_us:.2f} us)",
            info=True,
        ),
        Result(
            "peers: ours, store's part: circuit.admit() refusing / open + fallback added",
            [store_us / added_us],
            "-",
            True,
            f"{store_us:.2f} us of +{added_us:.2f} us (the policy: {added_us - store_us:.2f} us)",
            info=True,
        ),
        Result(
            "peers: ours, store's part: its circuits' bytes / memory per key",
            [store_bytes / ours_bytes],
            "-",
            True,
            f"{store_bytes:.0f} B of {ours_bytes:.0f} B (the policy and the key string: "
            f"{ours_bytes - store_bytes:.0f} B)",
            info=True,
        ),
    ]
