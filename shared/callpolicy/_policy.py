"""The engine: one object that guards calls with fallback -> retry -> breaker -> model.

Both adapters (LangChain, LlamaIndex) hand it zero-argument callables; it never sees a
framework type. The order, outermost first, and why:

1. **fallback** is outermost of the three so that it sees the *final* verdict on the
   primary: an open circuit, or a failure that survived every retry.
2. **retry** sits outside the breaker so that *every attempt* passes through the breaker:
   a storm of retries counts as the failures it is and trips the circuit, and a retry
   never goes to an open circuit.
3. **breaker** is innermost, next to the model, so it counts exactly the provider's
   answers and nothing else.

(The cache and the budget, in their own modules, sit outside all three.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import replace
from typing import Any, TypeVar, get_args

from ._budget import Budget, Usage
from ._budget_store import BudgetExceededError
from ._cache import ResponseCache
from ._classify import Classification, Classifier, classify_error
from ._config import BreakerConfig, FallbackOn, RetryPolicy
from ._errors import AllModelsFailedError, CircuitOpenError, add_note
from ._events import DEFAULT_LISTENER_TIMEOUT, Event, EventKind, Listener, dispatch, logger
from ._fallback import Fallbacks, FallbackStart, arun_chain, run_chain
from ._fallback import _current as _current_fallback
from ._memory import MemoryStore
from ._report import html_table, text_table
from ._request import CallRequest
from ._store import Circuit, CircuitStore, Permit, Transition
from ._stream import aguard_stream, guard_stream
from ._types import CircuitSnapshot, CircuitState, ErrorClass, KeyMetrics, Outcome, split_key

__all__ = ["CallPolicy"]

T = TypeVar("T")
C = TypeVar("C")

_SUCCESS = Outcome.SUCCESS
_FAILURE = Outcome.FAILURE
_IGNORED = Outcome.IGNORED
_OPEN = CircuitState.OPEN
_CALLER = ErrorClass.CALLER
_AUTH = ErrorClass.AUTH
_FALLBACK_MODES: tuple[str, ...] = get_args(FallbackOn)


class _Tally:
    """One key's circuit and this policy's counts for it.

    ``successes`` is bumped without a lock on the hot path (a plain ``+=`` on a slot: under
    heavy threading, a rare increment may be lost); every other count changes under the
    policy's counts lock.
    """

    __slots__ = (
        "budget_refusals",
        "cache_hits",
        "cache_misses",
        "cancelled",
        "circuit",
        "failures",
        "fallbacks",
        "ignored",
        "refusals",
        "retries",
        "successes",
    )

    def __init__(self, circuit: Circuit) -> None:
        self.circuit = circuit
        self.successes = 0
        self.failures: dict[ErrorClass, int] = {}
        self.ignored: dict[ErrorClass, int] = {}
        self.cancelled = 0
        self.refusals = 0
        self.retries = 0
        self.fallbacks = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.budget_refusals = 0

    def metrics(self) -> KeyMetrics:
        circuit = self.circuit
        failures, ignored = dict(self.failures), dict(self.ignored)
        return KeyMetrics(
            key=circuit.key,
            provider=circuit.provider,
            model=circuit.model,
            calls=self.successes + sum(failures.values()) + sum(ignored.values()) + self.cancelled,
            successes=self.successes,
            failures=failures,
            ignored=ignored,
            cancelled=self.cancelled,
            refusals=self.refusals,
            retries=self.retries,
            fallbacks=self.fallbacks,
            cache_hits=self.cache_hits,
            cache_misses=self.cache_misses,
            budget_refusals=self.budget_refusals,
        )


class CallPolicy:
    """A circuit breaker per ``provider::model`` key, with optional retry and fallback.

    One policy serves sync and async callers from any number of threads and event
    loops; wrappers that share a policy share circuit state (a trip seen through one
    is seen by all).

    Args:
        breaker: breaker options (see :class:`BreakerConfig`); the keyword options below
            are a shortcut for building one and cannot be combined with it.
        retry: retry options; ``None`` (the default) makes one attempt.
        fallback_on: when a fallback answers: ``"failure"`` (default), ``"open"`` or
            ``"error"`` (see :data:`FallbackOn`).
        classifier: replaces :func:`classify_error`.
        store: where circuit state lives; a fresh :class:`MemoryStore` by default.
        clock: monotonic seconds, for the deadline of retries and the memory store's
            cooldowns; inject a fake one in tests.
        sleep, async_sleep: how to wait between retries (injectable likewise).
        listeners: called with every :class:`Event` (also see :meth:`add_listener`);
            ``async def`` listeners too: a task when the event fires in a running event
            loop, else run to completion in the calling thread (docs/how-it-works.md).
        listener_timeout: seconds an async listener may run before it is cancelled.
        rng: the source of retry jitter.

    >>> policy = CallPolicy(failure_threshold=2, cooldown=30)
    >>> policy.execute("acme::m1", lambda: "hello")
    'hello'
    >>> policy.state("acme::m1")
    <CircuitState.CLOSED: 'closed'>
    """

    def __init__(
        self,
        *,
        breaker: BreakerConfig | None = None,
        retry: RetryPolicy | None = None,
        fallback_on: FallbackOn = "failure",
        classifier: Classifier | None = None,
        store: CircuitStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        async_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        listeners: Iterable[Listener] = (),
        listener_timeout: float = DEFAULT_LISTENER_TIMEOUT,
        rng: random.Random | None = None,
        **breaker_options: Any,
    ) -> None:
        if breaker is not None and breaker_options:
            raise TypeError(
                "pass either breaker=BreakerConfig(...) or breaker options "
                f"({', '.join(sorted(breaker_options))}), not both"
            )
        if breaker is None:
            breaker = BreakerConfig(**breaker_options)
        elif not isinstance(breaker, BreakerConfig):
            raise TypeError(f"breaker: expected a BreakerConfig, got {type(breaker).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry: expected a RetryPolicy or None, got {type(retry).__name__}")
        if fallback_on not in _FALLBACK_MODES:
            raise ValueError(f"fallback_on: expected one of {_FALLBACK_MODES}, got {fallback_on!r}")
        if classifier is not None and not callable(classifier):
            raise TypeError("classifier: expected a callable taking an exception")
        if store is not None and not isinstance(store, CircuitStore):
            raise TypeError(f"store: {type(store).__name__} does not implement CircuitStore")
        for name, fn in (("clock", clock), ("sleep", sleep), ("async_sleep", async_sleep)):
            if not callable(fn):
                raise TypeError(f"{name}: expected a callable")
        if isinstance(listener_timeout, bool) or not isinstance(listener_timeout, (int, float)):
            raise TypeError("listener_timeout: expected a number of seconds")
        if not 0 < listener_timeout < float("inf"):
            raise ValueError(
                f"listener_timeout: expected a positive number, got {listener_timeout}"
            )
        listeners = tuple(listeners)
        for listener in listeners:
            if not callable(listener):
                raise TypeError("listeners: expected callables taking an Event")
        self.breaker = breaker
        self.retry = retry
        self.fallback_on: FallbackOn = fallback_on
        self._classifier = classifier or classify_error
        self._store: CircuitStore = store if store is not None else MemoryStore(clock=clock)
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._rng = rng or random.Random()
        self._listeners: tuple[Listener, ...] = listeners
        self._listener_timeout = float(listener_timeout)
        self._listener_tasks: set[asyncio.Task[None]] = set()
        self._tallies: dict[str, _Tally] = {}
        self._counts_lock = threading.Lock()

    # -- public inspection and control -----------------------------------------------
    @property
    def store(self) -> CircuitStore:
        return self._store

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every :class:`Event` from now on (once: adding the
        same listener again changes nothing)."""
        if not callable(listener):
            raise TypeError("listener: expected a callable taking an Event")
        if listener not in self._listeners:
            self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    async def flush_listeners(self) -> None:
        """Wait until the async listeners this policy scheduled on the running event loop
        have finished (each is bounded by ``listener_timeout``)."""
        loop = asyncio.get_running_loop()
        while True:
            mine = [t for t in list(self._listener_tasks) if t.get_loop() is loop]
            if not mine:
                return
            await asyncio.wait(mine)

    def classify(self, exc: BaseException) -> Classification:
        """Classify ``exc`` with this policy's classifier (falls back to the built-in one
        if a user classifier fails, and logs that failure)."""
        try:
            found = self._classifier(exc)
        except Exception:
            logger.exception("callpolicy classifier failed; using the built-in one")
            return classify_error(exc)
        if not isinstance(found, Classification):
            logger.error("callpolicy classifier returned %r, not a Classification", found)
            return classify_error(exc)
        return found

    def circuit(self, key: str) -> Circuit:
        """The circuit of ``key`` (``provider::model``), created on first use."""
        return (self._tallies.get(key) or self._tally(key)).circuit

    def _tally(self, key: str) -> _Tally:
        with self._counts_lock:
            tally = self._tallies.get(key)
            if tally is not None:
                return tally
        provider, model = split_key(key)
        circuit = self._store.circuit(
            key,
            provider=provider,
            model=model,
            config=self.breaker,
            on_transition=self._on_transition,
        )
        with self._counts_lock:
            # The store hands out one circuit per key, so a racing creator built the same.
            return self._tallies.setdefault(key, _Tally(circuit))

    def state(self, key: str) -> CircuitState:
        """The state of ``key``'s circuit (CLOSED for a key never called)."""
        return self.circuit(key).snapshot().state

    def snapshot(self) -> dict[str, CircuitSnapshot]:
        """Every known circuit's state, by key, each with this policy's :class:`KeyMetrics`
        (``metrics``)."""
        found = {c.key: c for c in self._store.circuits()}
        tallies = dict(self._tallies)
        found.update((key, tally.circuit) for key, tally in tallies.items())
        counts = self.metrics()
        return {
            key: replace(
                circuit.snapshot(),
                metrics=counts.get(key)
                or KeyMetrics(key=key, provider=circuit.provider, model=circuit.model),
            )
            for key, circuit in sorted(found.items())
        }

    def metrics(self) -> dict[str, KeyMetrics]:
        """This policy's counts (calls, successes, failures by class, refusals, retries,
        fallbacks, cache hits and misses, budget refusals), by key. Local to this process
        and cheap: no store is asked, unlike :meth:`snapshot`."""
        with self._counts_lock:
            return {key: tally.metrics() for key, tally in sorted(self._tallies.items())}

    def trip(self, key: str) -> None:
        """Open ``key``'s circuit now, for one cooldown (then probes resume)."""
        self.circuit(key).force(CircuitState.OPEN, hold=False)

    def reset(self, key: str) -> None:
        """Close ``key``'s circuit and clear its counts and any forced state."""
        self.circuit(key).force(None, hold=False)

    def force_open(self, key: str) -> None:
        """Hold ``key``'s circuit open (no probes) until :meth:`reset`."""
        self.circuit(key).force(CircuitState.OPEN, hold=True)

    def force_closed(self, key: str) -> None:
        """Hold ``key``'s circuit closed (failures not counted) until :meth:`reset`."""
        self.circuit(key).force(CircuitState.CLOSED, hold=True)

    def __copy__(self) -> CallPolicy:
        # A policy is shared state: a copied model (pydantic model_copy, copy.deepcopy of
        # a chain) must keep sharing its circuits, not fork them.
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> CallPolicy:
        return self

    def fallback_served(self) -> dict[str, int]:
        """How many calls the fallback answered, by the primary's key (this process)."""
        with self._counts_lock:
            return {key: t.fallbacks for key, t in self._tallies.items() if t.fallbacks}

    def __repr__(self) -> str:
        return "CallPolicy\n" + text_table(self.snapshot().values(), self.fallback_served())

    def _repr_html_(self) -> str:
        """The circuits as a table, for Jupyter."""
        return html_table(self.snapshot().values(), self.fallback_served())

    # -- the guarded call, sync ------------------------------------------------------
    def execute(
        self,
        key: str,
        call: Callable[[], T],
        /,
        *,
        fallback: Callable[[], T] | Fallbacks[T] | None = None,
        fallback_key: str | None = None,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        request: CallRequest[T] | None = None,
    ) -> T:
        """Run ``call()`` under ``key``'s breaker, with retry and fallback as configured.

        ``fallback`` answers instead when the circuit is open or (per ``fallback_on``) the
        primary failed; it runs under ``fallback_key``'s breaker when one is given, once,
        without retries. A :class:`Fallbacks` list is tried in order, each under its own
        circuit (``fallback_key`` is then not used). Errors propagate unchanged: a refused
        call raises :class:`CircuitOpenError`, a failed one the provider's own exception
        (or, when a list of fallbacks ends without an answer, :class:`AllModelsFailedError`).

        With a ``cache`` and/or a ``budget`` (``request`` then describes the call), the
        order is cache -> budget -> fallback -> retry -> breaker: a hit costs no budget,
        and a call the budget refuses (:class:`BudgetExceededError`) reaches no model.
        """
        if budget is not None or cache is not None:
            return self._cached(key, call, fallback, fallback_key, budget, cache, request)
        tally = self._tallies.get(key) or self._tally(key)
        circuit = tally.circuit
        refused: CircuitOpenError | None = None
        try:
            permit = circuit.admit()
        except CircuitOpenError as refusal:
            self._refused(circuit, refusal)
            if fallback is None:
                raise
            refused = _detached(refusal)
        if refused is not None:
            # Served outside the except block: a model called while an exception is
            # being handled runs measurably slower (every call of an outage pays it).
            assert fallback is not None
            return self._run_fallback(
                circuit, fallback, fallback_key, refused, None, _refused_state(refused)
            )
        retry = self.retry
        started = self._clock() if retry is not None else 0.0
        attempt = 1
        while True:
            try:
                result = call()
            except Exception as exc:
                classification, outcome = self._judge(exc)
                self._count_error(tally, classification, outcome)
                state = circuit.record(permit, outcome)
                delay = self._next_delay(circuit, exc, classification, state, attempt, started)
                if delay is not None:
                    self._sleep(delay)
                    attempt += 1
                    next_permit = self._admit_retry(circuit, exc, attempt, started)
                    if next_permit is not None:
                        permit = next_permit
                        continue
                    if fallback is not None:  # refused mid-retry: open, so every mode falls back
                        return self._run_fallback(
                            circuit, fallback, fallback_key, exc, classification, _OPEN
                        )
                    raise
                if fallback is not None and self._wants_fallback(classification, outcome):
                    return self._run_fallback(
                        circuit, fallback, fallback_key, exc, classification, state
                    )
                raise
            except BaseException:
                circuit.record(permit, _IGNORED)  # cancelled or interrupted: free the slot
                self._count_cancelled(tally)
                raise
            circuit.record(permit, _SUCCESS)
            tally.successes += 1
            return result

    def _run_fallback(
        self,
        circuit: Circuit,
        fallback: Callable[[], T] | Fallbacks[T],
        fallback_key: str | None,
        cause: BaseException,
        classification: Classification | None,
        state: CircuitState,
    ) -> T:
        self._emit_fallback(circuit, cause, classification)
        token = _current_fallback.set(FallbackStart(circuit.key, state, cause))
        try:
            if isinstance(fallback, Fallbacks):
                return run_chain(self, circuit.key, fallback, cause)
            if fallback_key is None:
                return fallback()
            return self._guard_once(
                self._tallies.get(fallback_key) or self._tally(fallback_key), fallback
            )
        except AllModelsFailedError:
            raise  # names every model already
        except Exception as exc:
            _chain(exc, cause)
            self._note_fallback_failure(exc, circuit, cause)
            raise
        finally:
            _current_fallback.reset(token)

    def _guard_once(self, tally: _Tally, call: Callable[[], T]) -> T:
        circuit = tally.circuit
        try:
            permit = circuit.admit()
        except CircuitOpenError as refusal:
            self._refused(circuit, refusal)
            raise
        try:
            result = call()
        except Exception as exc:
            classification, outcome = self._judge(exc)
            self._count_error(tally, classification, outcome)
            circuit.record(permit, outcome)
            raise
        except BaseException:
            circuit.record(permit, _IGNORED)
            self._count_cancelled(tally)
            raise
        circuit.record(permit, _SUCCESS)
        tally.successes += 1
        return result

    # -- the guarded call, async -----------------------------------------------------
    async def aexecute(
        self,
        key: str,
        call: Callable[[], Awaitable[T]],
        /,
        *,
        fallback: Callable[[], Awaitable[T]] | Fallbacks[Awaitable[T]] | None = None,
        fallback_key: str | None = None,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        request: CallRequest[T] | None = None,
    ) -> T:
        """Async :meth:`execute`: ``call`` and ``fallback`` return awaitables.

        No lock is held across an ``await``; a cancelled call frees its probe slot.
        """
        if budget is not None or cache is not None:
            return await self._acached(key, call, fallback, fallback_key, budget, cache, request)
        tally = self._tallies.get(key) or self._tally(key)
        circuit = tally.circuit
        native = circuit.is_async_native
        refused: CircuitOpenError | None = None
        try:
            permit = await circuit.aadmit() if native else circuit.admit()
        except CircuitOpenError as refusal:
            self._refused(circuit, refusal)
            if fallback is None:
                raise
            refused = _detached(refusal)
        if refused is not None:  # outside the except block, as in execute
            assert fallback is not None
            return await self._arun_fallback(
                circuit, fallback, fallback_key, refused, None, _refused_state(refused)
            )
        retry = self.retry
        started = self._clock() if retry is not None else 0.0
        attempt = 1
        while True:
            try:
                result = await call()
            except Exception as exc:
                classification, outcome = self._judge(exc)
                self._count_error(tally, classification, outcome)
                state = (
                    await circuit.arecord(permit, outcome)
                    if native
                    else circuit.record(permit, outcome)
                )
                delay = self._next_delay(circuit, exc, classification, state, attempt, started)
                if delay is not None:
                    await self._async_sleep(delay)
                    attempt += 1
                    next_permit = await self._aadmit_retry(circuit, exc, attempt, started)
                    if next_permit is not None:
                        permit = next_permit
                        continue
                    if fallback is not None:  # refused mid-retry: open, so every mode falls back
                        return await self._arun_fallback(
                            circuit, fallback, fallback_key, exc, classification, _OPEN
                        )
                    raise
                if fallback is not None and self._wants_fallback(classification, outcome):
                    return await self._arun_fallback(
                        circuit, fallback, fallback_key, exc, classification, state
                    )
                raise
            except BaseException:
                # Cancelled (CancelledError), interrupted or exiting: free the slot.
                # Recording here never awaits for the memory store, so it completes
                # even inside a cancelled task.
                self._count_cancelled(tally)
                if native:
                    await asyncio.shield(circuit.arecord(permit, _IGNORED))
                else:
                    circuit.record(permit, _IGNORED)
                raise
            if native:
                await circuit.arecord(permit, _SUCCESS)
            else:
                circuit.record(permit, _SUCCESS)
            tally.successes += 1
            return result

    async def _arun_fallback(
        self,
        circuit: Circuit,
        fallback: Callable[[], Awaitable[T]] | Fallbacks[Awaitable[T]],
        fallback_key: str | None,
        cause: BaseException,
        classification: Classification | None,
        state: CircuitState,
    ) -> T:
        self._emit_fallback(circuit, cause, classification)
        # Set in this task's context: the fallback's coroutine, awaited here, sees it.
        token = _current_fallback.set(FallbackStart(circuit.key, state, cause))
        try:
            if isinstance(fallback, Fallbacks):
                return await arun_chain(self, circuit.key, fallback, cause)
            if fallback_key is None:
                return await fallback()
            return await self._aguard_once(
                self._tallies.get(fallback_key) or self._tally(fallback_key), fallback
            )
        except AllModelsFailedError:
            raise  # names every model already
        except Exception as exc:
            _chain(exc, cause)
            self._note_fallback_failure(exc, circuit, cause)
            raise
        finally:
            _current_fallback.reset(token)

    async def _aguard_once(self, tally: _Tally, call: Callable[[], Awaitable[T]]) -> T:
        circuit = tally.circuit
        native = circuit.is_async_native
        try:
            permit = await circuit.aadmit() if native else circuit.admit()
        except CircuitOpenError as refusal:
            self._refused(circuit, refusal)
            raise
        try:
            result = await call()
        except Exception as exc:
            classification, outcome = self._judge(exc)
            self._count_error(tally, classification, outcome)
            await circuit.arecord(permit, outcome) if native else circuit.record(permit, outcome)
            raise
        except BaseException:
            self._count_cancelled(tally)
            if native:
                await asyncio.shield(circuit.arecord(permit, _IGNORED))
            else:
                circuit.record(permit, _IGNORED)
            raise
        await circuit.arecord(permit, _SUCCESS) if native else circuit.record(permit, _SUCCESS)
        tally.successes += 1
        return result

    async def _aadmit_retry(
        self, circuit: Circuit, last_error: Exception, attempt: int, started: float
    ) -> Permit | None:
        try:
            return await circuit.aadmit() if circuit.is_async_native else circuit.admit()
        except CircuitOpenError as refusal:
            self._refused(circuit, refusal)
            self._note_gave_up(last_error, circuit, attempt - 1, started, "the circuit opened")
            return None

    # -- the guarded stream (callpolicy/_stream.py) ---------------------------------------
    def stream(
        self,
        key: str,
        start: Callable[[], Iterable[C]],
        /,
        *,
        fallback: Callable[[], Iterable[C]] | Fallbacks[Iterable[C]] | None = None,
        fallback_key: str | None = None,
        finished: Callable[[C], bool] | None = None,
        fallback_finished: Callable[[C], bool] | Sequence[Callable[[C], bool] | None] | None = None,
    ) -> Iterator[C]:
        """The stream ``start()`` opens, guarded as one call under ``key``'s breaker.

        ``start`` opens the primary's stream (called once per attempt); ``fallback`` opens
        the fallback's, guarded once under ``fallback_key`` when given. Admission, retry
        and fallback apply until the first chunk; after it, a failure is recorded and
        re-raised with a note (``callpolicy: stream of <key> failed after N chunks``),
        never replayed. ``finished(chunk)`` (``fallback_finished`` for the fallback's
        chunks) is True for a chunk carrying the provider's end marker: a stream that ends
        without one raises :class:`IncompleteStreamError` after its last chunk and counts
        as a failure; None: the integration reports none (no check). It must not raise.
        Consumed to its end, the stream is a success; closed early by its consumer, it is
        neither (a half-open slot is freed). Each chunk is yielded as the same object, as
        it comes. Nothing happens until the stream is iterated; the permit is held while
        it runs.

        A :class:`Fallbacks` list of stream openers is tried in order, each under its own
        circuit, as ``execute`` tries one (``fallback_key`` is then not used): a step
        whose circuit is open is skipped without a call, a failure before a step's first
        chunk hands over to the next per ``fallback_on``, and when every step fails
        :class:`AllModelsFailedError` names each model tried. The first step to deliver a
        chunk serves the stream, under the rules above. ``fallback_finished`` is then one
        check for every step, or a sequence of checks (or None) aligned with the steps.

        >>> policy = CallPolicy()
        >>> list(policy.stream("acme::m1", lambda: iter(["Hel", "lo"])))
        ['Hel', 'lo']
        """
        if fallback_finished is not None and not callable(fallback_finished):
            _check_markers(fallback, fallback_finished)
        return guard_stream(self, key, start, fallback, fallback_key, finished, fallback_finished)

    def astream(
        self,
        key: str,
        start: Callable[[], AsyncIterable[C] | Awaitable[AsyncIterable[C]]],
        /,
        *,
        fallback: Callable[[], AsyncIterable[C] | Awaitable[AsyncIterable[C]]]
        | Fallbacks[AsyncIterable[C] | Awaitable[AsyncIterable[C]]]
        | None = None,
        fallback_key: str | None = None,
        finished: Callable[[C], bool] | None = None,
        fallback_finished: Callable[[C], bool] | Sequence[Callable[[C], bool] | None] | None = None,
    ) -> AsyncIterator[C]:
        """Async :meth:`stream`: ``start`` returns an async iterable, or an awaitable of
        one; the result is an async generator (``aclose()`` closes the inner stream, and
        a cancelled consumer frees its slot like an early stop)."""
        if fallback_finished is not None and not callable(fallback_finished):
            _check_markers(fallback, fallback_finished)
        return aguard_stream(self, key, start, fallback, fallback_key, finished, fallback_finished)

    # -- the outer policies: cache, then budget ---------------------------------------
    def _cached(
        self,
        key: str,
        call: Callable[[], T],
        fallback: Callable[[], T] | Fallbacks[T] | None,
        fallback_key: str | None,
        budget: Budget | None,
        cache: ResponseCache | None,
        request: CallRequest[T] | None,
    ) -> T:
        request = _require_request(request)
        keep = None
        if cache is not None and fallback is not None and not cache.cache_fallback_answers:
            fell_back = [False]  # a fallback's answer must not outlive the outage
            fallback = _noting(fallback, fell_back)
            keep = _unless(fell_back)

        def budgeted() -> T:
            if budget is None:
                return self.execute(key, call, fallback=fallback, fallback_key=fallback_key)
            try:
                reservation = budget.reserve(key, budget.estimate(request.input_text()))
            except BudgetExceededError as refusal:
                self._budget_refused(key, refusal)
                raise
            answered = [key]
            routed: Callable[[], T] | Fallbacks[T] | None = None
            if isinstance(fallback, Fallbacks):
                routed = fallback.map(functools.partial(_answering, answered))
            elif fallback is not None:

                def routed() -> T:
                    answered[0] = fallback_key or key
                    return fallback()

            try:
                result = self.execute(key, call, fallback=routed, fallback_key=fallback_key)
            except CircuitOpenError:
                budget.release(reservation, refund_call=answered[0] == key)
                raise
            except Exception as exc:
                # A caller's mistake with no fallback run never reached a model: no round.
                budget.release(reservation, refund_call=self._never_sent(exc, answered[0], key))
                raise
            except BaseException:
                budget.release(reservation)
                raise
            budget.commit(reservation, _usage(request, result), key=answered[0])
            return result

        if cache is None:
            return budgeted()
        encode, decode = request.encode, request.decode
        if encode is None or decode is None:
            raise TypeError("request: encode and decode are needed when a cache is given")

        cache_key = cache.request_key(key, request.describe)
        if cache_key is None:  # no canonical form: uncached, never another request's answer
            return budgeted()

        def computed() -> T:
            self._count_cache_miss(key)
            return budgeted()

        value, status = cache.get_or_compute(
            cache_key, computed, encode=encode, decode=decode, keep=keep
        )
        return self._served_from_cache(key, request, value, status)

    async def _acached(
        self,
        key: str,
        call: Callable[[], Awaitable[T]],
        fallback: Callable[[], Awaitable[T]] | Fallbacks[Awaitable[T]] | None,
        fallback_key: str | None,
        budget: Budget | None,
        cache: ResponseCache | None,
        request: CallRequest[T] | None,
    ) -> T:
        request = _require_request(request)
        keep = None
        if cache is not None and fallback is not None and not cache.cache_fallback_answers:
            fell_back = [False]  # a fallback's answer must not outlive the outage
            fallback = _anoting(fallback, fell_back)
            keep = _unless(fell_back)

        async def budgeted() -> T:
            if budget is None:
                return await self.aexecute(key, call, fallback=fallback, fallback_key=fallback_key)
            try:
                reservation = await budget.areserve(key, budget.estimate(request.input_text()))
            except BudgetExceededError as refusal:
                self._budget_refused(key, refusal)
                raise
            answered = [key]
            routed: Callable[[], Awaitable[T]] | Fallbacks[Awaitable[T]] | None = None
            if isinstance(fallback, Fallbacks):
                routed = fallback.map(functools.partial(_answering, answered))
            elif fallback is not None:

                async def routed() -> T:
                    answered[0] = fallback_key or key
                    return await fallback()

            try:
                result = await self.aexecute(key, call, fallback=routed, fallback_key=fallback_key)
            except CircuitOpenError:
                await budget.arelease(reservation, refund_call=answered[0] == key)
                raise
            except Exception as exc:
                await budget.arelease(
                    reservation, refund_call=self._never_sent(exc, answered[0], key)
                )
                raise
            except BaseException:
                await budget.arelease(reservation)
                raise
            await budget.acommit(reservation, _usage(request, result), key=answered[0])
            return result

        if cache is None:
            return await budgeted()
        encode, decode = request.encode, request.decode
        if encode is None or decode is None:
            raise TypeError("request: encode and decode are needed when a cache is given")

        cache_key = cache.request_key(key, request.describe)
        if cache_key is None:  # no canonical form: uncached, never another request's answer
            return await budgeted()

        async def computed() -> T:
            self._count_cache_miss(key)
            return await budgeted()

        value, status = await cache.aget_or_compute(
            cache_key, computed, encode=encode, decode=decode, keep=keep
        )
        return self._served_from_cache(key, request, value, status)

    def _budget_refused(self, key: str, refusal: BudgetExceededError) -> None:
        tally = self._tallies.get(key) or self._tally(key)
        with self._counts_lock:
            tally.budget_refusals += 1
        provider, model = split_key(key)
        self._dispatch(
            Event(
                EventKind.BUDGET_REFUSED,
                key,
                provider,
                model,
                reason=f"{refusal.kind}: {refusal.consumed} of {refusal.limit}",
                error_type=type(refusal).__name__,
            )
        )

    def _count_cache_miss(self, key: str) -> None:
        tally = self._tallies.get(key) or self._tally(key)
        with self._counts_lock:
            tally.cache_misses += 1

    def _served_from_cache(self, key: str, request: CallRequest[T], value: T, status: str) -> T:
        if status == "miss":
            return value
        tally = self._tallies.get(key) or self._tally(key)
        with self._counts_lock:
            tally.cache_hits += 1
        provider, model = split_key(key)
        self._dispatch(Event(EventKind.CACHE_HIT, key, provider, model, reason=status))
        return request.mark(value, status) if request.mark is not None else value

    # -- decisions shared by sync and async ----------------------------------------------
    def _judge(self, exc: BaseException) -> tuple[Classification, Outcome]:
        classification = self.classify(exc)
        counted = classification.error_class in self.breaker.counted_errors
        return classification, (_FAILURE if counted else _IGNORED)

    def _never_sent(self, exc: Exception, answered: str, key: str) -> bool:
        """A call that failed with the caller's own mistake, the fallback never started."""
        return answered == key and self.classify(exc).error_class is _CALLER

    def _wants_fallback(self, classification: Classification, outcome: Outcome) -> bool:
        if classification.error_class is _CALLER:
            return False  # the fallback would be handed the same mistake, in every mode
        mode = self.fallback_on
        return mode == "error" or (mode == "failure" and outcome is _FAILURE)

    def _next_delay(
        self,
        circuit: Circuit,
        exc: Exception,
        classification: Classification,
        state: CircuitState,
        attempt: int,
        started: float,
    ) -> float | None:
        """Seconds to wait before another attempt, or None to give up (noting why)."""
        retry = self.retry
        if retry is None or classification.error_class not in retry.retry_on:
            if attempt > 1:
                self._note_gave_up(exc, circuit, attempt, started, "not retryable")
            return None
        if state is not CircuitState.CLOSED:
            why = "the circuit opened" if state is CircuitState.OPEN else f"the circuit is {state}"
            self._note_gave_up(exc, circuit, attempt, started, why)
            return None
        if attempt >= retry.max_attempts:
            self._note_gave_up(exc, circuit, attempt, started, "attempts exhausted")
            return None
        delay = retry.delay(attempt, classification.retry_after, self._rng)
        if retry.deadline is not None and self._clock() - started + delay > retry.deadline:
            self._note_gave_up(exc, circuit, attempt, started, "deadline reached")
            return None
        tally = self._tallies.get(circuit.key) or self._tally(circuit.key)
        with self._counts_lock:
            tally.retries += 1
        self._dispatch(
            Event(
                EventKind.RETRY,
                circuit.key,
                circuit.provider,
                circuit.model,
                error_class=classification.error_class,
                error_type=type(exc).__name__,
                attempt=attempt,
                delay=delay,
            )
        )
        return delay

    def _admit_retry(
        self, circuit: Circuit, last_error: Exception, attempt: int, started: float
    ) -> Permit | None:
        try:
            return circuit.admit()
        except CircuitOpenError as refusal:
            self._refused(circuit, refusal)
            self._note_gave_up(last_error, circuit, attempt - 1, started, "the circuit opened")
            return None

    def _note_gave_up(
        self, exc: BaseException, circuit: Circuit, attempts: int, started: float, why: str
    ) -> None:
        elapsed = self._clock() - started
        add_note(
            exc,
            f"callpolicy: gave up on {circuit.provider}/{circuit.model} after {attempts} "
            f"attempt{'s' if attempts != 1 else ''} over {elapsed:.2f}s ({why})",
        )

    @staticmethod
    def _note_fallback_failure(exc: BaseException, circuit: Circuit, cause: BaseException) -> None:
        add_note(
            exc,
            f"callpolicy: the fallback failed after {circuit.provider}/{circuit.model} "
            f"failed with {type(cause).__name__}",
        )

    # -- counts and events -----------------------------------------------------------------
    def _count_error(self, tally: _Tally, classification: Classification, outcome: Outcome) -> None:
        counts = tally.failures if outcome is _FAILURE else tally.ignored
        error_class = classification.error_class
        with self._counts_lock:
            counts[error_class] = counts.get(error_class, 0) + 1
            first_auth = error_class is _AUTH and counts[error_class] == 1
        if first_auth:
            _warn_auth(tally.circuit, classification)

    def _count_cancelled(self, tally: _Tally) -> None:
        with self._counts_lock:
            tally.cancelled += 1

    def _dispatch(self, event: Event) -> None:
        dispatch(
            event,
            self._listeners,
            timeout=self._listener_timeout,
            pending=self._listener_tasks,
        )

    def _on_transition(self, transition: Transition) -> None:
        self._dispatch(Event.from_transition(transition))

    def _refused(self, circuit: Circuit, refusal: CircuitOpenError) -> None:
        tally = self._tallies.get(circuit.key) or self._tally(circuit.key)
        with self._counts_lock:
            tally.refusals += 1
        if not self._listeners and not logger.isEnabledFor(logging.DEBUG):
            return  # nobody to tell: an open circuit's refusals stay cheap
        self._dispatch(
            Event(
                EventKind.REFUSED,
                circuit.key,
                circuit.provider,
                circuit.model,
                state=CircuitState.OPEN if refusal.retry_in != 0.0 else CircuitState.HALF_OPEN,
                failures=refusal.failures,
                delay=refusal.retry_in,
            )
        )

    def _emit_fallback(
        self, circuit: Circuit, cause: BaseException, classification: Classification | None
    ) -> None:
        refused = isinstance(cause, CircuitOpenError)
        tally = self._tallies.get(circuit.key) or self._tally(circuit.key)
        with self._counts_lock:
            tally.fallbacks += 1
        if not self._listeners and not logger.isEnabledFor(logging.INFO):
            return
        self._dispatch(
            Event(
                EventKind.FALLBACK,
                circuit.key,
                circuit.provider,
                circuit.model,
                state=CircuitState.OPEN if refused else None,
                error_class=None if classification is None else classification.error_class,
                error_type=None if refused else type(cause).__name__,
            )
        )


