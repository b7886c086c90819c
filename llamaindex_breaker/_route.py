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
    Sequence,
)
from typing import Any, TypeVar, cast

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM

from callpolicy import Budget, CallPolicy, CallRequest, Fallbacks, ResponseCache

from ._keys import CircuitKeys
from ._markers import EndMarker
from ._request import ameter_stream, meter_stream
from ._served import mark_fallback

__all__ = ["Route"]

R = TypeVar("R", ChatResponse, CompletionResponse)


Step = tuple["str | None", str, LLM]
"""One fallback: its circuit key (None: unguarded), its model name, the model."""


class Route:
    """The policy, circuit keys, fallbacks, budget and cache of one wrapper, resolved once
    at construction."""

    __slots__ = (
        "budget",
        "cache",
        "described",
        "fallback_finished",
        "finished",
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

    # -- guarded streams ----------------------------------------------------------------
    def stream(
        self,
        key: str,
        start: Callable[[], Iterable[R]],
        fallback: Callable[[Any], Iterable[R]] | None,
        *,
        tools: bool = False,
    ) -> Generator[R, None, None]:
        """``start()``'s stream, guarded by the engine as one call under ``key``
        (:meth:`callpolicy.CallPolicy.stream`): admission, retry and ``fallback(model)``'s
        stream on each fallback in turn (the tool-calling ones with ``tools``; its chunks
        marked) until the first chunk; after it, a failure counts and propagates; a
        stream cut short (no end marker, where the model reports one) raises
        :class:`callpolicy.IncompleteStreamError`. Nothing starts until it is iterated."""
        steps = self.tool_steps if tools else self.steps
        # The engine's guarded stream is a generator (typed as an iterator there).
        if fallback is None or not steps:
            return cast(
                "Generator[R, None, None]", self.policy.stream(key, start, finished=self.finished)
            )
        markers = self.tool_finished if tools else self.step_finished
        if len(steps) == 1:  # one fallback: one closure per call, as it always was
            plan_key, name, model = steps[0]
            guarded = self.policy.stream(
                key,
                start,
                fallback=lambda: _marked(fallback(model), plan_key, name),
                fallback_key=plan_key,
                finished=self.finished,
                fallback_finished=markers[0],
            )
        else:

            def opener(step: Step) -> Callable[[], Iterable[R]]:
                step_key, name, model = step
                return lambda: _marked(fallback(model), step_key, name)

            guarded = self.policy.stream(
                key,
                start,
                fallback=Fallbacks([(step[0], opener(step)) for step in steps]),
                finished=self.finished,
                fallback_finished=markers,
            )
        return cast("Generator[R, None, None]", guarded)

    def astream(
        self,
        key: str,
        start: Callable[[], Awaitable[AsyncIterable[R]]],
        fallback: Callable[[Any], Awaitable[AsyncIterable[R]]] | None,
        *,
        tools: bool = False,
    ) -> AsyncGenerator[R, None]:
        """Async :meth:`stream`: ``start`` is a LlamaIndex ``astream_*`` call (a coroutine
        that returns the stream), and so is ``fallback(model)``."""
        steps = self.tool_steps if tools else self.steps
        if fallback is None or not steps:
            return cast(
                "AsyncGenerator[R, None]", self.policy.astream(key, start, finished=self.finished)
            )
        markers = self.tool_finished if tools else self.step_finished
        if len(steps) == 1:
            plan_key, name, model = steps[0]

            async def open_fallback() -> AsyncIterable[R]:
                return _amarked(await fallback(model), plan_key, name)

            guarded = self.policy.astream(
                key,
                start,
                fallback=open_fallback,
                fallback_key=plan_key,
                finished=self.finished,
                fallback_finished=markers[0],
            )
        else:

            def opener(step: Step) -> Callable[[], Awaitable[AsyncIterable[R]]]:
                step_key, step_name, step_model = step

                async def open_step() -> AsyncIterable[R]:
                    return _amarked(await fallback(step_model), step_key, step_name)

                return open_step

            guarded = self.policy.astream(
                key,
                start,
                fallback=Fallbacks([(step[0], opener(step)) for step in steps]),
                finished=self.finished,
                fallback_finished=markers,
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
