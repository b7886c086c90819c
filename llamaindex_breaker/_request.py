"""What the engine's budget and response cache need to know about one LlamaIndex call.

The wrapper only *describes* a call (a :class:`callpolicy.CallRequest`); the engine does
the rest (cache -> budget -> fallback -> retry -> breaker -> model). A request is built
only when the wrapper has a budget or a cache, so the plain path never pays for it.

- **describe** (the cache key): which call (``chat``, ``complete``, ``chat_with_tools``),
  the inner model's class, model name and settings (every serialised field, its
  ``additional_kwargs`` included, except transport settings: timeouts, retries, headers,
  clients; the endpoint stays, without user info or query string; secrets are dropped by
  the key), every message with all its blocks, the tools with their names, descriptions
  and parameter schemas, and the call's keyword arguments (``tool_choice``,
  ``temperature``, ``stop``, a structured output class as its JSON schema, ...). Messages,
  tools and schemas go in as canonical JSON *text*: the key's secret filter drops entries
  by name, and must not drop a tool parameter called ``password``. All of it goes through
  the engine's one walker (:func:`callpolicy.key_data`). A call argument or message with
  no JSON form (a client object, a function) makes the call uncacheable (the engine calls
  the model without the cache, with one warning per kind); a model setting with none
  counts by its type. A message's ``additional_kwargs["callpolicy"]`` (callpolicy's own
  mark) is left out. A block referring to a file or URL counts by that reference, not the
  bytes behind it.
- **encode / decode** (the cached answer, JSON only): a ``ChatResponse`` or
  ``CompletionResponse`` with all its fields. Provider SDK objects (``raw``: OpenAI's
  ``ChatCompletion``; OpenAI's tool calls in ``message.additional_kwargs["tool_calls"]``)
  are stored as JSON tagged with their class and rebuilt on decode, so the integration
  reads a cached answer exactly as a fresh one. Only classes of the SDK packages in
  :data:`SDK_MODULES` are rebuilt (importing a module named by a cache file is not
  allowed beyond those); others come back as their JSON data. A ``raw`` with no JSON form
  is not cached (the cached answer's ``raw`` is None); other fields with no JSON form
  make the answer uncacheable (the engine returns it uncached, with a warning).
- **mark**: a cached answer carries ``additional_kwargs["callpolicy"]["cache"]`` (``"hit"``,
  ``"shared"`` or ``"stale"``) on the response, next to a fallback's mark (see
  ``_served``).
- **usage**: see ``_usage``.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import (
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Final, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    MessageRole,
)
from llama_index.core.llms import LLM
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from callpolicy import (
    CallRequest,
    UncacheableRequestError,
    by_type,
    describe_arguments,
    key_data,
    key_text,
)

from ._keys import model_name_of
from ._served import SERVED_BY_KEY, mark_cached
from ._usage import usage_of

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = [
    "SDK_MODULES",
    "chat_request",
    "complete_request",
    "decode_chat",
    "decode_completion",
    "describe_model",
    "describe_tool",
    "encode_chat",
    "encode_completion",
    "messages_text",
    "tool_messages",
    "tools_request",
    "tools_text",
]

logger = logging.getLogger("callpolicy")

R = TypeVar("R", ChatResponse, CompletionResponse)

SDK_MODULES: Final = ("openai.types.", "anthropic.types.")
"""Packages whose pydantic classes a cached answer may name and have rebuilt on decode."""

# Model settings that do not change the answer: how the request is sent. (Secrets such as
# api_key are dropped by the cache key itself, at any depth.)
_TRANSPORT: Final = frozenset(
    {
        "async_http_client",
        "callback_manager",
        "default_headers",
        "default_query",
        "http_client",
        "max_retries",
        "num_workers",
        "rate_limiter",
        "request_timeout",
        "reuse_client",
        "timeout",
    }
)
# Tool-call options that do not change the answer.
_QUIET_OPTIONS: Final = frozenset({"verbose"})

_PLAIN: Final = (str, int, float, bool)
_SDK_TAG: Final = "$sdk"
_FORMAT: Final = "llamaindex.v1"
_CHAT: Final = "chat"
_COMPLETION: Final = "completion"


# -- describe: the cache key's view of a call ------------------------------------------
def jsonable(value: Any, *, settings: bool = False) -> Any:
    """``value`` as JSON data for the cache key: the engine's walker
    (:func:`callpolicy.key_data`), with LlamaIndex tools as their description (as JSON
    text). A value with no JSON form raises :class:`callpolicy.UncacheableRequestError`
    (the engine then calls the model uncached), except in the model's ``settings``, which
    stay the same from call to call: there it counts by its type."""
    return key_data(value, convert=_convert, opaque=by_type if settings else None)


def json_text(value: Any) -> str:
    """``value`` (see :func:`jsonable`) as canonical JSON text: sorted keys, no spaces;
    secrets (``SecretStr``) as null."""
    return key_text(value, convert=_convert)


def _convert(value: Any) -> Any:
    if isinstance(value, _tool_class()):
        return {"$tool": key_text(describe_tool(value))}
    return NotImplemented


@functools.cache
def _tool_class() -> type[BaseTool]:
    # Imported on first use, once: an import statement per value costs microseconds.
    from llama_index.core.tools.types import BaseTool

    return BaseTool


def _arguments(arguments: Mapping[str, Any], *, settings: bool = False) -> dict[str, Any]:
    """Settings or call arguments for the key, the engine's one way
    (:func:`callpolicy.describe_arguments`): schemas as JSON text, endpoints without
    credentials, the rest as JSON data (see :func:`jsonable` for ``settings``)."""
    return describe_arguments(
        arguments,
        convert=_convert,
        opaque=by_type if settings else None,
        where="settings" if settings else "kwargs",
    )


def describe_model(llm: LLM) -> dict[str, Any]:
    """The model as the cache key sees it: class, model name and answer-changing settings
    (its serialised fields, less the transport settings), ``additional_kwargs`` included."""
    settings: dict[str, Any] = {}
    for name, field in type(llm).model_fields.items():
        if not field.exclude and name not in _TRANSPORT:
            settings[name] = getattr(llm, name, None)
    extra = settings.get("additional_kwargs")
    if isinstance(extra, Mapping):
        settings["additional_kwargs"] = _arguments(extra, settings=True)
    return {
        "class": type(llm).__qualname__,
        "model_name": model_name_of(llm),
        "settings": _arguments(settings, settings=True),
    }


def describe_tool(tool: BaseTool) -> dict[str, Any]:
    """A tool as the model sees it: name, description and parameter schema."""
    metadata = tool.metadata
    return {
        "name": metadata.name,
        "description": metadata.description,
        "parameters": metadata.get_parameters_dict(),
    }


def describe_messages(messages: Iterable[ChatMessage]) -> str:
    """Every message with all its blocks and ``additional_kwargs``, as canonical JSON text
    (content is never filtered by name), as the provider receives it: without callpolicy's
    own mark (``additional_kwargs["callpolicy"]``), which integrations do not send and
    which would make a follow-up turn whose history holds a cached answer another
    request."""
    try:
        return json_text([_unmarked(message) for message in messages])
    except UncacheableRequestError as exc:
        exc.path.append("['messages']")
        raise


def _unmarked(message: ChatMessage) -> ChatMessage:
    extra = message.additional_kwargs
    if SERVED_BY_KEY not in extra:
        return message
    kept = {name: value for name, value in extra.items() if name != SERVED_BY_KEY}
    return message.model_copy(update={"additional_kwargs": kept})


def messages_text(messages: Iterable[ChatMessage]) -> str:
    """The text of ``messages`` (their text blocks), for the budget's token estimate."""
    return "\n".join(text for message in messages if (text := message.content))


