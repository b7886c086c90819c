"""The engine's public face: :class:`CallPolicy`, the pipeline of strategies around a call.

Both adapters (LangChain, LlamaIndex) hand it zero-argument callables; it never sees a
framework type. The pipeline, outermost first::

    cache -> budget -> fallback -> retry -> breaker -> the model call

Each strategy is a module of its own (``_caching``, ``_budgeting``, ``_fallback``,
``_retrying``, ``_breaking``), composed once at construction (``_pipeline``); the cache
and the budget are per call. This module holds the policy's keys and their state,
metrics and listeners, and the healthy call: admit, call, record and count, written out
inline in :meth:`CallPolicy.execute` and :meth:`CallPolicy.aexecute` because every
guarded call pays for it. Anything else (a refusal with a fallback that has a key of its
own, a failure, a retry, a cache or a budget) is handed to the pipeline's steps, written
once for sync and async callers (``_drive``).
"""

from __future__ import annotations

import asyncio
import functools
import random
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
from typing import Any, TypeVar

from ._budget import Budget
from ._cache import ResponseCache
from ._classify import Classification, Classifier, classify_error, classify_with
from ._config import BreakerConfig, FallbackOn, RetryPolicy, checked_policy_options
from ._drive import arun, call_op, run
from ._errors import CircuitOpenError
from ._events import DEFAULT_LISTENER_TIMEOUT, Announcer, Event, Listener
from ._fallback import Fallbacks
from ._memory import MemoryStore
from ._pipeline import Core
from ._report import html_table, text_table
from ._request import CallRequest
from ._store import Circuit, CircuitStore, Transition
from ._stream import aguard_stream, guard_stream
from ._tally import Tallies
from ._types import CircuitSnapshot, CircuitState, KeyMetrics, Outcome

__all__ = ["CallPolicy"]

T = TypeVar("T")
C = TypeVar("C")

