"""A guarded runnable: what ``with_structured_output`` of the wrapper returns.

The inner model and the fallback each build their own structured-output runnable (in
their own provider's format: OpenAI's JSON schema, Anthropic's tools, ...). This
runnable calls the inner's through the wrapper's engine and circuit, and the fallback's
when the engine says so. Like the chat model, it starts no run of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import BaseModel
from typing_extensions import override

from ._route import Route, StreamMethod

__all__ = ["GuardedRunnable"]


class GuardedRunnable(Runnable[Any, Any]):
    """Calls ``route.primary`` under the route's circuit, ``route.fallback`` instead when
    the circuit is open or the primary failed (per the policy's ``fallback_on``).

    ``invoke``/``ainvoke`` (so ``batch``/``abatch``) go through the engine, with the
    wrapper's budget and cache if any (a cached answer is the parsed object, or with
    ``include_raw`` the raw message too, marked); ``stream`` and ``astream`` go through
    the engine's stream guard too (the chat model's rules; parsed chunks carry no end
    marker, so no cut-short check), or pass through untouched with
    ``guard_streams=False``. With a budget, a stream counts as one call, by its estimate
    (parsed chunks report no usage).
    """

    def __init__(self, route: Route, *, guard_streams: bool = True) -> None:
        self.route = route
        self.guard_streams = guard_streams

    @property
    def primary(self) -> Runnable[Any, Any]:
        """The inner model's runnable."""
        return self.route.primary

    @property
    def fallback(self) -> Runnable[Any, Any] | None:
        """The (first) fallback model's runnable, if any."""
        fallbacks = self.route.fallbacks
        return fallbacks[0] if fallbacks else None

    @property
    @override
    def InputType(self) -> Any:
        return self.route.primary.InputType

    @property
    @override
    def OutputType(self) -> Any:
        return self.route.primary.OutputType

    @override
    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return cast("type[BaseModel]", self.route.primary.get_input_schema(config))

    @override
    def get_output_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        return cast("type[BaseModel]", self.route.primary.get_output_schema(config))

    @override
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self.route.call("invoke", input, config, kwargs)

    @override
    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self.route.call("ainvoke", input, config, kwargs)

    @override
    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        return self._chunks("stream", input, config, kwargs)  # type: ignore[no-any-return]

    @override
    def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        return self._chunks("astream", input, config, kwargs)  # type: ignore[no-any-return]

    def _chunks(
        self, method: StreamMethod, input: Any, config: RunnableConfig | None, kwargs: Any
    ) -> Any:
        route = self.route
        if self.guard_streams:
            return route.stream(method, input, config, kwargs)
        return route.passthrough(method, input, config, kwargs)

    def __repr__(self) -> str:
        return (
            f"GuardedRunnable(key={self.route.guard.key!r}, primary={self.route.primary!r}, "
            f"fallback={self.fallback!r})"
        )
