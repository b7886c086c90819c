"""One wrapper's way through the engine: how a call and its fallbacks (or a stream and
its fallbacks' streams) are handed to the wrapper's :class:`callpolicy.ModelGuard`.

A :class:`~llamaindex_breaker._calls.Call` names the model method to call; the route
turns it into callables that call a model's *own* method (``inner.chat``,
``fallback.achat_with_tools``, ...) and mark what a fallback returns, and hands them to
the guard, which owns the keys, the fallbacks' plan, the budget and the cache. What to
hand over is decided once for sync and async (:meth:`Route._plan`); the four drivers
only acquire the rate limiter and call the guard.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM

from callpolicy import ModelGuard

from ._calls import Call
from ._markers import EndMarker
from ._request import meter_stream
from ._served import mark_fallback

if TYPE_CHECKING:
    from ._llm import CircuitBreakerLLM

__all__ = ["Route"]

R = TypeVar("R", ChatResponse, CompletionResponse)

Mark = Callable[[Any, str, str], Any]
"""Marks a fallback's answer (or stream) with its key and model name."""


class Route:
    """The guard, models and stream end markers of one wrapper, resolved once at
    construction."""

    __slots__ = ("fallbacks", "finished", "guard", "inner", "step_finished", "tool_indices")

    def __init__(
        self,
        guard: ModelGuard,
        inner: LLM,
        fallbacks: Sequence[LLM] = (),
        *,
        finished: EndMarker | None = None,
        step_finished: Sequence[EndMarker | None] = (),
    ) -> None:
        self.guard = guard
        self.inner = inner
        self.fallbacks: tuple[LLM, ...] = tuple(fallbacks)
        """The fallbacks, in the order of ``guard.fallback_keys``."""
        self.finished = finished
        """The inner model's stream end marker (None: its integration reports none)."""
        self.step_finished: tuple[EndMarker | None, ...] = tuple(step_finished)
        """Each fallback's stream end marker, aligned with :attr:`fallbacks`."""
        if len(self.step_finished) != len(self.fallbacks):
            raise ValueError("step_finished: expected one end marker per fallback")
        self.tool_indices: tuple[int, ...] = tuple(
            index
            for index, model in enumerate(self.fallbacks)
            if isinstance(model, FunctionCallingLLM) and model.metadata.is_function_calling_model
        )
        """The fallbacks that can call tools (their indices), in order."""

    def _model(self, llm: CircuitBreakerLLM, call: Call[Any]) -> LLM:
        """The inner model, checked for tool calling when ``call`` needs it."""
        return llm._tool_model() if call.calls_tools else self.inner

    # -- what to hand the guard: decided once for sync and async -------------------------
    def _plan(
        self,
        llm: CircuitBreakerLLM,
        method: str,
        call: Call[Any],
        *,
        asynchronous: bool,
        mark: Mark,
        stream: bool,
    ) -> tuple[str, Callable[[], Any], dict[str, Any]]:
        """The key, the inner model's call and the guard's keyword arguments for ``call``:
        the fallbacks (the tool-calling ones for a tool call), each answer marked by
        ``mark``; for a stream the end-marker checks, else the request (with a budget or
        a cache)."""
        guard, inner, kwargs = self.guard, self._model(llm, call), call.kwargs
        options: dict[str, Any] = {}
        if stream:
            options.update(finished=self.finished, fallback_finished=self.step_finished)
        elif guard.described:
            options["request"] = call.request(inner)
        if self.fallbacks:
            factory = _afallback if asynchronous else _fallback
            options["fallback"] = factory(self, call, method, mark)
            if call.calls_tools:
                options["indices"] = self.tool_indices
        return guard.key_of(kwargs), lambda: call.on(inner, method, kwargs), options

    # -- the drivers -----------------------------------------------------------------------
    def run(self, llm: CircuitBreakerLLM, method: str, call: Call[R]) -> R:
        """``inner.<method>(...)`` through the guard: breaker, retry, each fallback in turn
        (its answer marked), and the cache and budget when the wrapper has them."""
        limiter = llm.rate_limiter
        if limiter is not None:
            limiter.acquire()
        plan = self._plan(llm, method, call, asynchronous=False, mark=mark_fallback, stream=False)
        answer: R = self.guard.execute(plan[0], plan[1], **plan[2])
        return answer

    async def arun(self, llm: CircuitBreakerLLM, method: str, call: Call[R]) -> R:
        """Async :meth:`run`: ``method`` returns an awaitable."""
        limiter = llm.rate_limiter
        if limiter is not None:
            await limiter.async_acquire()
        plan = self._plan(llm, method, call, asynchronous=True, mark=mark_fallback, stream=False)
        answer: R = await self.guard.aexecute(plan[0], plan[1], **plan[2])
        return answer

    def stream(
        self, llm: CircuitBreakerLLM, method: str, call: Call[R]
    ) -> Generator[R, None, None]:
        """``inner.<method>(...)``'s stream guarded as one call (:meth:`ModelGuard.stream`):
        admission, retry and each fallback's stream in turn (its chunks marked) until the
        first chunk; after it, a failure counts and propagates; a stream cut short (no end
        marker, where the model reports one) raises
        :class:`callpolicy.IncompleteStreamError`. Nothing starts until it is iterated.
        Untouched with ``guard_streams=False``; with a budget, metered as it passes."""
        limiter = llm.rate_limiter
        if limiter is not None:
            limiter.acquire()
        key, start, options, meter = self._stream_plan(llm, method, call, asynchronous=False)
        chunks = start() if options is None else self.guard.stream(key, start, **options)
        return cast("Generator[R, None, None]", chunks if meter is None else meter(chunks))

    async def astream(
        self, llm: CircuitBreakerLLM, method: str, call: Call[R]
    ) -> AsyncGenerator[R, None]:
        """Async :meth:`stream`: ``method`` is a LlamaIndex ``astream_*`` method (a
        coroutine that returns the stream)."""
        limiter = llm.rate_limiter
        if limiter is not None:
            await limiter.async_acquire()
        key, start, options, meter = self._stream_plan(llm, method, call, asynchronous=True)
        chunks = await start() if options is None else self.guard.astream(key, start, **options)
        return cast("AsyncGenerator[R, None]", chunks if meter is None else meter(chunks))

    def _stream_plan(
        self, llm: CircuitBreakerLLM, method: str, call: Call[Any], *, asynchronous: bool
    ) -> tuple[str, Callable[[], Any], dict[str, Any] | None, Callable[[Any], Any] | None]:
        """The key, the stream's opener, the guard's options (None with
        ``guard_streams=False``: the opener's stream is passed through) and, with a budget,
        the meter to pass the stream through."""
        start: Callable[[], Any]
        options: dict[str, Any] | None
        if llm.guard_streams:
            mark = _amarked if asynchronous else _marked
            key, start, options = self._plan(
                llm, method, call, asynchronous=asynchronous, mark=mark, stream=True
            )
        else:
            inner = self._model(llm, call)
            key, options = self.guard.key_of(call.kwargs), None
            start = lambda: call.untouched(inner, method)  # noqa: E731
        budget = self.guard.budget
        if budget is None:
            return key, start, options, None
        # The input as it is now, before the stream opens: an integration may append to
        # the arguments in place.
        text = call.input_text()
        return (
            key,
            start,
            options,
            lambda chunks: meter_stream(chunks, budget, key, text, asynchronous=asynchronous),
        )


# -- fallback number ``index`` of a call, its answer (or stream) marked as its -------------
def _fallback(route: Route, call: Call[Any], method: str, mark: Mark) -> Callable[[int], Any]:
    models, guard, kwargs = route.fallbacks, route.guard, call.kwargs

    def on(index: int) -> Any:
        answer = call.on(models[index], method, guard.fallback_kwargs(kwargs))
        return mark(answer, guard.fallback_keys[index], guard.fallback_names[index])

    return on


def _afallback(route: Route, call: Call[Any], method: str, mark: Mark) -> Callable[[int], Any]:
    models, guard, kwargs = route.fallbacks, route.guard, call.kwargs

    async def on(index: int) -> Any:
        answer = await call.on(models[index], method, guard.fallback_kwargs(kwargs))
        return mark(answer, guard.fallback_keys[index], guard.fallback_names[index])

    return on


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
