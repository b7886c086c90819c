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

This module follows the stream meter's pattern (``_meter.py``): the decisions, shared by
the sync and the async stream, are plain functions over one :class:`_Leg`; the two
drivers only iterate, and talk to the circuit (sync, or awaiting an async-native store).
The breaker machinery itself (judging an error, retry delays, refusals, fallback events
and the ``fallback_start()`` hand-over) is the policy's own, shared with ``execute``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from ._classify import Classification
from ._errors import CircuitOpenError, IncompleteStreamError, add_note
from ._fallback import Fallbacks, FallbackStart, _exhausted, _moves_on
from ._fallback import _current as _current_fallback
from ._types import CircuitState, Outcome

if TYPE_CHECKING:
    from ._policy import CallPolicy, _Tally
    from ._store import Permit

__all__ = ["aguard_stream", "guard_stream"]

logger = logging.getLogger("callpolicy")

C = TypeVar("C")

_END: Final[Any] = object()
"""``next(chunks, _END)``: the stream ended (no StopIteration raised and caught)."""

_SUCCESS = Outcome.SUCCESS
_FAILURE = Outcome.FAILURE
_IGNORED = Outcome.IGNORED
_OPEN = CircuitState.OPEN

Finished = Callable[[Any], bool]

Markers = Finished | Sequence[Finished | None] | None
"""``fallback_finished``: one check (every fallback's), or one per step of a list."""

Opener = Callable[[], "AsyncIterable[C] | Awaitable[AsyncIterable[C]]"]
"""What opens an async stream: an async iterable, or an awaitable of one."""


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


class _Opening:
    """The way to the first chunk: admission, attempts, and the hand-over to the fallback.

    Holds the retry bookkeeping; every decision is the policy's (``_judge``,
    ``_next_delay``, ``_admit_retry``, ``_refused``, ``_emit_fallback``), as in ``execute``.
    """

    __slots__ = ("attempt", "cause", "classification", "policy", "started", "state", "tally")

    def __init__(self, policy: CallPolicy, tally: _Tally, started: float) -> None:
        self.policy = policy
        self.tally = tally
        self.attempt = 1
        self.started = started
        self.cause: BaseException | None = None
        """Why the fallback serves (a refusal, or the primary's last error)."""
        self.classification: Classification | None = None
        self.state: CircuitState = _OPEN

    def refused(self, refusal: CircuitOpenError) -> None:
        self.policy._refused(self.tally.circuit, refusal)
        self.cause = refusal.with_traceback(None)  # kept past its except block: no cycle
        self.state = CircuitState.HALF_OPEN if refusal.retry_in == 0.0 else _OPEN

    def judge(self, exc: Exception) -> Outcome:
        """Classify and count a failure before the first chunk; the outcome to record."""
        classification, outcome = self.policy._judge(exc)
        self.policy._count_error(self.tally, classification, outcome)
        self.classification = classification
        return outcome

    def delay(self, exc: Exception, state: CircuitState) -> float | None:
        """Seconds before another attempt, or None (no retry; the policy notes why)."""
        assert self.classification is not None
        policy = self.policy
        self.state = state
        return policy._next_delay(
            self.tally.circuit, exc, self.classification, state, self.attempt, self.started
        )

    def retry_refused(self, exc: Exception) -> None:
        """The circuit opened during the wait before a retry (the policy noted it)."""
        self.cause, self.state = exc, _OPEN

    def falls_back(self, exc: Exception, outcome: Outcome) -> bool:
        """After the last attempt failed: does the fallback serve (per ``fallback_on``)?"""
        assert self.classification is not None
        if not self.policy._wants_fallback(self.classification, outcome):
            return False
        self.cause = exc
        return True

    def hand_over(self) -> FallbackStart:
        """Count and announce the fallback; what ``fallback_start()`` says inside it."""
        assert self.cause is not None
        circuit = self.tally.circuit
        self.policy._emit_fallback(circuit, self.cause, self.classification)
        return FallbackStart(circuit.key, self.state, self.cause)

    def fallback_failed(self, exc: Exception) -> None:
        assert self.cause is not None
        if exc.__context__ is None and exc is not self.cause:
            exc.__context__ = self.cause
        self.policy._note_fallback_failure(exc, self.tally.circuit, self.cause)


