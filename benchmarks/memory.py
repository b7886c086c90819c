"""Figure 8: memory per breaker key, and that it grows linearly with the number of keys."""

from __future__ import annotations

import gc
import tracemalloc

from callpolicy import CallPolicy, ResponseCache, cache_key

from ._harness import Result


def _bytes_for_keys(count: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        policy = CallPolicy()
        for index in range(count):
            policy.execute(f"provider::model-{index}", int)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del policy
    return after - before


# A typical short answer, as the LangChain adapter stores it (JSON of the message).
_ANSWER = {
    "type": "ai",
    "data": {
        "content": "The capital of France is Paris.",
        "response_metadata": {"model_name": "gpt-4o-mini", "finish_reason": "stop"},
        "usage_metadata": {"input_tokens": 12, "output_tokens": 8, "total_tokens": 20},
        "tool_calls": [],
        "id": "run-0000",
    },
}


def _bytes_for_entries(count: int) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = ResponseCache(max_entries=count + 1)
        for index in range(count):
            key = cache_key({"messages": [f"question {index}"], "model": "gpt-4o-mini"})
            cache.set(key, _ANSWER)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del cache
    return after - before


def run(*, quick: bool) -> list[Result]:
    small, large = (1_000, 5_000) if quick else (1_000, 10_000)
    per_key_small = _bytes_for_keys(small) / small
    per_key_large = _bytes_for_keys(large) / large
    growth = per_key_large / per_key_small  # 1.0: perfectly linear
    per_entry_small = _bytes_for_entries(small) / small
    per_entry_large = _bytes_for_entries(large) / large
    entry_growth = per_entry_large / per_entry_small
    return [
        Result(
            f"memory: bytes per cached entry at {large:,} / at {small:,} entries",
            [entry_growth],
            "<= 1.20 (linear)",
            entry_growth <= 1.20,
            f"{per_entry_large:.0f} B per cached short answer (~300 B of JSON), in memory",
        ),
        Result(
            f"memory: bytes per key at {large:,} keys / at {small:,} keys",
            [growth],
            "<= 1.20 (linear)",
            growth <= 1.20,
            f"{per_key_large:.0f} B per breaker key",
        ),
    ]
