"""The engine's stream meter, ``Budget.metered`` / ``Budget.ametered``, without a framework.

Fake chunks come from plain generators (sync) and async generators (async); most tests
run both ways through the ``mode`` fixture. The model's stream is kept alive by its
:class:`Source`, so only an explicit close by the meter closes it (not garbage collection).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from callpolicy._budget import Budget, Usage
from callpolicy._budget_memory import MemoryBudgetStore

KEY = "acme::m1"
FALLBACK = "other::m2"


@dataclass(eq=False)  # compared by identity: a chunk must come out as the very object
class Chunk:
    text: str
    usage: Usage | None = None
    answered_by: str | None = None


def usage_of(chunk: Chunk) -> Usage | None:
    return chunk.usage


class Boom(RuntimeError):
    pass


class Source:
    """A model's stream, scripted: chunks, and an exception where one is to be raised."""

    def __init__(self, *items: Chunk | Exception) -> None:
        self.items = items
        self.started = False
        self.closed = False
        self.finished = False
        self.made: list[object] = []  # kept alive: only an explicit close closes a stream

    def stream(self, mode: str) -> Any:
        made = self._sync() if mode == "sync" else self._async()
        self.made.append(made)
        return made

    def _sync(self) -> Iterator[Chunk]:
        self.started = True
        try:
            for item in self.items:
                if isinstance(item, Exception):
                    raise item
                yield item
            self.finished = True
        finally:
            self.closed = True

    async def _async(self) -> AsyncIterator[Chunk]:
        self.started = True
        try:
            for item in self.items:
                if isinstance(item, Exception):
                    raise item
                yield item
            self.finished = True
        finally:
            self.closed = True

    def chunks(self) -> list[Chunk]:
        return [item for item in self.items if isinstance(item, Chunk)]


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wrap(budget: Budget, source: Source, mode: str, **options: Any) -> Any:
    options.setdefault("key", KEY)
    options.setdefault("usage_of", usage_of)
    if mode == "sync":
        return budget.metered(source.stream(mode), **options)
    return budget.ametered(source.stream(mode), **options)


async def drain(budget: Budget, source: Source, mode: str, **options: Any) -> list[Chunk]:
    stream = wrap(budget, source, mode, **options)
    if mode == "sync":
        return list(stream)
    return [chunk async for chunk in stream]


async def first_then_close(stream: Any, mode: str) -> Chunk:
    """The first chunk, then the consumer stops (as a ``break`` and a close do)."""
    if mode == "sync":
        chunk: Chunk = next(stream)
        stream.close()
    else:
        chunk = await anext(stream)
        await stream.aclose()
    return chunk


def counted(budget: Budget, key: str | None = None) -> tuple[int, int, int]:
    usage = budget.usage(key)
    return (usage.calls, usage.input_tokens, usage.output_tokens)


class Estimate:
    """An estimate that counts how often it is asked."""

    def __init__(self, tokens: int = 12) -> None:
        self.tokens = tokens
        self.asked = 0

    def __call__(self) -> int:
        self.asked += 1
        return self.tokens


# -- the chunks pass untouched ------------------------------------------------------------
async def test_every_chunk_passes_as_the_very_same_object_in_order(mode: str) -> None:
    source = Source(Chunk("a", Usage(2, 0)), Chunk("b"), Chunk("c", Usage(0, 3)))
    received = await drain(Budget(), source, mode)
    assert len(received) == 3
    assert all(got is sent for got, sent in zip(received, source.chunks(), strict=True))
    assert [chunk.usage for chunk in received] == [Usage(2, 0), None, Usage(0, 3)]


