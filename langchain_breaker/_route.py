"""One wrapper's way through the engine: which runnable answers, under which circuit.

A :class:`Route` holds the wrapper's :class:`callpolicy.ModelGuard` (policy, circuit
keys, budget and cache) and the runnables it may call (the primary, and the fallbacks in
the guard's order). Its ``call`` hands the guard zero-argument callables; each calls a
runnable's *own* ``invoke`` (or ``ainvoke``, ``stream``, ``astream``) with a run config
stamped with ``callpolicy_*`` metadata. The route itself starts no run, so a trace shows
exactly one run per attempt, of the model that answered. Sync and async calls share one
body: only the name of the runnable's method differs, and the relay of events (awaited
when async).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, cast

from langchain_core.callbacks import Callbacks
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    merge_configs,
    var_child_runnable_config,
)

from callpolicy import ModelGuard, fallback_start, split_key

from ._events import EventRelay
from ._outer import Outer, chunk_usage, unbind
from ._served import mark_served, served_mark
from ._stream_end import StreamFinished, end_marker

__all__ = [
    "FALLBACK",
    "META_ATTEMPT",
    "META_KEY",
    "META_ROLE",
    "META_STATE",
    "PRIMARY",
    "Route",
    "aserved",
]

PRIMARY: Final = "primary"
FALLBACK: Final = "fallback"

# Metadata keys stamped on every attempt's run (so on its LangSmith/LangChain trace).
META_KEY: Final = "callpolicy_key"
"""The primary's circuit key (``provider::model``), also on the fallback's runs."""
META_ROLE: Final = "callpolicy_role"
"""``"primary"`` or ``"fallback"``: which model answered in this run."""
META_STATE: Final = "callpolicy_state"
"""On the fallback's runs: the primary circuit's state as the fallback starts (``open``:
refused, or this failure opened it; ``closed``: a failure below the threshold;
``half_open``: its probes were all in flight)."""
META_ATTEMPT: Final = "callpolicy_attempt"
"""Which model call of the guarded call this run is: 1, 2, ... (the primary's retries,
then the fallback; a fallback serving a refused call is call 1)."""

_NOTHING: Final = object()
_SAME: Final = object()

CallMethod = Literal["invoke", "ainvoke"]
StreamMethod = Literal["stream", "astream"]


class Route:
    """The guard and runnables of one wrapper (or one structured-output runnable)."""

    __slots__ = (
        "_markers",
        "callbacks",
        "fallbacks",
        "guard",
        "metadata",
        "outer",
        "primary",
        "tags",
    )

    def __init__(
        self,
        guard: ModelGuard,
        primary: Runnable[Any, Any],
        fallbacks: Sequence[Runnable[Any, Any]] = (),
        *,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        callbacks: Callbacks = None,
        outer: Outer | None = None,
    ) -> None:
        self.guard = guard
        self.primary = primary
        self.fallbacks = tuple(fallbacks)
        """The fallbacks' runnables, in the order of ``guard.fallback_keys``."""
        self.tags = tags
        """Tags, metadata and callbacks of the wrapper itself, added to every run."""
        self.metadata = metadata
        self.callbacks = callbacks
        self.outer = outer
        """How calls are described for the guard's budget and cache; None without either
        (then the route never builds a request: the hot path is unchanged)."""
        self._markers: dict[tuple[Any, Any], tuple[Any, Any]] = {}
        """The end-marker checks of a stream called without kwargs, by the two options
        (looked up once per route: the first chunk's time is measured)."""

    def with_runnables(
        self,
        primary: Runnable[Any, Any],
        fallbacks: Sequence[Runnable[Any, Any]] | None = None,
        *,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        callbacks: Callbacks = None,
        outer: object = _SAME,
    ) -> Route:
        """A route with the same guard (and codec, unless ``outer`` is given; the same
        fallbacks, unless ``fallbacks`` is), calling other runnables."""
        return Route(
            self.guard,
            primary,
            self.fallbacks if fallbacks is None else fallbacks,
            tags=tags,
            metadata=metadata,
            callbacks=callbacks,
            outer=self.outer if outer is _SAME else cast("Outer | None", outer),
        )

    # -- per-call config -----------------------------------------------------------------
    def prepare(self, config: RunnableConfig | None, key: str) -> RunnableConfig:
        """A private copy of the caller's config (with the context's, as LangChain merges
        it), plus the wrapper's own tags, metadata and callbacks, plus the key."""
        if config is None and var_child_runnable_config.get() is None:
            # What ensure_config() would add, the called model's own ensure_config() adds.
            cfg = RunnableConfig(tags=[], metadata={})
        else:
            cfg = ensure_config(config)  # a fresh dict, with fresh tags and metadata
        tags = self.tags
        if tags:
            cfg["tags"] = [*cfg["tags"], *(t for t in tags if t not in cfg["tags"])]
        if self.metadata:
            cfg["metadata"].update(self.metadata)
        if self.callbacks is not None:
            cfg = merge_configs(cfg, {"callbacks": self.callbacks})
        cfg["metadata"][META_KEY] = key
        return cfg

    @staticmethod
    def stamp(cfg: RunnableConfig, role: str, attempt: int) -> RunnableConfig:
        """Label ``cfg`` for one attempt. Mutates in place: the model called copies what it
        keeps (``ensure_config``), so one dict serves every attempt of a call."""
        metadata = cfg["metadata"]
        metadata[META_ROLE] = role
        metadata[META_ATTEMPT] = attempt
        if attempt > 1:
            cfg.pop("run_id", None)  # a caller's run id names the first run only
        return cfg

    def stamp_fallback(self, cfg: RunnableConfig, key: str, attempt: int) -> RunnableConfig:
        """:meth:`stamp` for the fallback, with the state of the primary's circuit as the
        engine handed over (no second read of the circuit: with a Redis store, a round
        trip on every call of an outage)."""
        start = fallback_start()
        if start is not None and start.key == key:
            state = start.state.value
        else:  # not called by the engine's fallback step: read it
            try:
                state = self.guard.policy.circuit(key).snapshot().state.value
            except Exception:  # a label must not cost the answer (a store out of reach)
                state = "unknown"
        cfg["metadata"][META_STATE] = state
        return self.stamp(cfg, FALLBACK, attempt)

    @staticmethod
    def served(answer: Any, key: str | None) -> Any:
        """A fallback's answer, marked as served by the fallback ``key`` (and why)."""
        model = split_key(key)[1] if key else "unknown"
        return mark_served(answer, served_mark(key, model))

    # -- invoke --------------------------------------------------------------------------
    def single_attempt(self) -> bool:
        """One attempt and nothing to route: no fallback, no budget or cache, no retry."""
        return not self.fallbacks and self.outer is None and self.guard.policy.retry is None

    def bare(self) -> bool:
        """True when a call with no config and no kwargs needs nothing but the breaker:
        a single attempt, no tags or callbacks of the wrapper's own, and no parent run in
        the context (whose callbacks might listen to events)."""
        return (
            self.single_attempt()
            and not self.tags
            and self.callbacks is None
            and var_child_runnable_config.get() is None
        )

    def bare_config(self) -> RunnableConfig:
        """The run config of a bare call, built in one step: what key_of/prepare/stamp
        would build (the wrapper's metadata, then the stamps), without their calls."""
        key, metadata = self.guard.key, self.metadata
        if metadata:
            stamped = {**metadata, META_KEY: key, META_ROLE: PRIMARY, META_ATTEMPT: 1}
        else:
            stamped = {META_KEY: key, META_ROLE: PRIMARY, META_ATTEMPT: 1}
        return RunnableConfig(tags=[], metadata=stamped)

    def call(
        self, method: CallMethod, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> Any:
        """One guarded call of the primary's ``method`` (``"invoke"``: its answer;
        ``"ainvoke"``: the call's coroutine, from a plain function: one frame fewer for
        each of thousands of concurrent calls)."""
        guard = self.guard
        policy = guard.policy
        execute = policy.execute if method == "invoke" else policy.aexecute
        if config is None and not kwargs and self.bare():  # a script's, a thread pool's
            run = getattr(self.primary, method)
            return execute(guard.key, functools.partial(run, input, self.bare_config()))
        key = guard.key_of(kwargs)
        cfg = self.prepare(config, key)
        if not EventRelay.wanted(policy, cfg):
            if self.single_attempt():
                # One attempt and nothing to route: the engine calls the model's own method
                # (no closure, cell or extra frame per call in flight, which with 10,000
                # async calls in flight is memory the collector keeps walking).
                self.stamp(cfg, PRIMARY, 1)
                run = getattr(self.primary, method)
                return execute(key, functools.partial(run, input, cfg, **kwargs))
            return self._guarded(method, input, cfg, kwargs, key, None)
        if method == "ainvoke":
            return self._arelayed_call(input, cfg, kwargs, key)
        relay = EventRelay(cfg)
        try:
            return self._guarded(method, input, cfg, kwargs, key, relay)
        finally:
            relay.finish()

    async def _arelayed_call(
        self, input: Any, cfg: RunnableConfig, kwargs: dict[str, Any], key: str
    ) -> Any:
        relay = EventRelay(cfg)
        try:
            return await self._guarded("ainvoke", input, cfg, kwargs, key, relay)
        finally:
            await relay.afinish()

    def _guarded(
        self,
        method: CallMethod,
        input: Any,
        cfg: RunnableConfig,
        kwargs: dict[str, Any],
        key: str,
        relay: EventRelay | None,
    ) -> Any:
        """The call through the guard: each attempt labelled (and its events relayed),
        a fallback's answer marked, the budget and cache given the call's request."""
        asynchronous = method == "ainvoke"
        run = getattr(self.primary, method)
        attempt = 0

        def call() -> Any:
            nonlocal attempt
            attempt += 1
            if relay is None:
                return run(input, self.stamp(cfg, PRIMARY, attempt), **kwargs)
            return _started(
                relay,
                asynchronous,
                lambda: self.stamp(cfg, PRIMARY, attempt),
                lambda labelled: run(input, labelled, **kwargs),
            )

        fallback = None
        if self.fallbacks:
            fallback_kwargs = self.guard.fallback_kwargs(kwargs)

            def fallback(index: int) -> Any:
                nonlocal attempt
                attempt += 1
                step = self.guard.fallback_keys[index]
                runnable = getattr(self.fallbacks[index], method)
                answer = _started(
                    relay,
                    asynchronous,
                    lambda: self.stamp_fallback(cfg, key, attempt),
                    lambda labelled: runnable(input, labelled, **fallback_kwargs),
                )
                return aserved(answer, step) if asynchronous else self.served(answer, step)

        outer = self.outer
        request = None if outer is None else outer.request(self.primary, input, kwargs)
        execute = self.guard.aexecute if asynchronous else self.guard.execute
        return execute(key, call, fallback, request)

    # -- streams ---------------------------------------------------------------------------
    def passthrough(
        self,
        method: StreamMethod,
        input: Any,
        config: RunnableConfig | None,
        kwargs: dict[str, Any],
    ) -> Any:
        """The primary's own stream, untouched (``guard_streams=False``); metered by the
        budget, if any."""
        chunks = getattr(self.primary, method)(input, config, **kwargs)
        return chunks if self.outer is None else self.metered(method, chunks, input, kwargs)

    def metered(
        self,
        method: StreamMethod,
        chunks: Any,
        input: Any,
        kwargs: dict[str, Any],
        answered: list[str] | None = None,
    ) -> Any:
        """``chunks`` as they are, or, with a budget, each chunk (the same object) counted
        as it passes (the engine's meter; LangChain chunks report usage as deltas, each
        one added): the usage it reports, and the stream as one call (under
        ``answered[0]``, the key of the model streaming, when given)."""
        outer = self.outer
        if outer is None or outer.budget is None:
            return chunks
        budget = outer.budget
        meter = budget.metered if method == "stream" else budget.ametered
        return meter(
            chunks,
            key=self.guard.key_of(kwargs),
            usage_of=chunk_usage,
            estimate=lambda: outer.estimate(input),
            key_of=None if answered is None else (lambda _chunk: answered[0]),
        )

    def stream(
        self,
        method: StreamMethod,
        input: Any,
        config: RunnableConfig | None,
        kwargs: dict[str, Any],
        *,
        finished: StreamFinished = None,
        fallback_finished: StreamFinished = None,
    ) -> Any:
        """The primary's stream (``method``: ``"stream"`` or ``"astream"``) under the
        engine's guard (``CallPolicy.stream``): admission, retry and the fallbacks'
        streams before the first chunk, the chunks untouched, a failure after it counted,
        a stream cut short (no end marker) an error; metered by the budget, if any."""
        guard = self.guard
        relay: EventRelay | None = None
        if (
            config is None
            and not kwargs
            and not self.tags
            and self.callbacks is None
            and var_child_runnable_config.get() is None
        ):
            # A script's stream (no config, kwargs or parent run): what key_of/prepare
            # would build, in one step, as bare_config() does for invoke. Its config has
            # no callbacks, so there is nobody to relay events to (EventRelay.wanted: no).
            # The time to the first chunk is measured (benchmarks/instructions.py).
            key, metadata = guard.key, self.metadata
            cfg = RunnableConfig(
                tags=[], metadata={**metadata, META_KEY: key} if metadata else {META_KEY: key}
            )
        else:
            key = guard.key_of(kwargs)
            cfg = self.prepare(config, key)
            if EventRelay.wanted(guard.policy, cfg):
                relay = EventRelay(cfg, active=False)
        run = getattr(self.primary, method)
        attempt = 0
        answered = [key]

        def start() -> Any:
            nonlocal attempt
            attempt += 1
            return _started(
                relay,
                False,  # opening a stream is a plain call, also for astream
                lambda: self.stamp(cfg, PRIMARY, attempt),
                lambda labelled: run(input, labelled, **kwargs),
            )

        fallback = None
        if self.fallbacks:
            fallback_kwargs = guard.fallback_kwargs(kwargs)

            def fallback(index: int) -> Any:
                nonlocal attempt
                attempt += 1
                answered[0] = guard.fallback_keys[index]
                opener = getattr(self.fallbacks[index], method)
                return _started(
                    relay,
                    False,
                    lambda: self.stamp_fallback(cfg, key, attempt),
                    lambda labelled: opener(input, labelled, **fallback_kwargs),
                )

        ends, fallback_ends = self._end_markers(finished, fallback_finished, kwargs)
        guarded: Callable[..., Any] = guard.stream if method == "stream" else guard.astream
        chunks = guarded(key, start, fallback, finished=ends, fallback_finished=fallback_ends)
        if relay is not None:
            relayed: Callable[..., Any] = _relayed if method == "stream" else _arelayed
            chunks = relayed(relay, chunks)
        if self.outer is not None:
            chunks = self.metered(method, chunks, input, kwargs, answered)
        return chunks

    def _end_markers(
        self, finished: StreamFinished, fallback_finished: StreamFinished, kwargs: dict[str, Any]
    ) -> tuple[Any, Any]:
        """The end-marker checks of the primary's stream and of each fallback's (chosen for
        its own model), cached for calls without kwargs."""
        markers = self._markers.get((finished, fallback_finished)) if not kwargs else None
        if markers is None:
            fallback_kwargs = self.guard.fallback_kwargs(kwargs)
            markers = (
                end_marker(_model_of(self.primary), finished, kwargs),
                tuple(
                    end_marker(_model_of(runnable), fallback_finished, fallback_kwargs)
                    for runnable in self.fallbacks
                ),
            )
            if not kwargs:
                self._markers[finished, fallback_finished] = markers
        return markers


def _started(
    relay: EventRelay | None,
    asynchronous: bool,
    label: Callable[[], RunnableConfig],
    run: Callable[[RunnableConfig], Any],
) -> Any:
    """Start one attempt: hand the events so far (the previous attempt's) to the caller's
    callbacks, label the attempt's run and name it (:meth:`EventRelay.run_started`), run
    it. Async: a coroutine doing the same, the relay awaited."""
    if relay is None:
        return run(label())
    if asynchronous:
        return _astarted(relay, label, run)
    relay.flush()
    labelled = label()
    relay.run_started(labelled)
    return run(labelled)


async def _astarted(
    relay: EventRelay,
    label: Callable[[], RunnableConfig],
    run: Callable[[RunnableConfig], Awaitable[Any]],
) -> Any:
    await relay.aflush()
    labelled = label()
    relay.run_started(labelled)
    return await run(labelled)


async def aserved(answer: Awaitable[Any], key: str | None) -> Any:
    """Async :meth:`Route.served`: the fallback's answer, once awaited, marked."""
    return Route.served(await answer, key)


def _model_of(runnable: Runnable[Any, Any]) -> Any:
    """The chat model under a binding (bound tools): its class says which end marker."""
    model, _bound = unbind(runnable)
    return model


def _relayed(relay: EventRelay, chunks: Iterator[Any]) -> Iterator[Any]:
    """``chunks``, with the engine's events of the stream's opening (refusal, retries,
    fallback) handed to the caller's callbacks as custom events. The events are collected
    only while the opening runs, inside one ``next()``: a context variable must not stay
    set across a ``yield`` (the consumer's context would see it)."""
    relay.activate()
    try:
        first = next(chunks, _NOTHING)
    finally:
        relay.finish()
    if first is _NOTHING:
        return
    try:
        yield first
    except BaseException:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        raise
    yield from chunks


async def _arelayed(relay: EventRelay, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Async :func:`_relayed`."""
    relay.activate()
    try:
        first = await anext(chunks, _NOTHING)
    finally:
        await relay.afinish()
    if first is _NOTHING:
        return
    try:
        yield first
        async for chunk in chunks:
            yield chunk
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
