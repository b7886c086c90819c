"""One wrapper's way through the engine: which circuit a call counts against, and how a
call and its fallbacks (or a stream and its fallbacks' streams) are handed to the policy.

A :class:`~llamaindex_breaker._calls.Call` names the model method to call; the route
turns it into zero-argument callables that call a model's *own* method (``inner.chat``,
``fallback.achat_with_tools``, ...), hands them to :meth:`callpolicy.CallPolicy.execute`
(``aexecute``, ``stream``, ``astream``) and marks what a fallback returns. What to hand
over is decided once for sync and async (:meth:`Route._plan`); the four drivers only
acquire the rate limiter and call the engine.
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
    Sequence,
)
from typing import TYPE_CHECKING, Any, TypeVar, cast

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM

from callpolicy import Budget, CallPolicy, Fallbacks, ResponseCache

from ._calls import Call
from ._keys import CircuitKeys
from ._markers import EndMarker
from ._request import meter_stream
from ._served import mark_fallback

if TYPE_CHECKING:
    from ._llm import CircuitBreakerLLM

__all__ = ["Route", "Step"]

R = TypeVar("R", ChatResponse, CompletionResponse)


Step = tuple["str | None", str, LLM]
"""One fallback: its circuit key (None: unguarded), its model name, the model."""

Wrap = Callable[[Callable[[LLM], Any], Step], Callable[[], Any]]
"""Makes one fallback's zero-argument callable for the engine from ``on(model)``."""