def _fallback_tally(policy: CallPolicy, fallback_key: str | None) -> _Tally | None:
    if fallback_key is None:
        return None
    return policy._tallies.get(fallback_key) or policy._tally(fallback_key)


def _leg_judge(policy: CallPolicy, leg: _Leg, exc: Exception) -> Outcome | None:
    """Classify and count a failure of ``leg``'s stream; None when it has no circuit."""
    tally = leg.tally
    if tally is None:
        return None
    classification, outcome = policy._judge(exc)
    policy._count_error(tally, classification, outcome)
    return outcome


def _broke(policy: CallPolicy, leg: _Leg, exc: Exception, chunks: int) -> Outcome | None:
    """A failure after the first chunk: noted on the exception, judged (None: no circuit)."""
    add_note(exc, f"callpolicy: stream of {leg.key} failed after {chunks} chunks")
    return _leg_judge(policy, leg, exc)


def _stopped(policy: CallPolicy, leg: _Leg) -> bool:
    """The consumer stopped early (or was interrupted): True when there is a slot to free."""
    if leg.tally is None:
        return False
    policy._count_cancelled(leg.tally)
    return True


def _ended(
    policy: CallPolicy, leg: _Leg, marked: bool, chunks: int
) -> tuple[Outcome | None, IncompleteStreamError | None]:
    """The stream ran to its end: the outcome to record (None: no circuit), and the error
    to raise when it never showed its end marker (cut short: a failure)."""
    if not marked:
        error = IncompleteStreamError(leg.key, chunks)
        return _leg_judge(policy, leg, error), error
    tally = leg.tally
    if tally is None:
        return None, None
    tally.successes += 1
    return _SUCCESS, None


def _close(stream: object) -> None:
    close = getattr(stream, "close", None)
    if callable(close):
        close()


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if callable(aclose):
        await aclose()


