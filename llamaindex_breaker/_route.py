"""One wrapper's way through the engine: how a call and its fallbacks (or a stream and
its fallbacks' streams) are handed to the wrapper's :class:`callpolicy.ModelGuard`.

A :class:`~llamaindex_breaker._calls.Call` names the model method to call; the route
turns it into callables that call a model's *own* method (``inner.chat``,
``fallback.achat_with_tools``, ...) and mark what a fallback returns, and hands them to
the guard, which owns the keys, the fallbacks' plan, the budget and the cache. What to
hand over is decided once for sync and async (:meth:`Route.run`, :meth:`Route._guarded`);
the async drivers only acquire the rate limiter and await, the stream drivers meter.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM

from callpolicy import ModelGuard

from ._calls import Call
from ._markers import EndMarker
from ._served import mark_fallback
from ._usage import meter_stream

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Generator, Iterable

    from ._llm import CircuitBreakerLLM

__all__ = ["Route"]

R = TypeVar("R", ChatResponse, CompletionResponse)

Mark = Callable[[Any, str, str], Any]
"""Marks a fallback's answer (or stream) with its key and model name."""


class Route:
    """The guard, models and stream end markers of one wrapper, resolved once at
    construction."""

    __slots__ = (
        "fallbacks",
        "finished",
        "guard",
        "inner",
        "marks",
        "step_finished",
        "tool_indices",
    )

    def __init__(
        self,
        guard: ModelGuard,
        inner: LLM,
        fallbacks: Iterable[LLM] = (),
        *,
        finished: EndMarker | None = None,
        step_finished: Iterable[EndMarker | None] = (),
    ) -> None:
        self.guard = guard
        self.inner = inner
        self.fallbacks: tuple[LLM, ...] = tuple(fallbacks)
        """The fallbacks, in the order of ``guard.fallback_keys``."""
        self.marks: tuple[tuple[str, str], ...] = tuple(
            zip(guard.fallback_keys, guard.fallback_names, strict=True)
        )
        """Each fallback's mark on what it serves: its circuit key and model name."""
        self.finished = finished
        """The inner model's stream end marker (None: its integration reports none)."""
        self.step_finished: tuple[EndMarker | None, ...] = tuple(step_finished)
        """Each fallback's stream end marker, aligned with :attr:`fallbacks`."""
        if not len(self.step_finished) == len(self.fallbacks) == len(self.marks):
            raise ValueError("step_finished: expected one end marker per fallback")
        self.tool_indices: tuple[int, ...] = tuple(
            index
            for index, model in enumerate(self.fallbacks)
            if isinstance(model, FunctionCallingLLM) and model.metadata.is_function_calling_model
        )
        """The fallbacks that can call tools (their indices), in order."""

    def model(self, llm: CircuitBreakerLLM, call: Call[Any]) -> LLM:
        """The inner model, checked for tool calling when ``call`` needs it."""
        return llm._tool_model() if call.calls_tools else self.inner

    # -- calls -------------------------------------------------------------------------
    @overload
    def run(self, llm: CircuitBreakerLLM, call: Call[R]) -> R: ...

    @overload
    def run(
        self, llm: CircuitBreakerLLM, call: Call[R], *, asynchronous: Literal[True]
    ) -> Awaitable[R]: ...

    def run(self, llm: CircuitBreakerLLM, call: Call[Any], *, asynchronous: bool = False) -> Any:
        """The call on the inner model through the guard: breaker, retry, each fallback in
        turn (its answer marked), and the cache and budget when the wrapper has them.

        One body for sync and async: with ``asynchronous``, the call's method returns an
        awaitable and so does this (its caller, :meth:`arun`, acquired the rate limiter).
        """
        guard, kwargs = self.guard, call.kwargs
        execute: Callable[..., Any]
        if asynchronous:
            execute, answer = guard.aexecute, self._aanswer
        else:
            limiter = llm.rate_limiter
            if limiter is not None:
                limiter.acquire()
            execute, answer = guard.execute, self._answer
        inner = llm._tool_model() if call.calls_tools else self.inner
        key = guard.key_of(kwargs) if kwargs else guard.key
        request = call.request(inner) if guard.described else None
        if not self.fallbacks:
            return execute(key, call.bound(inner), None, request)
        return execute(
            key,
            call.bound(inner),
            partial(answer, mark_fallback, call),
            request,
            indices=self.tool_indices if call.calls_tools else None,
        )

    async def arun(self, llm: CircuitBreakerLLM, call: Call[R]) -> R:
        """Async :meth:`run`: the call's method returns an awaitable."""
        limiter = llm.rate_limiter
        if limiter is not None:
            await limiter.async_acquire()
        return await self.run(llm, call, asynchronous=True)

    # -- streams -----------------------------------------------------------------------
    def stream(self, llm: CircuitBreakerLLM, call: Call[R]) -> Generator[R, None, None]:
        """The call's stream guarded as one call (:meth:`callpolicy.ModelGuard.stream`):
        admission, retry and each fallback's stream in turn (its chunks marked) until the
        first chunk; after it, a failure counts and propagates; a stream cut short (no end
        marker, where the model reports one) raises
        :class:`callpolicy.IncompleteStreamError`. Nothing starts until it is iterated.
        Untouched with ``guard_streams=False``; with a budget, metered as it passes."""
        limiter = llm.rate_limiter
        if limiter is not None:
            limiter.acquire()
        key, meter = self._meter(call, asynchronous=False)
        if llm.guard_streams:
            chunks = self._guarded(llm, call, key, self.guard.stream, self._answer, _marked)
        else:
            chunks = call.untouched(self.model(llm, call))
        return cast("Generator[R, None, None]", chunks if meter is None else meter(chunks))

    async def astream(self, llm: CircuitBreakerLLM, call: Call[R]) -> AsyncGenerator[R, None]:
        """Async :meth:`stream`: the call's method is a LlamaIndex ``astream_*`` method (a
        coroutine that returns the stream)."""
        limiter = llm.rate_limiter
        if limiter is not None:
            await limiter.async_acquire()
        key, meter = self._meter(call, asynchronous=True)
        if llm.guard_streams:
            chunks = self._guarded(llm, call, key, self.guard.astream, self._aanswer, _amarked)
        else:
            chunks = await call.untouched(self.model(llm, call))
        return cast("AsyncGenerator[R, None]", chunks if meter is None else meter(chunks))

    def _guarded(
        self,
        llm: CircuitBreakerLLM,
        call: Call[Any],
        key: str,
        stream: Callable[..., Any],
        answer: Callable[[Mark, Call[Any], int], Any],
        mark: Mark,
    ) -> Any:
        """One body for both: ``stream`` is the guard's stream or astream; ``answer`` opens
        a fallback's stream, ``mark`` marks its chunks."""
        start = call.bound(self.model(llm, call))
        if not self.fallbacks:
            return stream(key, start, finished=self.finished)
        return stream(
            key,
            start,
            partial(answer, mark, call),
            finished=self.finished,
            fallback_finished=self.step_finished,
            indices=self.tool_indices if call.calls_tools else None,
        )

    def _meter(
        self, call: Call[Any], *, asynchronous: bool
    ) -> tuple[str, Callable[[Any], Any] | None]:
        """The stream's key and, with a budget, the meter to pass it through, which counts
        the input as it is now, before the stream opens (an integration may append to the
        arguments in place)."""
        key, budget = self.guard.key_of(call.kwargs), self.guard.budget
        if budget is None:
            return key, None
        text = call.input_text()
        return key, lambda chunks: meter_stream(
            chunks, budget, key, text, asynchronous=asynchronous
        )

    # -- a fallback's call, its answer (or stream) marked as its -------------------------
    def _answer(self, mark: Mark, call: Call[Any], index: int) -> Any:
        model, kwargs = self.fallbacks[index], self.guard.fallback_kwargs(call.kwargs)
        return mark(call.on(model, kwargs), *self.marks[index])

    async def _aanswer(self, mark: Mark, call: Call[Any], index: int) -> Any:
        model, kwargs = self.fallbacks[index], self.guard.fallback_kwargs(call.kwargs)
        return mark(await call.on(model, kwargs), *self.marks[index])


def _marked(chunks: Iterable[R], key: str, model: str) -> Generator[R, None, None]:
    """The fallback's chunks, each marked as the fallback's; closing this closes them."""
    iterator = iter(chunks)
    try:
        for chunk in iterator:
            yield mark_fallback(chunk, key, model)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


async def _amarked(chunks: AsyncIterable[R], key: str, model: str) -> AsyncGenerator[R, None]:
    """Async :func:`_marked`."""
    iterator = aiter(chunks)
    try:
        async for chunk in iterator:
            yield mark_fallback(chunk, key, model)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
