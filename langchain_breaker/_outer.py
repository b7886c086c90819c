"""The outer policies, budget and response cache, as the LangChain wrapper uses them.

The engine applies them (cache -> budget -> fallback -> retry -> breaker -> model); the
adapter only *describes* a call as a :class:`callpolicy.CallRequest`: what changes its
answer (for the cache key), its input text (for the budget's estimate), and how its answer
becomes JSON and back (for the cache) and what it used (for the budget). Nothing here runs
unless a budget or a cache is given: without them a route has no :class:`Outer` at all.

Three kinds of call are described:

- a chat model call (``invoke``; the answer an ``AIMessage``),
- the same call on the legacy ``generate()`` path (the answer a ``ChatResult``; its entry
  is interchangeable with the ``invoke`` one),
- a structured-output call (``with_structured_output``; the answer a pydantic object, a
  dict, or ``{"raw", "parsed", "parsing_error"}`` with ``include_raw=True``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

from callpolicy import (
    Budget,
    CallRequest,
    ResponseCache,
    UncacheableRequestError,
    Usage,
    by_type,
    describe_arguments,
    key_data,
    key_text,
)

__all__ = [
    "META_CACHE",
    "TRACING_KWARGS",
    "ChatCodec",
    "Outer",
    "StructuredCodec",
    "chunk_usage",
    "describe_value",
    "unbind",
]

META_CACHE: Final = "callpolicy_cache"
"""``response_metadata`` key of an answer that did not come from its own model call:
``"hit"`` (the cache), ``"shared"`` (an identical call in the air, single flight) or
``"stale"`` (an expired entry served because the circuit is open)."""

TRACING_KWARGS: Final = ("ls_structured_output_format", "structured_output_format")
"""Call kwargs that only label traces: a model's private ``_generate`` must not get them,
and they do not change the answer."""

# Model fields read besides ``_identifying_params`` (which most integrations fill, but
# not all): the model and its sampling parameters, and the endpoint (two servers
# answering for the same model name must not share entries). Read from the model's
# ``__dict__``: a missing one costs nothing, and a field assigned later is seen.
_MODEL_FIELDS = (
    "model_name",
    "model",
    "model_id",
    "deployment_name",
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_sequences",
    "n",
    "openai_api_base",
    "openai_api_version",
    "azure_endpoint",
    "anthropic_api_url",
    "base_url",
    "api_base",
    "endpoint",
    "endpoint_url",
    "region_name",
)


def unbind(runnable: Runnable[Any, Any]) -> tuple[Runnable[Any, Any], dict[str, Any]]:
    """The runnable under a (possibly nested) binding, and the kwargs bound to it."""
    bound: dict[str, Any] = {}
    while isinstance(runnable, RunnableBinding):
        bound = {**runnable.kwargs, **bound}
        runnable = runnable.bound
    return runnable, bound


# -- describing a request: the engine's walker, with LangChain's tools --------------------
def describe_value(value: Any) -> Any:
    """``value`` as data :func:`callpolicy.cache_key` can hash (the engine's
    :func:`callpolicy.key_data`): JSON values as they are, pydantic objects as their
    fields, pydantic classes as their JSON schema, LangChain tools and TypedDict classes
    in their OpenAI form; ``SecretStr`` values null. A value with no JSON form (a client
    object, a function) raises :class:`callpolicy.UncacheableRequestError`: the engine then
    calls the model without the cache rather than risk another request's answer."""
    return key_data(value, convert=_convert)


def _convert(value: Any) -> Any:
    """LangChain's values the engine's walker does not know: tools (whole, as JSON text,
    so that a parameter called ``password`` is not dropped by name)."""
    if isinstance(value, BaseTool):
        return {"$tool": key_text(convert_to_openai_tool(value))}
    if isinstance(value, type) and not issubclass(value, BaseModel):
        return _as_tool(value)  # a TypedDict, say
    return NotImplemented


def _convert_tool(value: Any) -> Any:
    """:func:`_convert` where a tool is expected (``tools=``, ``functions=``, ...): a plain
    function is a tool too, described by its schema as every ``bind_tools`` sends it."""
    found = _convert(value)
    if found is NotImplemented and callable(value) and not isinstance(value, type):
        return _as_tool(value)
    return found


def _as_tool(value: Any) -> Any:
    try:
        return {"$tool": key_text(convert_to_openai_tool(value))}
    except Exception:  # no schema to be had: the engine calls it uncacheable
        return NotImplemented


