"""Figure 8: memory per breaker key, and that it grows linearly with the number of keys."""

from __future__ import annotations

import gc
import tracemalloc

from callpolicy import CallPolicy

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


def run(*, quick: bool) -> list[Result]:
    small, large = (1_000, 5_000) if quick else (1_000, 10_000)
    per_key_small = _bytes_for_keys(small) / small
    per_key_large = _bytes_for_keys(large) / large
    growth = per_key_large / per_key_small  # 1.0: perfectly linear
    return [
        Result(
            f"memory: bytes per key at {large:,} keys / at {small:,} keys",
            [growth],
            "<= 1.20 (linear)",
            growth <= 1.20,
            f"{per_key_large:.0f} B per breaker key",
        )
    ]
