"""Figure 1: what the engine adds to a guarded call, next to pybreaker's ``call()``."""

from __future__ import annotations

import statistics

import pybreaker

from callpolicy import CallPolicy

from ._harness import Result, ratio_rows


def run(*, quick: bool) -> list[Result]:
    def model_call() -> int:
        return 1

    policy = CallPolicy()
    key = "bench::model"
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    policy.execute(key, model_call)
    timings = ratio_rows(
        {
            "bare": model_call,
            "callpolicy": lambda: policy.execute(key, model_call),
            "pybreaker": lambda: breaker.call(model_call),
        },
        loops=20_000 if quick else 200_000,
        repeats=3 if quick else 9,
    )
    # The lambdas cost the same in both guarded rows; subtracting the bare call leaves
    # what each breaker adds (plus one lambda call each).
    ratios = [
        (ours - bare) / (theirs - bare)
        for bare, ours, theirs in zip(
            timings["bare"], timings["callpolicy"], timings["pybreaker"], strict=True
        )
    ]
    ours_ns = statistics.median(timings["callpolicy"]) - statistics.median(timings["bare"])
    theirs_ns = statistics.median(timings["pybreaker"]) - statistics.median(timings["bare"])
    return [
        Result(
            "engine: added cost per guarded call / pybreaker call()",
            ratios,
            "<= 0.60",
            statistics.median(ratios) <= 0.60,
            f"+{ours_ns:.0f} ns vs +{theirs_ns:.0f} ns",
        )
    ]
