"""One wrapper's way through the engine: which circuit a call counts against, and how a
call and its fallback (or a stream and its fallback's stream) are handed to the policy.

The wrapper's methods build zero-argument callables that call a model's *own* method
(``inner.chat``, ``fallback.achat_with_tools``, ...); the route hands them to
:meth:`callpolicy.CallPolicy.execute`/``aexecute`` and marks what the fallback returns.
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
)
from typing import Any, TypeVar, cast

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms.function_calling import FunctionCallingLLM

from callpolicy import Budget, CallPolicy, CallRequest, ResponseCache

from ._keys import CircuitKeys
from ._markers import EndMarker
from ._request import ameter_stream, meter_stream
from ._served import mark_fallback

__all__ = ["Route"]

R = TypeVar("R", ChatResponse, CompletionResponse)


class Route:
    """The policy, circuit keys, budget and cache of one wrapper, resolved once at
    construction."""

    __slots__ = (
        "budget",
        "cache",
        "described",
        "fallback_finished",
        "finished",
        "keys",
        "policy",
        "tool_fallback",
    )

    def __init__(
        self,
        policy: CallPolicy,
        keys: CircuitKeys,
        tool_fallback: FunctionCallingLLM | None,
        *,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        finished: EndMarker | None = None,
        fallback_finished: EndMarker | None = None,
    ) -> None:
        self.policy = policy
        self.keys = keys
        self.tool_fallback = tool_fallback
        """The fallback when it can call tools; tool calls have no fallback otherwise."""
        self.budget = budget
        self.cache = cache
        self.described = budget is not None or cache is not None
        """Whether calls need a CallRequest (only for a budget or a cache: the plain path
        never builds one)."""
        self.finished = finished
        """The inner model's stream end marker (None: its integration reports none)."""
        self.fallback_finished = fallback_finished
        """The fallback's."""

    def key_of(self, kwargs: Mapping[str, Any]) -> str:
        """The circuit of this call: the inner model's, or a per-call ``model=`` override's."""
        model = kwargs.get("model") if kwargs else None
        return self.keys.for_model(model) if isinstance(model, str) else self.keys.default

    @staticmethod
    def fallback_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call kwargs for the fallback: a ``model=`` override names an inner model."""
        if "model" not in kwargs:
            return kwargs
        return {name: value for name, value in kwargs.items() if name != "model"}

    def run(
        self,
        key: str,
        call: Callable[[], R],
        fallback: Callable[[], R] | None,
        request: CallRequest[R] | None = None,
    ) -> R:
        """``call()`` under ``key``'s breaker; ``fallback()`` (marked) answers instead when
        the engine says so. ``request`` (given when :attr:`described`) lets the engine's
        cache and budget see the call."""
        if request is not None:
            return self._run_described(key, call, fallback, request)
        if fallback is None:
            return self.policy.execute(key, call)
        keys = self.keys
        model = keys.fallback_model or "unknown"

        def from_fallback() -> R:
            return mark_fallback(fallback(), keys.fallback, model)

        return self.policy.execute(key, call, fallback=from_fallback, fallback_key=keys.fallback)

    def _run_described(
        self,
        key: str,
        call: Callable[[], R],
        fallback: Callable[[], R] | None,
        request: CallRequest[R],
    ) -> R:
        keys = self.keys
        routed: Callable[[], R] | None = None
        if fallback is not None:
            model = keys.fallback_model or "unknown"

            def from_fallback() -> R:
                return mark_fallback(fallback(), keys.fallback, model)

            routed = from_fallback
        return self.policy.execute(
            key,
            call,
            fallback=routed,
            fallback_key=keys.fallback if fallback is not None else None,
            budget=self.budget,
            cache=self.cache,
            request=request,
        )

    async def arun(
        self,
        key: str,
        call: Callable[[], Awaitable[R]],
        fallback: Callable[[], Awaitable[R]] | None,
        request: CallRequest[R] | None = None,
    ) -> R:
        """Async :meth:`run`: the callables return awaitables."""
        if request is not None:
            return await self._arun_described(key, call, fallback, request)
        if fallback is None:
            return await self.policy.aexecute(key, call)
        keys = self.keys
        model = keys.fallback_model or "unknown"

        async def from_fallback() -> R:
            return mark_fallback(await fallback(), keys.fallback, model)

        return await self.policy.aexecute(
            key, call, fallback=from_fallback, fallback_key=keys.fallback
        )

    async def _arun_described(
        self,
        key: str,
        call: Callable[[], Awaitable[R]],
        fallback: Callable[[], Awaitable[R]] | None,
        request: CallRequest[R],
    ) -> R:
        keys = self.keys
        routed: Callable[[], Awaitable[R]] | None = None
        if fallback is not None:
            model = keys.fallback_model or "unknown"

            async def from_fallback() -> R:
                return mark_fallback(await fallback(), keys.fallback, model)

            routed = from_fallback
        return await self.policy.aexecute(
            key,
            call,
            fallback=routed,
            fallback_key=keys.fallback if fallback is not None else None,
            budget=self.budget,
            cache=self.cache,
            request=request,
        )

    # -- streams: metered when there is a budget -------------------------------------------
    def metered(
        self, key: str, chunks: Generator[R, None, None], input_text: Callable[[], str]
    ) -> Generator[R, None, None]:
        """``chunks`` as they are, or, with a budget, each unchanged while the stream and the
        usage its chunks report are counted (never refused); ``input_text`` gives the
        stream's input for an estimate when it reports no usage."""
        budget = self.budget
        return chunks if budget is None else meter_stream(chunks, budget, key, input_text)

    def ametered(
        self, key: str, chunks: AsyncGenerator[R, None], input_text: Callable[[], str]
    ) -> AsyncGenerator[R, None]:
        """Async :meth:`metered`."""
        budget = self.budget
        return chunks if budget is None else ameter_stream(chunks, budget, key, input_text)

    # -- guarded streams ----------------------------------------------------------------
    def stream(
        self,
        key: str,
        start: Callable[[], Iterable[R]],
        fallback: Callable[[], Iterable[R]] | None,
    ) -> Generator[R, None, None]:
        """``start()``'s stream, guarded by the engine as one call under ``key``
        (:meth:`callpolicy.CallPolicy.stream`): admission, retry and the fallback's stream
        (its chunks marked) until the first chunk; after it, a failure counts and
        propagates; a stream cut short (no end marker, where the model reports one)
        raises :class:`callpolicy.IncompleteStreamError`. Nothing starts until it is
        iterated."""
        # The engine's guarded stream is a generator (typed as an iterator there).
        if fallback is None:
            return cast(
                "Generator[R, None, None]", self.policy.stream(key, start, finished=self.finished)
            )
        keys = self.keys
        model = keys.fallback_model or "unknown"
        guarded = self.policy.stream(
            key,
            start,
            fallback=lambda: _marked(fallback(), keys.fallback, model),
            fallback_key=keys.fallback,
            finished=self.finished,
            fallback_finished=self.fallback_finished,
        )
        return cast("Generator[R, None, None]", guarded)

    def astream(
        self,
        key: str,
        start: Callable[[], Awaitable[AsyncIterable[R]]],
        fallback: Callable[[], Awaitable[AsyncIterable[R]]] | None,
    ) -> AsyncGenerator[R, None]:
        """Async :meth:`stream`: ``start`` is a LlamaIndex ``astream_*`` call (a coroutine
        that returns the stream)."""
        if fallback is None:
            return cast(
                "AsyncGenerator[R, None]", self.policy.astream(key, start, finished=self.finished)
            )
        keys = self.keys
        model = keys.fallback_model or "unknown"

        async def open_fallback() -> AsyncIterable[R]:
            return _amarked(await fallback(), keys.fallback, model)

        guarded = self.policy.astream(
            key,
            start,
            fallback=open_fallback,
            fallback_key=keys.fallback,
            finished=self.finished,
            fallback_finished=self.fallback_finished,
        )
        return cast("AsyncGenerator[R, None]", guarded)


def _marked(chunks: Iterable[R], key: str | None, model: str) -> Generator[R, None, None]:
    """The fallback's chunks, each marked as the fallback's; closing this closes them."""
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            yield mark_fallback(chunk, key, model)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


async def _amarked(
    chunks: AsyncIterable[R], key: str | None, model: str
) -> AsyncGenerator[R, None]:
    """Async :func:`_marked`."""
    iterator = aiter(chunks)
    try:
        async for chunk in iterator:
            yield mark_fallback(chunk, key, model)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