def _warn_auth(circuit: Circuit, classification: Classification) -> None:
    """A provider refused our credentials: said once per key, at WARNING, since behind a
    fallback a revoked key is otherwise silent. Names no secret (nor the provider's
    message, which can quote part of the key)."""
    status = "" if classification.status is None else f"HTTP {classification.status}, "
    logger.warning(
        "callpolicy: the provider of %r refused the credentials (%sauth): check its API "
        "key and permissions; every call to it fails (and goes to the fallback, if any) "
        "until they are fixed",
        circuit.key,
        status,
        extra={
            "callpolicy_event": "auth_failed",
            "callpolicy_key": circuit.key,
            "callpolicy_provider": circuit.provider,
            "callpolicy_model": circuit.model,
            "callpolicy_error_class": str(classification.error_class),
        },
    )


def _detached(refusal: CircuitOpenError) -> CircuitOpenError:
    """``refusal`` without its traceback, to keep past its except block: the traceback
    holds the frame that holds the refusal, a cycle only the collector would free."""
    return refusal.with_traceback(None)


def _chain(exc: BaseException, cause: BaseException) -> None:
    """A fallback's error, raised outside the primary's except block, still names the
    primary's refusal or error as its context, as it would inside it."""
    if exc.__context__ is None and exc is not cause:
        exc.__context__ = cause


