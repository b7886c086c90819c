"""One wrapper's way through the engine: which circuit a call counts against, and how a
call and its fallback (or, opt-in, a stream's start) are handed to the policy.

The wrapper's methods build zero-argument callables that call a model's *own* method
(``inner.chat``, ``fallback.achat_with_tools``, ...); the route hands them to
:meth:`callpolicy.CallPolicy.execute`/``aexecute`` and marks what the fallback returns.
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Final, TypeVar

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM

from callpolicy import Budget, CallPolicy, CallRequest, Fallbacks, ResponseCache

from ._keys import CircuitKeys
from ._request import ameter_stream, meter_stream
from ._served import mark_fallback

__all__ = ["Route"]

R = TypeVar("R", ChatResponse, CompletionResponse)

_NOTHING: Final = object()


Step = tuple["str | None", str, LLM]
"""One fallback: its circuit key (None: unguarded), its model name, the model."""


class Route:
    """The policy, circuit keys, fallbacks, budget and cache of one wrapper, resolved once
    at construction."""

    __slots__ = (
        "budget",
        "cache",
        "described",
        "keys",
        "policy",
        "steps",
        "tool_fallback",
        "tool_steps",
    )

    def __init__(
        self,
        policy: CallPolicy,
        keys: CircuitKeys,
        tool_fallback: FunctionCallingLLM | None,
        *,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        steps: Sequence[Step] = (),
    ) -> None:
        self.policy = policy
        self.keys = keys
        self.tool_fallback = tool_fallback
        """The first fallback that can call tools; tool calls have no fallback otherwise."""
        self.budget = budget
        self.cache = cache
        self.described = budget is not None or cache is not None
        """Whether calls need a CallRequest (only for a budget or a cache: the plain path
        never builds one)."""
        self.steps: tuple[Step, ...] = tuple(steps)
        """The fallbacks, in order (empty without one)."""
        self.tool_steps: tuple[Step, ...] = tuple(
            step
            for step in self.steps
            if isinstance(step[2], FunctionCallingLLM)
            and step[2].metadata.is_function_calling_model
        )
        """The fallbacks that can call tools, in order."""

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

    @staticmethod
    def _listed(on: Callable[[Any], R], steps: tuple[Step, ...]) -> Fallbacks[R]:
        """The engine's list of fallbacks: ``on(model)`` on each, its answer marked."""

        def marked(step: Step) -> Callable[[], R]:
            key, name, model = step
            return lambda: mark_fallback(on(model), key, name)

        return Fallbacks([(step[0], marked(step)) for step in steps])

    @staticmethod
    def _alisted(
        on: Callable[[Any], Awaitable[R]], steps: tuple[Step, ...]
    ) -> Fallbacks[Awaitable[R]]:
        """Async :meth:`_listed`."""

        def marked(step: Step) -> Callable[[], Awaitable[R]]:
            key, name, model = step

            async def call() -> R:
                return mark_fallback(await on(model), key, name)

            return call

        return Fallbacks([(step[0], marked(step)) for step in steps])

    def run(
        self,
        key: str,
        call: Callable[[], R],
        fallback: Callable[[Any], R] | None,
        request: CallRequest[R] | None = None,
        *,
        tools: bool = False,
    ) -> R:
        """``call()`` under ``key``'s breaker; ``fallback(model)`` on each fallback in turn
        (the tool-calling ones with ``tools``), its answer marked, when the engine says so.
        ``request`` (given when :attr:`described`) lets the engine's cache and budget see
        the call."""
        steps = self.tool_steps if tools else self.steps
        if fallback is None or not steps:
            if request is None:
                return self.policy.execute(key, call)
            return self.policy.execute(
                key, call, budget=self.budget, cache=self.cache, request=request
            )
        plan: Any
        if len(steps) == 1:  # one fallback: one closure per call, as it always was
            plan_key, name, model = steps[0]

            def plan() -> R:
                return mark_fallback(fallback(model), plan_key, name)

        else:
            plan, plan_key = self._listed(fallback, steps), None
        if request is None:
            return self.policy.execute(key, call, fallback=plan, fallback_key=plan_key)  # type: ignore[no-any-return]
        return self.policy.execute(
            key,
            call,
            fallback=plan,
            fallback_key=plan_key,
            budget=self.budget,
            cache=self.cache,
            request=request,
        )

    async def arun(
        self,
        key: str,
        call: Callable[[], Awaitable[R]],
        fallback: Callable[[Any], Awaitable[R]] | None,
        request: CallRequest[R] | None = None,
        *,
        tools: bool = False,
    ) -> R:
        """Async :meth:`run`: the callables return awaitables."""
        steps = self.tool_steps if tools else self.steps
        if fallback is None or not steps:
            if request is None:
                return await self.policy.aexecute(key, call)
            return await self.policy.aexecute(
                key, call, budget=self.budget, cache=self.cache, request=request
            )
        plan: Any
        if len(steps) == 1:
            plan_key, name, model = steps[0]

            async def plan() -> R:
                return mark_fallback(await fallback(model), plan_key, name)

        else:
            plan, plan_key = self._alisted(fallback, steps), None
        if request is None:
            return await self.policy.aexecute(key, call, fallback=plan, fallback_key=plan_key)
        return await self.policy.aexecute(
            key,
            call,
            fallback=plan,
            fallback_key=plan_key,
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

    # -- streams whose start is guarded (opt-in) -----------------------------------------
    def stream(
        self,
        key: str,
        start: Callable[[], Iterator[R]],
        fallback: Callable[[], Iterator[R]] | None,
    ) -> Generator[R, None, None]:
        """A stream whose start the breaker guards: admission, and a failure before the
        first chunk (counted, retried, or answered by the fallback's stream, whose chunks
        are marked). Once a chunk is out, chunks pass untouched and a later error
        propagates as is, uncounted. The stream is opened before this returns."""
        keys = self.keys
        model = keys.fallback_model or "unknown"

        def open_fallback() -> tuple[Iterator[R], Any]:
            assert fallback is not None
            chunks, first = _open(fallback)
            marked = (mark_fallback(chunk, keys.fallback, model) for chunk in chunks)
            if first is not _NOTHING:
                first = mark_fallback(first, keys.fallback, model)
            return marked, first

        chunks, first = self.policy.execute(
            key,
            lambda: _open(start),
            fallback=None if fallback is None else open_fallback,
            fallback_key=keys.fallback,
        )
        return _chain(first, chunks)

    async def astream(
        self,
        key: str,
        start: Callable[[], Awaitable[AsyncIterator[R]]],
        fallback: Callable[[], Awaitable[AsyncIterator[R]]] | None,
    ) -> AsyncGenerator[R, None]:
        """Async :meth:`stream`."""
        keys = self.keys
        model = keys.fallback_model or "unknown"

        async def open_fallback() -> tuple[AsyncIterator[R], Any]:
            assert fallback is not None
            chunks, first = await _aopen(fallback)
            if first is not _NOTHING:
                first = mark_fallback(first, keys.fallback, model)
            return _amarked(chunks, keys.fallback, model), first

        chunks, first = await self.policy.aexecute(
            key,
            lambda: _aopen(start),
            fallback=None if fallback is None else open_fallback,
            fallback_key=keys.fallback,
        )
        return _achain(first, chunks)


def _open(start: Callable[[], Iterator[R]]) -> tuple[Iterator[R], Any]:
    """Start a stream and wait for its first chunk (``_NOTHING`` if it is empty)."""
    chunks = iter(start())
    try:
        return chunks, next(chunks)
    except StopIteration:
        return chunks, _NOTHING


async def _aopen(start: Callable[[], Awaitable[AsyncIterator[R]]]) -> tuple[AsyncIterator[R], Any]:
    chunks = await start()
    try:
        return chunks, await chunks.__anext__()
    except StopAsyncIteration:
        return chunks, _NOTHING


def _chain(first: Any, rest: Iterator[R]) -> Generator[R, None, None]:
    if first is not _NOTHING:
        yield first
    yield from rest


async def _achain(first: Any, rest: AsyncIterator[R]) -> AsyncGenerator[R, None]:
    if first is not _NOTHING:
        yield first
    async for chunk in rest:
        yield chunk


async def _amarked(
    chunks: AsyncIterator[R], key: str | None, model: str
) -> AsyncGenerator[R, None]:
    async for chunk in chunks:
        yield mark_fallback(chunk, key, model)
