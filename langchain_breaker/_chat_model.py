"""``CircuitBreakerChatModel``: a LangChain chat model that guards another one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal, cast

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SkipValidation,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import Self, override

from callpolicy import (
    ENGINE_OPTIONS,
    Budget,
    CallPolicy,
    CallRequest,
    CircuitState,
    EngineOptions,
    ModelGuard,
    ResponseCache,
    RetryPolicy,
)
from callpolicy import __version__ as callpolicy_version

from ._guarded import GuardedRunnable
from ._keys import model_identity
from ._outer import TRACING_KWARGS, ChatCodec, Outer, StructuredCodec, unbind
from ._route import Route, aserved
from ._stream_end import AUTO, StreamFinished

__all__ = ["CircuitBreakerChatModel"]

# Fields the route is built from: assigning one later would silently do nothing.
_FIXED_FIELDS = frozenset(
    ("inner", "fallback", "policy", "key", "fallback_key", "budget", "cache", *ENGINE_OPTIONS)
)


def _unbind(runnable: Runnable[Any, Any]) -> tuple[BaseChatModel, dict[str, Any]]:
    """The chat model under a (possibly nested) binding, and the kwargs bound to it."""
    model, bound = unbind(runnable)
    return cast("BaseChatModel", model), bound


def _invoked(
    model: BaseChatModel, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
) -> Iterator[AIMessageChunk]:
    # As BaseChatModel streams when streaming is off: one "chunk", the invoked message.
    yield cast("AIMessageChunk", model.invoke(input, config, **kwargs))


async def _ainvoked(
    model: BaseChatModel, input: Any, config: RunnableConfig | None, kwargs: dict[str, Any]
) -> AsyncIterator[AIMessageChunk]:
    yield cast("AIMessageChunk", await model.ainvoke(input, config, **kwargs))


class CircuitBreakerChatModel(BaseChatModel, EngineOptions):
    """A chat model that calls ``inner`` through a circuit breaker, with optional retry
    and a fallback model.

    ``invoke``, ``ainvoke``, ``batch`` and ``abatch`` go through the engine
    (:class:`callpolicy.CallPolicy`): the circuit of the inner model's
    ``provider::model`` key admits or refuses the call, counted failures open it after
    ``failure_threshold`` in a row, a probe after ``cooldown`` closes it again, retries
    (off unless ``retry`` is given) pass through the breaker, and ``fallback`` answers
    when the circuit is open or the inner model failed (per ``fallback_on``).

    ``stream`` and ``astream`` (so ``astream_events``, LCEL chains and LangGraph) are
    guarded too (``guard_streams=True``, the default), each stream as one call: an open
    circuit sends it to the fallback's stream (or raises ``CircuitOpenError``); a failure
    before the first chunk is counted, retried and served by the fallback's stream; a
    failure after it is counted and re-raised with a note (never replayed, never followed
    by another model's chunks); a stream that ends without its provider's end marker
    (OpenAI's ``finish_reason``, Anthropic's ``stop_reason``: see ``stream_finished``)
    raises ``callpolicy.IncompleteStreamError`` and counts; a consumer that stops early
    counts as neither. The chunks are the inner model's own objects, as they come.
    ``guard_streams=False`` passes streams through untouched. A wrapper with
    ``disable_streaming=True`` streams by calling ``invoke`` (so through the engine), as
    any LangChain chat model does.

    Tracing: the wrapper starts no run of its own. Each attempt is one run of the model
    that answered (the inner model's, or the fallback's), whose metadata says which:
    ``callpolicy_key`` (the inner model's circuit), ``callpolicy_role`` (``"primary"`` or
    ``"fallback"``), ``callpolicy_state`` (the circuit's state as the attempt started)
    and ``callpolicy_attempt``. A streaming callback handler (``astream_events``,
    LangGraph's ``"messages"`` stream mode) gets the tokens of the answering model, since
    that model streams internally; tokens of a failed attempt reach it too.

    The circuit key is the inner model's ``ls_provider``/``ls_model_name`` (what traces
    name: ``openai::gpt-4o-mini``), else its ``model_name``/``model`` attribute, else its
    class name; ``key=`` names it explicitly. A per-call ``model=`` override uses that
    model's circuit (``openai::gpt-4o``) and is not passed to the fallback.

    ``bind_tools`` and ``with_structured_output`` bind on the inner model and on the
    fallback, each in its own provider's format; what they return shares this wrapper's
    policy, so its circuit state.

    Args:
        inner: the guarded chat model. Give it ``max_retries=0`` (or few): its own
            client's retries happen inside one attempt, invisible to the breaker.
        fallback: answers instead of ``inner`` when the engine says so; runs once, without
            retries, under its own circuit (``fallback_key``).
        policy: an engine to share with other wrappers (and the LlamaIndex wrapper): they
            then share circuit state. Cannot be combined with the engine options below.
        key, fallback_key: circuit keys, ``provider::model``; derived from the models when
            not given. The two must differ.
        failure_threshold, cooldown, half_open_max_calls, success_threshold,
            failure_rate_threshold, window_size, minimum_calls, cooldown_multiplier,
            max_cooldown, counted_errors: breaker options (see
            :class:`callpolicy.BreakerConfig`); durations are seconds or a timedelta.
        retry: a :class:`callpolicy.RetryPolicy`; off by default.
        fallback_on: ``"failure"`` (default), ``"open"`` or ``"error"``.
        classifier: replaces :func:`callpolicy.classify_error`.
        listeners: callables receiving every :class:`callpolicy.Event` (sync or async).
        listener_timeout: seconds an async listener may run before it is cancelled.
        store: where circuit state lives (:class:`callpolicy.MemoryStore` by default; a
            Redis store shares it between processes).
        guard_streams: guard ``stream``/``astream`` (default True); False passes them
            through untouched. ``guard_stream_start`` is its deprecated alias.
        stream_finished, fallback_stream_finished: how to tell the chunk carrying the
            inner model's (each fallback's) end marker: ``"auto"`` (default: OpenAI's and
            Anthropic's integrations are recognised), a function of one chunk, or None
            (no check: a stream that ends is complete).
        budget: a :class:`callpolicy.Budget`: every call is checked first and refused with
            :class:`callpolicy.BudgetExceededError` before it reaches a model; usage is
            read from the answer's ``usage_metadata`` (a call without it counts by its
            estimate, in ``estimated_calls``); streams are counted as their chunks pass,
            never refused. With ``max_cost_usd``, both models must be in its price table.
        cache: a :class:`callpolicy.ResponseCache` (memory, SQLite, ...), outermost: a hit
            is the full answer, a copy marked ``response_metadata["callpolicy_cache"]``
            (``"hit"``, ``"shared"``, ``"stale"``), and costs no budget, breaker slot or
            model call. Streams are not cached. A LangChain cache is refused here: give it
            to the inner model.

    Engine options left at ``None`` take the engine's defaults (5 failures, 30 s, one
    probe). After construction ``policy``, ``key`` and ``fallback_key`` hold the values in
    use. The wrapper's ``tags``, ``metadata`` and ``callbacks`` are added to every run of
    the models it calls; its ``rate_limiter`` is acquired once per call (a cache hit
    included); LangChain caches belong on the inner and fallback models. The wrapper is not
    LangChain-serializable (``dumpd`` gives the "not implemented" form): it holds live
    circuit state, and ``langchain_core.load`` admits only allow-listed classes anyway.

    Raises:
        TypeError: ``inner`` or ``fallback`` is not a chat model, ``policy`` is given with
            engine options, an engine option has the wrong type, ``budget`` is not a
            ``Budget`` or ``cache`` not a ``ResponseCache`` (naming the argument).
        callpolicy.MissingPriceError: ``budget`` has ``max_cost_usd`` and no price for
            the inner model or the fallback (naming it).
        pydantic.ValidationError: a bad engine option value, ``fallback`` is ``inner``,
            or the two share a circuit key (naming the argument).

    >>> from langchain_core.language_models import FakeListChatModel
    >>> model = CircuitBreakerChatModel(inner=FakeListChatModel(responses=["hi"]))
    >>> model.invoke("hello").content
    'hi'
    >>> model.state_for()
    <CircuitState.CLOSED: 'closed'>
    """

    # LangChain models ignore unknown arguments; a misspelt option must not pass silently.
    model_config = ConfigDict(extra="forbid")

    inner: BaseChatModel
    """The guarded chat model."""
    fallback: BaseChatModel | list[BaseChatModel] | None = None
    """Answers when the inner model's circuit is open or it failed (per ``fallback_on``);
    a list of models is tried in order."""
    policy: SkipValidation[CallPolicy | None] = Field(default=None, exclude=True)
    """The engine; shared state when shared. Set after construction."""
    key: str | None = None
    """Circuit key of the inner model (derived when not given; set after construction)."""
    fallback_key: str | None = None
    """Circuit key of the fallback (derived when not given; set after construction)."""

    # The engine options are EngineOptions' fields (validated by the engine, which names
    # the field). ``retry`` alone is validated here too, as this wrapper always has: a
    # mapping of RetryPolicy's fields is accepted, anything else a ValidationError.
    retry: RetryPolicy | None = None

    budget: SkipValidation[Budget | None] = Field(default=None, exclude=True)
    """Limits on calls, tokens and dollars (:class:`callpolicy.Budget`), checked before
    every call; shared by the bound copies and structured-output runnables."""
    cache: SkipValidation[ResponseCache | BaseCache | bool | None] = Field(  # type: ignore[assignment]
        default=None, exclude=True
    )
    """The wrapper's response cache (:class:`callpolicy.ResponseCache`), outermost: a hit
    costs no budget, no breaker slot and no model call. ``None`` or ``False``: none. A
    LangChain ``BaseCache`` (or ``True``) is refused: it belongs on the inner model."""

    guard_streams: bool = True
    """Guard ``stream``/``astream`` as calls (the engine's ``CallPolicy.stream``); False:
    the inner model's streams pass through untouched (metered by the budget, if any)."""
    stream_finished: SkipValidation[StreamFinished] = Field(default=AUTO, exclude=True)
    """Which chunk of the inner model's stream carries its end marker: ``"auto"`` (the
    integrations in ``langchain_breaker._stream_end``), a function of one chunk, or None."""
    fallback_stream_finished: SkipValidation[StreamFinished] = Field(default=AUTO, exclude=True)
    """``stream_finished`` for the fallback's chunks."""

    _route: Route = PrivateAttr()
    _tools_bound: bool = PrivateAttr(default=False)

    # -- construction ------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _deprecated_guard_stream_start(cls, data: Any) -> Any:
        if isinstance(data, dict) and "guard_stream_start" in data:
            data = dict(data)
            data["guard_streams"] = _deprecated_alias(
                data.pop("guard_stream_start"), data.get("guard_streams")
            )
        return data

    @field_validator("stream_finished", "fallback_stream_finished", mode="before")
    @classmethod
    def _check_stream_finished(cls, value: Any, info: ValidationInfo) -> Any:
        return ModelGuard.check_finished(str(info.field_name), value)

    @field_validator("inner", "fallback", mode="before")
    @classmethod
    def _check_model(cls, value: Any, info: ValidationInfo) -> Any:
        return ModelGuard.fallback_argument(str(info.field_name), value, _checked_model)

    @field_validator("budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, Budget):
            raise TypeError(
                f"budget: expected a callpolicy.Budget or None, got {type(value).__name__}"
            )
        return value

    @field_validator("cache", mode="before")
    @classmethod
    def _check_cache(cls, value: Any) -> Any:
        if value is None or value is False or isinstance(value, ResponseCache):
            return value
        if value is True or isinstance(value, BaseCache):
            given = (
                "True (LangChain's global cache)"
                if value is True
                else f"a LangChain {type(value).__name__}"
            )
            raise TypeError(
                f"cache: got {given}; CircuitBreakerChatModel takes a "
                "callpolicy.ResponseCache (keyed on every message, tool schema and "
                "parameter, with single flight), or None/False. A LangChain cache belongs "
                "on the model it caches: inner=ChatOpenAI(..., cache=InMemoryCache()), or "
                "set_llm_cache() for every model"
            )
        raise TypeError(
            f"cache: expected a callpolicy.ResponseCache or None, got {type(value).__name__}"
        )

    @override
    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._add_version("callpolicy", callpolicy_version)
        inner, fallbacks = self.inner, ModelGuard.fallback_models(self.fallback)
        guard = ModelGuard(
            inner,
            fallbacks,
            identity=model_identity,
            key=self.key,
            fallback_key=self.fallback_key,
            policy=self.policy,
            options=self,
            budget=self.budget,
            cache=self.cache if isinstance(self.cache, ResponseCache) else None,
            owner=type(self).__name__,
        )
        outer = None
        if guard.described:
            outer = Outer(guard.budget, guard.cache, ChatCodec(inner))
        # Plain dict writes: these are results, not user input (kept out of fields_set).
        self.__dict__.update(policy=guard.policy, key=guard.key, fallback_key=guard.fallback_key)
        self._route = Route(
            guard,
            inner,
            fallbacks,
            tags=self.tags,
            metadata=self.metadata,
            callbacks=self.callbacks,
            outer=outer,
        )

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIXED_FIELDS:
            raise AttributeError(
                f"{name}: fixed at construction (the circuits and the engine are built from "
                "it); build a new CircuitBreakerChatModel instead"
            )
        super().__setattr__(name, value)
        private = getattr(self, "__pydantic_private__", None)
        if name in ("tags", "metadata", "callbacks") and private and "_route" in private:
            route: Route = private["_route"]
            self._route = route.with_runnables(
                route.primary, tags=self.tags, metadata=self.metadata, callbacks=self.callbacks
            )

    @override
    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        # The budget and the cache are shared state, as the policy is: a deep copy (of a
        # chain, say) keeps spending the same budget and reading the same cache.
        memo = {} if memo is None else memo
        for shared in (self.budget, self.cache):
            if isinstance(shared, (Budget, ResponseCache)):
                memo.setdefault(id(shared), shared)
        return super().__deepcopy__(memo)

    def _rerouted(
        self, primary: Runnable[Any, Any], fallbacks: Sequence[Runnable[Any, Any]]
    ) -> CircuitBreakerChatModel:
        """A copy calling other runnables (bound tools) with the same guard."""
        clone = self.model_copy()
        clone._route = self._route.with_runnables(
            primary, fallbacks, tags=self.tags, metadata=self.metadata, callbacks=self.callbacks
        )
        clone._tools_bound = True
        return clone

    def _each_model(self, build: Callable[[str, BaseChatModel], Any]) -> tuple[Any, list[Any]]:
        """``build(argument, model)`` on the inner model and each fallback (``argument``
        names it in an error: ``inner``, ``fallback``, ``fallback[1]``, ...)."""
        fallbacks = ModelGuard.fallback_models(self.fallback)
        built = [
            build("fallback" if index == 0 else f"fallback[{index}]", model)
            for index, model in enumerate(fallbacks)
        ]
        return build("inner", self.inner), built

    # -- identity and tracing ----------------------------------------------------------
    @property
    @override
    def _llm_type(self) -> str:
        return "circuit_breaker"

    @property
    @override
    def _identifying_params(self) -> dict[str, Any]:
        policy = self._route.guard.policy
        described = [
            {"_type": model._llm_type, **model._identifying_params}
            for model in ModelGuard.fallback_models(self.fallback)
        ]
        return {
            "inner": {"_type": self.inner._llm_type, **self.inner._identifying_params},
            "fallback": described if len(described) > 1 else next(iter(described), None),
            "key": self.key,
            "fallback_key": self.fallback_key,
            "breaker": policy.breaker.model_dump(mode="json"),
            "retry": None if policy.retry is None else policy.retry.model_dump(mode="json"),
            "fallback_on": policy.fallback_on,
        }

    @override
    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """The inner model's: traces name its provider and model."""
        return self.inner._get_ls_params(stop=stop, **kwargs)

    @override
    def _resolve_model_profile(self) -> ModelProfile | None:
        return self.inner.profile

    @override
    def get_token_ids(self, text: str) -> list[int]:
        """The inner model's tokenizer (``trim_messages(token_counter=model)`` and the
        like count as the model that answers when healthy would)."""
        return self.inner.get_token_ids(text)

    @override
    def get_num_tokens(self, text: str) -> int:
        return self.inner.get_num_tokens(text)

    @override
    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        return self.inner.get_num_tokens_from_messages(messages, tools=tools)

    @property
    def model_name(self) -> str:
        """The inner model's name (as in its circuit key)."""
        return self._route.guard.model

    # -- inspection --------------------------------------------------------------------
    def key_for(self, model_name: str | None = None) -> str:
        """The circuit key of the inner model, or of ``model_name`` (another model of the
        inner model's provider, as a per-call ``model=`` override would use)."""
        return self._route.guard.for_model(model_name)

    def state_for(self, model_name: str | None = None) -> CircuitState:
        """The circuit state of the inner model, or of ``model_name`` (another model of
        the inner model's provider)."""
        guard = self._route.guard
        return guard.policy.state(guard.for_model(model_name))

    def _fast_route(self) -> Route:
        # ``self._route`` goes through pydantic's ``__getattr__`` (a few microseconds);
        # the private-attribute dict is a plain slot.
        return self.__pydantic_private__["_route"]  # type: ignore[index,no-any-return]

    # -- guarded calls -----------------------------------------------------------------
    @override
    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        if stop is not None:
            kwargs["stop"] = stop
        if self.rate_limiter is not None:
            self.rate_limiter.acquire(blocking=True)
        return cast("AIMessage", self._fast_route().call("invoke", input, config, kwargs))

    @override
    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        if stop is not None:
            kwargs["stop"] = stop
        if self.rate_limiter is not None:
            await self.rate_limiter.aacquire(blocking=True)
        return cast("AIMessage", await self._fast_route().call("ainvoke", input, config, kwargs))

    # -- streams: guarded by the engine (or the inner model's own) ----------------------
    def _streaming_off(self, kwargs: dict[str, Any]) -> bool:
        mode = self.disable_streaming
        return mode is True or (
            mode == "tool_calling" and (self._tools_bound or bool(kwargs.get("tools")))
        )

    @override
    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        return cast("Iterator[AIMessageChunk]", self._chunks("stream", input, config, stop, kwargs))

    @override
    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        chunks = self._chunks("astream", input, config, stop, kwargs)
        return cast("AsyncIterator[AIMessageChunk]", chunks)

    def _chunks(
        self,
        method: Literal["stream", "astream"],
        input: LanguageModelInput,
        config: RunnableConfig | None,
        stop: list[str] | None,
        kwargs: dict[str, Any],
    ) -> Any:
        """``stream``/``astream``: guarded by the engine, or the inner model's own."""
        if stop is not None:
            kwargs["stop"] = stop
        if self._streaming_off(kwargs):  # one "chunk", invoked through the engine
            return (_invoked if method == "stream" else _ainvoked)(self, input, config, kwargs)
        route = self._fast_route()
        if not self.guard_streams:
            return route.passthrough(method, input, config, kwargs)
        return route.stream(
            method,
            input,
            config,
            kwargs,
            finished=self.stream_finished,
            fallback_finished=self.fallback_stream_finished,
        )

    # ``stream_events(version="v3")`` streams too: the inner model's own.
    @override
    def _chat_model_stream_v3(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._route.primary.stream_events(input, config, version="v3", stop=stop, **kwargs)

    @override
    async def _achat_model_stream_v3(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self._route.primary.astream_events(
            input, config, version="v3", stop=stop, **kwargs
        )

    # -- the legacy generate() path ----------------------------------------------------
    # ``generate``/``agenerate`` (and ``generate_prompt``) start a run of the wrapper
    # itself (named for the inner model: ``_get_ls_params``), then call these: every
    # attempt, of the inner model or the fallback, runs inside that one run.
    def _legacy(
        self,
        method: Literal["_generate_with_cache", "_agenerate_with_cache"],
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: Any,
        kwargs: dict[str, Any],
    ) -> tuple[str, Callable[[], Any], Callable[[int], Any] | None, CallRequest[Any] | None]:
        """What the guard needs for one legacy call: the key, the primary's call, each
        fallback's (its answer marked), and the request (with a budget or cache)."""
        route = self._route
        guard = route.guard
        primary, primary_kwargs = _legacy_call(route.primary, kwargs)
        call = functools.partial(
            getattr(primary, method), messages, stop=stop, run_manager=run_manager, **primary_kwargs
        )
        fallback = None
        if route.fallbacks:
            fallback_kwargs = guard.fallback_kwargs(kwargs)

            def fallback(index: int) -> Any:
                model, bound = _legacy_call(route.fallbacks[index], fallback_kwargs)
                answer = getattr(model, method)(
                    messages, stop=stop, run_manager=run_manager, **bound
                )
                step = guard.fallback_keys[index]
                if method == "_agenerate_with_cache":
                    return aserved(answer, step)
                return Route.served(answer, step)

        request = None
        if route.outer is not None:
            request = self._legacy_request(messages, stop, primary_kwargs)
        return guard.key_of(kwargs), call, fallback, request

    def _legacy_request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> CallRequest[ChatResult]:
        # Described as invoke() describes the same call (the entry serves both paths).
        return ChatCodec(self.inner).legacy_request(messages, stop, kwargs)

    # The wrapper's own LangChain cache layer: a ResponseCache is not a LangChain cache
    # (LangChain's ``_generate_with_cache`` would raise "Asked to cache, but no cache
    # found", or use the global cache on top of it); the engine applies it in _generate.
    @override
    def _generate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not isinstance(self.cache, ResponseCache):
            return super()._generate_with_cache(messages, stop, run_manager, **kwargs)
        if self.rate_limiter is not None:
            self.rate_limiter.acquire(blocking=True)
        return self._generate(messages, stop=stop, run_manager=run_manager, **kwargs)

    @override
    async def _agenerate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if not isinstance(self.cache, ResponseCache):
            return await super()._agenerate_with_cache(messages, stop, run_manager, **kwargs)
        if self.rate_limiter is not None:
            await self.rate_limiter.aacquire(blocking=True)
        return await self._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)

    @override
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        legacy = self._legacy("_generate_with_cache", messages, stop, run_manager, kwargs)
        return cast("ChatResult", self._route.guard.execute(*legacy))

    @override
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        legacy = self._legacy("_agenerate_with_cache", messages, stop, run_manager, kwargs)
        return cast("ChatResult", await self._route.guard.aexecute(*legacy))

    # -- binding -----------------------------------------------------------------------
    @override
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind ``tools`` on the inner model and on the fallback, each in its own format.

        Returns a binding of a copy of this wrapper that calls the two bound models under
        this wrapper's policy and circuits (a trip seen through it shows in
        :meth:`state_for`). ``tool_choice`` and ``kwargs`` go to both models.
        """
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        primary, fallbacks = self._each_model(
            lambda role, model: _bind_tools(role, model, tools, kwargs)
        )
        return self._rerouted(primary, fallbacks).bind()

    @override
    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """The inner model's and the fallback's own ``with_structured_output``, called
        under this wrapper's policy and circuits (see :class:`GuardedRunnable`).

        ``kwargs`` (``method``, ``strict``) go to both models. The engine judges a
        parsing failure like any error: an ``OutputParserException`` is the caller's kind
        (not counted; the fallback answers it only with ``fallback_on="error"``), while
        the bare pydantic ``ValidationError`` some parsers raise classifies as unknown.
        """
        primary, fallbacks = self._each_model(
            lambda role, model: _structured(role, model, schema, include_raw, kwargs)
        )
        outer = self._route.outer
        if outer is not None:
            outer = outer.with_codec(StructuredCodec(self.inner, schema, include_raw, kwargs))
        route = self._route.with_runnables(
            primary,
            fallbacks,
            tags=self.tags,
            metadata=self.metadata,
            callbacks=self.callbacks,
            outer=outer,
        )
        return GuardedRunnable(route, guard_streams=self.guard_streams)


def _checked_model(argument: str, value: Any) -> BaseChatModel:
    """``value`` if it is a chat model, else a TypeError naming ``argument``."""
    if isinstance(value, BaseChatModel):
        return value
    hint = ""
    if isinstance(value, RunnableBinding) and isinstance(value.bound, BaseChatModel):
        hint = (
            " (a bound model: pass the chat model itself and call bind_tools(), "
            "bind() or with_structured_output() on the wrapper)"
        )
    elif type(value).__module__.startswith("llama_index"):
        hint = " (a LlamaIndex model: guard it with llamaindex_breaker.CircuitBreakerLLM)"
    elif hasattr(value, "invoke"):
        hint = " (a runnable or completion LLM, not a chat model)"
    raise TypeError(
        f"{argument}: expected a LangChain chat model (a BaseChatModel such "
        f"as ChatOpenAI), got {type(value).__name__}{hint}"
    )


_Legacy = tuple[BaseChatModel, dict[str, Any]]


def _deprecated_alias(value: Any, guard_streams: Any) -> Any:
    """``guard_stream_start=value`` (deprecated): the value for ``guard_streams``."""
    warnings.warn(
        "CircuitBreakerChatModel: guard_stream_start is deprecated; streams are guarded by "
        "default (guard_streams=True), whole streams and not only their start: use "
        "guard_streams",
        DeprecationWarning,
        stacklevel=4,
    )
    if guard_streams is not None and guard_streams != value:
        raise ValueError(
            f"guard_stream_start: {value!r} contradicts guard_streams={guard_streams!r} "
            "(guard_stream_start is a deprecated alias of guard_streams)"
        )
    return value


def _legacy_call(runnable: Runnable[Any, Any], kwargs: dict[str, Any]) -> _Legacy:
    """The chat model to call ``_generate_with_cache`` on, and its kwargs (bound ones too,
    less those that only label traces)."""
    model, bound = _unbind(runnable)
    merged = {**bound, **kwargs}
    for name in TRACING_KWARGS:
        merged.pop(name, None)
    return model, merged


def _bind_tools(
    role: str, model: BaseChatModel, tools: Sequence[Any], kwargs: dict[str, Any]
) -> Runnable[LanguageModelInput, AIMessage]:
    try:
        return model.bind_tools(tools, **kwargs)
    except NotImplementedError as exc:
        raise NotImplementedError(
            f"{role}: {type(model).__name__} does not support bind_tools"
        ) from exc


def _structured(
    role: str, model: BaseChatModel, schema: Any, include_raw: bool, kwargs: dict[str, Any]
) -> Runnable[LanguageModelInput, Any]:
    try:
        return model.with_structured_output(schema, include_raw=include_raw, **kwargs)
    except NotImplementedError as exc:
        raise NotImplementedError(
            f"{role}: {type(model).__name__} does not support with_structured_output"
        ) from exc
