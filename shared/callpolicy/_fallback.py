"""What the fallback is answering for, readable from inside the fallback while it runs.

The engine calls a fallback with no arguments (its signature is the primary's), yet the
fallback may want to say why it was called: an adapter labels the fallback's run with
the primary circuit's state, a user's fallback may log the primary's error. The engine
knows both at no cost as it hands over (the refusal, or the state the failure left the
circuit in), so it publishes them in a context variable for the duration of the call:
reading the circuit again would cost a lock, or with a shared store a round trip, on
every call of an outage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from ._errors import AllModelsFailedError, CircuitOpenError
from ._types import CircuitState

if TYPE_CHECKING:
    from ._policy import CallPolicy

__all__ = ["FallbackStart", "Fallbacks", "arun_chain", "fallback_start", "run_chain"]

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


_current: ContextVar[FallbackStart | None] = ContextVar("callpolicy_fallback", default=None)


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
    return _current.get()


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


def run_chain(policy: CallPolicy, primary: str, chain: Fallbacks[T], cause: BaseException) -> T:
    """The fallback step of ``execute`` for a list: each step in turn (see
    :class:`Fallbacks`); raises :class:`AllModelsFailedError` when none answers."""
    keys: list[str | None] = [primary]
    errors: list[BaseException] = [cause]
    last = len(chain.steps) - 1
    for index, (key, call) in enumerate(chain.steps):
        try:
            if key is None:
                return call()
            return policy._guard_once(policy._tallies.get(key) or policy._tally(key), call)
        except Exception as exc:
            keys.append(key)
            errors.append(exc.with_traceback(None) if isinstance(exc, CircuitOpenError) else exc)
            if index == last or not _moves_on(policy, key, exc):
                break
    raise _exhausted(keys, errors)


async def arun_chain(
    policy: CallPolicy, primary: str, chain: Fallbacks[Awaitable[T]], cause: BaseException
) -> T:
    """Async :func:`run_chain`."""
    keys: list[str | None] = [primary]
    errors: list[BaseException] = [cause]
    last = len(chain.steps) - 1
    for index, (key, call) in enumerate(chain.steps):
        try:
            if key is None:
                return await call()
            return await policy._aguard_once(policy._tallies.get(key) or policy._tally(key), call)
        except Exception as exc:
            keys.append(key)
            errors.append(exc.with_traceback(None) if isinstance(exc, CircuitOpenError) else exc)
            if index == last or not _moves_on(policy, key, exc):
                break
    raise _exhausted(keys, errors)


def _moves_on(policy: CallPolicy, key: str | None, exc: Exception) -> bool:
    """Whether a step's error hands the call to the next step (an open circuit always; a
    failure as ``fallback_on`` says for the primary's), counting the hand-over (and its
    event) under the step that handed over."""
    classification = None
    if not isinstance(exc, CircuitOpenError):
        classification, outcome = policy._judge(exc)
        if not policy._wants_fallback(classification, outcome):
            return False
    if key is not None:
        policy._emit_fallback(policy.circuit(key), exc, classification)
    return True


def _exhausted(keys: list[str | None], errors: list[BaseException]) -> AllModelsFailedError:
    error = AllModelsFailedError(tuple(keys), tuple(errors))
    error.__cause__ = errors[-1]
    return error