# -- sync ----------------------------------------------------------------------------------
def guard_stream(
    policy: CallPolicy,
    key: str,
    start: Callable[[], Iterable[C]],
    fallback: Callable[[], Iterable[C]] | Fallbacks[Iterable[C]] | None,
    fallback_key: str | None,
    finished: Finished | None,
    fallback_finished: Markers,
) -> Generator[C, None, None]:
    """The guarded stream (see the module's rules); nothing happens until it is iterated."""
    # The retry bookkeeping (an _Opening) is built only when the way to the first chunk
    # is not straight (a refusal, a failure): the healthy stream's set-up is measured.
    tally = policy._tallies.get(key) or policy._tally(key)
    circuit = tally.circuit
    started = policy._clock() if policy.retry is not None else 0.0
    opening: _Opening | None = None
    permit: Permit | None = None
    leg: _Leg | None = None
    try:
        permit = circuit.admit()
    except CircuitOpenError as refusal:
        if fallback is None:
            policy._refused(circuit, refusal)
            raise
        opening = _Opening(policy, tally, started)
        opening.refused(refusal)
    while permit is not None:  # the primary's attempts
        stream: Iterable[C] | None = None
        try:
            stream = start()
            chunks = iter(stream)
            first = next(chunks, _END)
            if first is _END and finished is not None:
                raise IncompleteStreamError(key, 0)
        except Exception as exc:
            if opening is None:
                opening = _Opening(policy, tally, started)
            outcome = opening.judge(exc)
            state = circuit.record(permit, outcome)
            _close_quietly(stream)
            delay = opening.delay(exc, state)
            if delay is not None:
                policy._sleep(delay)
                opening.attempt += 1
                permit = policy._admit_retry(circuit, exc, opening.attempt, opening.started)
                if permit is not None:
                    continue
                if fallback is None:
                    raise
                opening.retry_refused(exc)
                break
            if fallback is None or not opening.falls_back(exc, outcome):
                raise
            break
        except BaseException:
            circuit.record(permit, _IGNORED)
            policy._count_cancelled(tally)
            raise
        leg = _Leg(circuit.key, tally, permit, finished)
        break
    if leg is None:  # refused, or the primary's attempts failed: the fallback serves
        assert fallback is not None
        assert opening is not None
        token = _current_fallback.set(opening.hand_over())
        try:
            if isinstance(fallback, Fallbacks):
                leg, stream, chunks, first = _open_chain(
                    policy, opening, fallback, fallback_finished
                )
            else:
                leg, stream, chunks, first = _open_fallback(
                    policy, opening, fallback, fallback_key, cast("Finished", fallback_finished)
                )
        finally:
            _current_fallback.reset(token)
    # The chunks, inline: no second generator to pass each one through.
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
            if not marked:
                assert finished is not None
                if finished(first):
                    marked = True
                else:
                    for chunk in chunks:
                        count += 1
                        yielding = True
                        yield chunk
                        yielding = False
                        if finished(chunk):
                            marked = True
                            break
            for chunk in chunks:  # the hot loop: after the end marker, or none to look for
                count += 1
                yielding = True
                yield chunk
                yielding = False
    except Exception as exc:
        if yielding:  # thrown in by the consumer at the yield: not the provider's failure
            if _stopped(policy, leg):
                _record(leg, _IGNORED)
            _close_quietly(chunks, stream)
            raise
        broke = _broke(policy, leg, exc, count)
        _close_quietly(chunks, stream)
        if broke is not None:
            _record(leg, broke)
        raise
    except BaseException:  # the consumer stopped (GeneratorExit at the yield), or interrupted
        if _stopped(policy, leg):
            _record(leg, _IGNORED)
        _close(chunks)
        if stream is not chunks:
            _close(stream)
        raise
    ended, error = _ended(policy, leg, marked, count)
    if ended is not None:
        _record(leg, ended)
    if error is not None:
        raise error


def _open_fallback(
    policy: CallPolicy,
    opening: _Opening,
    fallback: Callable[[], Iterable[C]],
    fallback_key: str | None,
    finished: Finished | None,
) -> tuple[_Leg, Iterable[C], Iterator[C], Any]:
    """The fallback's stream, opened once under its own circuit, up to its first chunk."""
    tally = _fallback_tally(policy, fallback_key)
    leg = _Leg(fallback_key or opening.tally.circuit.key, tally, None, finished)
    stream: Iterable[C] | None = None
    try:
        if tally is not None:
            try:
                leg.permit = tally.circuit.admit()
            except CircuitOpenError as refusal:
                policy._refused(tally.circuit, refusal)
                raise
        stream = fallback()
        chunks = iter(stream)
        first = next(chunks, _END)
        if first is _END and finished is not None:
            raise IncompleteStreamError(leg.key, 0)
    except Exception as exc:
        if leg.permit is not None and tally is not None:
            outcome = _leg_judge(policy, leg, exc)
            assert outcome is not None
            tally.circuit.record(leg.permit, outcome)
        _close_quietly(stream)
        opening.fallback_failed(exc)
        raise
    except BaseException:
        if leg.permit is not None and tally is not None:
            tally.circuit.record(leg.permit, _IGNORED)
            policy._count_cancelled(tally)
        raise
    return leg, stream, chunks, first


def _step_marker(markers: Markers, index: int) -> Finished | None:
    """The end-marker check of a list's step ``index``: its own, or the one for all."""
    if markers is None or callable(markers):
        return markers
    return markers[index]


def _step_leg(policy: CallPolicy, primary: str, key: str | None, finished: Finished | None) -> _Leg:
    """A step of a list of fallbacks, under ``key``'s circuit (None: unguarded, named by
    the primary's key in notes, as a single fallback without a key is)."""
    return _Leg(key or primary, _fallback_tally(policy, key), None, finished)