def describe_schema(schema: Any) -> str:
    """The structured-output schema of ``with_structured_output``, as JSON text."""
    try:
        return key_text(schema, convert=_convert_tool)
    except UncacheableRequestError as exc:
        exc.path.extend(("['schema']", "['structured_output']"))
        raise


def _model_params(model: BaseChatModel) -> dict[str, Any]:
    """The model: its type, identifying parameters (model, temperature, max_tokens, ...),
    and the fields of :data:`_MODEL_FIELDS` it has. Provider and model name are in the
    engine's part of the key (the circuit key); secrets are dropped by the key."""
    fields = model.__dict__
    given = {name: fields[name] for name in _MODEL_FIELDS if fields.get(name) is not None}
    described = {
        "_type": model._llm_type,
        "params": model._identifying_params,
        "fields": describe_arguments(given, convert=_convert, opaque=by_type, where="model"),
    }
    # Settings stay the same from call to call: one with no JSON form (a client object)
    # counts by its type rather than making every call uncacheable.
    return key_data(described, convert=_convert, opaque=by_type)  # type: ignore[no-any-return]


# Message fields the provider never receives: the run id, what the provider *reported*
# about an earlier answer (response_metadata, including callpolicy's own cache mark;
# usage_metadata), and a tool's artifact (kept for the application, not sent).
_CLIENT_ONLY_FIELDS = ("id", "response_metadata", "usage_metadata", "artifact")


def _messages_described(messages: Sequence[BaseMessage], *, response_ids: bool = False) -> str:
    """Every message with all its content blocks, as canonical JSON text (sorted keys),
    as the provider receives it: without :data:`_CLIENT_ONLY_FIELDS` (so a follow-up turn
    whose history holds a cached answer, marked as such, is the same request as one whose
    history holds the fresh answer). ``response_ids``: keep an answer's
    ``response_metadata["id"]`` (sent as ``previous_response_id`` by OpenAI's Responses
    API with ``use_previous_response_id``). One string: the key's canonical form then
    hashes it without walking every block again, and a field of a message named like a
    secret stays in (it is the conversation, not a credential)."""
    described = []
    for message in messages:
        data = message.model_dump()
        metadata = data.get("response_metadata")
        for name in _CLIENT_ONLY_FIELDS:
            data.pop(name, None)
        if response_ids and isinstance(metadata, dict) and metadata.get("id") is not None:
            data["response_id"] = metadata["id"]
        described.append({"type": message.type, "data": data})
    try:
        return key_text(described, convert=_convert)
    except UncacheableRequestError as exc:
        exc.path.append("['messages']")
        raise


def _input_text(messages: Sequence[BaseMessage]) -> str:
    """The messages' text (and the arguments of earlier tool calls), for the estimate."""
    parts: list[str] = []
    for message in messages:
        parts.append(str(message.text))
        if isinstance(message, AIMessage) and message.tool_calls:
            parts.append(json.dumps([call["args"] for call in message.tool_calls], default=str))
    return "\n".join(parts)


# -- answers as JSON -----------------------------------------------------------------------
def _encode_message(message: object) -> dict[str, Any]:
    if not isinstance(message, BaseMessage):
        raise TypeError(f"expected a message, got {type(message).__name__}")
    return message_to_dict(message)


def _decode_message(data: object) -> AIMessage:
    if not isinstance(data, dict):
        raise TypeError("not a message")
    message = messages_from_dict([data])[0]
    if not isinstance(message, AIMessage):
        raise TypeError(f"expected an AI message, got {type(message).__name__}")
    return message


def _marked(message: AIMessage, status: str) -> AIMessage:
    return message.model_copy(
        update={"response_metadata": {**message.response_metadata, META_CACHE: status}}
    )


def encode_message(message: AIMessage) -> dict[str, Any]:
    return {"message": _encode_message(message)}


def decode_message(payload: dict[str, Any]) -> AIMessage:
    return _decode_message(payload["message"])


def mark_message(message: AIMessage, status: str) -> AIMessage:
    """A copy marked ``response_metadata["callpolicy_cache"] = status``."""
    return _marked(message, status)


def usage_of_message(message: AIMessage) -> object:
    return message.usage_metadata


# The legacy path's ChatResult, in the same payload (its first message under "message"),
# so an entry written by invoke() serves generate() and the other way round.
def encode_result(result: ChatResult) -> dict[str, Any]:
    generations = result.generations
    if not generations:
        raise ValueError("an answer without generations")
    first, *more = generations
    return {
        "message": _encode_message(first.message),
        "generation_info": first.generation_info,
        "more": [
            {"message": _encode_message(g.message), "generation_info": g.generation_info}
            for g in more
        ],
        "llm_output": result.llm_output,
    }


