"""Test doubles for the LlamaIndex adapter: a scripted, natively async function-calling LLM,
a fake sleeper for the engine (it advances :class:`~tests.support.clock.FakeClock`), and
recorders of LlamaIndex instrumentation.

``ScriptedLLM`` behaves like a real integration where it matters here: its methods fire
LlamaIndex's callbacks and spans (``llm_chat_callback``/``llm_completion_callback``, the
dispatcher span mixin), its async methods really await, it prepares tools in its own
format and parses tool calls from its own response format (``tool_style``), and its
``_prepare_chat_with_tools`` appends ``user_msg`` to the caller's ``chat_history`` in place,
as llama-index-llms-openai does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools.types import BaseTool
from pydantic import Field, PrivateAttr

_ids = itertools.count(1)


# -- errors a provider might raise -----------------------------------------------------
class FakeAPIError(Exception):
    """An SDK-style error carrying an HTTP status (classified by its status)."""

    def __init__(self, status_code: int, message: str = "boom") -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


def server_error() -> FakeAPIError:
    return FakeAPIError(500, "internal error")


def client_error() -> FakeAPIError:
    return FakeAPIError(400, "bad request")


# -- behaviours ------------------------------------------------------------------------
@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Raise:
    error: BaseException


@dataclass(frozen=True)
class Stream:
    """Stream ``words``; raise ``error`` after ``fail_after`` of them (never if None)."""

    words: tuple[str, ...]
    fail_after: int | None = None
    error: BaseException | None = None


Behaviour = Text | ToolCall | Raise | Stream | Callable[[Sequence[ChatMessage]], Any]


def tool_then_answer(name: str, kwargs: dict[str, Any], answer: str) -> Behaviour:
    """Call tool ``name`` first; once a tool result is in the history, answer with
    ``answer`` followed by the tool's output."""

    def decide(messages: Sequence[ChatMessage]) -> Text | ToolCall:
        results = [m for m in messages if m.role == MessageRole.TOOL]
        if results:
            return Text(f"{answer} {results[-1].content}")
        return ToolCall(name, kwargs)

    return decide


@dataclass
class Call:
    """One call a ScriptedLLM received."""

    method: str
    messages: list[str]
    kwargs: dict[str, Any]


