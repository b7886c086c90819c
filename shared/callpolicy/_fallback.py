"""The fallback strategy, outermost of the three around the model: it sees the *final*
verdict on the primary (an open circuit, or a failure that survived every retry).

What the fallback is answering for is readable from inside the fallback while it runs.
The engine calls a fallback with no arguments (its signature is the primary's), yet the
fallback may want to say why it was called: an adapter labels the fallback's run with
the primary circuit's state, a user's fallback may log the primary's error. The engine
knows both at no cost as it hands over (the refusal, or the state the failure left the
circuit in), so it publishes them in a context variable for the duration of the call:
reading the circuit again would cost a lock, or with a shared store a round trip, on
every call of an outage. The variable holds a plain tuple; :func:`fallback_start` makes
the :class:`FallbackStart` only when someone asks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._breaking import Breaker
from ._classify import Classification
from ._config import FallbackOn
from ._drive import Body, call_op, within
from ._errors import AllModelsFailedError, CircuitOpenError, add_note
from ._events import Event, EventKind
from ._store import Circuit
from ._tally import _Tally
from ._types import CircuitState, ErrorClass, Outcome

__all__ = ["FallbackStart", "Fallbacks", "FallingBack", "fallback_start"]

T = TypeVar("T")


@dataclass(frozen=True)
class FallbackStart:
    """Why the fallback now running was called.

    Attributes:
        key: the primary's circuit key (``provider::model``).
        state: the primary circuit's state as the fallback started: ``OPEN`` (the call
            was refused, or this failure opened it), ``HALF_OPEN`` (its probes were all
            in flight), or ``CLOSED`` (a failure below the threshold, with
            ``fallback_on="error"``).
        cause: the refusal (:class:`~callpolicy.CircuitOpenError`) or the primary's error.
    """

    key: str
    state: CircuitState
    cause: BaseException


_Start = tuple[str, CircuitState, BaseException]
"""A :class:`FallbackStart`'s fields, as the engine publishes them."""

_current: ContextVar[_Start | None] = ContextVar("callpolicy_fallback", default=None)


def fallback_start() -> FallbackStart | None:
    """Inside a fallback the engine is running: why it was called; elsewhere None.

    >>> from callpolicy import CallPolicy, fallback_start
    >>> policy = CallPolicy()
    >>> policy.force_open("acme::m1")
    >>> def backup() -> str:
    ...     start = fallback_start()
    ...     return f"backup, as {start.key} is {start.state.value}"
    >>> policy.execute("acme::m1", lambda: "primary", fallback=backup)
    'backup, as acme::m1 is open'
    >>> fallback_start() is None
    True
    """
    start = _current.get()
    return None if start is None else FallbackStart(*start)