def _refused_state(refusal: CircuitOpenError) -> CircuitState:
    """The state a refusal comes from: half-open with its probe slots taken (no wait),
    or open (cooling down, or held)."""
    return CircuitState.HALF_OPEN if refusal.retry_in == 0.0 else _OPEN


def _answering(answered: list[str], key: str | None, call: Callable[[], T]) -> Callable[[], T]:
    """``call``, noting first that ``key`` (a step of a fallback list) is answering: the
    budget counts the call's usage under the model that answered."""

    def step() -> T:
        if key is not None:
            answered[0] = key
        return call()

    return step


def _require_request(request: CallRequest[T] | None) -> CallRequest[T]:
    if request is None:
        raise TypeError("request: a CallRequest is needed when a budget or cache is given")
    return request


def _usage(request: CallRequest[T], result: T) -> Usage | None:
    if request.usage is None:
        return None
    return Usage.from_report(request.usage(result))


def _noting(
    fallback: Callable[[], T] | Fallbacks[T], noted: list[bool]
) -> Callable[[], T] | Fallbacks[T]:
    """``fallback`` (each step of a list), noting in ``noted[0]`` that it ran (for the
    cache)."""
    if isinstance(fallback, Fallbacks):
        return fallback.map(lambda _key, call: _noted(call, noted))
    return _noted(fallback, noted)


