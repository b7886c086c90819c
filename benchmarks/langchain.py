"""Figures 2 and 4: the LangChain wrapper next to the bare model and to
``with_retry().with_fallbacks()``, with nothing failing; the cost of an open circuit;
10,000 concurrent ``ainvoke`` on one event loop; 16 threads through ``invoke``; a
response-cache hit next to LangChain's own ``InMemoryCache`` hit."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import statistics
import time

from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.language_models import FakeListChatModel

from callpolicy import CallPolicy, CircuitOpenError, ResponseCache
from langchain_breaker import CircuitBreakerChatModel

from ._fakes import AsyncEchoChatModel
from ._harness import Result, ThreadGang, blocks, paired_added_ns, ratio_rows


def _overhead(quick: bool) -> list[Result]:
    bare = FakeListChatModel(responses=["ok"])
    fallback = FakeListChatModel(responses=["fallback"])
    guarded = CircuitBreakerChatModel(inner=bare, fallback=fallback, fallback_key="fb::fake")
    composed = bare.with_retry().with_fallbacks([fallback])
    timings = ratio_rows(
        {
            "bare": lambda: bare.invoke("hi"),
            "wrapper": lambda: guarded.invoke("hi"),
            "with_retry_fallbacks": lambda: composed.invoke("hi"),
        },
        **blocks(quick),
    )
    vs_bare = [w / b for w, b in zip(timings["wrapper"], timings["bare"], strict=True)]
    vs_composed = [
        w / c for w, c in zip(timings["wrapper"], timings["with_retry_fallbacks"], strict=True)
    ]
    bare_us = statistics.median(timings["bare"]) / 1000
    return [
        Result(
            "langchain: invoke, breaker+fallback, healthy / bare FakeListChatModel.invoke",
            vs_bare,
            "<= 1.10",
            statistics.median(vs_bare) <= 1.10,
            f"bare {bare_us:.0f} us, wrapper {statistics.median(timings['wrapper']) / 1000:.0f} us",
        ),
        Result(
            "langchain: invoke, breaker+fallback / with_retry().with_fallbacks([fb])",
            vs_composed,
            "< 1.00",
            statistics.median(vs_composed) < 1.0,
            f"with_retry+with_fallbacks "
            f"{statistics.median(timings['with_retry_fallbacks']) / 1000:.0f} us",
        ),
    ]


def _open_circuit(quick: bool) -> list[Result]:
    primary = FakeListChatModel(responses=["never"])
    fallback = FakeListChatModel(responses=["fallback"])
    policy = CallPolicy()
    routed = CircuitBreakerChatModel(
        inner=primary, fallback=fallback, fallback_key="fb::fake", policy=policy
    )
    refusing = CircuitBreakerChatModel(inner=primary, policy=policy)
    policy.force_open(routed.key_for())

    def refuse() -> None:
        with contextlib.suppress(CircuitOpenError):
            refusing.invoke("hi")

    repeats = 3 if quick else 9
    pairs = 300 if quick else 3_000
    added_us = [
        paired_added_ns(lambda: fallback.invoke("hi"), lambda: routed.invoke("hi"), pairs=pairs)
        / 1000
        for _ in range(repeats)
    ]
    refused = ratio_rows({"refused": refuse}, loops=pairs, repeats=repeats)
    refused_us = [t / 1000 for t in refused["refused"]]
    return [
        Result(
            "langchain: circuit open, routed to fallback: added us vs bare fallback",
            added_us,
            "<= 50 us",
            statistics.median(added_us) <= 50,
            "absolute us: median of back-to-back pairs (routed - bare fallback)",
        ),
        Result(
            "langchain: circuit open, no fallback: us per refused call",
            refused_us,
            "<= 50 us",
            statistics.median(refused_us) <= 50,
            "absolute microseconds (CircuitOpenError raised and caught)",
        ),
    ]


def _concurrency(quick: bool) -> list[Result]:
    tasks = 1_000 if quick else 10_000
    bare = AsyncEchoChatModel()
    guarded = CircuitBreakerChatModel(inner=bare)

    async def storm(model: AsyncEchoChatModel | CircuitBreakerChatModel) -> float:
        start = time.perf_counter()
        await asyncio.gather(*(model.ainvoke("hi") for _ in range(tasks)))
        return time.perf_counter() - start

    def timed_storm(model: AsyncEchoChatModel | CircuitBreakerChatModel) -> float:
        gc.collect()  # each storm starts from the same heap: 10,000 live calls make GC work
        return asyncio.run(storm(model))

    ratios = []
    # 21 storms each: one storm of 10,000 calls takes 1-3 s, long enough for another
    # tenant of a shared machine to land in one and not the other.
    for repeat in range(3 if quick else 21):
        order = [bare, guarded] if repeat % 2 == 0 else [guarded, bare]
        seconds = {id(m): timed_storm(m) for m in order}
        ratios.append(seconds[id(guarded)] / seconds[id(bare)])

    # Many short rounds, each model's back to back (alternating which goes first), and
    # the median of the per-pair ratios: with 16 threads on a shared 2-core machine one
    # long block per model drifts by more than the margin being measured.
    threads, per_thread, pairs = 16, (10 if quick else 50), (3 if quick else 31)
    sync_bare = FakeListChatModel(responses=["ok"])
    sync_guarded = CircuitBreakerChatModel(inner=sync_bare)
    bare_call = functools.partial(sync_bare.invoke, "hi")
    guarded_call = functools.partial(sync_guarded.invoke, "hi")
    thread_ratios = []
    with ThreadGang(threads) as gang:
        gang.run(bare_call, per_thread)  # warm up both paths in every thread
        gang.run(guarded_call, per_thread)
        for pair in range(pairs):
            if pair % 2:
                guarded_s, bare_s = (
                    gang.run(guarded_call, per_thread),
                    gang.run(bare_call, per_thread),
                )
            else:
                bare_s, guarded_s = (
                    gang.run(bare_call, per_thread),
                    gang.run(guarded_call, per_thread),
                )
            thread_ratios.append(guarded_s / bare_s)
    return [
        Result(
            f"langchain: {tasks:,} concurrent ainvoke, one loop / without the wrapper",
            ratios,
            "<= 1.10",
            statistics.median(ratios) <= 1.10,
            "native-async fake model",
        ),
        Result(
            f"langchain: {threads} threads x {per_thread} invoke / without the wrapper",
            thread_ratios,
            "<= 1.10",
            statistics.median(thread_ratios) <= 1.10,
            f"FakeListChatModel; {pairs} pairs of rounds",
        ),
    ]


def _cache_hit(quick: bool) -> list[Result]:
    """A hit of the wrapper's ``ResponseCache`` against a hit of LangChain's own
    ``set_llm_cache(InMemoryCache())``, on the same model and prompt, in the same run."""
    # Two answers: a model that answered again would say "second", so a hit is provable.
    langchain_cached = FakeListChatModel(responses=["first", "second"])
    # The wrapper's inner model ignores the global cache (cache=False): the wrapper's own
    # cache answers, and a hit never reaches the inner model anyway.
    guarded = CircuitBreakerChatModel(
        inner=FakeListChatModel(responses=["first", "second"], cache=False),
        cache=ResponseCache(),
    )
    set_llm_cache(InMemoryCache())
    try:
        for model in (langchain_cached, guarded):
            model.invoke("hi")  # fill the cache
            assert model.invoke("hi").content == "first", "not a cache hit"
        assert guarded.invoke("hi").response_metadata["callpolicy_cache"] == "hit"
        timings = ratio_rows(
            {
                "langchain": lambda: langchain_cached.invoke("hi"),
                "wrapper": lambda: guarded.invoke("hi"),
            },
            **blocks(quick),
        )
    finally:
        set_llm_cache(None)  # the global cache must not leak into the next figures
    ratios = [w / lc for w, lc in zip(timings["wrapper"], timings["langchain"], strict=True)]
    return [
        Result(
            "langchain: cache hit, wrapper ResponseCache / set_llm_cache(InMemoryCache())",
            ratios,
            "< 1.00",
            statistics.median(ratios) < 1.0,
            f"wrapper {statistics.median(timings['wrapper']) / 1000:.0f} us, "
            f"InMemoryCache {statistics.median(timings['langchain']) / 1000:.0f} us",
        )
    ]


def run(*, quick: bool) -> list[Result]:
    return [*_overhead(quick), *_open_circuit(quick), *_concurrency(quick), *_cache_hit(quick)]