class Fallbacks(Generic[T]):
    """Several fallbacks, tried in order: hand one to ``CallPolicy.execute(fallback=...)``
    (or ``aexecute``) in place of a single fallback callable.

    Each step is ``(key, call)``: ``call()`` runs under ``key``'s own circuit (``None``:
    unguarded). A step whose circuit is open is skipped at once, without calling it; a
    step that fails hands over to the next when the policy's ``fallback_on`` would have
    handed the primary's failure over (``"failure"``: a counted failure; ``"error"``: any
    error; ``"open"``: only an open circuit). When the list ends without an answer the
    engine raises :class:`~callpolicy.AllModelsFailedError`, naming every model tried.

    >>> from callpolicy import CallPolicy, Fallbacks
    >>> policy = CallPolicy()
    >>> policy.force_open("acme::m1")
    >>> policy.force_open("backup::m2")
    >>> chain = Fallbacks([("backup::m2", lambda: "second"), ("spare::m3", lambda: "third")])
    >>> policy.execute("acme::m1", lambda: "first", fallback=chain)
    'third'
    """

    __slots__ = ("steps",)

    def __init__(self, steps: Iterable[tuple[str | None, Callable[[], T]]]) -> None:
        found = tuple(steps)
        if not found:
            raise ValueError("steps: expected at least one fallback")
        seen: set[str] = set()
        for index, step in enumerate(found):
            if not isinstance(step, tuple) or len(step) != 2:
                raise TypeError(f"steps[{index}]: expected a (key, call) pair")
            key, call = step
            if key is not None and (not isinstance(key, str) or not key):
                raise TypeError(f"steps[{index}]: key: expected a non-empty string or None")
            if not callable(call):
                raise TypeError(f"steps[{index}]: call: expected a zero-argument callable")
            if key is not None:
                if key in seen:
                    raise ValueError(f"steps[{index}]: key {key!r} is given twice")
                seen.add(key)
        self.steps: tuple[tuple[str | None, Callable[[], T]], ...] = found

    def map(self, wrap: Callable[[str | None, Callable[[], T]], Callable[[], T]]) -> Fallbacks[T]:
        """The same steps, each call replaced by ``wrap(key, call)``."""
        return Fallbacks((key, wrap(key, call)) for key, call in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Fallbacks({[key for key, _ in self.steps]!r})"


_CALLER = ErrorClass.CALLER

Step = Callable[..., Body[Any]]
"""How one fallback is tried: ``step(index in the list, its key or None, its call,
context=the error its errors chain to, or None)``."""
_FAILURE = Outcome.FAILURE


class FallingBack:
    """Decides whether a fallback serves, hands the call over, and walks a list."""

    __slots__ = ("breaker", "mode")

    def __init__(self, mode: FallbackOn, *, breaker: Breaker) -> None:
        self.mode = mode
        self.breaker = breaker

    def wants(self, classification: Classification, outcome: Outcome) -> bool:
        """Does a failure go to the fallback (per ``fallback_on``)? An open circuit always
        does; this is for an error."""
        if classification.error_class is _CALLER:
            return False  # the fallback would be handed the same mistake, in every mode
        mode = self.mode
        return mode == "error" or (mode == "failure" and outcome is _FAILURE)

    def handed_over(
        self, tally: _Tally, cause: BaseException, classification: Classification | None
    ) -> None:
        """Count the hand-over under the key that handed over, and announce it."""
        breaker = self.breaker
        (tally.more or breaker.tallies.more(tally)).fallbacks += 1
        announcer = breaker.announcer
        if not announcer.heard(logging.INFO):
            return
        refused = isinstance(cause, CircuitOpenError)
        circuit = tally.circuit
        announcer.emit(
            Event(
                EventKind.FALLBACK,
                circuit.key,
                circuit.provider,
                circuit.model,
                state=CircuitState.OPEN if refused else None,
                error_class=None if classification is None else classification.error_class,
                error_type=None if refused else type(cause).__name__,
            )
        )

    def enter(self, tally: _Tally, cause: BaseException, state: CircuitState) -> Token[Any]:
        """Count and announce the hand-over after a refusal, and tell the fallback why
        (``fallback_start()``) until the token is reset."""
        self.handed_over(tally, cause, None)
        return _current.set((tally.circuit.key, state, cause))

    def serve_now(
        self, tally: _Tally, fallback: Callable[[], T], cause: BaseException, state: CircuitState
    ) -> T:
        """A plain fallback (no circuit of its own) after a refusal, called at once: the
        sync path an outage takes on every call, kept short."""
        token = self.enter(tally, cause, state)
        try:
            return fallback()
        except Exception as exc:
            failed_over(exc, tally.circuit, cause)
            raise
        finally:
            _current.reset(token)

    async def aserve_now(
        self,
        tally: _Tally,
        fallback: Callable[[], Awaitable[T]],
        cause: BaseException,
        state: CircuitState,
    ) -> T:
        """Async :meth:`serve_now` (the variable is set in this task's context, which the
        fallback's coroutine, awaited here, shares)."""
        token = self.enter(tally, cause, state)
        try:
            answer = await fallback()
        except Exception as exc:
            failed_over(exc, tally.circuit, cause)
            raise
        finally:
            _current.reset(token)
        return answer

    def serve(
        self,
        tally: _Tally,
        fallback: Callable[[], Any] | Fallbacks[Any],
        fallback_key: str | None,
        cause: BaseException,
        classification: Classification | None,
        state: CircuitState,
        step: Step | None = None,
        chained: bool = False,
    ) -> Body[Any]:
        """The fallback's answer in place of the primary's (``fallback_start()`` tells it
        why): a list tried in order, or the one fallback, each by ``step`` (by default
        :meth:`step`: a call under its key's circuit, or as it is without a key).
        ``chained``: the fallback's errors carry ``cause`` as their context, as when it
        is called while the primary's error is handled (see ``_drive.within``)."""
        self.handed_over(tally, cause, classification)
        token = _current.set((tally.circuit.key, state, cause))
        step = step or self.step
        context = cause if chained else None
        try:
            if isinstance(fallback, Fallbacks):
                walked = functools.partial(self.walk, tally.circuit.key, fallback, cause)
                return (yield from walked(functools.partial(step, context=context)))
            return (yield from step(0, fallback_key, fallback, context=context))
        except AllModelsFailedError:
            raise  # names every model already
        except Exception as exc:
            failed_over(exc, tally.circuit, cause)
            raise
        finally:
            _current.reset(token)

    def step(
        self, index: int, key: str | None, call: Callable[[], Any], context: BaseException | None
    ) -> Body[Any]:
        """One fallback (a step of a list): under its key's circuit, or unguarded."""
        attempt = within(call_op(call), context)
        if key is None:
            return (yield attempt)
        return (yield from self.breaker.guarded(self.breaker.tallies.get(key), attempt))

    def walk(
        self,
        primary: str,
        chain: Fallbacks[Any],
        cause: BaseException,
        step: Step,
    ) -> Body[Any]:
        """The first answer of ``chain``'s steps, each tried in turn by ``step`` (see
        :class:`Fallbacks`); :class:`AllModelsFailedError` when none answers."""
        keys: list[str | None] = [primary]
        errors: list[BaseException] = [cause]
        last = len(chain.steps) - 1
        for index, (key, call) in enumerate(chain.steps):
            try:
                return (yield from step(index, key, call))
            except Exception as exc:
                keys.append(key)
                errors.append(
                    exc.with_traceback(None) if isinstance(exc, CircuitOpenError) else exc
                )
                if index == last or not self.moves_on(key, exc):
                    break
        error = AllModelsFailedError(tuple(keys), tuple(errors))
        error.__cause__ = errors[-1]
        raise error

    def moves_on(self, key: str | None, exc: Exception) -> bool:
        """Whether a step's error hands the call to the next step (an open circuit always; a
        failure as ``fallback_on`` says for the primary's), counting the hand-over (and its
        event) under the step that handed over."""
        classification = None
        if not isinstance(exc, CircuitOpenError):
            classification, outcome = self.breaker.judge(exc)
            if not self.wants(classification, outcome):
                return False
        if key is not None:
            self.handed_over(self.breaker.tallies.get(key), exc, classification)
        return True


def failed_over(exc: BaseException, circuit: Circuit, cause: BaseException) -> None:
    """The fallback failed too: its error names the primary's refusal or error as its
    context (as it would, raised inside the primary's except block), and says so."""
    if exc.__context__ is None and exc is not cause:
        exc.__context__ = cause
    add_note(
        exc,
        f"callpolicy: the fallback failed after {circuit.provider}/{circuit.model} "
        f"failed with {type(cause).__name__}",
    )
