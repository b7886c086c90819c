"""A stream guarded as a call: :meth:`CallPolicy.stream <callpolicy.CallPolicy.stream>` and
:meth:`CallPolicy.astream <callpolicy.CallPolicy.astream>`.

A stream is one call that answers piece by piece. Its rules (docs/how-it-works.md):

- **Admission.** An open circuit never opens the primary's stream: the fallback's stream
  serves, or :class:`~callpolicy.CircuitOpenError` without one. The permit (a half-open
  probe slot, say) is held for the stream's whole life.
- **Before the first chunk** nothing has reached the consumer, so a failure there is an
  ``execute`` failure: classified, counted, retried per the policy's ``RetryPolicy``,
  then served by the fallback's stream (guarded once under ``fallback_key``).
- **After the first chunk** a failure is recorded against the key that was streaming and
  reaches the consumer as the original exception, with a note naming the key and how
  many chunks had been delivered. Never replayed, never followed by another model's.
- **Cut short.** With ``finished`` given (the integration reports an end marker), a stream
  that ends without one raises :class:`~callpolicy.IncompleteStreamError` after its last
  chunk and counts as a failure (before any chunk: like any failure before the first).
- **Outcome.** Consumed to its end: a success. Stopped early by its consumer (``close()``,
  ``aclose()``, a ``break`` whose generator is collected, a cancelled task): neither
  success nor failure (``IGNORED``), which frees a half-open slot.
- **Chunks untouched.** Each chunk is yielded as the very object the model produced, as
  it comes (nothing buffered).

The way to the first chunk after anything went wrong (a refusal, a failure, the retries,
the hand-over to the fallback's stream or a list of them) is one description of steps,
run by either driver (``_drive``), with the breaker's, the retry's and the fallback's
decisions from their own strategies, as in ``execute``. The drivers only open the healthy
stream and iterate: the chunk loop is the stream's hot path, written for each.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any, Final, TypeVar

from ._drive import Body, Held, Op, arun, perform, record_op, release_op, run, within
from ._errors import IncompleteStreamError, add_note
from ._events import logger
from ._fallback import Fallbacks
from ._pipeline import Core
from ._store import Permit
from ._tally import _Tally
from ._types import Outcome

__all__ = ["aguard_stream", "guard_stream"]

C = TypeVar("C")

_END: Final[Any] = object()
"""``next(chunks, _END)``: the stream ended (no StopIteration raised and caught)."""

_SUCCESS = Outcome.SUCCESS
_IGNORED = Outcome.IGNORED

Finished = Callable[[Any], bool]

Markers = Finished | Sequence[Finished | None] | None
"""``fallback_finished``: one check (every fallback's), or one per step of a list."""

Opener = Callable[[], Any]
"""What opens an async stream: returns an async iterable, or an awaitable of one
(``CallPolicy.astream`` declares the types)."""

Opened = tuple["_Leg", Any, Any, Any]
"""A stream that reached its first chunk: its leg, the stream, its iterator, the chunk."""


class _Leg:
    """The stream being served (the primary's or the fallback's) and its circuit."""

    __slots__ = ("finished", "key", "permit", "tally")

    def __init__(
        self, key: str, tally: _Tally | None, permit: Permit | None, finished: Finished | None
    ) -> None:
        self.key = key
        self.tally = tally
        """None for a fallback without a circuit of its own (no ``fallback_key``)."""
        self.permit = permit
        self.finished = finished


# -- decisions, shared by both drivers -------------------------------------------------
def _leg_judge(core: Core, leg: _Leg, exc: Exception) -> Outcome | None:
    """Classify and count a failure of ``leg``'s stream; None when it has no circuit."""
    tally = leg.tally
    if tally is None:
        return None
    return core.breaker.failed(tally, exc)[1]


def _broke(core: Core, leg: _Leg, exc: Exception, chunks: int) -> Outcome | None:
    """A failure after the first chunk: noted on the exception, judged (None: no circuit)."""
    add_note(exc, f"callpolicy: stream of {leg.key} failed after {chunks} chunks")
    return _leg_judge(core, leg, exc)


def _stopped(core: Core, leg: _Leg) -> bool:
    """The consumer stopped early (or was interrupted): True when there is a slot to free."""
    if leg.tally is None:
        return False
    core.breaker.cancelled(leg.tally)
    return True


def _ended(
    core: Core, leg: _Leg, marked: bool, chunks: int
) -> tuple[Outcome | None, IncompleteStreamError | None]:
    """The stream ran to its end: the outcome to record (None: no circuit), and the error
    to raise when it never showed its end marker (cut short: a failure)."""
    if not marked:
        error = IncompleteStreamError(leg.key, chunks)
        return _leg_judge(core, leg, error), error
    tally = leg.tally
    if tally is None:
        return None, None
    tally.successes += 1
    return _SUCCESS, None


def _step_marker(markers: Markers, index: int) -> Finished | None:
    """The end-marker check of a list's step ``index``: its own, or the one for all."""
    if markers is None or callable(markers):
        return markers
    return markers[index]


# -- the way to the first chunk: one description, for both drivers -----------------------
def _opening(
    core: Core,
    key: str,
    start: Callable[[], Any],
    fallback: Callable[[], Any] | Fallbacks[Any] | None,
    fallback_key: str | None,
    finished: Finished | None,
    markers: Markers,
) -> Body[Opened]:
    """The primary's stream up to its first chunk, through the policy's pipeline
    (admission, retries, then the fallback's stream or a list's first to open)."""
    tally = core.tallies.by_key.get(key) or core.tallies.create(key)
    attempt = Op(_open, _aopen, start, key, finished)
    step = functools.partial(_open_step, core, key, markers)
    opened = yield from core.held(tally, attempt, fallback, fallback_key, step)
    if type(opened) is not Held:
        fallen: Opened = opened
        return fallen
    return (_Leg(key, tally, opened.permit, finished), *opened.result)


def _open_step(
    core: Core,
    primary: str,
    markers: Markers,
    index: int,
    key: str | None,
    call: Any,
    context: BaseException | None,
) -> Body[Opened]:
    """A fallback's stream (step ``index`` of a list, or the one fallback), opened once
    under ``key``'s circuit (None: unguarded, named by the primary's key in notes), up to
    its first chunk; a failure before it is counted against that key and raised."""
    finished = _step_marker(markers, index)
    attempt = within(Op(_open, _aopen, call, key or primary, finished), context)
    if key is None:
        stream, chunks, first = yield attempt
        return _Leg(primary, None, None, finished), stream, chunks, first
    tally = core.tallies.get(key)
    held = yield from core.breaker.guarded(tally, attempt, hold=True)
    return (_Leg(key, tally, held.permit, finished), *held.result)


def _open(start: Callable[[], Iterable[C]], key: str, finished: Finished | None) -> tuple[Any, ...]:
    """Open a stream and read its first chunk; closed again when that fails."""
    stream: Iterable[C] | None = None
    try:
        stream = start()
        chunks = iter(stream)
        first = next(chunks, _END)
        if first is _END and finished is not None:
            raise IncompleteStreamError(key, 0)
    except Exception:
        _close(stream, quietly=True)
        raise
    return stream, chunks, first


async def _aopen(start: Opener, key: str, finished: Finished | None) -> tuple[Any, ...]:
    """Async :func:`_open`."""
    stream: Any = None
    try:
        opened = start()
        # LlamaIndex's astream_* are coroutines returning the generator.
        stream = opened if hasattr(opened, "__aiter__") else await opened
        chunks = aiter(stream)
        first = await anext(chunks, _END)
        if first is _END and finished is not None:
            raise IncompleteStreamError(key, 0)
    except Exception:
        await _aclose(stream, quietly=True)
        raise
    return stream, chunks, first


def _close(*streams: object, quietly: bool = False) -> None:
    """Close each stream that can be closed (the iterator, then the stream it came from).
    ``quietly`` after a failure: a second error while closing would hide the first."""
    for stream in streams:
        try:
            close = getattr(stream, "close", None)
            if callable(close):
                close()
        except Exception:
            if not quietly:
                raise
            logger.debug("callpolicy: closing a failed stream failed", exc_info=True)


async def _aclose(*streams: object, quietly: bool = False) -> None:
    """Async :func:`_close` (``aclose``)."""
    for stream in streams:
        try:
            aclose = getattr(stream, "aclose", None)
            if callable(aclose):
                await aclose()
        except Exception:
            if not quietly:
                raise
            logger.debug("callpolicy: closing a failed stream failed", exc_info=True)


def _record(leg: _Leg, outcome: Outcome) -> None:
    assert leg.tally is not None
    assert leg.permit is not None
    leg.tally.circuit.record(leg.permit, outcome)


async def _arecord(leg: _Leg, outcome: Outcome) -> None:
    assert leg.tally is not None
    assert leg.permit is not None
    await perform(record_op(leg.tally.circuit, leg.permit, outcome))


async def _arecord_shielded(leg: _Leg) -> None:
    """Free the slot of a stopped stream, even inside a cancelled task."""
    assert leg.tally is not None
    assert leg.permit is not None
    await perform(release_op(leg.tally.circuit, leg.permit))


# -- sync ----------------------------------------------------------------------------------
def guard_stream(
    core: Core,
    key: str,
    start: Callable[[], Iterable[C]],
    fallback: Callable[[], Iterable[C]] | Fallbacks[Iterable[C]] | None,
    fallback_key: str | None,
    finished: Finished | None,
    fallback_finished: Markers,
) -> Iterator[C]:
    """The guarded stream (see the module's rules); nothing happens until it is iterated."""
    opening = _opening(core, key, start, fallback, fallback_key, finished, fallback_finished)
    leg, stream, chunks, first = run(opening)
    # The chunks, inline: no second generator to pass each one through.
    finished = leg.finished
    marked = finished is None
    count = 0
    yielding = False
    try:
        for chunk in () if first is _END else chain((first,), chunks):
            count += 1
            yielding = True
            yield chunk
            yielding = False
            marked = marked or finished(chunk)  # type: ignore[misc]
    except Exception as exc:
        if yielding:  # thrown in by the consumer at the yield: not the provider's failure
            if _stopped(core, leg):
                _record(leg, _IGNORED)
            _close(chunks, stream, quietly=True)
            raise
        broke = _broke(core, leg, exc, count)
        _close(chunks, stream, quietly=True)
        if broke is not None:
            _record(leg, broke)
        raise
    except BaseException:  # the consumer stopped (GeneratorExit at the yield), or interrupted
        if _stopped(core, leg):
            _record(leg, _IGNORED)
        _close(chunks, *(() if stream is chunks else (stream,)))
        raise
    ended, error = _ended(core, leg, marked, count)
    if ended is not None:
        _record(leg, ended)
    if error is not None:
        raise error


# -- async ---------------------------------------------------------------------------------
async def aguard_stream(
    core: Core,
    key: str,
    start: Opener,
    fallback: Opener | Fallbacks[Any] | None,
    fallback_key: str | None,
    finished: Finished | None,
    fallback_finished: Markers,
) -> AsyncIterator[C]:
    """Async :func:`guard_stream`."""
    opening = _opening(core, key, start, fallback, fallback_key, finished, fallback_finished)
    leg, stream, chunks, first = await arun(opening)
    # The chunks, inline (no second async generator to pass each one through).
    finished = leg.finished
    marked = finished is None
    count = 0
    yielding = False
    try:
        if first is not _END:
            count = 1
            yielding = True
            yield first
            yielding = False
            marked = marked or finished(first)  # type: ignore[misc]
            async for chunk in chunks:
                count += 1
                yielding = True
                yield chunk
                yielding = False
                if not marked:
                    marked = finished(chunk)  # type: ignore[misc]
    except Exception as exc:
        if yielding:
            if _stopped(core, leg):
                await _arecord(leg, _IGNORED)
            await _aclose(chunks, stream, quietly=True)
            raise
        broke = _broke(core, leg, exc, count)
        await _aclose(chunks, stream, quietly=True)
        if broke is not None:
            await _arecord(leg, broke)
        raise
    except BaseException:  # aclose() (GeneratorExit at the yield), or a cancelled task
        if _stopped(core, leg):
            await _arecord_shielded(leg)
        await _aclose(chunks, *(() if stream is chunks else (stream,)))
        raise
    ended, error = _ended(core, leg, marked, count)
    if ended is not None:
        await _arecord(leg, ended)
    if error is not None:
        raise error
