"""One description of a strategy's steps, run by a sync driver or an async one.

The cold paths of a guarded call (a failure and its retries, the hand-over to a fallback,
a guarded fallback, a list of fallbacks, the budget's reservation, the cache's lookup) are
written once, as generator functions ("bodies") that make every decision themselves and
``yield`` each step that touches the world as an :class:`Op`: call the model, admit to
a circuit or record in it, sleep, reserve from a budget. The sync driver (:func:`run`)
performs an op by calling its sync side, the async driver (:func:`arun`) by awaiting its
async side, and each hands back the op's result (or throws its exception in at the
``yield``). A body therefore reads as the plain sync code it is, and serves async callers
unchanged: no second, hand-kept async copy of any decision.

The healthy call never comes here: ``CallPolicy.execute``/``aexecute`` admit, call,
record and count inline, and hand a body to a driver only once something went wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._types import Outcome

if TYPE_CHECKING:
    from ._store import Circuit, Permit

__all__ = [
    "Body",
    "Held",
    "Op",
    "admit_op",
    "arun",
    "call_op",
    "perform",
    "record_op",
    "release_op",
    "run",
    "within",
]

T = TypeVar("T")

_IGNORED = Outcome.IGNORED


class Op:
    """One step a body asks its driver to take: ``sync(*args, **kwargs)`` for the sync
    driver; for the async one ``await asynchronous(...)``, or ``sync(...)`` when there is
    no async side (a circuit whose sync methods never block)."""

    __slots__ = ("args", "asynchronous", "kwargs", "sync")

    def __init__(
        self,
        sync: Callable[..., Any],
        asynchronous: Callable[..., Awaitable[Any]] | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.sync = sync
        self.asynchronous = asynchronous
        self.args = args
        self.kwargs = kwargs


Body = Generator[Op, Any, T]
"""A strategy's steps: yields :class:`Op` s, returns the call's answer (or raises)."""


class Held:
    """An attempt's result whose permit is still held: a stream that reached its first
    chunk keeps its circuit's slot until it ends, and its outcome is recorded then."""

    __slots__ = ("permit", "result")

    def __init__(self, permit: Permit, result: Any) -> None:
        self.permit = permit
        self.result = result


class _Steps:
    """A body's progress, between its driver's steps: what to hand it next (an op's
    result, or its error to throw in), and at the end the body's answer."""

    __slots__ = ("body", "failed", "reply")

    def __init__(self, body: Body[Any]) -> None:
        self.body = body
        self.reply: Any = None
        self.failed = False

    def next(self) -> Op | None:
        """The body's next op, or None when it has answered (the answer is ``reply``)."""
        reply, self.reply = self.reply, None
        try:
            if self.failed:
                self.failed = False
                return self.body.throw(reply)
            return self.body.send(reply)
        except StopIteration as done:
            self.reply = done.value
            return None
        finally:
            reply = None  # an error's traceback holds this frame: no cycle through it

    def fail(self, exc: BaseException) -> None:
        self.reply, self.failed = exc, True


def run(body: Body[T]) -> T:
    """Run ``body`` in this thread, performing each op with its sync side."""
    steps = _Steps(body)
    while (op := steps.next()) is not None:
        try:
            steps.reply = op.sync(*op.args, **op.kwargs)
        except BaseException as exc:
            steps.fail(exc)
    return cast("T", steps.reply)


async def arun(body: Body[T]) -> T:
    """Run ``body`` in this task, awaiting each op's async side."""
    steps = _Steps(body)
    while (op := steps.next()) is not None:
        try:
            steps.reply = await perform(op)
        except BaseException as exc:
            steps.fail(exc)
    return cast("T", steps.reply)


async def perform(op: Op) -> Any:
    """One op, for an async caller."""
    if op.asynchronous is None:
        return op.sync(*op.args, **op.kwargs)
    return await op.asynchronous(*op.args, **op.kwargs)


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


async def _acall(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


def call_op(fn: Callable[[], Any]) -> Op:
    """Call ``fn`` (a model, a fallback); the async driver awaits what it returns."""
    return Op(_call, _acall, fn)


def admit_op(circuit: Circuit) -> Op:
    return Op(circuit.admit, circuit.aadmit if circuit.is_async_native else None)


def record_op(circuit: Circuit, permit: Permit, outcome: Outcome) -> Op:
    return Op(circuit.record, circuit.arecord if circuit.is_async_native else None, permit, outcome)


def within(op: Op, cause: BaseException | None) -> Op:
    """``op``, performed as if while ``cause`` is being handled (None: ``op`` as it is).

    A fallback called after the primary failed runs in its place: its error, as raised
    inside the primary's except block, would name the primary's error as its context,
    and the classifier reads that chain (a bare ``ValueError`` with an HTTP error behind
    it is the provider's failure, not the caller's). A body runs the fallback from its
    driver, outside any except block, so the chain is completed here.
    """
    if cause is None:
        return op
    return Op(_within, _awithin, op, cause)


def _within(op: Op, cause: BaseException) -> Any:
    try:
        return op.sync(*op.args, **op.kwargs)
    except BaseException as exc:
        _chain_context(exc, cause)
        raise


async def _awithin(op: Op, cause: BaseException) -> Any:
    try:
        return await perform(op)
    except BaseException as exc:
        _chain_context(exc, cause)
        raise


def _chain_context(exc: BaseException, cause: BaseException) -> None:
    """Give the end of ``exc``'s context chain ``cause`` as its context."""
    last = exc
    while (context := last.__context__) is not None:
        if context is cause:
            return
        last = context
    if last is not cause:
        last.__context__ = cause


def _release(circuit: Circuit, permit: Permit) -> None:
    circuit.record(permit, _IGNORED)


async def _arelease(circuit: Circuit, permit: Permit) -> None:
    # Shielded: the slot is freed even when the task was cancelled (the usual reason).
    await asyncio.shield(circuit.arecord(permit, _IGNORED))


def release_op(circuit: Circuit, permit: Permit) -> Op:
    """Free the slot of an attempt that ended without an outcome (cancelled, interrupted)."""
    return Op(_release, _arelease if circuit.is_async_native else None, circuit, permit)
