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
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Sequence,
)
from itertools import chain
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from ._drive import Body, Op, admit_op, arun, record_op, release_op, run
from ._errors import CircuitOpenError, IncompleteStreamError, add_note
from ._fallback import Fallbacks
from ._types import CircuitState, Outcome

if TYPE_CHECKING:
    from ._pipeline import Core
    from ._store import Permit
    from ._tally import _Tally

__all__ = ["aguard_stream", "guard_stream"]

logger = logging.getLogger("callpolicy")

C = TypeVar("C")

_END: Final[Any] = object()
"""``next(chunks, _END)``: the stream ended (no StopIteration raised and caught)."""

_SUCCESS = Outcome.SUCCESS
_IGNORED = Outcome.IGNORED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN

Finished = Callable[[Any], bool]

Markers = Finished | Sequence[Finished | None] | None
"""``fallback_finished``: one check (every fallback's), or one per step of a list."""

Opener = Callable[[], "AsyncIterable[C] | Awaitable[AsyncIterable[C]]"]
"""What opens an async stream: an async iterable, or an awaitable of one."""

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


# -- the way to the first chunk, once something went wrong: one description --------------
def _opening(
    core: Core,
    tally: _Tally,
    permit: Permit | None,
    failure: Exception,
    start: Callable[[], Any],
    fallback: Callable[[], Any] | Fallbacks[Any] | None,
    fallback_key: str | None,
    finished: Finished | None,
    markers: Markers,
    started: float,
) -> Body[Opened]:
    """After a refusal (``permit`` None: a fallback is given) or the first attempt's
    failure: the retries (per the policy's retry strategy), then the fallback's stream
    (or a list's first to open), each up to its first chunk."""
    circuit = tally.circuit
    key = circuit.key
    breaker = core.breaker
    falling_back = core.falling_back
    retrying = core.retrying
    classification = None
    if permit is None:
        assert isinstance(failure, CircuitOpenError)
        state = _HALF_OPEN if failure.retry_in == 0.0 else _OPEN
    attempt = 1
    while permit is not None:
        classification, outcome = breaker.failed(tally, failure)
        state = yield record_op(circuit, permit, outcome)
        if (
            retrying is None
            or (delay := retrying.delay(circuit, failure, classification, state, attempt, started))
            is None
        ):
            if fallback is None or not falling_back.wants(classification, outcome):
                raise failure
            break
        yield Op(retrying.sleep, retrying.async_sleep, delay)
        attempt += 1
        try:
            permit = yield admit_op(circuit)
        except CircuitOpenError as refusal:
            retrying.readmitted(tally, refusal, failure, attempt - 1, started)
            permit = None
        if permit is None:  # the circuit opened during the wait: every mode falls back
            if fallback is None:
                raise failure
            state = _OPEN
            break
        try:
            opened = yield Op(_open, _aopen, start, key, finished)
        except Exception as exc:
            failure = exc
            continue
        except BaseException:
            breaker.cancelled(tally)
            yield release_op(circuit, permit)
            raise
        healed: Opened = (_Leg(key, tally, permit, finished), *opened)
        return healed
    assert fallback is not None
    step = functools.partial(_open_step, core, key, markers)
    served: Opened = yield from falling_back.serve(
        tally, fallback, fallback_key, failure, classification, state, step
    )
    return served


def _open_step(
    core: Core, primary: str, markers: Markers, index: int, key: str | None, call: Any
) -> Body[Opened]:
    """A fallback's stream (step ``index`` of a list, or the one fallback), opened once
    under ``key``'s circuit (None: unguarded, named by the primary's key in notes), up to
    its first chunk; a failure before it is counted against that key and raised."""
    tally = None if key is None else core.tallies.get(key)
    leg = _Leg(key or primary, tally, None, _step_marker(markers, index))
    breaker = core.breaker
    if tally is not None:
        try:
            leg.permit = yield admit_op(tally.circuit)
        except CircuitOpenError as refusal:
            breaker.refused(tally, refusal)
            raise
    try:
        opened = yield Op(_open, _aopen, call, leg.key, leg.finished)
    except Exception as exc:
        if tally is not None:
            yield record_op(tally.circuit, leg.permit, breaker.failed(tally, exc)[1])  # type: ignore[arg-type]
        raise
    except BaseException:
        if tally is not None:
            breaker.cancelled(tally)
            yield release_op(tally.circuit, leg.permit)  # type: ignore[arg-type]
        raise
    found: Opened = (leg, *opened)
    return found


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
        _close_quietly(stream)
        raise
    return stream, chunks, first


async def _aopen(start: Opener[C], key: str, finished: Finished | None) -> tuple[Any, ...]:
    """Async :func:`_open`."""
    stream: AsyncIterable[C] | None = None
    try:
        opened = start()
        # LlamaIndex's astream_* are coroutines returning the generator.
        stream = cast("AsyncIterable[C]", opened if hasattr(opened, "__aiter__") else await opened)
        chunks = aiter(stream)
        first = await anext(chunks, _END)
        if first is _END and finished is not None:
            raise IncompleteStreamError(key, 0)
    except Exception:
        await _aclose_quietly(stream)
        raise
    return stream, chunks, first


def _close(stream: object) -> None:
    close = getattr(stream, "close", None)
    if callable(close):
        close()


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if callable(aclose):
        await aclose()


