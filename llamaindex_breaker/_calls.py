"""One LlamaIndex call, described once for its sync, async and stream methods.

``chat``, ``achat``, ``stream_chat`` and ``astream_chat`` take the same arguments and
differ only in the model method they call, so a call is its arguments plus the name of
that method: the route has the call bound to the inner model (:meth:`Call.bound`) or made
on a fallback (:meth:`Call.on`), and asks it for what the engine's cache and budget need
to know (its :class:`callpolicy.CallRequest`, the text of its input). The sync and async
drivers in ``_route`` then share everything but their ``await``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse
from llama_index.core.llms import LLM

from callpolicy import CallRequest

from ._request import (
    chat_request,
    complete_request,
    messages_text,
    tool_messages,
    tools_request,
    tools_text,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["Call", "Chat", "Completion", "ToolChat", "tool_options"]

R = TypeVar("R", ChatResponse, CompletionResponse)


class Call(Generic[R]):
    """The arguments of one call, for any model and any of its four methods (``R``: the
    answer, or each chunk of a stream)."""

    __slots__ = ("kwargs", "method")

    calls_tools: ClassVar[bool] = False
    """Whether only tool-calling models can answer it (``chat_with_tools`` and its kin)."""

    def __init__(self, method: str, kwargs: dict[str, Any]) -> None:
        self.method = method
        """The model method it calls (``"chat"``, ``"astream_chat"``, ...)."""
        self.kwargs = kwargs
        """The call's keyword arguments: a ``model=`` among them keys the call."""

    def on(self, model: LLM, kwargs: dict[str, Any]) -> Any:
        """``model.<method>(...)`` with this call's arguments and ``kwargs``."""
        raise NotImplementedError

    def bound(self, model: LLM) -> Callable[[], Any]:
        """The call on ``model`` (the inner model), to be made once per attempt."""
        return functools.partial(self.on, model, self.kwargs)

    def untouched(self, model: LLM) -> Any:
        """The call as the caller made it (for a stream that is not guarded)."""
        return self.on(model, self.kwargs)

    def request(self, model: LLM) -> CallRequest[R]:
        """What the cache and the budget see of the call, ``model`` answering it."""
        raise NotImplementedError

    def input_text(self) -> Callable[[], str]:
        """The text of the call's input for the budget's estimate, as it is now (before a
        model can change the arguments in place)."""
        raise NotImplementedError


class Chat(Call[ChatResponse]):
    """``chat(messages, **kwargs)``."""

    __slots__ = ("messages",)

    def __init__(
        self, method: str, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> None:
        self.method = method
        self.messages = messages
        self.kwargs = kwargs

    def on(self, model: LLM, kwargs: dict[str, Any]) -> Any:
        return getattr(model, self.method)(self.messages, **kwargs)

    def bound(self, model: LLM) -> Callable[[], Any]:
        # No frame of ours between the engine and the model's method on the hot path.
        return functools.partial(getattr(model, self.method), self.messages, **self.kwargs)

    def request(self, model: LLM) -> CallRequest[ChatResponse]:
        return chat_request(model, self.messages, self.kwargs)

    def input_text(self) -> Callable[[], str]:
        messages = self.messages
        return lambda: messages_text(messages)


class Completion(Call[CompletionResponse]):
    """``complete(prompt, formatted=..., **kwargs)``."""

    __slots__ = ("formatted", "prompt")

    def __init__(self, method: str, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> None:
        self.method = method
        self.prompt = prompt
        self.formatted = formatted
        self.kwargs = kwargs

    def on(self, model: LLM, kwargs: dict[str, Any]) -> Any:
        return getattr(model, self.method)(self.prompt, formatted=self.formatted, **kwargs)

    def bound(self, model: LLM) -> Callable[[], Any]:
        method = getattr(model, self.method)
        return functools.partial(method, self.prompt, formatted=self.formatted, **self.kwargs)

    def request(self, model: LLM) -> CallRequest[CompletionResponse]:
        return complete_request(model, self.prompt, self.formatted, self.kwargs)

    def input_text(self) -> Callable[[], str]:
        prompt = self.prompt
        return lambda: prompt


class ToolChat(Call[ChatResponse]):
    """``chat_with_tools(tools, user_msg=..., chat_history=..., **options)``; ``kwargs``
    holds the options (``verbose``, ``allow_parallel_tool_calls``, ...)."""

    __slots__ = ("chat_history", "tools", "user_msg")

    calls_tools = True

    def __init__(
        self,
        method: str,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None,
        chat_history: list[ChatMessage] | None,
        options: dict[str, Any],
    ) -> None:
        super().__init__(method, options)
        self.tools, self.user_msg, self.chat_history = tools, user_msg, chat_history

    def on(self, model: LLM, kwargs: dict[str, Any]) -> Any:
        # Integrations append user_msg to chat_history in place (OpenAI does): every
        # attempt gets its own copy, or a retry or the fallback would see it twice.
        history = self.chat_history
        return getattr(model, self.method)(
            self.tools,
            user_msg=self.user_msg,
            chat_history=None if history is None else list(history),
            **kwargs,
        )

    def untouched(self, model: LLM) -> Any:
        return getattr(model, self.method)(
            self.tools, user_msg=self.user_msg, chat_history=self.chat_history, **self.kwargs
        )

    def request(self, model: LLM) -> CallRequest[ChatResponse]:
        return tools_request(model, self.tools, self.user_msg, self.chat_history, self.kwargs)

    def input_text(self) -> Callable[[], str]:
        # The messages sent, taken before an integration appends user_msg to chat_history.
        sent, tools = tool_messages(self.user_msg, self.chat_history), self.tools
        return lambda: tools_text(sent, tools)


def tool_options(
    verbose: bool, allow_parallel_tool_calls: bool, tool_required: bool, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of a tool call, as the models receive them."""
    options = {"verbose": verbose, "allow_parallel_tool_calls": allow_parallel_tool_calls}
    if tool_required:
        # Only when set: integrations predating tool_required do not accept it.
        options["tool_required"] = True
    options.update(kwargs)
    return options
