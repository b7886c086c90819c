"""``CircuitBreakerLLM``: a LlamaIndex LLM whose calls go through a callpolicy engine.

The adapter is thin: it builds the engine's :class:`callpolicy.ModelGuard` once (keys and
their rules, construction checks, the policy from its :class:`callpolicy.EngineOptions`
fields), turns each LlamaIndex call into callables of the models' own methods (see
``_calls`` and ``_route``), and lets the engine decide (breaker, retry, fallback, budget,
cache). It never formats prompts or tools itself: the model that answers does, with its
own conventions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import Field, PrivateAttr, SkipValidation, field_validator, model_validator

from callpolicy import Budget, CallPolicy, CircuitState, EngineOptions, ModelGuard, ResponseCache

from ._calls import Chat, Completion, ToolChat, tool_options
from ._events import relay_events
from ._keys import model_identity, model_name_of
from ._markers import AUTO, StreamFinished, end_marker
from ._models import model_checker
from ._route import Route
from ._served import fallback_mark
from ._spans import unspanned

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["CircuitBreakerLLM"]

R = TypeVar("R", ChatResponse, CompletionResponse)

# Prompt settings LlamaIndex applies in the *calling* LLM (predict, structured_predict,
# chat engines read them from the LLM they were given), so the wrapper takes the inner
# model's unless told otherwise: wrapping must not change the prompts sent.
_INHERITED_FROM_INNER = (
    "callback_manager",
    "system_prompt",
    "messages_to_prompt",
    "completion_to_prompt",
    "output_parser",
    "pydantic_program_mode",
    "query_wrapper_prompt",
)


class CircuitBreakerLLM(FunctionCallingLLM, EngineOptions):
    """A LlamaIndex LLM guarded by a circuit breaker per ``provider::model``, with optional
    retry and a fallback model. Use it wherever LlamaIndex takes an LLM.

    >>> from llama_index.core.llms import MockLLM
    >>> llm = CircuitBreakerLLM(inner=MockLLM(), failure_threshold=3, cooldown=30)
    >>> llm.complete("hi").text
    'hi'
    >>> llm.state_for()
    <CircuitState.CLOSED: 'closed'>

    **What goes through the engine.** Every call: ``chat``, ``achat``, ``complete``,
    ``acomplete``, ``chat_with_tools``, ``achat_with_tools`` (and everything built on them:
    ``predict``, ``structured_predict``, ``predict_and_call``, query and chat engines), and
    the streams: ``stream_chat``, ``astream_chat``, ``stream_complete``,
    ``astream_complete``, ``stream_chat_with_tools``, ``astream_chat_with_tools`` (and
    through them streaming agents, query engines and chat engines). A call is refused
    with :class:`callpolicy.CircuitOpenError` while the inner model's circuit is open,
    unless the fallback answers instead.

    **Streams** are guarded as one call each (:meth:`callpolicy.CallPolicy.stream`): an
    open circuit sends the stream to the fallback's stream (or refuses it); a failure
    before the first chunk is counted, retried per ``retry=``, then served by the
    fallback's stream (its chunks marked; with a list, each fallback's in turn, as for
    ``chat``). After the first chunk a failure counts
    against the circuit and reaches the caller as the model's own exception, with a
    note naming the key and the chunks delivered: never replayed, never followed by the
    fallback's chunks. A stream that ends without the provider's end marker (OpenAI's
    ``finish_reason``, Anthropic's ``stop_reason``; see ``stream_finished``)
    raises :class:`callpolicy.IncompleteStreamError` after its last chunk and counts as a
    failure. Consumed to its end, a stream is a success; stopped early by the caller
    (``break``, ``aclose()``, a cancelled task), neither (a half-open probe slot is
    freed). The chunks are the model's own objects, in order, unbuffered. Nothing is
    sent until the stream is iterated (as with the bare models). ``guard_streams=False``
    passes streams through untouched instead (they are then neither counted nor
    refused).

    **Tools.** The wrapper is always a ``FunctionCallingLLM``; ``metadata`` is the inner
    model's, so LlamaIndex uses tool calling exactly when the inner model supports it.
    ``chat_with_tools`` calls ``inner.chat_with_tools`` (or ``fallback.chat_with_tools``),
    so each model formats the tools its own way, and ``get_tool_calls_from_response``
    hands a response to the model that produced it. A fallback that is not a
    ``FunctionCallingLLM`` serves plain calls only: tool calls then have no fallback.

    **Fallback responses** carry ``additional_kwargs["callpolicy"] == {"served_by":
    "fallback", "key": ..., "model": ...}`` (see :func:`llamaindex_breaker.served_by`).
    Pipelines that return strings (query engines) can watch the engine's events instead:
    ``listeners=[...]`` receives a ``FALLBACK`` event per fallback.

    **Budget and cache** (``budget=``, ``cache=``, optional). The engine applies them
    outermost, in the order cache -> budget -> fallback -> retry -> breaker -> model; the
    wrapper only describes each call. The budget is checked before every guarded call (a
    call that would pass a limit raises :class:`callpolicy.BudgetExceededError` and reaches
    no model) and counts the usage the answer reports (``raw`` usage, or ``prompt_tokens``/
    ``completion_tokens`` in ``additional_kwargs``), else the estimated input. The budget
    never refuses or alters a stream: it counts it as it passes. A cache
    hit returns the full answer, marked ``additional_kwargs["callpolicy"]["cache"] ==
    "hit"`` (see :func:`llamaindex_breaker.cache_status`), and costs no budget. See
    ``docs/llamaindex.md``.

    **Instrumentation.** The wrapper opens no dispatcher span and fires no LLM events of
    its own: the model that answers does (``LLMChatStartEvent`` names it in
    ``model_dict``), so each call shows one set of events. A failed primary attempt shows
    as that model's dropped span before the fallback's. Old-style callbacks work too: a
    ``callback_manager`` given to or assigned to the wrapper (``Settings`` and query
    engines assign one) is passed on to the inner and fallback models; without one, the
    wrapper uses the inner model's.

    Args:
        inner: the model to guard (a ``llama_index.core.llms.LLM``). Turn off its own
            retries (``max_retries=0`` for OpenAI) so the breaker sees every failure, and
            use ``retry=`` instead.
        fallback: answers when the inner model's circuit is open or (per ``fallback_on``)
            its call failed. It runs once, with the same arguments, under its own circuit,
            which must not be the inner model's: sharing it would refuse the fallback
            whenever the primary is refused, so a fallback whose key is the inner model's
            (another endpoint of the same model) is refused here; give ``fallback_key=``
            (or ``key=``) to tell them apart. Prompts were formatted with the wrapper's
            settings (taken from ``inner``).
        policy: the engine to use; share one between wrappers (LlamaIndex and LangChain)
            to share circuit state. Cannot be combined with the engine options below.
        key: circuit key of the inner model; default ``"<class name, lowercased>::
            <metadata.model_name>"``, e.g. ``"openai::gpt-4o-mini"`` — the key the
            LangChain wrapper gives ``ChatOpenAI(model="gpt-4o-mini")``, so both share a
            circuit through a shared policy. A per-call ``model=`` keyword keys that call
            under ``"<provider>::<that model>"`` (and is not passed to the fallback).
        fallback_key: likewise for the fallback; must differ from ``key``.
        failure_threshold, cooldown, half_open_max_calls, success_threshold,
            failure_rate_threshold, window_size, minimum_calls, cooldown_multiplier,
            max_cooldown, counted_errors: breaker options (see
            :class:`callpolicy.BreakerConfig`); durations are seconds or a timedelta.
        retry: a :class:`callpolicy.RetryPolicy`; no retries by default.
        fallback_on: ``"failure"`` (default), ``"open"`` or ``"error"``.
        classifier: replaces :func:`callpolicy.classify_error`.
        listeners: callables receiving every :class:`callpolicy.Event` (sync or async).
        listener_timeout: seconds an async listener may run before it is cancelled.
        store: where circuit state lives (:class:`callpolicy.MemoryStore` by default).
        guard_streams: guard the stream methods (default True); False passes them
            through to the inner model untouched. ``guard_stream_start=`` is a
            deprecated alias (a DeprecationWarning): ``True`` now guards whole streams.
        stream_finished, fallback_stream_finished: how to tell the chunk carrying the
            inner model's (each fallback's) end marker: ``"auto"`` (default: the OpenAI
            and Anthropic integrations are recognised), a function of one chunk (such as
            :func:`llamaindex_breaker.openai_finished`), or None (no check: a stream that
            ends is complete).
        budget: a :class:`callpolicy.Budget` (limits on calls, tokens, dollars); share one
            object between wrappers to share the limits. With ``max_cost_usd``, the inner
            model and the fallback must be in its price table (checked now).
        cache: a :class:`callpolicy.ResponseCache` (memory, SQLite, ...); share one object
            between wrappers to share answers.

    Engine options left at ``None`` take the engine's defaults (5 failures, 30 s, one
    probe). After construction ``policy``, ``key`` and ``fallback_key`` hold the values
    in use. The wrapper's ``system_prompt``, ``messages_to_prompt``,
    ``completion_to_prompt``, ``output_parser``, ``pydantic_program_mode``,
    ``query_wrapper_prompt`` and ``callback_manager`` default to the inner model's. The
    wrapper's own ``rate_limiter`` (none by default; the inner model keeps its own) is
    acquired once per call, streams included, before the engine sees the call.

    Raises:
        TypeError: ``inner`` or ``fallback`` is not a LlamaIndex LLM, ``policy`` is given
            with engine options, or ``policy``, ``retry``, ``classifier``, ``key``,
            ``budget``, ``cache`` has the wrong type (the error names the argument).
        callpolicy.MissingPriceError: ``budget`` has ``max_cost_usd`` but no price for
            the inner model or the fallback (the error names the model).
        pydantic.ValidationError: a bad engine option value, ``fallback`` is ``inner``,
            two of the wrapper's models have one circuit key (``fallback_key`` equals
            ``key``, a fallback derives the inner model's), ``fallback_key`` comes without
            a fallback (the error names the argument).

    ``inner``, ``fallback``, ``policy``, the keys, the engine options, ``budget`` and
    ``cache`` are frozen: build a new wrapper to change them (they are resolved once, at
    construction).
    """

    inner: LLM = Field(frozen=True, description="The guarded model.")
    fallback: LLM | list[LLM] | None = Field(
        default=None,
        frozen=True,
        description="Answers when the inner model's circuit is open or it failed; a list "
        "is tried in order.",
    )
    policy: SkipValidation[CallPolicy | None] = Field(
        default=None, frozen=True, exclude=True, description="The callpolicy engine."
    )
    key: str | None = Field(
        default=None, frozen=True, description="Circuit key of the inner model."
    )
    fallback_key: str | None = Field(
        default=None, frozen=True, description="Circuit key of the fallback."
    )

    # The engine options are EngineOptions' fields (validated by the engine, which names
    # the field, so the rules live in one place).
    guard_streams: bool = Field(
        default=True, description="Guard the stream methods (False: pass them through)."
    )
    stream_finished: SkipValidation[StreamFinished] = Field(default=AUTO, frozen=True, exclude=True)
    """Which chunk of the inner model's stream carries its end marker: ``"auto"``, a
    function of one chunk, or None (see ``llamaindex_breaker._markers``)."""
    fallback_stream_finished: SkipValidation[StreamFinished] = Field(
        default=AUTO, frozen=True, exclude=True
    )
    """``stream_finished`` for the fallback's chunks."""
    budget: SkipValidation[Budget | None] = Field(
        default=None, frozen=True, exclude=True, description="Limits checked before every call."
    )
    cache: SkipValidation[ResponseCache | None] = Field(
        default=None, frozen=True, exclude=True, description="Cached answers by request."
    )

    _route: Route = PrivateAttr()

    # -- construction ------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _inherit_prompt_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "guard_stream_start" in data:
            data = dict(data)
            data["guard_streams"] = _deprecated_alias(
                data.pop("guard_stream_start"), data.get("guard_streams"), stacklevel=5
            )
        if isinstance(data, dict):
            inner = data.get("inner")
            if isinstance(inner, LLM):
                missing = {
                    name: getattr(inner, name)
                    for name in _INHERITED_FROM_INNER
                    if name not in data and getattr(inner, name, None) is not None
                }
                if missing:
                    data = {**missing, **data}
        return data

    @field_validator(
        "inner", "fallback", "stream_finished", "fallback_stream_finished", mode="before"
    )
    @classmethod
    def _check_argument(cls, value: Any, info: Any) -> Any:
        # The engine's checks, each naming the argument; the models must be LlamaIndex's.
        name = str(info.field_name)
        if name in ("inner", "fallback"):
            return ModelGuard.fallback_argument(name, value, _checked_llm)
        return ModelGuard.check_finished(name, value)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        inner = self.inner
        fallbacks = ModelGuard.fallback_models(self.fallback)
        guard = ModelGuard(
            inner,
            fallbacks,
            identity=model_identity,
            key=self.key,
            fallback_key=self.fallback_key,
            policy=self.policy,
            options=self,
            budget=self.budget,
            cache=self.cache,
            owner=type(self).__name__,
        )
        # The values in use, for inspection (the fields are frozen: set them directly).
        self.__dict__.update(policy=guard.policy, key=guard.key, fallback_key=guard.fallback_key)
        self._route = Route(
            guard,
            inner,
            fallbacks,
            finished=end_marker(inner, self.stream_finished),
            step_finished=[end_marker(model, self.fallback_stream_finished) for model in fallbacks],
        )
        relay_events(guard.policy)
        if self.callback_manager is not inner.callback_manager:  # given, not inherited
            self._share_callback_manager(self.callback_manager)

    def _share_callback_manager(self, manager: Any) -> None:
        # The models fire the callback events, so they need the manager given to the
        # wrapper (Settings and query engines assign one), as they would unwrapped.
        models = [
            self.__dict__.get("inner"),
            *ModelGuard.fallback_models(self.__dict__.get("fallback")),
        ]
        for model in models:
            if model is not None:
                model.callback_manager = manager

    @property
    def guard_stream_start(self) -> bool:
        """Deprecated alias of :attr:`guard_streams`."""
        return self.guard_streams

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "guard_stream_start":
            name, value = "guard_streams", _deprecated_alias(value, None, stacklevel=3)
        super().__setattr__(name, value)
        if name == "callback_manager":
            self._share_callback_manager(value)

    @classmethod
    def class_name(cls) -> str:
        return "CircuitBreakerLLM"

    @property
    def metadata(self) -> LLMMetadata:
        """The inner model's metadata (context window, output size, model name, chat and
        function calling support)."""
        return self.inner.metadata

    # -- inspection ------------------------------------------------------------------
    def key_for(self, model_name: str | None = None) -> str:
        """The circuit key of the inner model by default; of the fallback when
        ``model_name`` is the fallback's ``metadata.model_name``; else of ``model_name`` as
        another model of the inner model's provider (a per-call ``model=`` override)."""
        guard = _route_of(self).guard
        if (
            model_name is not None
            and guard.fallback_names
            and model_name == guard.fallback_names[0]
            and model_name != guard.model
        ):
            return guard.fallback_keys[0]
        return guard.for_model(model_name)

    def state_for(self, model_name: str | None = None) -> CircuitState:
        """The state of the circuit :meth:`key_for` names (the inner model's by default)."""
        return _route_of(self).guard.policy.state(self.key_for(model_name))

    # -- the guarded calls: the route drives them, sync or async ------------------------
    @unspanned
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _route_of(self).run(self, Chat("chat", messages, kwargs))

    @unspanned
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _route_of(self).arun(self, Chat("achat", messages, kwargs))

    @unspanned
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _route_of(self).run(self, Completion("complete", prompt, formatted, kwargs))

    @unspanned
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return await _route_of(self).arun(self, Completion("acomplete", prompt, formatted, kwargs))

    # -- streams: guarded by the engine, unless guard_streams=False ----------------------
    @unspanned
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return _route_of(self).stream(self, Chat("stream_chat", messages, kwargs))

    @unspanned
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        return await _route_of(self).astream(self, Chat("astream_chat", messages, kwargs))

    @unspanned
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        return _route_of(self).stream(
            self, Completion("stream_complete", prompt, formatted, kwargs)
        )

    @unspanned
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return await _route_of(self).astream(
            self, Completion("astream_complete", prompt, formatted, kwargs)
        )

    # -- tool calling --------------------------------------------------------------------
    def _tool_model(self) -> FunctionCallingLLM:
        inner = self.inner
        if not isinstance(inner, FunctionCallingLLM):
            raise ValueError(
                f"{type(inner).__name__} ({model_name_of(inner)}) is not a FunctionCallingLLM: "
                "it cannot call tools"
            )
        return inner

    def chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """``inner.chat_with_tools`` through the engine; the fallback (when it can call
        tools) prepares the tools its own way."""
        options = tool_options(verbose, allow_parallel_tool_calls, tool_required, kwargs)
        call = ToolChat("chat_with_tools", tools, user_msg, chat_history, options)
        return _route_of(self).run(self, call)

    async def achat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Async :meth:`chat_with_tools`."""
        options = tool_options(verbose, allow_parallel_tool_calls, tool_required, kwargs)
        call = ToolChat("achat_with_tools", tools, user_msg, chat_history, options)
        return await _route_of(self).arun(self, call)

    def stream_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> ChatResponseGen:
        """``inner.stream_chat_with_tools`` guarded as one call (its chunks untouched), or
        the fallback's when it can call tools; untouched with ``guard_streams=False``."""
        options = tool_options(verbose, allow_parallel_tool_calls, tool_required, kwargs)
        call = ToolChat("stream_chat_with_tools", tools, user_msg, chat_history, options)
        return _route_of(self).stream(self, call)

    async def astream_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> ChatResponseAsyncGen:
        """Async :meth:`stream_chat_with_tools`."""
        options = tool_options(verbose, allow_parallel_tool_calls, tool_required, kwargs)
        call = ToolChat("astream_chat_with_tools", tools, user_msg, chat_history, options)
        return await _route_of(self).astream(self, call)

    @unspanned
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inner model's preparation (the wrapper's own ``chat_with_tools`` never uses
        this: each model prepares its own call)."""
        return self._tool_model()._prepare_chat_with_tools_compat(
            tools,
            user_msg=user_msg,
            chat_history=chat_history,
            verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls,
            tool_required=tool_required,
            **kwargs,
        )

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The tool calls in ``response``, parsed by the model that produced it (the
        fallback for a response marked as its, else the inner model)."""
        model: LLM = self.inner
        mark = fallback_mark(response)
        if mark is not None:
            route = _route_of(self)
            guard = route.guard
            for key, name, fallback in zip(
                guard.fallback_keys, guard.fallback_names, route.fallbacks, strict=True
            ):
                if mark.get("key") == key and mark.get("model") == name:
                    model = fallback
                    break
        if not isinstance(model, FunctionCallingLLM):
            if error_on_no_tool_call:
                raise ValueError(
                    f"{type(model).__name__} ({model_name_of(model)}) is not a "
                    "FunctionCallingLLM: its responses carry no tool calls"
                )
            return []
        return model.get_tool_calls_from_response(
            response, error_on_no_tool_call=error_on_no_tool_call, **kwargs
        )