def decode_result(payload: dict[str, Any]) -> ChatResult:
    entries = [
        {"message": payload["message"], "generation_info": payload.get("generation_info")},
        *payload.get("more", ()),
    ]
    return ChatResult(
        generations=[
            ChatGeneration(
                message=_decode_message(entry["message"]),
                generation_info=entry.get("generation_info"),
            )
            for entry in entries
        ],
        llm_output=payload.get("llm_output"),
    )


def mark_result(result: ChatResult, status: str) -> ChatResult:
    return ChatResult(
        generations=[
            ChatGeneration(
                message=_marked(_ai(g.message), status), generation_info=g.generation_info
            )
            for g in result.generations
        ],
        llm_output=result.llm_output,
    )


def _ai(message: BaseMessage) -> AIMessage:
    if not isinstance(message, AIMessage):
        raise TypeError(f"expected an AI message, got {type(message).__name__}")
    return message


def usage_of_result(result: ChatResult) -> object:
    if result.generations:
        found = getattr(result.generations[0].message, "usage_metadata", None)
        if found:
            return found
    return result.llm_output


# -- codecs: how one route's calls are described -------------------------------------------
class ChatCodec:
    """Describes the calls of a chat model route: the inner model, the kwargs bound on the
    route's primary (tools with their schemas, tool_choice, response_format, ...), and the
    call's own kwargs (``stop``, a per-call ``model=``, ...)."""

    __slots__ = ("model",)

    def __init__(self, model: BaseChatModel) -> None:
        self.model = model

    def request(
        self, primary: Runnable[Any, Any], input: Any, kwargs: Mapping[str, Any]
    ) -> CallRequest[Any]:
        _, bound = unbind(primary)
        merged = {**bound, **kwargs} if bound else kwargs
        messages = _Messages(self.model, input)
        model = self.model

        def describe() -> Mapping[str, Any]:
            return _described_call(model, messages.get(), merged, None)

        return CallRequest(
            describe=describe,
            input_text=lambda: _input_text(messages.get()),
            encode=encode_message,
            decode=decode_message,
            mark=mark_message,
            usage=usage_of_message,
        )

    def legacy_request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> CallRequest[ChatResult]:
        """The legacy ``_generate`` path: ``kwargs`` already merged with the bound ones."""
        merged = dict(kwargs) if stop is None else {**kwargs, "stop": stop}
        model = self.model
        return CallRequest(
            describe=lambda: _described_call(model, messages, merged, None),
            input_text=lambda: _input_text(messages),
            encode=encode_result,
            decode=decode_result,
            mark=mark_result,
            usage=usage_of_result,
        )


