"""A LlamaIndex RAG query engine that keeps answering while its primary model is down.

Runs offline: no API keys, no network. The two "models" are small fakes (a primary that
is down, then recovers; a fallback that answers from the retrieved context) and the
embeddings are LlamaIndex's ``MockEmbedding``. Swap in real ones, for instance::

    from llama_index.llms.openai import OpenAI
    from llama_index.llms.anthropic import Anthropic

    llm = CircuitBreakerLLM(
        inner=OpenAI(model="gpt-4o-mini", max_retries=0),
        fallback=Anthropic(model="claude-3-5-haiku-latest"),
        failure_threshold=5,
        cooldown=30.0,
    )

Run it with ``python examples/llamaindex_rag.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback

from callpolicy import CallPolicy, Event, EventKind
from llamaindex_breaker import CircuitBreakerLLM, served_by


class Clock:
    """Monotonic time that moves only when told: the example skips the cooldown's wait."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ToyModel(CustomLLM):
    """A stand-in for a hosted model: it is either down (raises what an SDK raises when
    the provider is unreachable) or answers with the context line about the country the
    query names."""

    model_name: str
    up: bool = True
    calls: int = 0

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.model_name, is_chat_model=True)

    def _answer(self, prompt: str) -> str:
        self.calls += 1
        if not self.up:
            raise ConnectionError(f"{self.model_name}: connection refused")
        lines = [line.strip() for line in prompt.splitlines() if line.strip()]
        query = next((line for line in lines if line.startswith("Query:")), lines[-1])
        country = query.rstrip("?.").split()[-1]
        fact = next((line for line in lines if country in line and line != query), query)
        return f"{fact} (answered by {self.model_name})"

    @llm_chat_callback()
    def chat(self, messages: Any, **kwargs: Any) -> ChatResponse:
        prompt = "\n".join(str(m.content) for m in messages)
        return ChatResponse(message=ChatMessage(role="assistant", content=self._answer(prompt)))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        yield CompletionResponse(text=self._answer(prompt))


def main() -> int:
    # The listener below prints the breaker's events; keep its log records quiet.
    logging.getLogger("callpolicy").setLevel(logging.ERROR)
    clock = Clock()
    primary = ToyModel(model_name="big-model", up=False)
    backup = ToyModel(model_name="small-model")

    def report(event: Event) -> None:
        if event.kind is EventKind.STATE_CHANGE:
            print(f"   [breaker] {event.key}: {event.old_state} -> {event.state} ({event.reason})")
        elif event.kind is EventKind.FALLBACK:
            print(f"   [breaker] fallback answers for {event.key} ({event.error_type or 'open'})")

    policy = CallPolicy(failure_threshold=3, cooldown=30.0, clock=clock, listeners=[report])
    llm = CircuitBreakerLLM(inner=primary, fallback=backup, policy=policy)
    print(f"guarding {llm.key} with fallback {llm.fallback_key}\n")

    documents = [
        Document(text="Oslo is the capital of Norway."),
        Document(text="Lima is the capital of Peru."),
        Document(text="Quito is the capital of Ecuador."),
    ]
    index = VectorStoreIndex.from_documents(documents, embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=llm, similarity_top_k=3)

    print("1. The primary model is down: each query fails over to the fallback.")
    countries = ["Norway", "Peru", "Ecuador", "Norway"]
    for number, country in enumerate(countries, start=1):
        answer = engine.query(f"What is the capital of {country}?")
        print(f"   query {number}: {answer}  [circuit {llm.state_for()}]")
    print(f"   the primary was called {primary.calls} times for 4 queries\n")

    print("2. The primary recovers; after the 30 s cooldown one probe closes the circuit.")
    primary.up = True
    clock.now += 30.0
    answer = engine.query("What is the capital of Peru?")
    print(f"   query 5: {answer}  [circuit {llm.state_for()}]\n")

    response = llm.chat([ChatMessage(role="user", content="Lima is the capital of Peru.")])
    print(f"3. A direct chat call says who answered: served_by -> {served_by(response)!r}")
    snapshot = policy.snapshot()[llm.key or ""]
    print(f"   {llm.key}: {snapshot.state}, opened {snapshot.trips} time(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
