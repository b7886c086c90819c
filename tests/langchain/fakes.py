"""Fake chat models and helpers for the LangChain wrapper's tests.

:class:`ScriptedChatModel` answers or fails per a script, one entry per call (invoke or
stream), counts the calls that reach it, and records the kwargs each call got. It
streams word by word with usage and response metadata on the last chunk, and can fail
midway through a stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

from callpolicy import Event


class ServerError(Exception):
    """A provider's 500."""

    status_code = 500


class BadRequest(Exception):
    """The caller's fault (400): not counted by default."""

    status_code = 400


class DiesMidStream:
    """A script entry: stream ``content``'s first ``after`` chunks, then raise ``error``."""

    def __init__(self, content: str, after: int, error: Exception) -> None:
        self.content = content
        self.after = after
        self.error = error


Entry = str | AIMessage | Exception | DiesMidStream


class ScriptedChatModel(BaseChatModel):
    """A chat model of provider ``provider`` and model ``model_name`` that plays a script.

    Entries: a string (the answer), an ``AIMessage`` (returned as is: tool calls), an
    exception (raised before anything is produced), :class:`DiesMidStream`. An empty
    script answers ``default``.
    """

    provider: str = "acme"
    model_name: str = "m1"
    default: str = "ok"
    script: list[Any] = Field(default_factory=list)
    tool_format: str = "openai"
    """``"openai"`` or ``"anthropic"``: the format ``bind_tools`` converts tools to."""

    _queue: deque[Any] = PrivateAttr(default_factory=deque)
    _calls: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _gate: asyncio.Event | None = PrivateAttr(default=None)
    _entered: asyncio.Event | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._queue.extend(self.script)

    # -- test controls ---------------------------------------------------------------
    def push(self, *entries: Entry) -> None:
        self._queue.extend(entries)

    def hold(self) -> tuple[asyncio.Event, asyncio.Event]:
        """From now on, async calls signal ``entered`` and then wait for ``gate``."""
        self._gate, self._entered = asyncio.Event(), asyncio.Event()
        return self._gate, self._entered

    @property
    def calls(self) -> int:
        return len(self._calls)

    @property
    def call_kwargs(self) -> list[dict[str, Any]]:
        return self._calls

    def _next(self, kwargs: dict[str, Any]) -> Entry:
        self._calls.append(kwargs)
        entry = self._queue.popleft() if self._queue else self.default
        return entry() if callable(entry) and not isinstance(entry, Exception) else entry

    # -- the chat model ----------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return f"{self.provider}-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=self.provider,
            ls_model_name=kwargs.get("model", self.model_name),
            ls_model_type="chat",
        )
        if stop:
            params["ls_stop"] = stop
        return params

    def _message(self, entry: Entry, kwargs: dict[str, Any]) -> AIMessage:
        if isinstance(entry, Exception):
            raise entry
        if isinstance(entry, DiesMidStream):
            raise entry.error
        if isinstance(entry, AIMessage):
            return entry.model_copy()
        return AIMessage(
            content=entry,
            response_metadata={"model_name": kwargs.get("model", self.model_name)},
            usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = self._message(self._next(kwargs), kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self._gate is not None and self._entered is not None:
            self._entered.set()
            await self._gate.wait()
        return self._generate(messages, stop, None, **kwargs)

    def _chunks(self, entry: Entry, kwargs: dict[str, Any]) -> Iterator[ChatGenerationChunk]:
        if isinstance(entry, Exception):
            raise entry
        limit: int | None = None
        if isinstance(entry, DiesMidStream):
            limit, content = entry.after, entry.content
        elif isinstance(entry, AIMessage):
            for index, call in enumerate(entry.tool_calls):
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="",
                        tool_call_chunks=[
                            tool_call_chunk(
                                name=call["name"],
                                args=_json(call["args"]),
                                id=call["id"],
                                index=index,
                            )
                        ],
                    )
                )
            content = entry.text if not entry.tool_calls else ""
            if not content:
                return
        else:
            content = entry
        words = re.findall(r"\S+\s*", content) or [content]
        for position, word in enumerate(words):
            if limit is not None and position >= limit:
                assert isinstance(entry, DiesMidStream)
                raise entry.error
            last = position == len(words) - 1
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=word,
                    usage_metadata={"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
                    if last
                    else None,
                    response_metadata={"model_name": self.model_name, "finish_reason": "stop"}
                    if last
                    else {},
                )
            )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._next(kwargs), kwargs):
            if run_manager is not None:
                run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._next(kwargs), kwargs):
            if run_manager is not None:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            yield chunk

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        converted = [convert_to_openai_tool(tool) for tool in tools]
        if self.tool_format == "anthropic":
            formatted: list[dict[str, Any]] = [
                {
                    "name": tool["function"]["name"],
                    "description": tool["function"].get("description", ""),
                    "input_schema": tool["function"]["parameters"],
                }
                for tool in converted
            ]
        else:
            formatted = converted
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)


def _json(value: Any) -> str:
    return json.dumps(value)


def tool_call_message(name: str, args: dict[str, Any], call_id: str = "call_1") -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id}])


class RunRecorder(BaseCallbackHandler):
    """Keeps every chat model run: start (with metadata and serialized name) and end."""

    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []
        self.ends: list[UUID] = []
        self.errors: list[UUID] = []
        self.tokens: list[str] = []
        self.chains: list[str] = []

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.starts.append(
            {
                "run_id": run_id,
                "parent_run_id": parent_run_id,
                "name": kwargs.get("name") or (serialized or {}).get("name"),
                "tags": tags or [],
                "metadata": dict(metadata or {}),
            }
        )

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self.ends.append(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.errors.append(run_id)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_chain_start(
        self, serialized: dict[str, Any], inputs: dict[str, Any], **kwargs: Any
    ) -> None:
        self.chains.append(kwargs.get("name") or (serialized or {}).get("name") or "?")


class Events:
    """A callpolicy listener that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [event.kind.value for event in self.events]


class SlowChatModel(ScriptedChatModel):
    """A :class:`ScriptedChatModel` that takes ``delay`` seconds per call (``time.sleep``
    in threads, ``asyncio.sleep`` on a loop), so that concurrent callers overlap."""

    delay: float = 0.05

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        time.sleep(self.delay)
        return super()._generate(messages, stop, run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(self.delay)
        return super()._generate(messages, stop, None, **kwargs)


class FixedChunksChatModel(ScriptedChatModel):
    """Streams exactly the chunk objects given to :meth:`set_chunks` (so a test can check
    that what reaches the caller is the very same objects), counting each stream."""

    _chunks_given: list[AIMessageChunk] = PrivateAttr(default_factory=list)

    def set_chunks(self, chunks: list[AIMessageChunk]) -> None:
        self._chunks_given = chunks

    def stream(
        self,
        input: LanguageModelInput,
        config: Any = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        self._calls.append(kwargs)
        yield from self._chunks_given

    async def astream(
        self,
        input: LanguageModelInput,
        config: Any = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        self._calls.append(kwargs)
        for chunk in self._chunks_given:
            yield chunk
