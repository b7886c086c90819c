"""Single flight: concurrent identical misses collapse into one model call.

The first caller of a key leads a :class:`Flight`; callers that arrive while it is in the
air wait for it instead of calling the model — threads on a ``threading.Event``, asyncio
tasks on a future of their own loop (woken thread-safely), in any mix. The table of
flights is guarded by one lock, held only to look up, add or remove a flight: never
across a call or an ``await``.

A flight ends in one of four ways: an answer (JSON text the waiters decode, each their
own copy); an exception (which every waiter raises); an answer that cannot be shared (not
JSON-able: each waiter calls the model itself); or abandoned — the leader was cancelled
or interrupted — and then the waiters try again, one of them leading.

A waiter that would wait on itself (the leader is further up its own thread's stack, or
is its own task) does not wait: it computes on its own rather than deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["Flight", "SingleFlight"]


class Flight:
    """One key's call in the air."""

    __slots__ = (
        "_async_waiters",
        "alone",
        "done",
        "error",
        "finished",
        "loop",
        "task",
        "text",
        "thread",
    )

    def __init__(self) -> None:
        self.done = threading.Event()
        self.finished = False
        self.text: str | None = None
        """The answer as the cache stores it, once the leader has one."""
        self.error: BaseException | None = None
        self.alone = False
        """The leader got an answer it could not share (not JSON-able): waiters should
        each call the model on their own, at once, rather than lead one by one."""
        self.thread = threading.get_ident()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[object] | None = None
        try:
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task(self.loop)
        except RuntimeError:  # a plain thread: no loop
            pass
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def abandoned(self) -> bool:
        return self.finished and self.text is None and self.error is None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # a waiter cancelled meanwhile has a done future
        future.set_result(None)


class SingleFlight:
    """The flights in the air, by key. Safe from any thread and any event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str) -> tuple[Flight, bool]:
        """The flight of ``key``, and whether the caller leads it (it was not in the air)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def finish(
        self,
        key: str,
        flight: Flight,
        *,
        text: str | None = None,
        error: BaseException | None = None,
        alone: bool = False,
    ) -> None:
        """Land ``flight`` (neither ``text`` nor ``error``: abandoned) and wake its waiters."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.text = text
            flight.error = error
            flight.alone = alone
            flight.finished = True
            waiters, flight._async_waiters = flight._async_waiters, []
        flight.done.set()
        for loop, future in waiters:
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    @staticmethod
    def wait(flight: Flight) -> bool:
        """Block until ``flight`` lands; False, at once, if waiting would deadlock (its
        leader runs on this very thread)."""
        if flight.thread == threading.get_ident():
            return False
        flight.done.wait()
        return True

    async def await_(self, flight: Flight) -> bool:
        """Wait, without blocking the loop, until ``flight`` lands; False, at once, if
        waiting would deadlock (the leader is this task, or blocks this thread)."""
        loop = asyncio.get_running_loop()
        if flight.thread == threading.get_ident() and (
            flight.loop is not loop or flight.task is asyncio.current_task(loop)
        ):
            return False
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if flight.finished:
                return True
            flight._async_waiters.append((loop, future))
        await future
        return True
