"""Figure 3: the LlamaIndex wrapper's ``chat`` next to a bare ``MockLLM.chat``."""

from __future__ import annotations

import statistics

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.llms import MockLLM

from llamaindex_breaker import CircuitBreakerLLM

from ._harness import Result, blocks, ratio_rows


def run(*, quick: bool) -> list[Result]:
    bare = MockLLM()
    guarded = CircuitBreakerLLM(inner=bare, fallback=MockLLM(), fallback_key="fb::mock")
    messages = [ChatMessage(role="user", content="hi")]
    timings = ratio_rows(
        {"bare": lambda: bare.chat(messages), "wrapper": lambda: guarded.chat(messages)},
        **blocks(quick),
    )
    ratios = [w / b for w, b in zip(timings["wrapper"], timings["bare"], strict=True)]
    return [
        Result(
            "llamaindex: chat, breaker+fallback, healthy / bare MockLLM.chat",
            ratios,
            "<= 1.10",
            statistics.median(ratios) <= 1.10,
            f"bare {statistics.median(timings['bare']) / 1000:.0f} us",
        )
    ]