def chat_request(
    model: LLM, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]
) -> CallRequest[ChatResponse]:
    """The request of ``model.chat(messages, **kwargs)`` (and ``achat``)."""

    def describe() -> dict[str, Any]:
        return {
            "call": "chat",
            "model": describe_model(model),
            "messages": describe_messages(messages),
            "kwargs": _arguments(kwargs),
        }

    return CallRequest(
        describe=describe,
        input_text=lambda: messages_text(messages),
        encode=encode_chat,
        decode=decode_chat,
        mark=mark_cached,
        usage=usage_of,
    )


def complete_request(
    model: LLM, prompt: str, formatted: bool, kwargs: Mapping[str, Any]
) -> CallRequest[CompletionResponse]:
    """The request of ``model.complete(prompt, formatted, **kwargs)`` (and ``acomplete``)."""

    def describe() -> dict[str, Any]:
        return {
            "call": "complete",
            "model": describe_model(model),
            "prompt": prompt,
            "formatted": formatted,
            "kwargs": _arguments(kwargs),
        }

    return CallRequest(
        describe=describe,
        input_text=lambda: prompt,
        encode=encode_completion,
        decode=decode_completion,
        mark=mark_cached,
        usage=usage_of,
    )


def tool_messages(
    user_msg: str | ChatMessage | None, chat_history: Sequence[ChatMessage] | None
) -> list[ChatMessage]:
    """The messages a ``chat_with_tools`` call sends: the history, then the user message."""
    messages = list(chat_history or ())
    if isinstance(user_msg, str):
        messages.append(ChatMessage(role=MessageRole.USER, content=user_msg))
    elif user_msg is not None:
        messages.append(user_msg)
    return messages


def tools_text(messages: Iterable[ChatMessage], tools: Sequence[BaseTool]) -> str:
    """The input of a tool call for the token estimate: the messages' text and the tools'
    schemas (they are sent with every request: input tokens too)."""
    return "\n".join([messages_text(messages), *(json_text(describe_tool(t)) for t in tools)])


