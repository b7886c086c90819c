"""Fake models for the benchmarks: no network, negligible work of their own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult


class AsyncEchoChatModel(BaseChatModel):
    """A chat model with a native async path (no thread pool), answering at once."""

    model_name: str = "echo-1"

    @property
    def _llm_type(self) -> str:
        return "async-echo"

    def _result(self) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="ok"))])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._result()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.sleep(0)  # yield once, as a real network call would
        return self._result()


class ChunkyChatModel(BaseChatModel):
    """A chat model that streams ``chunks`` one-character chunks (built as it streams, as a
    real model's are), for the stream figures."""

    model_name: str = "chunky-1"
    chunks: int = 1_000

    @property
    def _llm_type(self) -> str:
        return "chunky"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=AIMessage(content="w" * self.chunks))]
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for _ in range(self.chunks):
            yield ChatGenerationChunk(message=AIMessageChunk(content="w"))