def _noted(fallback: Callable[[], T], noted: list[bool]) -> Callable[[], T]:
    def noting() -> T:
        noted[0] = True
        return fallback()

    return noting


def _anoting(
    fallback: Callable[[], Awaitable[T]] | Fallbacks[Awaitable[T]], noted: list[bool]
) -> Callable[[], Awaitable[T]] | Fallbacks[Awaitable[T]]:
    """Async :func:`_noting`."""
    if isinstance(fallback, Fallbacks):
        return fallback.map(lambda _key, call: _anoted(call, noted))
    return _anoted(fallback, noted)


def _anoted(fallback: Callable[[], Awaitable[T]], noted: list[bool]) -> Callable[[], Awaitable[T]]:
    async def noting() -> T:
        noted[0] = True
        return await fallback()

    return noting


def _unless(noted: list[bool]) -> Callable[[object], bool]:
    """A cache ``keep``: store the answer unless the fallback gave it."""
    return lambda _answer: not noted[0]


def _check_markers(fallback: object, markers: object) -> None:
    """A ``fallback_finished`` that is not one check: one per step of a list of fallbacks."""
    if not isinstance(fallback, Fallbacks):
        raise TypeError(
            "fallback_finished: expected a function of one chunk or None (a sequence of "
            "them only with a Fallbacks list)"
        )
    if not isinstance(markers, Sequence) or isinstance(markers, str):
        raise TypeError(
            f"fallback_finished: expected a function of one chunk, None, or a sequence of "
            f"them, got {type(markers).__name__}"
        )
    if len(markers) != len(fallback):
        raise ValueError(
            f"fallback_finished: {len(markers)} checks for {len(fallback)} fallbacks "
            "(one per step, in order)"
        )
    for index, marker in enumerate(markers):
        if marker is not None and not callable(marker):
            raise TypeError(f"fallback_finished[{index}]: expected a function of one chunk or None")
