"""``CircuitBreakerMiddleware``: the engine as a LangChain agent middleware.

``langchain.agents.create_agent(model=..., middleware=[CircuitBreakerMiddleware(...)])``
guards every model call the agent makes (``wrap_model_call``/``awrap_model_call``) under
the circuit of the model actually called, with the engine's retry and a list of
fallbacks. A fallback is called through the agent's own handler with the request's model
replaced (``request.override(model=...)``), so the agent binds the tools and the
structured-output strategy on it in its own format, exactly as on the primary.

This module imports ``langchain`` (not only ``langchain-core``): it is imported on first
use of the name, so ``langchain_breaker`` itself works without it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain.agents.middleware import model_fallback as _langchain_fallback
from langchain.agents.middleware.types import AgentMiddleware, ModelRequest
from langchain.chat_models import init_chat_model
from langchain_core.language_models import BaseChatModel
from langgraph.errors import GraphBubbleUp

from callpolicy import (
    CallPolicy,
    CircuitState,
    Fallbacks,
    circuit_key,
    policy_from_options,
    takes_engine_options,
)

from ._keys import model_identity
from ._served import mark_served, served_mark

__all__ = ["CircuitBreakerMiddleware"]

_MAX_KEYS = 256


class _Interrupt(BaseException):
    """Carries a LangGraph interrupt (``GraphBubbleUp``) through the engine: a
    ``BaseException`` ends the call as neutral (neither a failure nor a success, no
    fallback), and the middleware raises the interrupt itself again outside."""

    def __init__(self, interrupt: GraphBubbleUp) -> None:
        super().__init__()
        self.interrupt = interrupt


class CircuitBreakerMiddleware(AgentMiddleware):
    """Guards every model call of a ``create_agent`` agent with a circuit breaker per
    ``provider::model``, the engine's retry, and a list of fallbacks.

    The circuit is the one of the model actually called (``request.model``, keyed as
    :class:`CircuitBreakerChatModel` keys it: ``openai::gpt-4o-mini``), so a model swapped
    in by another middleware (``ModelFallbackMiddleware``, a router) counts against its
    own circuit. Sync (``invoke``) and async (``ainvoke``) agents alike.

    Args:
        fallback: a chat model, a ``"provider:model"`` string (built with LangChain's
            ``init_chat_model``), or a list of them, tried in order when the called
            model's circuit is open or (per ``fallback_on``) it failed. Each runs under
            its own circuit; one whose circuit is open is skipped at once. When every
            model fails, a list of two or more raises
            :class:`callpolicy.AllModelsFailedError` naming each; a single fallback's own
            error propagates. Tools and ``response_format`` are bound on each by the agent.
        policy: an engine to share (with other middleware or wrappers: shared circuits).
            Cannot be combined with the engine options below.
        failure_threshold, cooldown, half_open_max_calls, success_threshold,
            failure_rate_threshold, window_size, minimum_calls, cooldown_multiplier,
            max_cooldown, counted_errors, retry, fallback_on, classifier, listeners,
            listener_timeout, store: the engine's options (see
            :class:`callpolicy.CallPolicy`); engine defaults when left at None.

    An answer a fallback served is marked in ``response_metadata["callpolicy_served_by"]``
    (which model, and why). A LangGraph interrupt raised during a model call is neither a
    failure nor a reason to fall back: it passes through as it is.

    Order against LangChain's middleware (the first in ``middleware=[...]`` is the
    outermost): put ``ModelFallbackMiddleware`` and ``ModelRetryMiddleware`` *before* this
    one, so that each model they try and each retry passes through the breaker (an open
    circuit then fails fast, with :class:`callpolicy.CircuitOpenError`); or use this
    middleware's own ``fallback=`` and ``retry=`` instead. ``ModelCallLimitMiddleware``
    counts model-node runs in its ``before_model``/``after_model`` hooks: its place does
    not matter, and a call the fallback served, or retried by the engine, is one run.

    Raises:
        TypeError: a fallback is neither a chat model nor a string, or ``policy`` is given
            with engine options (naming the argument).
        pydantic.ValidationError: a bad engine option value.
    """

    @takes_engine_options
    def __init__(
        self,
        *,
        fallback: BaseChatModel | str | Sequence[BaseChatModel | str] | None = None,
        policy: CallPolicy | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.policy: CallPolicy = policy_from_options(policy, options, owner=type(self).__name__)
        self.fallbacks: tuple[BaseChatModel, ...] = _fallback_models(fallback)
        """The fallback models, in order (strings built into models)."""
        self._fallback_keys = tuple(_key_of(model) for model in self.fallbacks)
        self._keys: dict[int, tuple[BaseChatModel, str]] = {}

    # -- keys --------------------------------------------------------------------------
    def key_for(self, model: BaseChatModel) -> str:
        """The circuit key of ``model`` (``provider::model``)."""
        found = self._keys.get(id(model))
        if found is not None and found[0] is model:
            return found[1]
        key = _key_of(model)
        if len(self._keys) < _MAX_KEYS:  # kept with its model, so the id stays its own
            self._keys[id(model)] = (model, key)
        return key

    def state_for(self, model: BaseChatModel | str) -> CircuitState:
        """The circuit state of ``model`` (a chat model, or its key)."""
        key = model if isinstance(model, str) else self.key_for(model)
        return self.policy.state(key)

    # -- the guarded model call ----------------------------------------------------------
    def wrap_model_call(self, request: ModelRequest, handler: Callable[..., Any]) -> Any:
        key, call, options = self._plan(request, handler, asynchronous=False)
        try:
            return self.policy.execute(key, call, **options)
        except _Interrupt as carried:
            interrupt = carried.interrupt
        raise interrupt  # outside the except block: the interrupt is raised as it was

    async def awrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[..., Awaitable[Any]],
    ) -> Any:
        key, call, options = self._plan(request, handler, asynchronous=True)
        try:
            return await self.policy.aexecute(key, call, **options)
        except _Interrupt as carried:
            interrupt = carried.interrupt
        raise interrupt

    def _plan(
        self, request: ModelRequest, handler: Callable[..., Any], *, asynchronous: bool
    ) -> tuple[str, Callable[[], Any], dict[str, Any]]:
        """The called model's key, its call, and the engine's fallback options: each
        fallback called through the agent's handler with the request's model replaced
        (async: the callables return coroutines)."""
        key = self.key_for(request.model)
        carried = _acarried if asynchronous else _carried
        call = functools.partial(carried, handler, request)
        steps = [
            (step, self._fallback_call(request, handler, model, step, asynchronous))
            for model, step in self._steps(key)
        ]
        if not steps:
            return key, call, {}
        if len(steps) == 1:
            return key, call, {"fallback": steps[0][1], "fallback_key": steps[0][0]}
        return key, call, {"fallback": Fallbacks(steps)}

    def _steps(self, key: str) -> list[tuple[BaseChatModel, str | None]]:
        """The fallbacks and their circuits for a call of ``key``'s model: a fallback with
        the called model's own key (another endpoint of it) runs unguarded, since that
        circuit is the one that just refused or failed."""
        return [
            (model, None if step == key else step)
            for model, step in zip(self.fallbacks, self._fallback_keys, strict=True)
        ]

    def _fallback_call(
        self,
        request: ModelRequest,
        handler: Callable[..., Any],
        model: BaseChatModel,
        key: str | None,
        asynchronous: bool,
    ) -> Callable[[], Any]:
        def call() -> Any:
            # Read as the engine hands over (inside its fallback step): why it was called.
            mark = served_mark(key, model_identity(model)[1])
            fallback_request = _sanitized(request, model).override(model=model)
            if asynchronous:
                return _amarked(_acarried(handler, fallback_request), mark)
            return mark_served(_carried(handler, fallback_request), mark)

        return call

    def __repr__(self) -> str:
        return (
            f"CircuitBreakerMiddleware(fallbacks={list(self._fallback_keys)!r}, "
            f"policy={type(self.policy).__name__})"
        )


def _carried(handler: Callable[..., Any], request: ModelRequest) -> Any:
    """``handler(request)``, a LangGraph interrupt carried through the engine."""
    try:
        return handler(request)
    except GraphBubbleUp as interrupt:
        raise _Interrupt(interrupt) from None


async def _acarried(handler: Callable[..., Awaitable[Any]], request: ModelRequest) -> Any:
    """Async :func:`_carried`."""
    try:
        return await handler(request)
    except GraphBubbleUp as interrupt:
        raise _Interrupt(interrupt) from None


async def _amarked(answer: Awaitable[Any], mark: dict[str, Any]) -> Any:
    return mark_served(await answer, mark)


def _sanitized(request: ModelRequest, model: BaseChatModel) -> ModelRequest:
    """``request`` for ``model`` as LangChain's own ``ModelFallbackMiddleware`` prepares it
    (provider-only prompt-cache settings stripped), when this langchain has that step."""
    sanitize = getattr(_langchain_fallback, "_sanitize_request_for_fallback", None)
    return request if sanitize is None else sanitize(request, model)


def _key_of(model: BaseChatModel) -> str:
    return circuit_key(*model_identity(model))


def _fallback_models(
    fallback: BaseChatModel | str | Sequence[BaseChatModel | str] | None,
) -> tuple[BaseChatModel, ...]:
    if fallback is None:
        return ()
    given: Sequence[Any] = (
        [fallback] if isinstance(fallback, (str, BaseChatModel)) else list(fallback)
    )
    models: list[BaseChatModel] = []
    for index, item in enumerate(given):
        where = "fallback" if len(given) == 1 else f"fallback[{index}]"
        if isinstance(item, str):
            if not item:
                raise ValueError(f"{where}: expected a model name such as 'openai:gpt-4o-mini'")
            models.append(init_chat_model(item))
        elif isinstance(item, BaseChatModel):
            models.append(item)
        else:
            raise TypeError(
                f"{where}: expected a chat model or a 'provider:model' string, "
                f"got {type(item).__name__}"
            )
    keys = [_key_of(model) for model in models]
    for index, key in enumerate(keys):
        if key in keys[:index]:
            raise ValueError(
                f"fallback[{index}]: its circuit key {key!r} is an earlier fallback's too; "
                "one circuit cannot guard both"
            )
    return tuple(models)