def _close_quietly(*streams: object) -> None:
    """Close a failed stream's resources; a second error there would hide the first."""
    for stream in streams:
        try:
            _close(stream)
        except Exception:
            logger.debug("callpolicy: closing a failed stream failed", exc_info=True)


async def _aclose_quietly(*streams: object) -> None:
    for stream in streams:
        try:
            await _aclose(stream)
        except Exception:
            logger.debug("callpolicy: closing a failed stream failed", exc_info=True)


def _record(leg: _Leg, outcome: Outcome) -> None:
    assert leg.tally is not None
    assert leg.permit is not None
    leg.tally.circuit.record(leg.permit, outcome)


async def _arecord(leg: _Leg, outcome: Outcome) -> None:
    assert leg.tally is not None
    assert leg.permit is not None
    await run_async_op(record_op(leg.tally.circuit, leg.permit, outcome))


async def _arecord_shielded(leg: _Leg) -> None:
    """Free the slot of a stopped stream, even inside a cancelled task."""
    assert leg.tally is not None
    assert leg.permit is not None
    await run_async_op(release_op(leg.tally.circuit, leg.permit))


async def run_async_op(op: Op) -> Any:
    if op.asynchronous is None:
        return op.sync(*op.args, **op.kwargs)
    return await op.asynchronous(*op.args, **op.kwargs)


# -- sync ----------------------------------------------------------------------------------
def guard_stream(
    core: Core,
    key: str,
    start: Callable[[], Iterable[C]],
    fallback: Callable[[], Iterable[C]] | Fallbacks[Iterable[C]] | None,
    fallback_key: str | None,
    finished: Finished | None,
    fallback_finished: Markers,
) -> Generator[C, None, None]:
    """The guarded stream (see the module's rules); nothing happens until it is iterated."""
    tally = core.tallies.by_key.get(key) or core.tallies.create(key)
    circuit = tally.circuit
    retrying = core.retrying
    started = retrying.clock() if retrying is not None else 0.0
    failure: Exception | None = None
    permit: Permit | None = None
    try:
        permit = circuit.admit()
    except CircuitOpenError as refusal:
        core.breaker.refused(tally, refusal)
        if fallback is None:
            raise
        failure = refusal.with_traceback(None)  # kept past its except block: no cycle
    if permit is not None:  # the healthy way: straight to the first chunk
        try:
            stream, chunks, first = _open(start, key, finished)
        except Exception as exc:
            failure = exc
        except BaseException:
            circuit.record(permit, _IGNORED)
            core.breaker.cancelled(tally)
            raise
    if failure is None:
        leg = _Leg(key, tally, permit, finished)
    else:
        opening = _opening(
            core, tally, permit, failure, start, fallback, fallback_key, finished,
            fallback_finished, started,
        )  # fmt: skip
        failure = None
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
            if not marked:
                marked = finished(chunk)  # type: ignore[misc]
    except Exception as exc:
        if yielding:  # thrown in by the consumer at the yield: not the provider's failure
            if _stopped(core, leg):
                _record(leg, _IGNORED)
            _close_quietly(chunks, stream)
            raise
        broke = _broke(core, leg, exc, count)
        _close_quietly(chunks, stream)
        if broke is not None:
            _record(leg, broke)
        raise
    except BaseException:  # the consumer stopped (GeneratorExit at the yield), or interrupted
        if _stopped(core, leg):
            _record(leg, _IGNORED)
        _close(chunks)
        if stream is not chunks:
            _close(stream)
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
    start: Opener[C],
    fallback: Opener[C] | Fallbacks[AsyncIterable[C] | Awaitable[AsyncIterable[C]]] | None,
    fallback_key: str | None,
    finished: Finished | None,
    fallback_finished: Markers,
) -> AsyncGenerator[C, None]:
    """Async :func:`guard_stream`."""
    tally = core.tallies.by_key.get(key) or core.tallies.create(key)
    circuit = tally.circuit
    native = circuit.is_async_native
    retrying = core.retrying
    started = retrying.clock() if retrying is not None else 0.0
    failure: Exception | None = None
    permit: Permit | None = None
    try:
        permit = await circuit.aadmit() if native else circuit.admit()
    except CircuitOpenError as refusal:
        core.breaker.refused(tally, refusal)
        if fallback is None:
            raise
        failure = refusal.with_traceback(None)
    if permit is not None:
        try:
            stream, chunks, first = await _aopen(start, key, finished)
        except Exception as exc:
            failure = exc
        except BaseException:
            core.breaker.cancelled(tally)
            await run_async_op(release_op(circuit, permit))
            raise
    if failure is not None:
        opening = _opening(
            core, tally, permit, failure, start, fallback, fallback_key, finished,
            fallback_finished, started,
        )  # fmt: skip
        failure = None
        leg, stream, chunks, first = await arun(opening)
    else:
        leg = _Leg(key, tally, permit, finished)
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
            await _aclose_quietly(chunks, stream)
            raise
        broke = _broke(core, leg, exc, count)
        await _aclose_quietly(chunks, stream)
        if broke is not None:
            await _arecord(leg, broke)
        raise
    except BaseException:  # aclose() (GeneratorExit at the yield), or a cancelled task
        if _stopped(core, leg):
            await _arecord_shielded(leg)
        await _aclose(chunks)
        if stream is not chunks:
            await _aclose(stream)
        raise
    ended, error = _ended(core, leg, marked, count)
    if ended is not None:
        await _arecord(leg, ended)
    if error is not None:
        raise error