class Route:
    """The policy, circuit keys, fallbacks, budget and cache of one wrapper, resolved once
    at construction."""

    __slots__ = (
        "budget",
        "cache",
        "described",
        "fallback_finished",
        "finished",
        "inner",
        "keys",
        "policy",
        "step_finished",
        "steps",
        "tool_finished",
        "tool_steps",
    )

    def __init__(
        self,
        policy: CallPolicy,
        keys: CircuitKeys,
        inner: LLM,
        *,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        finished: EndMarker | None = None,
        fallback_finished: EndMarker | None = None,
        steps: Sequence[Step] = (),
        step_finished: Sequence[EndMarker | None] = (),
    ) -> None:
        self.policy = policy
        self.keys = keys
        self.inner = inner
        self.budget = budget
        self.cache = cache
        self.described = budget is not None or cache is not None
        """Whether calls need a CallRequest (only for a budget or a cache: the plain path
        never builds one)."""
        self.finished = finished
        """The inner model's stream end marker (None: its integration reports none)."""
        self.fallback_finished = fallback_finished
        """The fallback's."""
        self.steps: tuple[Step, ...] = tuple(steps)
        """The fallbacks, in order (empty without one)."""
        self.tool_steps: tuple[Step, ...] = tuple(
            step
            for step in self.steps
            if isinstance(step[2], FunctionCallingLLM)
            and step[2].metadata.is_function_calling_model
        )
        """The fallbacks that can call tools, in order."""
        self.step_finished: tuple[EndMarker | None, ...] = tuple(step_finished) or (
            (fallback_finished,) * len(self.steps)
        )
        """Each fallback's stream end marker, aligned with :attr:`steps`."""
        if len(self.step_finished) != len(self.steps):
            raise ValueError("step_finished: expected one end marker per fallback")
        self.tool_finished: tuple[EndMarker | None, ...] = tuple(
            marker
            for step, marker in zip(self.steps, self.step_finished, strict=True)
            if any(step is tool_step for tool_step in self.tool_steps)
        )
        """The tool-calling fallbacks' end markers, aligned with :attr:`tool_steps`."""

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

    def _model(self, llm: CircuitBreakerLLM, call: Call[Any]) -> LLM:
        """The inner model, checked for tool calling when ``call`` needs it."""
        return llm._tool_model() if call.calls_tools else self.inner

    # -- what to hand the engine: decided once for sync and async ------------------------
    def _plan(
        self, llm: CircuitBreakerLLM, method: str, call: Call[Any], wrap: Wrap, *, stream: bool
    ) -> tuple[str, Callable[[], Any], dict[str, Any]]:
        """The key, the inner model's call and the engine's keyword arguments for ``call``:
        the fallbacks (the tool-calling ones for a tool call) each wrapped by ``wrap``, a
        single one with its key (one closure per call), several as a :class:`Fallbacks`
        list; for a stream the end-marker checks, else the budget, cache and request."""
        inner = self._model(llm, call)
        kwargs = call.kwargs
        options: dict[str, Any] = {}
        if stream:
            options["finished"] = self.finished
        elif self.described:
            options.update(budget=self.budget, cache=self.cache, request=call.request(inner))
        steps = self.tool_steps if call.calls_tools else self.steps
        if steps:
            fallback_kwargs = self.fallback_kwargs

            def on(model: LLM) -> Any:
                return call.on(model, method, fallback_kwargs(kwargs))

            markers = self.tool_finished if call.calls_tools else self.step_finished
            if len(steps) == 1:
                options["fallback"], options["fallback_key"] = wrap(on, steps[0]), steps[0][0]
                if stream:
                    options["fallback_finished"] = markers[0]
            else:
                options["fallback"] = Fallbacks([(step[0], wrap(on, step)) for step in steps])
                if stream:
                    options["fallback_finished"] = markers
        return self.key_of(kwargs), lambda: call.on(inner, method, kwargs), options

    # -- the drivers -----------------------------------------------------------------------
    def run(self, llm: CircuitBreakerLLM, method: str, call: Call[R]) -> R:
        """``inner.<method>(...)`` through the engine: breaker, retry, each fallback in turn
        (its answer marked), and the cache and budget when the wrapper has them."""
        limiter = llm.rate_limiter
        if limiter is not None:
            limiter.acquire()
        key, primary, options = self._plan(llm, method, call, _answer, stream=False)
        answer: R = self.policy.execute(key, primary, **options)
        return answer

    async def arun(self, llm: CircuitBreakerLLM, method: str, call: Call[R]) -> R:
        """Async :meth:`run`: ``method`` returns an awaitable."""
        limiter = llm.rate_limiter
        if limiter is not None:
            await limiter.async_acquire()
        key, primary, options = self._plan(llm, method, call, _aanswer, stream=False)
        answer: R = await self.policy.aexecute(key, primary, **options)
        return answer

    def stream(
        self, llm: CircuitBreakerLLM, method: str, call: Call[R]
    ) -> Generator[R, None, None]:
        """``inner.<method>(...)``'s stream guarded by the engine as one call
        (:meth:`callpolicy.CallPolicy.stream`): admission, retry and each fallback's stream
        in turn (its chunks marked) until the first chunk; after it, a failure counts and
        propagates; a stream cut short (no end marker, where the model reports one) raises
        :class:`callpolicy.IncompleteStreamError`. Nothing starts until it is iterated.
        Untouched with ``guard_streams=False``; with a budget, metered as it passes."""
        limiter = llm.rate_limiter
        if limiter is not None:
            limiter.acquire()
        key, start, options, meter = self._stream_plan(llm, method, call, asynchronous=False)
        chunks = start() if options is None else self.policy.stream(key, start, **options)
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
        chunks = await start() if options is None else self.policy.astream(key, start, **options)
        return cast("AsyncGenerator[R, None]", chunks if meter is None else meter(chunks))

    def _stream_plan(
        self, llm: CircuitBreakerLLM, method: str, call: Call[Any], *, asynchronous: bool
    ) -> tuple[str, Callable[[], Any], dict[str, Any] | None, Callable[[Any], Any] | None]:
        """The key, the stream's opener, the engine's options (None with
        ``guard_streams=False``: the opener's stream is passed through) and, with a budget,
        the meter to pass the stream through."""
        start: Callable[[], Any]
        options: dict[str, Any] | None
        if llm.guard_streams:
            wrap = _achunks if asynchronous else _chunks
            key, start, options = self._plan(llm, method, call, wrap, stream=True)
        else:
            inner = self._model(llm, call)
            key, options = self.key_of(call.kwargs), None
            start = lambda: call.untouched(inner, method)  # noqa: E731
        budget = self.budget
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


# -- a fallback's callable for the engine, its answer (or each chunk) marked ----------------
def _answer(on: Callable[[LLM], Any], step: Step) -> Callable[[], Any]:
    key, name, model = step
    return lambda: mark_fallback(on(model), key, name)


def _aanswer(on: Callable[[LLM], Awaitable[Any]], step: Step) -> Callable[[], Awaitable[Any]]:
    key, name, model = step

    async def answer() -> Any:
        return mark_fallback(await on(model), key, name)

    return answer


def _chunks(on: Callable[[LLM], Iterable[Any]], step: Step) -> Callable[[], Iterable[Any]]:
    key, name, model = step
    return lambda: _marked(on(model), key, name)


def _achunks(
    on: Callable[[LLM], Awaitable[AsyncIterable[Any]]], step: Step
) -> Callable[[], Awaitable[AsyncIterable[Any]]]:
    key, name, model = step

    async def chunks() -> AsyncIterable[Any]:
        return _amarked(await on(model), key, name)

    return chunks


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
