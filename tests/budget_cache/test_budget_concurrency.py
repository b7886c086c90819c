"""No overspend under concurrency: the check and the reservation are one atomic step.

Threads start together on a barrier; asyncio tasks yield between steps so their
reservations interleave with calls in flight. A property test drives random sequences of
reserve/commit/release against a plain model of the rules.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from callpolicy._budget import Budget, BudgetExceededError, Reservation, Usage
from tests.support.clock import FakeClock

CALLERS = 100


def _race_threads(budget: Budget, estimate: int, usage: Usage | None) -> tuple[int, int]:
    """CALLERS threads reserve at once, and settle only once every one of them has tried
    (so a budget that counted at settlement, as the reference did, would let all through).
    Returns (admitted, refused)."""
    start = threading.Barrier(CALLERS)
    tried = threading.Barrier(CALLERS)
    admitted = refused = 0
    lock = threading.Lock()

    def caller(index: int) -> None:
        nonlocal admitted, refused
        start.wait()
        try:
            reservation = budget.reserve(f"p::m{index % 3}", estimate)
        except BudgetExceededError:
            with lock:
                refused += 1
            tried.wait()
            return
        with lock:
            admitted += 1
        tried.wait()
        budget.commit(reservation, usage)

    with ThreadPoolExecutor(CALLERS) as pool:
        for future in [pool.submit(caller, i) for i in range(CALLERS)]:
            future.result()
    return admitted, refused


def test_100_threads_against_a_10_call_budget_get_exactly_10_through() -> None:
    budget = Budget(max_calls=10)
    assert _race_threads(budget, 5, Usage(5, 5)) == (10, 90)
    assert budget.usage().calls == 10


def test_100_threads_never_overspend_tokens() -> None:
    budget = Budget(max_tokens=100)
    admitted, _ = _race_threads(budget, 7, None)  # usage unknown: the estimate stays
    assert admitted == 14  # 14 * 7 = 98; a 15th would make 105
    usage = budget.usage()
    assert usage.tokens == 98
    assert usage.estimated_calls == 14


def test_100_threads_never_overspend_dollars() -> None:
    budget = Budget(max_cost_usd=0.01, prices={"m0": (1, 0), "m1": (1, 0), "m2": (1, 0)})
    admitted, _ = _race_threads(budget, 1000, Usage(1000, 0))  # $0.001 a call
    assert admitted == 10
    assert budget.usage().cost_usd == 0.01


def test_100_threads_per_key_budgets_each_hold() -> None:
    budget = Budget(max_calls=5, per_key=True)
    admitted, _ = _race_threads(budget, 0, Usage(0, 0))
    assert admitted == 15  # three keys, five each
    assert {key: u.calls for key, u in budget.usages().items()} == {
        "p::m0": 5,
        "p::m1": 5,
        "p::m2": 5,
    }


async def test_100_asyncio_tasks_against_a_10_call_budget_get_exactly_10_through() -> None:
    budget = Budget(max_calls=10, max_tokens=10_000)
    in_flight = 0
    peak = 0

    async def caller() -> bool:
        nonlocal in_flight, peak
        await asyncio.sleep(0)
        try:
            reservation = await budget.areserve("p::m", 10)
        except BudgetExceededError:
            return False
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)  # the "model call": other tasks reserve meanwhile
        in_flight -= 1
        await budget.acommit(reservation, Usage(10, 20))
        return True

    results = await asyncio.gather(*(caller() for _ in range(CALLERS)))
    assert sum(results) == 10
    assert peak == 10  # they really were in flight together
    assert budget.usage().tokens == 300


def test_threads_each_running_an_event_loop_share_one_budget() -> None:
    budget = Budget(max_calls=10)
    barrier = threading.Barrier(4)
    admitted: list[int] = []

    async def tasks() -> int:
        async def one() -> bool:
            await asyncio.sleep(0)
            try:
                await budget.areserve("p::m")
            except BudgetExceededError:
                return False
            return True

        return sum(await asyncio.gather(*(one() for _ in range(25))))

    def run() -> None:
        barrier.wait()
        admitted.append(asyncio.run(tasks()))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 10


# -- property: random sequences never break the rules ----------------------------------
_op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 60), st.integers(0, 20)),
    st.tuples(st.just("commit"), st.integers(0, 30), st.integers(0, 80)),
    st.tuples(st.just("commit_unknown"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 30), st.booleans()),
)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(_op, max_size=60),
    max_calls=st.integers(1, 15),
    max_tokens=st.integers(1, 400),
    max_cost=st.integers(1, 400),
)
def test_random_sequences_follow_the_rules(
    ops: list[tuple[str, int, int]], max_calls: int, max_tokens: int, max_cost: int
) -> None:
    # A price of $1 per million input and output tokens: cost in micro-dollars == tokens.
    budget = Budget(
        max_calls=max_calls,
        max_tokens=max_tokens,
        max_cost_usd=max_cost / 1e6,
        prices={"m": (1.0, 1.0)},
    )
    open_reservations: list[tuple[Reservation, int, int]] = []
    # The model: calls and tokens (which are also the cost in micro-dollars).
    calls = tokens = 0
    for op, a, b in ops:
        if op == "reserve":
            held = a + b
            would_pass = (
                calls + 1 > max_calls
                or tokens >= max_tokens
                or tokens + held > max_tokens
                or tokens >= max_cost
                or tokens + held > max_cost
            )
            try:
                reservation = budget.reserve("p::m", a, estimated_output_tokens=b)
            except BudgetExceededError:
                reservation = None
            assert (reservation is None) == would_pass, "decided against the rules"
            if reservation is None:
                continue
            calls += 1
            tokens += held
            open_reservations.append((reservation, a, b))
        elif open_reservations:
            reservation, held_in, held_out = open_reservations.pop(a % len(open_reservations))
            if op == "commit":
                assert budget.commit(reservation, Usage(b // 2, b - b // 2))
                tokens += b - held_in - held_out
            elif op == "commit_unknown":
                assert budget.commit(reservation, None)
            else:
                assert budget.release(reservation, refund_call=bool(b))
                tokens -= held_in + held_out
                calls -= 1 if b else 0
        usage = budget.usage()
        assert (usage.calls, usage.tokens) == (calls, tokens)
        assert usage.cost_usd == tokens / 1e6
        assert usage.calls <= max_calls
        assert usage.in_flight == len(open_reservations)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0, 30), st.booleans()), max_size=80),
    max_calls=st.integers(1, 6),
    window=st.integers(1, 60),
)
def test_no_window_ever_admits_more_than_its_limit(
    steps: list[tuple[float, bool]], max_calls: int, window: int
) -> None:
    clock = FakeClock.wall()
    budget = Budget(max_calls=max_calls, window=window, clock=clock)
    admitted: list[float] = []
    for pause, fail in steps:
        clock.advance(pause)
        try:
            reservation = budget.reserve("p::m", 1)
        except BudgetExceededError:
            recent = [t for t in admitted if t > clock.now - window]
            assert len(recent) >= max_calls, "refused with room in the window"
            continue
        admitted.append(clock.now)
        if fail:
            budget.release(reservation)
        else:
            budget.commit(reservation, Usage(1, 1))
        recent = [t for t in admitted if t > clock.now - window]
        assert len(recent) <= max_calls
        assert budget.usage().window_calls == len(recent)