async def test_a_stream_never_iterated_counts_nothing_and_never_starts(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a", Usage(5, 5)))
    estimate = Estimate()
    wrap(budget, source, mode, estimate=estimate)
    assert not source.started
    assert counted(budget) == (0, 0, 0)
    assert estimate.asked == 0


# -- deltas and running totals ----------------------------------------------------------------
async def test_delta_reports_are_each_added(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a", Usage(3, 1)), Chunk("b"), Chunk("c", Usage(3, 2)))
    await drain(budget, source, mode)
    assert counted(budget) == (1, 6, 3)  # as running totals it would be (1, 3, 2)
    assert budget.usage().estimated_calls == 0


async def test_running_totals_count_only_their_growth(mode: str) -> None:
    budget = Budget()
    source = Source(
        Chunk("a", Usage(5, 1)),
        Chunk("b", Usage(5, 2)),
        Chunk("c", Usage(5, 2)),  # repeated: nothing new
        Chunk("d", Usage(4, 3)),  # a smaller input total adds nothing; output grew by 1
    )
    await drain(budget, source, mode, cumulative=True)
    assert counted(budget) == (1, 5, 3)  # as deltas it would be (1, 19, 8)


async def test_usage_is_recorded_as_the_chunks_pass(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a", Usage(4, 0)), Chunk("b", Usage(0, 6)))
    stream = wrap(budget, source, mode)
    if mode == "sync":
        next(stream)
    else:
        await anext(stream)
    assert counted(budget) == (1, 4, 0)  # before the stream's end
    await first_then_close(stream, mode)
    assert counted(budget) == (1, 4, 6)


async def test_the_call_counts_with_the_first_chunk_before_any_usage(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a"), Chunk("b", Usage(1, 1)))
    stream = wrap(budget, source, mode)
    if mode == "sync":
        next(stream)
    else:
        await anext(stream)
    assert counted(budget) == (1, 0, 0)  # a stream in flight is a call, as a reserved one
    rest = list(stream) if mode == "sync" else [chunk async for chunk in stream]
    assert len(rest) == 1
    assert counted(budget) == (1, 1, 1)


@pytest.mark.parametrize("cumulative", [False, True], ids=["deltas", "totals"])
async def test_the_stream_is_one_call_however_many_chunks_report(
    mode: str, cumulative: bool
) -> None:
    budget = Budget()
    source = Source(*(Chunk(str(n), Usage(n, n)) for n in range(1, 6)))
    await drain(budget, source, mode, cumulative=cumulative, estimate=Estimate())
    calls, input_tokens, output_tokens = counted(budget)
    assert calls == 1
    assert (input_tokens, output_tokens) == ((5, 5) if cumulative else (15, 15))


# -- no usage: the estimate ------------------------------------------------------------------
async def test_a_stream_reporting_no_usage_counts_one_call_and_its_estimate(mode: str) -> None:
    budget = Budget()
    estimate = Estimate(12)
    source = Source(Chunk("a"), Chunk("b"))
    stream = wrap(budget, source, mode, estimate=estimate)
    received = list(stream) if mode == "sync" else [chunk async for chunk in stream]
    assert len(received) == 2
    assert counted(budget) == (1, 12, 0)
    assert estimate.asked == 1
    assert budget.usage().estimated_calls == 1  # its tokens are a guess, and say so


async def test_an_estimate_of_zero_tokens_is_still_an_estimated_call(mode: str) -> None:
    budget = Budget()
    await drain(budget, Source(Chunk("a")), mode, estimate=Estimate(0))
    assert counted(budget) == (1, 0, 0)
    assert budget.usage().estimated_calls == 1


async def test_a_zero_report_says_nothing_and_the_estimate_stays(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a", Usage(0, 0)), Chunk("b", Usage(0, 0)))
    await drain(budget, source, mode, estimate=Estimate(9), cumulative=False)
    assert counted(budget) == (1, 9, 0)
    assert budget.usage().estimated_calls == 1


async def test_a_stream_reporting_usage_never_asks_for_an_estimate(mode: str) -> None:
    budget = Budget()
    estimate = Estimate(100)
    await drain(budget, Source(Chunk("a", Usage(2, 2))), mode, estimate=estimate)
    assert estimate.asked == 0
    assert counted(budget) == (1, 2, 2)


async def test_an_empty_stream_counts_one_call_and_its_estimate(mode: str) -> None:
    budget = Budget()
    assert await drain(budget, Source(), mode, estimate=Estimate(7)) == []
    assert counted(budget) == (1, 7, 0)


async def test_without_an_estimate_a_stream_reporting_nothing_is_one_call(mode: str) -> None:
    budget = Budget()
    await drain(budget, Source(Chunk("a")), mode)
    assert counted(budget) == (1, 0, 0)
    assert budget.usage().estimated_calls == 0  # nothing was estimated


# -- failures ------------------------------------------------------------------------------
async def test_a_stream_failing_midway_counts_one_call_and_no_tokens(mode: str) -> None:
    budget = Budget()
    estimate = Estimate(50)
    source = Source(Chunk("a"), Boom("midway"))
    with pytest.raises(Boom):
        await drain(budget, source, mode, estimate=estimate)
    assert counted(budget) == (1, 0, 0)
    assert estimate.asked == 0


async def test_a_stream_failing_before_its_first_chunk_counts_one_call(mode: str) -> None:
    budget = Budget()
    with pytest.raises(Boom):
        await drain(budget, Source(Boom("at once")), mode, estimate=Estimate(50))
    assert counted(budget) == (1, 0, 0)


async def test_a_failed_stream_keeps_the_usage_it_reported(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a", Usage(4, 1)), Boom("later"))
    with pytest.raises(Boom):
        await drain(budget, source, mode, estimate=Estimate(50))
    assert counted(budget) == (1, 4, 1)


# -- the consumer stops early ----------------------------------------------------------------
async def test_stopping_early_closes_the_models_stream_and_counts_once(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a"), Chunk("b"), Chunk("c"))
    stream = wrap(budget, source, mode, estimate=Estimate(8))
    first = await first_then_close(stream, mode)
    assert first is source.chunks()[0]
    assert source.closed
    assert not source.finished  # closed, not drained
    assert counted(budget) == (1, 8, 0)  # the input was sent: it counts


async def test_a_break_out_of_a_for_loop_closes_the_models_stream(mode: str) -> None:
    budget = Budget()
    source = Source(Chunk("a", Usage(3, 0)), Chunk("b", Usage(0, 2)))
    stream = wrap(budget, source, mode)
    if mode == "sync":
        for _ in stream:
            break
        stream.close()  # what the end of the loop's owner does (and garbage collection)
    else:
        async for _ in stream:
            break
        await stream.aclose()
    assert source.closed
    assert not source.finished
    assert counted(budget) == (1, 3, 0)


async def test_the_end_is_counted_even_when_closing_the_models_stream_fails(mode: str) -> None:
    budget = Budget()

    class Refusing:
        """A model's stream whose close raises."""

        def __iter__(self) -> Refusing:
            return self

        def __next__(self) -> Chunk:
            return Chunk("a")

        def __aiter__(self) -> Refusing:
            return self

        async def __anext__(self) -> Chunk:
            return Chunk("a")

        def close(self) -> None:
            raise OSError("connection reset")

        async def aclose(self) -> None:
            raise OSError("connection reset")

    if mode == "sync":
        stream = budget.metered(Refusing(), key=KEY, usage_of=usage_of, estimate=Estimate(3))
        next(stream)
        with pytest.raises(OSError, match="reset"):
            stream.close()
    else:
        astream = budget.ametered(Refusing(), key=KEY, usage_of=usage_of, estimate=Estimate(3))
        await anext(astream)
        with pytest.raises(OSError, match="reset"):
            await astream.aclose()
    assert counted(budget) == (1, 3, 0)


def test_an_iterable_and_the_iterator_it_hands_out_are_both_closed() -> None:
    # An SDK's stream object owns the HTTP response its iterator reads.
    closed: list[str] = []

    def inner() -> Iterator[Chunk]:
        try:
            yield Chunk("a")
            yield Chunk("b")
        finally:
            closed.append("iterator")

    class SDKStream:
        def __init__(self) -> None:
            self.iterator = inner()

        def __iter__(self) -> Iterator[Chunk]:
            return self.iterator

        def close(self) -> None:
            closed.append("stream")

    sdk = SDKStream()
    stream = Budget().metered(sdk, key=KEY, usage_of=usage_of)
    next(stream)
    stream.close()
    assert closed == ["iterator", "stream"]


def test_a_plain_list_is_metered_too() -> None:
    budget = Budget()
    chunks = [Chunk("a", Usage(1, 0)), Chunk("b", Usage(0, 1))]
    received = list(budget.metered(chunks, key=KEY, usage_of=usage_of))
    assert all(got is sent for got, sent in zip(received, chunks, strict=True))
    assert counted(budget) == (1, 1, 1)


# -- keys and prices -----------------------------------------------------------------------
async def test_chunks_are_counted_under_the_key_that_answered(mode: str) -> None:
    budget = Budget(per_key=True, prices={"m1": (1.0, 1.0), "m2": (10.0, 10.0)})
    source = Source(
        Chunk("a", answered_by=FALLBACK), Chunk("b", Usage(100, 100), answered_by=FALLBACK)
    )
    await drain(budget, source, mode, key_of=lambda chunk: chunk.answered_by)
    assert counted(budget, FALLBACK) == (1, 100, 100)
    assert budget.usage(FALLBACK).cost_usd == pytest.approx(2000e-6)
    assert counted(budget, KEY) == (0, 0, 0)


async def test_the_estimate_is_counted_under_the_key_that_answered(mode: str) -> None:
    budget = Budget(per_key=True)
    source = Source(Chunk("a", answered_by=FALLBACK))
    await drain(budget, source, mode, estimate=Estimate(6), key_of=lambda c: c.answered_by)
    assert counted(budget, FALLBACK) == (1, 6, 0)
    assert counted(budget, KEY) == (0, 0, 0)


async def test_a_chunk_naming_no_key_is_counted_under_the_streams_key(mode: str) -> None:
    budget = Budget(per_key=True)
    await drain(budget, Source(Chunk("a", Usage(1, 1))), mode, key_of=lambda chunk: None)
    assert counted(budget, KEY) == (1, 1, 1)


async def test_the_default_usage_reader_is_usage_from_report(mode: str) -> None:
    budget = Budget()
    items = [{"text": "a"}, {"text": "b", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}]

    def sync_chunks() -> Iterator[dict[str, Any]]:
        yield from items

    async def async_chunks() -> AsyncIterator[dict[str, Any]]:
        for item in items:
            yield item

    if mode == "sync":
        received = list(budget.metered(sync_chunks(), key=KEY))
    else:
        received = [chunk async for chunk in budget.ametered(async_chunks(), key=KEY)]
    assert received == items
    assert counted(budget) == (1, 5, 2)


# -- metering never breaks a stream -----------------------------------------------------------
async def test_a_failing_usage_reader_is_logged_once_and_the_stream_goes_on(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget = Budget()

    def broken(chunk: Chunk) -> Usage | None:
        raise ValueError("unreadable")

    source = Source(Chunk("a"), Chunk("b"), Chunk("c"))
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        received = await drain(budget, source, mode, usage_of=broken, estimate=Estimate(5))
    assert len(received) == 3
    assert counted(budget) == (1, 5, 0)  # read as no report: the estimate
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "read the usage" in warnings[0].getMessage()
    exc_info = warnings[0].exc_info
    assert isinstance(exc_info, tuple)  # the traceback is logged
    assert exc_info[0] is ValueError


async def test_a_failing_estimate_is_logged_and_the_call_still_counts(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget = Budget()

    def broken() -> int:
        raise ValueError("no tokenizer")

    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        received = await drain(budget, Source(Chunk("a")), mode, estimate=broken)
    assert len(received) == 1
    assert counted(budget) == (1, 0, 0)
    assert any("estimate" in r.getMessage() for r in caplog.records)


class FailingStore(MemoryBudgetStore):
    """A store whose record fails (a server that is down), every time."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def record(self, scope: str, **amounts: Any) -> None:
        self.attempts += 1
        raise ConnectionError("store down")


async def test_a_failing_store_is_logged_once_and_the_stream_goes_on(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingStore()
    budget = Budget(store=store)
    source = Source(Chunk("a", Usage(1, 0)), Chunk("b", Usage(0, 1)), Chunk("c"))
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        received = await drain(budget, source, mode, estimate=Estimate(5))
    assert all(got is sent for got, sent in zip(received, source.chunks(), strict=True))
    assert source.finished
    assert store.attempts == 2  # each report tried once; no retry, no estimate after them
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "record" in warnings[0].getMessage()


async def test_the_models_own_error_is_not_swallowed_by_the_meter(mode: str) -> None:
    budget = Budget(store=FailingStore())
    with pytest.raises(Boom, match="the model's"):
        await drain(budget, Source(Chunk("a"), Boom("the model's")), mode)


# -- arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"key": None}, "key"),
        ({"usage_of": "usage"}, "usage_of"),
        ({"estimate": 12}, "estimate"),
        ({"cumulative": "yes"}, "cumulative"),
        ({"key_of": "key"}, "key_of"),
    ],
)
def test_bad_arguments_are_refused_when_the_stream_is_wrapped(
    mode: str, options: dict[str, Any], name: str
) -> None:
    budget = Budget()
    source = Source(Chunk("a"))
    with pytest.raises(TypeError, match=name):
        wrap(budget, source, mode, **options)
    assert not source.started


# -- arecord ------------------------------------------------------------------------------
class AsyncNativeStore(MemoryBudgetStore):
    """A store whose records must be awaited: its sync ``record`` is off limits."""

    is_async_native = True

    def __init__(self) -> None:
        super().__init__()
        self.awaited: list[dict[str, Any]] = []

    def record(self, scope: str, **amounts: Any) -> None:
        raise AssertionError("the sync record was called from async code")

    async def arecord(self, scope: str, **amounts: Any) -> None:
        self.awaited.append({"scope": scope, **amounts})
        MemoryBudgetStore.record(self, scope, **amounts)


async def test_arecord_awaits_an_async_native_stores_arecord() -> None:
    store = AsyncNativeStore()
    budget = Budget(store=store, prices={"m1": (1.0, 2.0)})
    await budget.arecord(KEY, Usage(10, 5), calls=1)
    assert store.awaited == [
        {
            "scope": "*",
            "calls": 1,
            "input_tokens": 10,
            "output_tokens": 5,
            "cost_units": 20 * 1_000_000,  # 10 x $1/M + 5 x $2/M, in pico-dollars
            "window": None,
            "estimated": False,
        }
    ]
    assert counted(budget) == (1, 10, 5)
    await budget.arecord(KEY, Usage(7, estimated=True))
    assert store.awaited[-1]["estimated"] is True
    assert budget.usage().estimated_calls == 1


async def test_arecord_on_a_sync_store_is_record() -> None:
    budget = Budget()
    await budget.arecord(KEY, Usage(3, 4), calls=1)
    await budget.arecord(KEY, Usage(1, 0))
    assert counted(budget) == (1, 4, 4)


@pytest.mark.parametrize("store", [None, "async"])
async def test_arecord_refuses_a_negative_call_count(store: str | None) -> None:
    budget = Budget(store=AsyncNativeStore() if store else None)
    with pytest.raises(ValueError, match="calls"):
        await budget.arecord(KEY, Usage(), calls=-1)


async def test_an_async_stream_records_through_arecord() -> None:
    store = AsyncNativeStore()
    budget = Budget(store=store)
    source = Source(Chunk("a", Usage(2, 0)), Chunk("b", Usage(0, 3)))
    await drain(budget, source, "async")
    assert [entry["calls"] for entry in store.awaited] == [1, 0]
    assert counted(budget) == (1, 2, 3)


# -- one meter a stream ---------------------------------------------------------------------
def test_two_streams_are_two_calls() -> None:
    budget = Budget()

    def stream(chunks: Iterable[Chunk]) -> list[Chunk]:
        return list(budget.metered(iter(chunks), key=KEY, usage_of=usage_of))

    stream([Chunk("a", Usage(1, 1))])
    stream([Chunk("b", Usage(2, 2)), Chunk("c")])
    assert counted(budget) == (2, 3, 3)


async def test_the_estimate_is_asked_only_once_the_chunks_are_done(mode: str) -> None:
    budget = Budget()
    estimate = Estimate(4)
    stream = wrap(budget, Source(Chunk("a"), Chunk("b")), mode, estimate=estimate)
    if mode == "sync":
        received = [next(stream), next(stream)]
        assert estimate.asked == 0  # not while chunks may still report usage
        assert list(stream) == []
    else:
        received = [await anext(stream), await anext(stream)]
        assert estimate.asked == 0
        assert [chunk async for chunk in stream] == []
    assert len(received) == 2
    assert estimate.asked == 1
    assert counted(budget) == (1, 4, 0)
