"""The memory store's cold paths: refusals that take no lock, and small circuits.

An open circuit cooling down refuses without the store's lock; these tests hold the
lock from the test and show the refusals still come, and run many threads against a
circuit that changes state under them to show every refusal they see is one the
locked path would have given (never a mix of two open periods' figures).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from callpolicy import (
    BreakerConfig,
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    MemoryStore,
    Outcome,
    Permit,
    Transition,
    split_key,
)
from tests.support.clock import FakeClock

KEY = "acme::m1"
HANG_GUARD = 60.0  # seconds before a blocked thread fails the test instead of hanging it
THRESHOLD = 3
COOLDOWN = 30.0


def _ignore(transition: Transition) -> None:
    pass


def _circuit(store: MemoryStore, key: str = KEY):  # type: ignore[no-untyped-def]
    provider, model = split_key(key)
    config = BreakerConfig(failure_threshold=THRESHOLD, cooldown=COOLDOWN)
    return store.circuit(key, provider=provider, model=model, config=config, on_transition=_ignore)


def _trip(circuit) -> None:  # type: ignore[no-untyped-def]
    for _ in range(THRESHOLD):
        circuit.record(circuit.admit(), Outcome.FAILURE)


@pytest.fixture
def switch_often() -> Iterator[None]:
    # Threads switch every few microseconds, so readers meet writers mid-change.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _run_while_the_lock_is_held(store: MemoryStore, work) -> list[object]:  # type: ignore[no-untyped-def]
    found: list[object] = []

    def run() -> None:
        found.extend(work())

    worker = threading.Thread(target=run, daemon=True)
    with store._lock:  # what every locked decision of this store's circuits takes
        worker.start()
        worker.join(HANG_GUARD)
        blocked = worker.is_alive()
    worker.join(HANG_GUARD)
    assert not blocked, "the worker waited for the store's lock"
    return found


def test_an_open_circuit_refuses_without_the_lock(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    circuit = _circuit(store)
    _trip(circuit)
    clock.advance(COOLDOWN / 2)

    def refuse_many() -> list[object]:
        found: list[object] = []
        for _ in range(100):
            try:
                found.append(circuit.admit())
            except CircuitOpenError as refusal:
                found.append(refusal)
        return found

    refusals = _run_while_the_lock_is_held(store, refuse_many)
    assert len(refusals) == 100
    for refusal in refusals:
        assert isinstance(refusal, CircuitOpenError)
        assert (refusal.provider, refusal.model) == ("acme", "m1")
        assert (refusal.failures, refusal.reason) == (THRESHOLD, "threshold")
        assert refusal.retry_in == COOLDOWN / 2


def test_a_held_circuit_refuses_without_the_lock(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    circuit = _circuit(store)
    circuit.force(CircuitState.OPEN, hold=True)

    def refuse() -> list[object]:
        try:
            return [circuit.admit()]
        except CircuitOpenError as refusal:
            return [refusal]

    (refusal,) = _run_while_the_lock_is_held(store, refuse)
    assert isinstance(refusal, CircuitOpenError)
    assert (refusal.retry_in, refusal.reason) == (None, "manual")


def test_a_clean_closed_circuit_admits_and_records_without_the_lock(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    circuit = _circuit(store)

    def succeed() -> list[object]:
        return [circuit.record(circuit.admit(), Outcome.SUCCESS) for _ in range(100)]

    assert _run_while_the_lock_is_held(store, succeed) == [CircuitState.CLOSED] * 100


def test_once_the_cooldown_is_over_the_locked_path_admits_the_probe(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    circuit = _circuit(store)
    _trip(circuit)
    clock.advance(COOLDOWN)
    probe = circuit.admit()
    assert probe.probe
    with pytest.raises(CircuitOpenError) as refused:
        circuit.admit()  # half-open, its one probe slot taken
    assert refused.value.retry_in == 0.0
    circuit.record(probe, Outcome.FAILURE)
    with pytest.raises(CircuitOpenError) as reopened:
        circuit.admit()
    assert (reopened.value.reason, reopened.value.failures) == ("probe_failed", THRESHOLD + 1)
    assert reopened.value.retry_in == COOLDOWN


def test_threads_see_only_refusals_the_locked_path_would_give(
    clock: FakeClock, switch_often: None
) -> None:
    # The writer cycles through three kinds of open period, each with its own figures;
    # a refusal that mixed two periods' figures (a torn read) would match none of them.
    # The clock stands still, so no cooldown ends: nothing may ever be admitted as a probe.
    store = MemoryStore(clock=clock)
    circuit = _circuit(store)
    rounds, readers, enough = 300, 6, 500
    started = threading.Barrier(readers + 1)  # no writer round before every reader runs
    stop = threading.Event()
    refused = [0]  # refusals so far (a rare lost increment only makes the writer go on)
    seen: list[tuple[str | None, int, str]] = []
    errors: list[BaseException] = []
    seen_lock = threading.Lock()

    def read() -> None:
        mine: list[tuple[str | None, int, str]] = []
        try:
            started.wait(HANG_GUARD)
            while not stop.is_set():
                try:
                    permit = circuit.admit()
                except CircuitOpenError as refusal:
                    wait = refusal.retry_in
                    if wait is None:
                        kind = "held"
                    elif 0 < wait <= COOLDOWN:
                        kind = "cooling"
                    else:
                        kind = f"bad retry_in {wait!r}"
                    mine.append((refusal.reason, refusal.failures, kind))
                    refused[0] += 1
                else:
                    assert not permit.probe, "a probe admitted while the cooldown runs"
        except BaseException as exc:
            errors.append(exc)
        with seen_lock:
            seen.extend(mine)

    def write() -> None:
        started.wait(HANG_GUARD)
        deadline = time.monotonic() + HANG_GUARD / 2  # a guard against a starved reader
        done = 0
        while (done < rounds or refused[0] < enough) and time.monotonic() < deadline:
            circuit.force(CircuitState.OPEN, hold=False)  # manual, 0 failures, cooling
            circuit.force(CircuitState.OPEN, hold=True)  # manual, 0 failures, held
            circuit.force(None, hold=False)
            _trip(circuit)  # threshold, THRESHOLD failures, cooling
            circuit.force(None, hold=False)
            done += 1

    threads = [threading.Thread(target=read, daemon=True) for _ in range(readers)]
    for thread in threads:
        thread.start()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(HANG_GUARD)
    stop.set()
    for thread in threads:
        thread.join(HANG_GUARD)
    assert not writer.is_alive()
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]
    valid = {("manual", 0, "cooling"), ("manual", 0, "held"), ("threshold", THRESHOLD, "cooling")}
    assert seen, "no reader was ever refused"
    assert set(seen) <= valid, set(seen) - valid
    assert circuit.snapshot().state is CircuitState.CLOSED


def test_every_key_of_a_policy_shares_one_set_of_rules(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    policy = CallPolicy(store=store, clock=clock)
    other = CallPolicy(store=store, clock=clock)
    for index in range(50):
        policy.execute(f"acme::m{index}", lambda: "ok")
    other.execute("other::m", lambda: "ok")
    rules = {id(circuit._rules) for circuit in store.circuits()}  # type: ignore[attr-defined]
    assert len(rules) == 2  # one per policy, not one per key


def test_a_circuit_that_never_failed_stays_small(clock: FakeClock) -> None:
    keys = [f"provider::model-{index}" for index in range(2_000)]
    config = BreakerConfig()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = MemoryStore(clock=clock)
        for key in keys:
            provider, model = split_key(key)
            circuit = store.circuit(
                key, provider=provider, model=model, config=config, on_transition=_ignore
            )
            circuit.record(circuit.admit(), Outcome.SUCCESS)
        per_key = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
    finally:
        tracemalloc.stop()
    # A circuit of a few slots and its entry in the store's table; no lock, permit,
    # listener or name strings of its own (the key string is the caller's).
    assert per_key < 200, per_key


def test_names_that_differ_from_the_key_are_kept(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    circuit = store.circuit(
        "custom-key", provider="acme", model="m1", config=BreakerConfig(), on_transition=_ignore
    )
    assert (circuit.key, circuit.provider, circuit.model) == ("custom-key", "acme", "m1")
    circuit.force(CircuitState.OPEN, hold=False)
    with pytest.raises(CircuitOpenError) as refused:
        circuit.admit()
    assert (refused.value.provider, refused.value.model) == ("acme", "m1")
    snapshot = circuit.snapshot()
    assert (snapshot.provider, snapshot.model) == ("acme", "m1")


def test_a_stale_permit_of_another_period_changes_nothing(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    circuit = _circuit(store)
    first = circuit.admit()
    circuit.force(CircuitState.OPEN, hold=False)
    circuit.force(None, hold=False)
    for _ in range(THRESHOLD):
        circuit.record(first, Outcome.FAILURE)  # admitted two periods ago
    assert circuit.snapshot().failures == 0
    assert isinstance(circuit.admit(), Permit)