def _open_chain(
    policy: CallPolicy,
    opening: _Opening,
    chain: Fallbacks[Iterable[C]],
    markers: Markers,
) -> tuple[_Leg, Iterable[C], Iterator[C], Any]:
    """The first stream of ``chain`` to reach its first chunk, each step under its own
    circuit, in order (the rules of :func:`callpolicy.run_chain`: an open circuit is
    skipped without a call; a failure hands over per ``fallback_on``); raises
    :class:`AllModelsFailedError` naming every model tried when none does."""
    primary = opening.tally.circuit.key
    assert opening.cause is not None
    keys: list[str | None] = [primary]
    errors: list[BaseException] = [opening.cause]
    last = len(chain.steps) - 1
    for index, (key, call) in enumerate(chain.steps):
        leg = _step_leg(policy, primary, key, _step_marker(markers, index))
        try:
            return _open_step(policy, leg, call)
        except Exception as exc:
            keys.append(key)
            errors.append(exc.with_traceback(None) if isinstance(exc, CircuitOpenError) else exc)
            if index == last or not _moves_on(policy, key, exc):
                break
    raise _exhausted(keys, errors)


def _open_step(
    policy: CallPolicy, leg: _Leg, call: Callable[[], Iterable[C]]
) -> tuple[_Leg, Iterable[C], Iterator[C], Any]:
    """One step's stream, opened once under its circuit, up to its first chunk; a
    failure before it is counted against the step and raised."""
    tally = leg.tally
    stream: Iterable[C] | None = None
    try:
        if tally is not None:
            try:
                leg.permit = tally.circuit.admit()
            except CircuitOpenError as refusal:
                policy._refused(tally.circuit, refusal)
                raise
        stream = call()
        chunks = iter(stream)
        first = next(chunks, _END)
        if first is _END and leg.finished is not None:
            raise IncompleteStreamError(leg.key, 0)
    except Exception as exc:
        if leg.permit is not None:
            outcome = _leg_judge(policy, leg, exc)
            assert outcome is not None
            _record(leg, outcome)
        _close_quietly(stream)
        raise
    except BaseException:
        if leg.permit is not None and _stopped(policy, leg):
            _record(leg, _IGNORED)
        raise
    return leg, stream, chunks, first


def _record(leg: _Leg, outcome: Outcome) -> None:
    assert leg.tally is not None
    assert leg.permit is not None
    leg.tally.circuit.record(leg.permit, outcome)


def _close_quietly(*streams: object) -> None:
    """Close a failed stream's resources; a second error there would hide the first."""
    for stream in streams:
        try:
            _close(stream)
        except Exception:
            logger.debug("callpolicy: closing a failed stream failed", exc_info=True)


# -- async ---------------------------------------------------------------------------------
async def _opened(
    start: Callable[[], AsyncIterable[C] | Awaitable[AsyncIterable[C]]],
) -> AsyncIterable[C]:
    stream = start()
    if hasattr(stream, "__aiter__"):
        return cast("AsyncIterable[C]", stream)
    return await stream  # LlamaIndex's astream_* are coroutines returning the generator


async def _arecord(leg: _Leg, outcome: Outcome) -> None:
    assert leg.tally is not None
    assert leg.permit is not None
    circuit = leg.tally.circuit
    if circuit.is_async_native:
        await circuit.arecord(leg.permit, outcome)
    else:
        circuit.record(leg.permit, outcome)


async def _arecord_shielded(leg: _Leg) -> None:
    """Free the slot of a stopped stream, even inside a cancelled task."""
    assert leg.tally is not None
    assert leg.permit is not None
    circuit = leg.tally.circuit
    if circuit.is_async_native:
        await asyncio.shield(circuit.arecord(leg.permit, _IGNORED))
    else:
        circuit.record(leg.permit, _IGNORED)


