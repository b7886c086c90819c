"""Figure 5: latency per call through an outage of the primary, without the breaker and
with it (plus a healthy fallback), for a primary that hangs and for a 503 storm.

Every model is a real ``ChatOpenAI`` talking HTTP to an OpenAI-compatible server on
127.0.0.1 (``tests/support/openai_server.py``): the primary's server hangs (or answers
503 with ``Retry-After: 1``), the fallback's server answers at once, so the fallback's
latency is a real loopback round trip. The client timeout is 2 s and the primary makes
one attempt per call (``max_retries=0``) unless a row says otherwise.

Each repeat makes 200 calls through a fresh wrapper per scenario. The first calls trip
the circuit (they wait the timeout, or the retries); the rest are interleaved call by
call with calls of the fallback alone and of the unguarded compositions (the order
rotates each call), so all see the same machine, and the wrapper's p99 after the trip is
compared with the fallback's own p99 over as many calls. The unguarded baselines that
take seconds per call run many calls at once in a thread pool while the circuits trip
(their per-call latency is the same as one after another; 200 sequential hangs would
take 400 s).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from langchain_openai import ChatOpenAI

from callpolicy import CircuitState, RetryPolicy
from langchain_breaker import CircuitBreakerChatModel
from tests.support.openai_server import Fail, Hang, OpenAICompatServer, Reply

from ._harness import Result

TIMEOUT = 2.0
TARGET_MS = 5.0
PROMPT = "hi"

Samples = dict[str, list[float]]


def _server() -> OpenAICompatServer:
    # The server sets TCP_NODELAY itself: with Nagle on, each reply's body waited for the
    # client's delayed ACK (~40 ms on Linux).
    return OpenAICompatServer()


def _chat(server: OpenAICompatServer, model: str, *, max_retries: int = 0) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.base_url,
        api_key="sk-test",  # type: ignore[arg-type]
        model=model,
        max_retries=max_retries,
        timeout=TIMEOUT,
    )


def _percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 195 samples: the 194th smallest)."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _answers(runnable: Any) -> Callable[[], None]:
    def call() -> None:
        if not runnable.invoke(PROMPT).content:
            raise AssertionError("no answer")

    return call


def _fails(runnable: Any) -> Callable[[], None]:
    def call() -> None:
        try:
            runnable.invoke(PROMPT)
        except Exception:
            return
        raise AssertionError("expected the unguarded call to fail")

    return call


def _timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _interleaved(candidates: dict[str, Callable[[], None]], calls: int) -> Samples:
    """Seconds per call of each candidate, ``calls`` each, interleaved call by call."""
    names = list(candidates)
    found: Samples = {name: [] for name in names}
    gc.collect()
    for index in range(calls):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            found[name].append(_timed(candidates[name]))
    return found


def _concurrent(candidates: dict[str, Callable[[], None]], calls: int) -> Samples:
    """Seconds per call, ``calls`` of each candidate all in flight together.

    Submissions are spaced by 2 ms: the test server's listen backlog is 5, and a burst
    of connects overflows it (a dropped SYN costs the client a 1 s retransmit)."""
    with ThreadPoolExecutor(calls * len(candidates)) as pool:
        futures: dict[str, list[Any]] = {name: [] for name in candidates}
        for _ in range(calls):
            for name, call in candidates.items():
                futures[name].append(pool.submit(_timed, call))
                time.sleep(0.002)
        return {name: [f.result() for f in found] for name, found in futures.items()}


def _repeat(models: dict[str, Any], plan: dict[str, int]) -> Samples:
    """One repeat of both scenarios: seconds per call, by series."""
    fallback, threshold, calls = models["fallback"], plan["threshold"], plan["calls"]
    hang = CircuitBreakerChatModel(
        inner=models["hang"], fallback=fallback, failure_threshold=threshold, cooldown=30.0
    )
    storm = CircuitBreakerChatModel(
        inner=models["storm"],
        fallback=fallback,
        failure_threshold=threshold,
        cooldown=30.0,
        retry=models["retry"],
    )

    def trip(guarded: CircuitBreakerChatModel, count: int) -> list[float]:
        return [_timed(_answers(guarded)) for _ in range(count)]

    # The calls that take seconds all overlap: the unguarded baselines and the two trips
    # (each trip's calls one after another, as the figure has them).
    with ThreadPoolExecutor(3) as background:
        storm_tripping = background.submit(trip, storm, plan["tripping"])
        slow = background.submit(
            _concurrent,
            {
                "hang_unguarded": _fails(models["hang"]),
                "storm_sdk": _fails(models["sdk"]),
                "storm_retried": _answers(models["storm"].with_retry().with_fallbacks([fallback])),
            },
            plan["in_flight"],
        )
        hang_trip = trip(hang, threshold)
        found = slow.result()
        storm_trip = storm_tripping.result()
    for name, guarded in (("hang", hang), ("503 storm", storm)):
        if guarded.state_for() is not CircuitState.OPEN:
            raise AssertionError(f"{name}: the circuit did not open ({guarded.state_for()})")
    if min(hang_trip) < TIMEOUT * 0.9:
        raise AssertionError(f"hang: a tripping call did not wait the timeout: {hang_trip}")
    after = _interleaved(
        {"alone": _answers(fallback), "guarded": _answers(hang)}, calls - threshold
    )
    found.update(hang_alone=after["alone"], hang_after=after["guarded"])
    found["hang_all"] = hang_trip + after["guarded"]
    after = _interleaved(
        {
            "alone": _answers(fallback),
            "bare": _fails(models["storm"]),
            "composed": _answers(models["storm"].with_fallbacks([fallback])),
            "guarded": _answers(storm),
        },
        calls - plan["tripping"],
    )
    found.update(
        storm_alone=after["alone"],
        storm_bare=after["bare"],
        storm_composed=after["composed"],
        storm_after=after["guarded"],
        storm_all=storm_trip + after["guarded"],
    )
    return found


class _Figures:
    """p50 and p99 in ms of every series, one value per repeat."""

    def __init__(self, repeats: list[Samples]) -> None:
        self.p50 = {k: [_percentile(r[k], 0.50) * 1000 for r in repeats] for k in repeats[0]}
        self.p99 = {k: [_percentile(r[k], 0.99) * 1000 for r in repeats] for k in repeats[0]}

    def median(self, series: str, q: str = "p99") -> float:
        return statistics.median((self.p99 if q == "p99" else self.p50)[series])

    def info(self, series: str, name: str, detail: str) -> Result:
        return Result(
            f"{name}: p99 ms",
            self.p99[series],
            "-",
            True,
            f"p50 {self.median(series, 'p50'):.1f} ms; {detail}",
            info=True,
        )

    def target(self, scenario: str, prefix: str, calls: int) -> Result:
        deltas = [
            g - f
            for g, f in zip(self.p99[f"{prefix}_after"], self.p99[f"{prefix}_alone"], strict=True)
        ]
        return Result(
            f"outage, {scenario}: wrapper p99 after the trip - fallback-alone p99, ms",
            deltas,
            f"<= {TARGET_MS:.0f} ms",
            statistics.median(deltas) <= TARGET_MS,
            f"absolute ms; {self.median(f'{prefix}_after'):.2f} ms vs "
            f"{self.median(f'{prefix}_alone'):.2f} ms, over {calls} interleaved calls each",
        )


def _rows(figures: _Figures, plan: dict[str, int]) -> list[Result]:
    threshold, calls, tripping = plan["threshold"], plan["calls"], plan["tripping"]
    in_flight = f"{plan['in_flight']} calls in flight at once per repeat"
    hang_speedup = figures.median("hang_unguarded", "p50") / figures.median("hang_after", "p50")
    storm_vs_composed = figures.median("storm_after", "p50") / figures.median(
        "storm_composed", "p50"
    )
    return [
        figures.info(
            "hang_unguarded",
            f"outage, hang: unguarded ChatOpenAI (timeout {TIMEOUT:.0f} s)",
            f"each call ends in APITimeoutError; {in_flight} "
            "(200 one after another would take 400 s)",
        ),
        figures.info(
            "hang_alone",
            "outage, hang: fallback alone (ChatOpenAI, healthy loopback server)",
            f"{calls - threshold} calls",
        ),
        figures.info(
            "hang_all",
            f"outage, hang: wrapper + fallback, all {calls} calls",
            f"the first {threshold} wait the {TIMEOUT:.0f} s timeout (then the fallback) "
            "and trip the circuit",
        ),
        figures.info(
            "hang_after",
            f"outage, hang: wrapper + fallback, the {calls - threshold} calls after the trip",
            f"p50 {hang_speedup:.0f}x lower than unguarded",
        ),
        figures.target("hang", "hang", calls - threshold),
        figures.info(
            "storm_bare",
            "outage, 503 storm: unguarded ChatOpenAI, max_retries=0",
            "the 503 at once: an error, no answer",
        ),
        figures.info(
            "storm_sdk",
            "outage, 503 storm: unguarded ChatOpenAI, max_retries=2 (SDK default)",
            f"the openai SDK waits Retry-After (1 s) twice, then raises: no answer; {in_flight}",
        ),
        figures.info(
            "storm_retried",
            "outage, 503 storm: with_retry().with_fallbacks([fallback])",
            "3 attempts with exponential jitter backoff (Retry-After ignored), then the "
            f"fallback answers; {in_flight}",
        ),
        figures.info(
            "storm_composed",
            "outage, 503 storm: with_fallbacks([fallback]), max_retries=0",
            "every call: a 503 round trip, then the fallback",
        ),
        figures.info(
            "storm_alone", "outage, 503 storm: fallback alone", f"{calls - tripping} calls"
        ),
        figures.info(
            "storm_all",
            f"outage, 503 storm: wrapper + RetryPolicy() + fallback, all {calls} calls",
            f"each attempt waits Retry-After (1 s) and counts; failure {threshold} "
            f"(in call {tripping}) trips the circuit",
        ),
        figures.info(
            "storm_after",
            f"outage, 503 storm: wrapper + fallback, the {calls - tripping} calls after the trip",
            f"p50 {storm_vs_composed:.2f}x with_fallbacks' p50 (no 503 round trip first)",
        ),
        figures.target("503 storm", "storm", calls - tripping),
    ]


def run(*, quick: bool) -> list[Result]:
    retry = RetryPolicy()  # honours Retry-After: 1 s between attempts, 4 attempts
    threshold = 2 if quick else 5  # 5: the engine's default failure_threshold
    plan = {
        "threshold": threshold,
        "calls": 200,
        "repeats": 1 if quick else 5,
        "in_flight": 8 if quick else 25,
        # Every attempt passes the breaker: the call whose attempt is the threshold-th
        # failure trips the circuit (and falls back without retrying further).
        "tripping": math.ceil(threshold / retry.max_attempts),
    }
    servers = {name: _server() for name in ("hang", "storm", "fallback")}
    try:
        servers["fallback"].set_default(Reply("fallback"))
        models = {
            "hang": _chat(servers["hang"], "gpt-4o-mini"),
            "storm": _chat(servers["storm"], "gpt-4o-mini"),
            "sdk": _chat(servers["storm"], "gpt-4o-mini", max_retries=2),  # the SDK default
            "fallback": _chat(servers["fallback"], "gpt-4o"),
            "retry": retry,
        }
        for name, fault in (
            ("hang", Hang(30)),
            ("storm", Fail(503, "overloaded", headers={"retry-after": "1"})),
        ):
            servers[name].push(Reply("warm"))  # first call: client set-up, a connection
            models[name].invoke(PROMPT)
            servers[name].set_default(fault)
        models["fallback"].invoke(PROMPT)
        repeats = [_repeat(models, plan) for _ in range(plan["repeats"])]
    finally:
        for server in servers.values():
            server.close()
    return _rows(_Figures(repeats), plan)