class ScriptedLLM(FunctionCallingLLM):
    """A function-calling LLM that answers from a script (``push``), then ``default``."""

    model_name: str = "fake-primary"
    function_calling: bool = True
    tool_style: Literal["kwargs", "blocks"] = "kwargs"
    """Where its tool calls live in a response: ``message.additional_kwargs["fake_tool_calls"]``
    (and tools are sent as ``"kwargs:<name>"``), or ``ToolCallBlock``s (``"blocks:<name>"``)."""
    default: Any = Field(default_factory=lambda: Text("ok"), exclude=True)
    usage: dict[str, int] | None = Field(default=None, exclude=True)
    """Token usage to report, OpenAI-style, in ``raw["usage"]`` of every answer and of a
    stream's last chunk (None: report none)."""

    _script: deque[Any] = PrivateAttr(default_factory=deque)
    _calls: list[Call] = PrivateAttr(default_factory=list)
    _gate: asyncio.Event | None = PrivateAttr(default=None)
    _entered: asyncio.Event | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "ScriptedLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=4096,
            num_output=256,
            model_name=self.model_name,
            is_chat_model=True,
            is_function_calling_model=self.function_calling,
        )

    # -- script ------------------------------------------------------------------------
    def push(self, *behaviours: Behaviour) -> ScriptedLLM:
        self._script.extend(behaviours)
        return self

    @property
    def calls(self) -> list[Call]:
        return self._calls

    def hold(self) -> asyncio.Event:
        """Make ``achat`` wait (once admitted) until :meth:`release`; returns an event set
        when a call is inside ``achat``."""
        self._gate, self._entered = asyncio.Event(), asyncio.Event()
        return self._entered

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = self._entered = None

    def _next(self, method: str, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Any:
        self._calls.append(Call(method, [str(m.content) for m in messages], dict(kwargs)))
        behaviour = self._script.popleft() if self._script else self.default
        if callable(behaviour):  # decides from the messages
            behaviour = behaviour(messages)
        if isinstance(behaviour, Raise):
            raise behaviour.error
        return behaviour

    def _message(self, behaviour: Any) -> ChatMessage:
        if isinstance(behaviour, Text):
            return ChatMessage(role=MessageRole.ASSISTANT, content=behaviour.text)
        if isinstance(behaviour, Stream):
            return ChatMessage(role=MessageRole.ASSISTANT, content="".join(behaviour.words))
        assert isinstance(behaviour, ToolCall), behaviour
        call_id = f"call_{next(_ids)}"
        if self.tool_style == "kwargs":
            return ChatMessage(
                role=MessageRole.ASSISTANT,
                content="",
                additional_kwargs={
                    "fake_tool_calls": [
                        {"id": call_id, "name": behaviour.name, "args": behaviour.kwargs}
                    ]
                },
            )
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[
                ToolCallBlock(
                    tool_call_id=call_id, tool_name=behaviour.name, tool_kwargs=behaviour.kwargs
                )
            ],
        )

    def _chat(
        self, method: str, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> ChatResponse:
        message = self._message(self._next(method, messages, kwargs))
        return ChatResponse(message=message, raw=self._raw())

    def _complete(self, method: str, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        behaviour = self._next(method, [ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        text = behaviour.text if isinstance(behaviour, Text) else "".join(behaviour.words)
        return CompletionResponse(text=text, raw=self._raw())

    def _raw(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"model": self.model_name}
        if self.usage is not None:
            raw["usage"] = dict(self.usage)
        return raw

    def _chunk_raw(self, last: bool) -> dict[str, Any] | None:
        """A stream chunk's raw: the usage, on the last chunk, when reporting usage."""
        return self._raw() if last and self.usage is not None else None

    def _plan(
        self, method: str, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[list[tuple[ChatMessage, str]], int | None, BaseException | None]:
        """What a stream sends: (message so far, delta) pairs, and where it fails."""
        behaviour = self._next(method, messages, kwargs)
        if isinstance(behaviour, ToolCall):
            return [(self._message(behaviour), "")], None, None
        if isinstance(behaviour, Text):
            words = behaviour.text.split()
            behaviour = Stream(tuple(w if i == 0 else f" {w}" for i, w in enumerate(words)))
        assert isinstance(behaviour, Stream), behaviour
        steps, text = [], ""
        for word in behaviour.words:
            text += word
            steps.append((ChatMessage(role=MessageRole.ASSISTANT, content=text), word))
        return steps, behaviour.fail_after, behaviour.error

    # -- chat and complete ------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat("chat", messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        await asyncio.sleep(0)  # really async: other tasks run meanwhile
        if self._gate is not None and self._entered is not None:
            self._entered.set()
            await self._gate.wait()
        return self._chat("achat", messages, kwargs)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete("complete", prompt, kwargs)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        await asyncio.sleep(0)
        return self._complete("acomplete", prompt, kwargs)

    # -- streams ---------------------------------------------------------------------------
    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        steps, fail_after, error = self._plan("stream_chat", messages, kwargs)

        def gen() -> Generator[ChatResponse, None, None]:
            for index, (message, delta) in enumerate(steps):
                if fail_after is not None and index >= fail_after:
                    assert error is not None
                    raise error
                yield ChatResponse(
                    message=message, delta=delta, raw=self._chunk_raw(index == len(steps) - 1)
                )

        return gen()

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        steps, fail_after, error = self._plan("astream_chat", messages, kwargs)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            for index, (message, delta) in enumerate(steps):
                await asyncio.sleep(0)
                if fail_after is not None and index >= fail_after:
                    assert error is not None
                    raise error
                yield ChatResponse(
                    message=message, delta=delta, raw=self._chunk_raw(index == len(steps) - 1)
                )

        return gen()

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        chats = self.stream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs)

        def gen() -> Generator[CompletionResponse, None, None]:
            for chunk in chats:
                yield CompletionResponse(
                    text=chunk.message.content or "", delta=chunk.delta, raw=chunk.raw
                )

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        chats = await self.astream_chat(
            [ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs
        )

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            async for chunk in chats:
                yield CompletionResponse(
                    text=chunk.message.content or "", delta=chunk.delta, raw=chunk.raw
                )

        return gen()

    # -- tools ------------------------------------------------------------------------------
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
        messages = chat_history or []  # appended to in place, as OpenAI's integration does
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        return {
            "messages": messages,
            "tools": [f"{self.tool_style}:{tool.metadata.name}" for tool in tools],
            "tool_required": tool_required,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        if self.tool_style == "kwargs":
            found = [
                ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["args"])
                for c in response.message.additional_kwargs.get("fake_tool_calls", [])
            ]
        else:
            found = [
                ToolSelection(
                    tool_id=b.tool_call_id or "",
                    tool_name=b.tool_name,
                    tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {},
                )
                for b in response.message.blocks
                if isinstance(b, ToolCallBlock)
            ]
        if not found and error_on_no_tool_call:
            raise ValueError(f"{self.model_name}: no tool call in the response")
        return found


def primary(**kwargs: Any) -> ScriptedLLM:
    return ScriptedLLM(model_name="fake-primary", tool_style="kwargs", **kwargs)


def secondary(**kwargs: Any) -> ScriptedLLM:
    return ScriptedLLM(
        model_name="fake-fallback", tool_style="blocks", default=Text("from the fallback"), **kwargs
    )


# -- time ------------------------------------------------------------------------------


# -- instrumentation ---------------------------------------------------------------------
class EventRecorder(BaseEventHandler):
    """Keeps every LlamaIndex instrumentation event."""

    events: list[BaseEvent] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "EventRecorder"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event)

    def of(self, *types: type[BaseEvent]) -> list[BaseEvent]:
        return [event for event in self.events if isinstance(event, types)]

    def clear(self) -> None:
        self.events.clear()