async def _aclose_quietly(*streams: object) -> None:
    for stream in streams:
        try:
            await _aclose(stream)
        except Exception:
            logger.debug("callpolicy: closing a failed stream failed", exc_info=True)


async def aguard_stream(
    policy: CallPolicy,
    key: str,
    start: Callable[[], AsyncIterable[C] | Awaitable[AsyncIterable[C]]],
    fallback: Opener[C] | Fallbacks[AsyncIterable[C] | Awaitable[AsyncIterable[C]]] | None,
    fallback_key: str | None,
    finished: Finished | None,
    fallback_finished: Markers,
) -> AsyncGenerator[C, None]:
    """Async :func:`guard_stream`."""
    # The retry bookkeeping (an _Opening) is built only when the way to the first chunk
    # is not straight (a refusal, a failure): the healthy stream's set-up is measured.
    tally = policy._tallies.get(key) or policy._tally(key)
    circuit = tally.circuit
    started = policy._clock() if policy.retry is not None else 0.0
    opening: _Opening | None = None
    native = circuit.is_async_native
    permit: Permit | None = None
    leg: _Leg | None = None
    try:
        permit = await circuit.aadmit() if native else circuit.admit()
    except CircuitOpenError as refusal:
        if fallback is None:
            policy._refused(circuit, refusal)
            raise
        opening = _Opening(policy, tally, started)
        opening.refused(refusal)
    while permit is not None:
        stream: AsyncIterable[C] | None = None
        try:
            stream = await _opened(start)
            chunks = aiter(stream)
            first = await anext(chunks, _END)
            if first is _END and finished is not None:
                raise IncompleteStreamError(key, 0)
        except Exception as exc:
            if opening is None:
                opening = _Opening(policy, tally, started)
            outcome = opening.judge(exc)
            state = (
                await circuit.arecord(permit, outcome)
                if native
                else circuit.record(permit, outcome)
            )
            await _aclose_quietly(stream)
            delay = opening.delay(exc, state)
            if delay is not None:
                await policy._async_sleep(delay)
                opening.attempt += 1
                permit = await policy._aadmit_retry(circuit, exc, opening.attempt, opening.started)
                if permit is not None:
                    continue
                if fallback is None:
                    raise
                opening.retry_refused(exc)
                break
            if fallback is None or not opening.falls_back(exc, outcome):
                raise
            break
        except BaseException:
            policy._count_cancelled(tally)
            if native:
                await asyncio.shield(circuit.arecord(permit, _IGNORED))
            else:
                circuit.record(permit, _IGNORED)
            raise
        leg = _Leg(circuit.key, tally, permit, finished)
        break
    if leg is None:  # refused, or the primary's attempts failed: the fallback serves
        assert fallback is not None
        assert opening is not None
        token = _current_fallback.set(opening.hand_over())
        try:
            if isinstance(fallback, Fallbacks):
                leg, stream, chunks, first = await _aopen_chain(
                    policy, opening, fallback, fallback_finished
                )
            else:
                leg, stream, chunks, first = await _aopen_fallback(
                    policy, opening, fallback, fallback_key, cast("Finished", fallback_finished)
                )
        finally:
            _current_fallback.reset(token)
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
            if not marked:
                assert finished is not None
                if finished(first):
                    marked = True
                else:
                    async for chunk in chunks:
                        count += 1
                        yielding = True
                        yield chunk
                        yielding = False
                        if finished(chunk):
                            marked = True
                            break
            async for chunk in chunks:
                count += 1
                yielding = True
                yield chunk
                yielding = False
    except Exception as exc:
        if yielding:
            if _stopped(policy, leg):
                await _arecord(leg, _IGNORED)
            await _aclose_quietly(chunks, stream)
            raise
        broke = _broke(policy, leg, exc, count)
        await _aclose_quietly(chunks, stream)
        if broke is not None:
            await _arecord(leg, broke)
        raise
    except BaseException:  # aclose() (GeneratorExit at the yield), or a cancelled task
        if _stopped(policy, leg):
            await _arecord_shielded(leg)
        await _aclose(chunks)
        if stream is not chunks:
            await _aclose(stream)
        raise
    ended, error = _ended(policy, leg, marked, count)
    if ended is not None:
        await _arecord(leg, ended)
    if error is not None:
        raise error


