"""One wrapper's way through the engine: which runnable answers, under which circuit.

A :class:`Route` holds the policy, the circuit keys, and the two runnables it may call
(the primary, and the fallback if any). Its ``invoke`` hands the engine two zero-argument
callables; each calls the runnable's *own* ``invoke`` with a run config stamped with
``callpolicy_*`` metadata. The route itself starts no run, so a trace shows exactly one
run per attempt, of the model that answered.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final, cast

from langchain_core.callbacks import Callbacks
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    merge_configs,
    var_child_runnable_config,
)

from callpolicy import CallPolicy, Fallbacks, fallback_start, split_key

from ._events import EventRelay
from ._keys import CircuitKeys
from ._outer import Outer, ametered, metered, unbind
from ._served import mark_served, served_mark
from ._stream_end import StreamFinished, end_marker

__all__ = ["FALLBACK", "META_ATTEMPT", "META_KEY", "META_ROLE", "META_STATE", "PRIMARY", "Route"]

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


class Route:
    """The policy, keys and runnables of one wrapper (or one structured-output runnable)."""

    __slots__ = (
        "_markers",
        "callbacks",
        "fallback",
        "keys",
        "metadata",
        "more",
        "outer",
        "policy",
        "primary",
        "tags",
    )

    def __init__(
        self,
        policy: CallPolicy,
        keys: CircuitKeys,
        primary: Runnable[Any, Any],
        fallback: Runnable[Any, Any] | None,
        *,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        callbacks: Callbacks = None,
        outer: Outer | None = None,
        more: Sequence[tuple[str, Runnable[Any, Any]]] = (),
    ) -> None:
        self.policy = policy
        self.keys = keys
        self.primary = primary
        self.fallback = fallback
        self.tags = tags
        """Tags, metadata and callbacks of the wrapper itself, added to every run."""
        self.metadata = metadata
        self.callbacks = callbacks
        self.outer = outer
        """The budget and cache, and how calls are described for them; None without
        either (then the route never builds a request: the hot path is unchanged)."""
        self._markers: dict[tuple[Any, Any], tuple[Any, Any]] = {}
        """The end-marker checks of a stream called without kwargs, by the two options
        (looked up once per route: the first chunk's time is measured)."""
        self.more = tuple(more)
        """The fallbacks after the first, each with its circuit key, tried in order."""

    def with_runnables(
        self,
        primary: Runnable[Any, Any],
        fallback: Runnable[Any, Any] | None,
        *,
        tags: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        callbacks: Callbacks = None,
        outer: object = _SAME,
        more: Sequence[tuple[str, Runnable[Any, Any]]] | None = None,
    ) -> Route:
        """A route with the same policy and circuits (and budget and cache, unless
        ``outer`` is given; the further fallbacks, unless ``more`` is), calling other
        runnables."""
        return Route(
            self.policy,
            self.keys,
            primary,
            fallback,
            tags=tags,
            metadata=metadata,
            callbacks=callbacks,
            outer=self.outer if outer is _SAME else cast("Outer | None", outer),
            more=self.more if more is None else more,
        )

    # -- per-call config -----------------------------------------------------------------
    def key_of(self, kwargs: Mapping[str, Any]) -> str:
        """The circuit of this call: the primary's, or a per-call ``model=`` override's."""
        model = kwargs.get("model") if kwargs else None
        return self.keys.for_model(model) if isinstance(model, str) else self.keys.default

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
                state = self.policy.circuit(key).snapshot().state.value
            except Exception:  # a label must not cost the answer (a store out of reach)
                state = "unknown"
        cfg["metadata"][META_STATE] = state
        return self.stamp(cfg, FALLBACK, attempt)

    @staticmethod
    def fallback_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call kwargs for the fallback: a ``model=`` override names a primary's model."""
        if "model" not in kwargs:
            return kwargs
        return {name: value for name, value in kwargs.items() if name != "model"}

    def fallback_plan(
        self, on: Callable[[Runnable[Any, Any], str | None], Callable[[], Any]]
    ) -> tuple[Any, str | None]:
        """The engine's ``fallback`` and ``fallback_key`` for a call: ``on(runnable, key)``
        builds one fallback's callable; several fallbacks become a :class:`Fallbacks`
        list, each under its own circuit."""
        assert self.fallback is not None
        first_key = self.keys.fallback
        first = on(self.fallback, first_key)
        if not self.more:
            return first, first_key
        steps = [(first_key, first), *((key, on(runnable, key)) for key, runnable in self.more)]
        return Fallbacks(steps), None

    def _listed(self, call_fallback: Callable[..., Any]) -> tuple[Any, str | None]:
        """The engine's fallback list: ``call_fallback`` bound to each fallback."""
        return self.fallback_plan(
            lambda runnable, step: functools.partial(call_fallback, runnable, step)
        )

    @staticmethod
    def served(answer: Any, key: str | None) -> Any:
        """A fallback's answer, marked as served by the fallback ``key`` (and why)."""
        model = split_key(key)[1] if key else "unknown"
        return mark_served(answer, served_mark(key, model))

    # -- invoke --------------------------------------------------------------------------
    def single_attempt(self) -> bool:
        """One attempt and nothing to route: no fallback, no budget or cache, no retry."""
        return self.fallback is None and self.outer is None and self.policy.retry is None

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
        key, metadata = self.keys.default, self.metadata
        if metadata:
            stamped = {**metadata, META_KEY: key, META_ROLE: PRIMARY, META_ATTEMPT: 1}
        else:
            stamped = {META_KEY: key, META_ROLE: PRIMARY, META_ATTEMPT: 1}
        return RunnableConfig(tags=[], metadata=stamped)

    def invoke(self, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]) -> Any:
        if config is None and not kwargs and self.bare():  # a script's, a thread pool's
            return self.policy.execute(
                self.keys.default, functools.partial(self.primary.invoke, input, self.bare_config())
            )
        key = self.key_of(kwargs)
        cfg = self.prepare(config, key)
        if not EventRelay.wanted(self.policy, cfg):
            if self.single_attempt():
                self.stamp(cfg, PRIMARY, 1)  # one attempt, nothing to route (see ainvoke)
                return self.policy.execute(
                    key, functools.partial(self.primary.invoke, input, cfg, **kwargs)
                )
            return self._invoke(input, cfg, kwargs, key, None)
        relay = EventRelay(cfg)
        try:
            return self._invoke(input, cfg, kwargs, key, relay)
        finally:
            relay.flush()
            relay.close()

    def _invoke(
        self,
        input: Any,
        cfg: RunnableConfig,
        kwargs: dict[str, Any],
        key: str,
        relay: EventRelay | None,
    ) -> Any:
        primary = self.primary
        attempt = 0

        def call() -> Any:
            nonlocal attempt
            attempt += 1
            if relay is None:
                return primary.invoke(input, self.stamp(cfg, PRIMARY, attempt), **kwargs)
            relay.flush()
            labelled = self.stamp(cfg, PRIMARY, attempt)
            relay.run_started(labelled)
            return primary.invoke(input, labelled, **kwargs)

        fallback = self.fallback
        outer = self.outer
        if fallback is None and outer is None:
            return self.policy.execute(key, call)

        # One closure, as a single fallback always needed: the defaults name the first
        # fallback; a list binds each of its steps (functools.partial) instead.
        def call_fallback(runnable: Any = fallback, step: str | None = self.keys.fallback) -> Any:
            nonlocal attempt
            attempt += 1
            if relay is not None:
                relay.flush()
            labelled = self.stamp_fallback(cfg, key, attempt)
            if relay is not None:
                relay.run_started(labelled)
            answer = runnable.invoke(input, labelled, **self.fallback_kwargs(kwargs))
            return self.served(answer, step)

        plan: Any = None if fallback is None else call_fallback
        plan_key = self.keys.fallback
        if self.more:
            plan, plan_key = self._listed(call_fallback)
        if outer is None:
            return self.policy.execute(key, call, fallback=plan, fallback_key=plan_key)
        return self.policy.execute(
            key,
            call,
            fallback=plan,
            fallback_key=plan_key,
            budget=outer.budget,
            cache=outer.cache,
            request=outer.request(self.primary, input, kwargs),
        )

    def ainvoke(
        self, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
    ) -> Awaitable[Any]:
        """The call's coroutine (a plain function returning it: one frame fewer for each
        of thousands of concurrent calls)."""
        if config is None and not kwargs and self.bare():  # as in invoke
            return self.policy.aexecute(
                self.keys.default,
                functools.partial(self.primary.ainvoke, input, self.bare_config()),
            )
        key = self.key_of(kwargs)
        cfg = self.prepare(config, key)
        if not EventRelay.wanted(self.policy, cfg):
            if self.single_attempt():
                # One attempt and nothing to route: the engine awaits the model's own
                # coroutine (no closure, cell or extra frame per call in flight, which
                # with 10,000 calls in flight is memory the collector keeps walking).
                self.stamp(cfg, PRIMARY, 1)
                return self.policy.aexecute(
                    key, functools.partial(self.primary.ainvoke, input, cfg, **kwargs)
                )
            return self._ainvoke(input, cfg, kwargs, key, None)
        return self._ainvoke_relayed(input, cfg, kwargs, key)

    async def _ainvoke_relayed(
        self, input: Any, cfg: RunnableConfig, kwargs: dict[str, Any], key: str
    ) -> Any:
        relay = EventRelay(cfg)
        try:
            return await self._ainvoke(input, cfg, kwargs, key, relay)
        finally:
            await relay.aflush()
            relay.close()

    async def _ainvoke(
        self,
        input: Any,
        cfg: RunnableConfig,
        kwargs: dict[str, Any],
        key: str,
        relay: EventRelay | None,
    ) -> Any:
        primary = self.primary
        attempt = 0

        async def call() -> Any:
            nonlocal attempt
            attempt += 1
            if relay is None:
                return await primary.ainvoke(input, self.stamp(cfg, PRIMARY, attempt), **kwargs)
            await relay.aflush()
            labelled = self.stamp(cfg, PRIMARY, attempt)
            relay.run_started(labelled)
            return await primary.ainvoke(input, labelled, **kwargs)

        fallback = self.fallback
        outer = self.outer
        if fallback is None and outer is None:
            return await self.policy.aexecute(key, call)

        async def call_fallback(
            runnable: Any = fallback, step: str | None = self.keys.fallback
        ) -> Any:
            nonlocal attempt
            attempt += 1
            if relay is not None:
                await relay.aflush()
            labelled = self.stamp_fallback(cfg, key, attempt)
            if relay is not None:
                relay.run_started(labelled)
            answer = await runnable.ainvoke(input, labelled, **self.fallback_kwargs(kwargs))
            return self.served(answer, step)

        plan: Any = None if fallback is None else call_fallback
        plan_key = self.keys.fallback
        if self.more:
            plan, plan_key = self._listed(call_fallback)
        if outer is None:
            return await self.policy.aexecute(key, call, fallback=plan, fallback_key=plan_key)
        return await self.policy.aexecute(
            key,
            call,
            fallback=plan,
            fallback_key=plan_key,
            budget=outer.budget,
            cache=outer.cache,
            request=outer.request(self.primary, input, kwargs),
        )

    # -- streams: metered by the budget, if any -------------------------------------------
    def metered(
        self,
        chunks: Iterator[Any],
        input: Any,
        kwargs: dict[str, Any],
        answered: list[str] | None = None,
    ) -> Iterator[Any]:
        """``chunks`` as they are, or, with a budget, each chunk (the same object) counted
        as it passes: the usage it reports, and the stream as one call (under
        ``answered[0]``, the key of the model streaming, when given)."""
        outer = self.outer
        if outer is None or outer.budget is None:
            return chunks
        return metered(
            chunks,
            outer.budget,
            self.key_of(kwargs),
            lambda: outer.estimate(input),
            None if answered is None else (lambda _chunk: answered[0]),
        )

    def ametered(
        self,
        chunks: AsyncIterator[Any],
        input: Any,
        kwargs: dict[str, Any],
        answered: list[str] | None = None,
    ) -> AsyncIterator[Any]:
        """Async :meth:`metered`."""
        outer = self.outer
        if outer is None or outer.budget is None:
            return chunks
        return ametered(
            chunks,
            outer.budget,
            self.key_of(kwargs),
            lambda: outer.estimate(input),
            None if answered is None else (lambda _chunk: answered[0]),
        )

    # -- streams, guarded by the engine ------------------------------------------------------
    def _stream_calls(
        self,
        method: str,
        input: Any,
        config: RunnableConfig | None,
        kwargs: dict[str, Any],
        finished: StreamFinished,
        fallback_finished: StreamFinished,
    ) -> _StreamCalls:
        """What the engine needs to guard one stream: the key, the two openers (each
        labels its run as ``invoke``'s attempts are labelled), the end-marker checks."""
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
            key, metadata = self.keys.default, self.metadata
            cfg = RunnableConfig(
                tags=[], metadata={**metadata, META_KEY: key} if metadata else {META_KEY: key}
            )
        else:
            key = self.key_of(kwargs)
            cfg = self.prepare(config, key)
            if EventRelay.wanted(self.policy, cfg):
                relay = EventRelay(cfg, active=False)
        primary, fallback = self.primary, self.fallback
        attempt = 0
        answered = [key]

        def start() -> Any:
            nonlocal attempt
            attempt += 1
            if relay is not None:
                relay.flush()
            labelled = self.stamp(cfg, PRIMARY, attempt)
            if relay is not None:
                relay.run_started(labelled)
            return getattr(primary, method)(input, labelled, **kwargs)

        markers = self._markers.get((finished, fallback_finished)) if not kwargs else None
        if markers is None:
            markers = (
                end_marker(_model_of(primary), finished, kwargs),
                self._fallback_markers(fallback_finished, kwargs),
            )
            if not kwargs:
                self._markers[finished, fallback_finished] = markers
        call_fallback = None
        if fallback is not None:
            fallback_kwargs = self.fallback_kwargs(kwargs)

            if self.more:  # a list: one opener, bound to each step in turn

                def open_step(runnable: Any, step: str | None) -> Any:
                    nonlocal attempt
                    attempt += 1
                    answered[0] = step or key
                    if relay is not None:
                        relay.flush()
                    labelled = self.stamp_fallback(cfg, key, attempt)
                    if relay is not None:
                        relay.run_started(labelled)
                    return getattr(runnable, method)(input, labelled, **fallback_kwargs)

                plan = self._listed(open_step)[0]
                return key, start, plan, markers[0], markers[1], relay, answered

            def call_fallback() -> Any:
                nonlocal attempt
                attempt += 1
                answered[0] = self.keys.fallback or key
                if relay is not None:
                    relay.flush()
                labelled = self.stamp_fallback(cfg, key, attempt)
                if relay is not None:
                    relay.run_started(labelled)
                return getattr(fallback, method)(input, labelled, **fallback_kwargs)

        # A plain tuple: a NamedTuple's __new__ is one more Python call per stream.
        return key, start, call_fallback, markers[0], markers[1], relay, answered

    def _fallback_markers(self, option: StreamFinished, kwargs: dict[str, Any]) -> Any:
        """The fallbacks' end-marker checks: the one fallback's, or with a list, one per
        step in order (each chosen for its own model)."""
        fallback = self.fallback
        if fallback is None:
            return None
        fallback_kwargs = self.fallback_kwargs(kwargs)
        first = end_marker(_model_of(fallback), option, fallback_kwargs)
        if not self.more:
            return first
        return (
            first,
            *(
                end_marker(_model_of(runnable), option, fallback_kwargs)
                for _, runnable in self.more
            ),
        )

    def stream(
        self,
        input: Any,
        config: RunnableConfig | None,
        kwargs: dict[str, Any],
        *,
        finished: StreamFinished = None,
        fallback_finished: StreamFinished = None,
    ) -> Iterator[Any]:
        """The primary's stream under the engine's guard (``CallPolicy.stream``): admission,
        retry and the fallback's stream before the first chunk, the chunks untouched, a
        failure after it counted, a stream cut short (no end marker) an error; metered by
        the budget, if any."""
        key, start, call_fallback, ends, fallback_ends, relay, answered = self._stream_calls(
            "stream", input, config, kwargs, finished, fallback_finished
        )
        chunks = self.policy.stream(
            key,
            start,
            fallback=call_fallback,
            fallback_key=self.keys.fallback,
            finished=ends,
            fallback_finished=fallback_ends,
        )
        if relay is not None:
            chunks = _relayed(relay, chunks)
        if self.outer is not None:
            chunks = self.metered(chunks, input, kwargs, answered)
        return chunks

    def astream(
        self,
        input: Any,
        config: RunnableConfig | None,
        kwargs: dict[str, Any],
        *,
        finished: StreamFinished = None,
        fallback_finished: StreamFinished = None,
    ) -> AsyncIterator[Any]:
        """Async :meth:`stream`."""
        key, start, call_fallback, ends, fallback_ends, relay, answered = self._stream_calls(
            "astream", input, config, kwargs, finished, fallback_finished
        )
        chunks = self.policy.astream(
            key,
            start,
            fallback=call_fallback,
            fallback_key=self.keys.fallback,
            finished=ends,
            fallback_finished=fallback_ends,
        )
        if relay is not None:
            chunks = _arelayed(relay, chunks)
        if self.outer is not None:
            chunks = self.ametered(chunks, input, kwargs, answered)
        return chunks


_StreamCalls = tuple[
    str,  # the key
    Callable[[], Any],  # opens the primary's stream (an attempt)
    Callable[[], Any] | Fallbacks[Any] | None,  # opens the fallback's (or a list's steps)
    Callable[[Any], bool] | None,  # the primary's end-marker check
    Callable[[Any], bool] | tuple[Callable[[Any], bool] | None, ...] | None,  # the fallback's
    # (or one per step of a list)
    EventRelay | None,  # the events of the opening, for the caller's callbacks
    list[str],  # the key of the model streaming (for the budget's meter)
]
"""What :meth:`Route._stream_calls` returns."""


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
        try:
            relay.flush()
        finally:
            relay.close()
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
        try:
            await relay.aflush()
        finally:
            relay.close()
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
