"""A stream's usage, counted against a :class:`~callpolicy.Budget` as its chunks pass.

:meth:`Budget.metered <callpolicy.Budget.metered>` and :meth:`Budget.ametered
<callpolicy.Budget.ametered>` are the public doors; this module is the one implementation
both adapters use (each supplies only how to read the usage of one of its chunks).

A stream is never refused and never altered: every chunk is yielded as the very object
the model produced. What is counted, with :meth:`Budget.record <callpolicy.Budget.record>`:

- the stream as **one call**, once, with its first chunk (a call in flight counts, as a
  reserved call does), or at its end if it produced no chunk;
- the usage its chunks report, as they pass: each report added (``cumulative=False``,
  LangChain's ``usage_metadata``), or, for running totals (``cumulative=True``: OpenAI
  reports once at the end, Anthropic and Gemini repeat growing totals), only the growth
  over the highest totals seen. A report of zero tokens says nothing;
- at its end, if no chunk reported any tokens, its estimated input (``estimate()``),
  and the stream among the budget's ``estimated_calls``, unless it failed: a failed
  call's tokens are freed, as :meth:`Budget.release <callpolicy.Budget.release>` does.

The model's stream is closed when the metered one ends, also when its consumer stops
early. Metering never breaks a stream: the chunks are the caller's and already paid for,
so a failure to read a report, estimate or record is logged (a warning, once a stream)
and the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Iterable
from typing import Any, Generic, Protocol, TypeVar

from ._usage import Usage

__all__ = ["StreamMeter", "UsageRecorder", "ameter_stream", "meter_stream"]

logger = logging.getLogger("callpolicy")

T = TypeVar("T")

_Entry = tuple[str, Usage, int]
"""One record to make: (key, usage, calls)."""

_NO_TOKENS = Usage()


class UsageRecorder(Protocol):
    """What a meter records into (a :class:`~callpolicy.Budget`): this module needs only
    these two, so it does not import the budget that imports it."""

    def record(self, key: str, usage: Usage, *, calls: int = 0) -> None: ...

    async def arecord(self, key: str, usage: Usage, *, calls: int = 0) -> None: ...


class StreamMeter(Generic[T]):
    """The counting of one stream, apart from its iteration (see the module's rules).

    :meth:`see` and :meth:`end` only decide what to record, and advance the meter's
    state as they do; :meth:`record` (or :meth:`arecord`) records it. Kept apart so the
    sync and the async stream share one decision. A record that fails is not made again:
    it may have reached the store, and the call must never count twice.

    Its options are checked when it is built, that is when the stream is wrapped, not at
    its first chunk: a mistake shows where it was made, and never in the middle of a
    stream the caller is reading.
    """

    __slots__ = (
        "answered",
        "budget",
        "counted",
        "cumulative",
        "estimate",
        "key",
        "key_of",
        "reported",
        "seen_input",
        "seen_output",
        "usage_of",
        "warned",
    )

    def __init__(
        self,
        budget: UsageRecorder,
        key: object,
        usage_of: Callable[[T], Usage | None],
        estimate: Callable[[], int] | None,
        cumulative: bool,
        key_of: Callable[[T], str | None] | None,
    ) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key: expected a breaker key (str), got {key!r}")
        if not callable(usage_of):
            raise TypeError("usage_of: expected a callable taking a chunk")
        if estimate is not None and not callable(estimate):
            raise TypeError("estimate: expected None or a callable returning input tokens")
        if not isinstance(cumulative, bool):
            raise TypeError(f"cumulative: expected a bool, got {cumulative!r}")
        if key_of is not None and not callable(key_of):
            raise TypeError("key_of: expected None or a callable taking a chunk")
        self.budget = budget
        self.key = key
        self.usage_of = usage_of
        self.estimate = estimate
        self.cumulative = cumulative
        self.key_of = key_of
        self.answered = key
        """The key of the model that answered the last chunk (a fallback's, say)."""
        self.counted = False
        """The stream's one call was handed to :meth:`record` (it is never handed twice)."""
        self.reported = False
        """Some chunk reported tokens: no estimate at the end."""
        self.seen_input = 0
        self.seen_output = 0
        self.warned = False

    def see(self, chunk: T) -> _Entry | None:
        """What ``chunk`` adds: the call (the first chunk) and the tokens it reports."""
        try:
            usage = self.usage_of(chunk)
        except Exception:
            self._trouble("read the usage of a chunk")
            usage = None
        if self.key_of is not None:
            try:
                answered = self.key_of(chunk)
            except Exception:
                self._trouble("read which model answered a chunk")
                answered = None
            if answered:
                self.answered = answered
        if usage is not None and self.cumulative:
            # A running total: only its growth over the highest totals seen is new
            # (field by field: a total that shrinks or repeats adds nothing).
            grown_input = max(usage.input_tokens - self.seen_input, 0)
            grown_output = max(usage.output_tokens - self.seen_output, 0)
            self.seen_input += grown_input
            self.seen_output += grown_output
            usage = Usage(grown_input, grown_output, usage.estimated)
        has_tokens = usage is not None and usage.total_tokens > 0
        if self.counted and not has_tokens:
            return None
        calls = 0 if self.counted else 1
        self.counted = True
        if usage is None or not has_tokens:  # zeros say nothing: the estimate stays due
            return (self.answered, _NO_TOKENS, calls)
        self.reported = True
        return (self.answered, usage, calls)

    def end(self, failed: bool) -> _Entry | None:
        """What the stream's end adds: the call if no chunk came, and the estimated input
        if no chunk reported tokens and the stream did not fail."""
        usage = _NO_TOKENS
        if not failed and not self.reported and self.estimate is not None:
            # Called only now, and only when needed: an estimate may tokenize the prompt.
            try:
                usage = Usage(input_tokens=self.estimate(), estimated=True)
            except Exception:
                self._trouble("estimate the input")
        calls = 0 if self.counted else 1
        self.counted = True
        if not calls and not usage.total_tokens and not usage.estimated:
            return None  # an estimate of zero tokens still counts as an estimated call
        return (self.answered, usage, calls)

    def record(self, entry: _Entry | None) -> None:
        """Record ``entry`` in the budget; a failure is logged, never raised."""
        if entry is None:
            return
        key, usage, calls = entry
        try:
            self.budget.record(key, usage, calls=calls)
        except Exception:
            self._trouble("record the usage")

    async def arecord(self, entry: _Entry | None) -> None:
        """Async :meth:`record` (awaits the store when it is async-native)."""
        if entry is None:
            return
        key, usage, calls = entry
        try:
            await self.budget.arecord(key, usage, calls=calls)
        except Exception:
            self._trouble("record the usage")

    def _trouble(self, what: str) -> None:
        # Called from an ``except`` block: the traceback is logged. Once a stream as a
        # warning; a store that is down would otherwise log every chunk.
        if self.warned:
            logger.debug("callpolicy budget: could not %s of a stream of %s", what, self.key)
            return
        self.warned = True
        logger.warning(
            "callpolicy budget: could not %s of a stream of %s; the stream goes on, "
            "its count may be short",
            what,
            self.key,
            exc_info=True,
        )


def meter_stream(meter: StreamMeter[T], chunks: Iterable[T]) -> Generator[T, None, None]:
    """``chunks``, each the very same object, counted by ``meter`` as they pass (see
    :meth:`Budget.metered <callpolicy.Budget.metered>`)."""
    iterator = iter(chunks)
    with _Ending(meter, chunks, iterator):
        for chunk in iterator:
            meter.record(meter.see(chunk))
            yield chunk


async def ameter_stream(meter: StreamMeter[T], chunks: AsyncIterable[T]) -> AsyncGenerator[T, None]:
    """Async :func:`meter_stream`."""
    iterator = aiter(chunks)
    async with _Ending(meter, chunks, iterator):
        async for chunk in iterator:
            await meter.arecord(meter.see(chunk))
            yield chunk


class _Ending:
    """The end of a metered stream, however it ends: the model's stream is closed (also
    when the consumer stops early: GeneratorExit lands on the yield), as it would be
    unwrapped, and the end is counted, even if closing raises. A stream ended by an
    ``Exception`` failed (its estimate is not counted); one closed early did not."""

    __slots__ = ("meter", "streams")

    def __init__(self, meter: StreamMeter[Any], chunks: object, iterator: object) -> None:
        self.meter = meter
        # An SDK stream object owns what its iterator reads: both are closed.
        self.streams = (iterator,) if chunks is iterator else (iterator, chunks)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            for close in _closers(self.streams, "close"):
                close()
        finally:
            self.meter.record(self.meter.end(isinstance(error, Exception)))

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: object, error: object, trace: object) -> None:
        try:
            for aclose in _closers(self.streams, "aclose"):
                await aclose()
        finally:
            await self.meter.arecord(self.meter.end(isinstance(error, Exception)))


def _closers(streams: tuple[object, ...], name: str) -> list[Callable[[], Any]]:
    """The ``close`` (or ``aclose``) of each stream that has one (a list's iterator has
    none)."""
    found = (getattr(stream, name, None) for stream in streams)
    return [close for close in found if callable(close)]