class StructuredCodec:
    """Describes the calls of a ``with_structured_output`` route: the inner model, the
    schema (its JSON schema), ``include_raw`` and the options (``method``, ``strict``),
    and the call's kwargs; encodes its parsed answers."""

    __slots__ = ("description", "include_raw", "model", "schema_class")

    def __init__(
        self,
        model: BaseChatModel,
        schema: Any,
        include_raw: bool,
        options: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.include_raw = include_raw
        self.schema_class: type[BaseModel] | None = (
            schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None
        )
        self.description = {
            "schema": describe_schema(schema),
            "include_raw": include_raw,
            "options": describe_value(dict(options)),
        }

    def request(
        self, primary: Runnable[Any, Any], input: Any, kwargs: Mapping[str, Any]
    ) -> CallRequest[Any]:
        messages = _Messages(self.model, input)
        model, description = self.model, self.description
        if self.include_raw:
            return CallRequest(
                describe=lambda: _described_call(model, messages.get(), kwargs, description),
                input_text=lambda: _input_text(messages.get()),
                encode=self._encode_raw,
                decode=self._decode_raw,
                mark=_mark_raw,
                usage=_usage_of_raw,
            )
        return CallRequest(
            describe=lambda: _described_call(model, messages.get(), kwargs, description),
            input_text=lambda: _input_text(messages.get()),
            encode=self._encode_parsed,
            decode=self._decode_parsed,
        )

    def _encode_parsed(self, value: Any) -> dict[str, Any]:
        schema = self.schema_class
        if schema is not None and isinstance(value, schema):
            dumped = value.model_dump(mode="json")
            if schema.model_validate(dumped) != value:  # never serve a different object
                raise ValueError(f"{type(value).__name__} does not survive JSON")
            return {"model": dumped}
        if value is None or isinstance(value, (dict, list, str, int, float, bool)):
            if json.loads(json.dumps(value)) != value:
                raise ValueError("the parsed answer does not survive JSON")
            return {"json": value}
        raise TypeError(f"cannot cache a parsed {type(value).__name__}")

    def _decode_parsed(self, payload: dict[str, Any]) -> Any:
        if "model" in payload:
            if self.schema_class is None:
                raise TypeError("a pydantic answer for a schema that is not a pydantic class")
            return self.schema_class.model_validate(payload["model"])
        return payload["json"]

    def _encode_raw(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or "raw" not in value:
            raise TypeError("expected {'raw', 'parsed', 'parsing_error'}")
        if value.get("parsing_error") is not None:
            raise ValueError("an answer that failed to parse is not cached")
        return {
            "raw": _encode_message(value["raw"]),
            "parsed": self._encode_parsed(value.get("parsed")),
        }

    def _decode_raw(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "raw": _decode_message(payload["raw"]),
            "parsed": self._decode_parsed(payload["parsed"]),
            "parsing_error": None,
        }


def _mark_raw(value: dict[str, Any], status: str) -> dict[str, Any]:
    raw = value.get("raw")
    if not isinstance(raw, AIMessage):
        return value
    return {**value, "raw": _marked(raw, status)}


def _usage_of_raw(value: dict[str, Any]) -> object:
    return getattr(value.get("raw"), "usage_metadata", None)


def _described_call(
    model: BaseChatModel,
    messages: Sequence[BaseMessage],
    kwargs: Mapping[str, Any],
    structured: Mapping[str, Any] | None,
) -> dict[str, Any]:
    response_ids = bool(model.__dict__.get("use_previous_response_id"))
    described: dict[str, Any] = {
        "model": _model_params(model),
        "messages": _messages_described(messages, response_ids=response_ids),
        "kwargs": _described_kwargs(kwargs),
    }
    if structured is not None:
        described["structured_output"] = structured
    return described


def _described_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call's kwargs (bound ones too), less those that only label traces: the
    engine's one description of arguments, with LangChain's tools."""
    sent = {name: value for name, value in kwargs.items() if name not in TRACING_KWARGS}
    return describe_arguments(sent, convert=_convert, schema_convert=_convert_tool)


class _Messages:
    """The call's input as messages, converted once (for the key and for the estimate)."""

    __slots__ = ("_input", "_messages", "_model")

    def __init__(self, model: BaseChatModel, input: Any) -> None:
        self._model = model
        self._input = input
        self._messages: list[BaseMessage] | None = None

    def get(self) -> list[BaseMessage]:
        if self._messages is None:
            self._messages = self._model._convert_input(self._input).to_messages()
        return self._messages


# -- the route's outer policies ------------------------------------------------------------
class Outer:
    """The budget and the cache of one route, and the codec describing its calls."""

    __slots__ = ("budget", "cache", "codec")

    def __init__(
        self,
        budget: Budget | None,
        cache: ResponseCache | None,
        codec: ChatCodec | StructuredCodec,
    ) -> None:
        self.budget = budget
        self.cache = cache
        self.codec = codec

    def with_codec(self, codec: ChatCodec | StructuredCodec) -> Outer:
        return Outer(self.budget, self.cache, codec)

    def __deepcopy__(self, memo: dict[int, Any]) -> Outer:
        # Shared state: a deep copy of a chain keeps the same budget and cache.
        return Outer(self.budget, self.cache, copy.deepcopy(self.codec, memo))

    def request(
        self, primary: Runnable[Any, Any], input: Any, kwargs: Mapping[str, Any]
    ) -> CallRequest[Any]:
        return self.codec.request(primary, input, kwargs)

    def estimate(self, input: Any) -> int:
        """The budget's input-token estimate of ``input`` (0 without a budget)."""
        budget = self.budget
        if budget is None:
            return 0
        return budget.estimate(_input_text(_Messages(self.codec.model, input).get()))


# -- streams: usage counted as the chunks pass, never altered ------------------------------
def chunk_usage(chunk: object) -> Usage | None:
    """The usage a stream's chunk reports (a delta: the engine's meter adds each one)."""
    report = getattr(chunk, "usage_metadata", None)
    if report is None and isinstance(chunk, dict):  # include_raw: {"raw": chunk, ...}
        report = getattr(chunk.get("raw"), "usage_metadata", None)
    return None if not report else Usage.from_report(report)