async def _aopen_fallback(
    policy: CallPolicy,
    opening: _Opening,
    fallback: Callable[[], AsyncIterable[C] | Awaitable[AsyncIterable[C]]],
    fallback_key: str | None,
    finished: Finished | None,
) -> tuple[_Leg, AsyncIterable[C], AsyncIterator[C], Any]:
    """Async :func:`_open_fallback`."""
    tally = _fallback_tally(policy, fallback_key)
    leg = _Leg(fallback_key or opening.tally.circuit.key, tally, None, finished)
    stream: AsyncIterable[C] | None = None
    try:
        if tally is not None:
            circuit = tally.circuit
            try:
                leg.permit = await circuit.aadmit() if circuit.is_async_native else circuit.admit()
            except CircuitOpenError as refusal:
                policy._refused(circuit, refusal)
                raise
        stream = await _opened(fallback)
        chunks = aiter(stream)
        first = await anext(chunks, _END)
        if first is _END and finished is not None:
            raise IncompleteStreamError(leg.key, 0)
    except Exception as exc:
        if leg.permit is not None:
            outcome = _leg_judge(policy, leg, exc)
            assert outcome is not None
            await _arecord(leg, outcome)
        await _aclose_quietly(stream)
        opening.fallback_failed(exc)
        raise
    except BaseException:
        if leg.permit is not None and _stopped(policy, leg):
            await _arecord_shielded(leg)
        raise
    return leg, stream, chunks, first


async def _aopen_chain(
    policy: CallPolicy,
    opening: _Opening,
    chain: Fallbacks[AsyncIterable[C] | Awaitable[AsyncIterable[C]]],
    markers: Markers,
) -> tuple[_Leg, AsyncIterable[C], AsyncIterator[C], Any]:
    """Async :func:`_open_chain`."""
    primary = opening.tally.circuit.key
    assert opening.cause is not None
    keys: list[str | None] = [primary]
    errors: list[BaseException] = [opening.cause]
    last = len(chain.steps) - 1
    for index, (key, call) in enumerate(chain.steps):
        leg = _step_leg(policy, primary, key, _step_marker(markers, index))
        try:
            return await _aopen_step(policy, leg, call)
        except Exception as exc:
            keys.append(key)
            errors.append(exc.with_traceback(None) if isinstance(exc, CircuitOpenError) else exc)
            if index == last or not _moves_on(policy, key, exc):
                break
    raise _exhausted(keys, errors)


async def _aopen_step(
    policy: CallPolicy, leg: _Leg, call: Opener[C]
) -> tuple[_Leg, AsyncIterable[C], AsyncIterator[C], Any]:
    """Async :func:`_open_step`."""
    tally = leg.tally
    stream: AsyncIterable[C] | None = None
    try:
        if tally is not None:
            circuit = tally.circuit
            try:
                leg.permit = await circuit.aadmit() if circuit.is_async_native else circuit.admit()
            except CircuitOpenError as refusal:
                policy._refused(circuit, refusal)
                raise
        stream = await _opened(call)
        chunks = aiter(stream)
        first = await anext(chunks, _END)
        if first is _END and leg.finished is not None:
            raise IncompleteStreamError(leg.key, 0)
    except Exception as exc:
        if leg.permit is not None:
            outcome = _leg_judge(policy, leg, exc)
            assert outcome is not None
            await _arecord(leg, outcome)
        await _aclose_quietly(stream)
        raise
    except BaseException:
        if leg.permit is not None and _stopped(policy, leg):
            await _arecord_shielded(leg)
        raise
    return leg, stream, chunks, first