_SUCCESS = Outcome.SUCCESS
_IGNORED = Outcome.IGNORED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN


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
        breaker, listeners, timeout = checked_policy_options(
            breaker,
            breaker_options,
            retry=retry,
            fallback_on=fallback_on,
            classifier=classifier,
            callables={"clock": clock, "sleep": sleep, "async_sleep": async_sleep},
            listeners=listeners,
            listener_timeout=listener_timeout,
        )
        if store is not None and not isinstance(store, CircuitStore):
            raise TypeError(f"store: {type(store).__name__} does not implement CircuitStore")
        self.breaker = breaker
        self.retry = retry
        self.fallback_on: FallbackOn = fallback_on
        self._classifier = classifier or classify_error
        self._store: CircuitStore = store if store is not None else MemoryStore(clock=clock)
        self._clock = clock
        self._announcer = announcer = Announcer(listeners, timeout)
        self._listener_tasks = announcer.pending
        on_transition = functools.partial(_announce_transition, announcer)
        tallies = Tallies(self._store, breaker, on_transition)
        self._tallies = tallies.by_key
        self._tally = tallies.create
        self._metrics = tallies
        core = Core(
            tallies=tallies,
            announcer=announcer,
            counted=breaker.counted_errors,
            classify=self.classify,
            retry=retry,
            fallback_on=fallback_on,
            clock=clock,
            sleep=sleep,
            async_sleep=async_sleep,
            rng=rng or random.Random(),
        )
        self._core = core
        self._breaker = core.breaker
        self._falling_back = core.falling_back
        self._recover = core.recover
        self._timed = retry is not None
        """Only a retry's deadline needs the time the first attempt started."""

    # -- public inspection and control -----------------------------------------------
    @property
    def store(self) -> CircuitStore:
        return self._store

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every :class:`Event` from now on (once: adding the
        same listener again changes nothing)."""
        self._announcer.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._announcer.remove(listener)

    async def flush_listeners(self) -> None:
        """Wait until the async listeners this policy scheduled on the running event loop
        have finished (each is bounded by ``listener_timeout``)."""
        await self._announcer.flush()

    def classify(self, exc: BaseException) -> Classification:
        """Classify ``exc`` with this policy's classifier (falls back to the built-in one
        if a user classifier fails, and logs that failure)."""
        return classify_with(self._classifier, exc)

    def circuit(self, key: str) -> Circuit:
        """The circuit of ``key`` (``provider::model``), created on first use."""
        return (self._tallies.get(key) or self._tally(key)).circuit

    def state(self, key: str) -> CircuitState:
        """The state of ``key``'s circuit (CLOSED for a key never called)."""
        return self.circuit(key).snapshot().state

    def snapshot(self) -> dict[str, CircuitSnapshot]:
        """Every known circuit's state, by key, each with this policy's :class:`KeyMetrics`
        (``metrics``)."""
        return self._metrics.snapshot(self._store.circuits())

    def metrics(self) -> dict[str, KeyMetrics]:
        """This policy's counts (calls, successes, failures by class, refusals, retries,
        fallbacks, cache hits and misses, budget refusals), by key. Local to this process
        and cheap: no store is asked, unlike :meth:`snapshot`."""
        return self._metrics.metrics()

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
        return self._metrics.fallback_served()

    def __repr__(self) -> str:
        return "CallPolicy\n" + text_table(self.snapshot().values(), self.fallback_served())

    def _repr_html_(self) -> str:
        """The circuits as a table, for Jupyter."""
        return html_table(self.snapshot().values(), self.fallback_served())

    # -- the guarded call --------------------------------------------------------------
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
            outer = self._core.outer(
                self, key, call, fallback, fallback_key, budget, cache, request
            )
            answer: T = run(outer)
            return answer
        tally = self._tallies.get(key) or self._tally(key)
        circuit = tally.circuit
        refused: CircuitOpenError | None = None
        try:
            permit = circuit.admit()
        except CircuitOpenError as refusal:
            self._breaker.refused(tally, refusal)
            if fallback is None:
                raise
            # Kept past the except block without its traceback (which holds this frame:
            # a cycle only the collector would free). The fallback is served outside
            # the block: a model called while an exception is being handled runs slower.
            refused = refusal.with_traceback(None)
        if refused is not None:
            assert fallback is not None
            state = _HALF_OPEN if refused.retry_in == 0.0 else _OPEN
            if fallback_key is None and not isinstance(fallback, Fallbacks):
                return self._falling_back.serve_now(tally, fallback, refused, state)
            answer = run(
                self._falling_back.serve(tally, fallback, fallback_key, refused, None, state)
            )
            return answer
        started = self._clock() if self._timed else 0.0
        try:
            result = call()
        except Exception as exc:
            recovery = self._recover(
                tally, permit, exc, call_op(call), fallback, fallback_key, started
            )
        except BaseException:
            circuit.record(permit, _IGNORED)  # cancelled or interrupted: free the slot
            self._breaker.cancelled(tally)
            raise
        else:
            circuit.record(permit, _SUCCESS)
            tally.successes += 1
            return result
        # Outside the except block, as above: retries and the fallback run from here.
        answer = run(recovery)
        return answer

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
            outer = self._core.outer(
                self, key, call, fallback, fallback_key, budget, cache, request
            )
            answer: T = await arun(outer)
            return answer
        tally = self._tallies.get(key) or self._tally(key)
        circuit = tally.circuit
        native = circuit.is_async_native
        refused: CircuitOpenError | None = None
        try:
            permit = await circuit.aadmit() if native else circuit.admit()
        except CircuitOpenError as refusal:
            self._breaker.refused(tally, refusal)
            if fallback is None:
                raise
            refused = refusal.with_traceback(None)  # served outside the block, as in execute
        if refused is not None:
            assert fallback is not None
            state = _HALF_OPEN if refused.retry_in == 0.0 else _OPEN
            if fallback_key is None and not isinstance(fallback, Fallbacks):
                return await self._falling_back.aserve_now(tally, fallback, refused, state)
            serving = self._falling_back.serve(tally, fallback, fallback_key, refused, None, state)
            answer = await arun(serving)
            return answer
        started = self._clock() if self._timed else 0.0
        try:
            result = await call()
        except Exception as exc:
            recovery = self._recover(
                tally, permit, exc, call_op(call), fallback, fallback_key, started
            )
        except BaseException:
            # Cancelled (CancelledError), interrupted or exiting: free the slot. Recording
            # here never awaits for the memory store, so it completes even inside a
            # cancelled task.
            self._breaker.cancelled(tally)
            if native:
                await asyncio.shield(circuit.arecord(permit, _IGNORED))
            else:
                circuit.record(permit, _IGNORED)
            raise
        else:
            if native:
                await circuit.arecord(permit, _SUCCESS)
            else:
                circuit.record(permit, _SUCCESS)
            tally.successes += 1
            return result
        answer = await arun(recovery)
        return answer

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
        return guard_stream(
            self._core, key, start, fallback, fallback_key, finished, fallback_finished
        )

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
        return aguard_stream(
            self._core, key, start, fallback, fallback_key, finished, fallback_finished
        )


def _announce_transition(announcer: Announcer, transition: Transition) -> None:
    announcer.emit(Event.from_transition(transition))


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