def tools_request(
    model: LLM,
    tools: Sequence[BaseTool],
    user_msg: str | ChatMessage | None,
    chat_history: Sequence[ChatMessage] | None,
    options: Mapping[str, Any],
) -> CallRequest[ChatResponse]:
    """The request of ``model.chat_with_tools(tools, user_msg, chat_history, **options)``:
    the history with the user message appended (as the integrations do), the tools with
    their schemas, and the options (``tool_choice``, ``tool_required``,
    ``allow_parallel_tool_calls``, ...; not ``verbose``)."""
    messages = tool_messages(user_msg, chat_history)
    chosen = {name: value for name, value in options.items() if name not in _QUIET_OPTIONS}

    def describe() -> dict[str, Any]:
        return {
            "call": "chat_with_tools",
            "model": describe_model(model),
            "messages": describe_messages(messages),
            "tools": [_tool_text(tool) for tool in tools],
            "kwargs": _arguments(chosen),
        }

    return CallRequest(
        describe=describe,
        input_text=lambda: tools_text(messages, tools),
        encode=encode_chat,
        decode=decode_chat,
        mark=mark_cached,
        usage=usage_of,
    )


def _tool_text(tool: BaseTool) -> str:
    try:
        return json_text(describe_tool(tool))
    except UncacheableRequestError as exc:
        exc.path.append("['tools']")
        raise


# -- encode / decode: the cached answer, JSON only -----------------------------------------
def _pack(value: Any) -> Any:
    """``value`` as JSON data, SDK objects tagged with their class; raises for anything
    with no JSON form (then the answer is not cached)."""
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, Mapping):
        packed: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError(f"a mapping key {name!r} is not a string")
            packed[name] = _pack(item)
        return packed
    if isinstance(value, (list, tuple)):
        return [_pack(item) for item in value]
    if isinstance(value, BaseModel):
        kind = type(value)
        data = value.model_dump(mode="json")
        if kind.__module__.startswith(SDK_MODULES):
            return {_SDK_TAG: f"{kind.__module__}:{kind.__qualname__}", "data": data}
        return data
    return to_jsonable_python(value, bytes_mode="base64")


def _unpack(value: Any) -> Any:
    """The inverse of :func:`_pack`: tagged SDK objects rebuilt (when allowed and importable)."""
    if isinstance(value, dict):
        tag = value.get(_SDK_TAG)
        if isinstance(tag, str) and len(value) == 2 and "data" in value:
            return _rebuild(tag, value["data"])
        return {name: _unpack(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_unpack(item) for item in value]
    return value


def _rebuild(tag: str, data: Any) -> Any:
    module_name, _, qualname = tag.partition(":")
    if not module_name.startswith(SDK_MODULES) or not qualname:
        return _unpack(data)
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return _unpack(data)  # the SDK is not installed here, or moved the class
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        return _unpack(data)
    try:
        return found.model_validate(data)
    except ValueError as exc:  # another SDK version: keep the data
        logger.debug("callpolicy cache: %s not rebuilt: %r", tag, exc)
        return _unpack(data)


def _pack_raw(raw: Any) -> Any:
    try:
        return _pack(raw)
    except (TypeError, ValueError):
        # An SDK object with no JSON form: the answer is still cached, without it.
        return None


def _encode_message(message: ChatMessage) -> dict[str, Any]:
    data = message.model_dump(mode="json", exclude={"additional_kwargs"})
    data["additional_kwargs"] = _pack(message.additional_kwargs)
    return data


def _decode_message(data: Mapping[str, Any]) -> ChatMessage:
    return ChatMessage.model_validate(
        {**data, "additional_kwargs": _unpack(data.get("additional_kwargs") or {})}
    )


def _common(response: ChatResponse | CompletionResponse, kind: str) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "kind": kind,
        "raw": _pack_raw(response.raw),
        "delta": response.delta,
        "logprobs": to_jsonable_python(response.logprobs),
        "additional_kwargs": _pack(response.additional_kwargs),
    }


def _checked(payload: Mapping[str, Any], kind: str) -> None:
    if payload.get("format") != _FORMAT or payload.get("kind") != kind:
        raise ValueError(f"not a cached LlamaIndex {kind} response")


def encode_chat(response: ChatResponse) -> dict[str, Any]:
    """A ``ChatResponse`` as JSON data (see the module's docstring)."""
    payload = _common(response, _CHAT)
    payload["message"] = _encode_message(response.message)
    return payload


def decode_chat(payload: dict[str, Any]) -> ChatResponse:
    """A ``ChatResponse`` from :func:`encode_chat`'s data."""
    _checked(payload, _CHAT)
    return ChatResponse(
        message=_decode_message(payload["message"]),
        raw=_unpack(payload.get("raw")),
        delta=payload.get("delta"),
        logprobs=payload.get("logprobs"),
        additional_kwargs=_unpack(payload.get("additional_kwargs") or {}),
    )


def encode_completion(response: CompletionResponse) -> dict[str, Any]:
    """A ``CompletionResponse`` as JSON data."""
    payload = _common(response, _COMPLETION)
    payload["text"] = response.text
    return payload


def decode_completion(payload: dict[str, Any]) -> CompletionResponse:
    """A ``CompletionResponse`` from :func:`encode_completion`'s data."""
    _checked(payload, _COMPLETION)
    return CompletionResponse(
        text=payload["text"],
        raw=_unpack(payload.get("raw")),
        delta=payload.get("delta"),
        logprobs=payload.get("logprobs"),
        additional_kwargs=_unpack(payload.get("additional_kwargs") or {}),
    )