def _route_of(llm: CircuitBreakerLLM) -> Route:
    """``llm._route``, read straight from pydantic's private storage: the attribute
    lookup goes through ``BaseModel.__getattr__``, which costs microseconds per call."""
    private: dict[str, Any] = llm.__pydantic_private__  # type: ignore[assignment]
    route: Route = private["_route"]
    return route


def _deprecated_alias(value: Any, guard_streams: Any, *, stacklevel: int) -> Any:
    """``guard_stream_start=value`` (deprecated): the value for ``guard_streams``."""
    warnings.warn(
        "CircuitBreakerLLM: guard_stream_start is deprecated; streams are guarded by "
        "default (guard_streams=True), whole streams and not only their start: use "
        "guard_streams",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    if guard_streams is not None and guard_streams != value:
        raise ValueError(
            f"guard_stream_start: {value!r} contradicts guard_streams={guard_streams!r} "
            "(guard_stream_start is a deprecated alias of guard_streams)"
        )
    return value


_checked_llm: Callable[[str, Any], LLM] = model_checker(
    LLM,
    "a LlamaIndex LLM (llama_index.core.llms.LLM)",
    "a LangChain model: guard it with langchain_breaker.CircuitBreakerChatModel, or wrap it "
    "in llama_index.llms.langchain.LangChainLLM first",
)
