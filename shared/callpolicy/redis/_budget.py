"""Budget counters on Redis: one app-wide budget for every process.

Each reservation and each settlement is one Lua script run (``_budget_lua``: one round
trip), atomic on the server, so concurrent processes never overspend. When Redis cannot
be reached, ``on_unavailable`` decides: ``"open"`` (the default) lets calls go on,
counted in this process against the same limits (each process can spend at most the
limit while cut off), and adds what they used to the shared counters when Redis answers
again; ``"closed"`` refuses them with :class:`BudgetUnavailableError`. A settlement that
cannot reach Redis is queued and replayed, so no reservation is lost. A refusal of
credentials or permissions is no outage: it raises :class:`~callpolicy.redis.StoreAccessError`.

This module does not import the store it lives on: it asks of it only what
:class:`BudgetHost` lists, so the store imports this module and not the other way round.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from .._budget_memory import MemoryBudgetStore
from .._budget_store import (
    BudgetExceededError,
    BudgetLimits,
    BudgetStoreBase,
    Reservation,
    Tally,
    Window,
)
from .._budget_store import refusal as _refusal
from .._errors import add_note
from ._budget_lua import RECORD, RESERVE, SETTLE, TALLY
from ._connection import (
    REFUSED,
    UNREACHABLE,
    Health,
    StoreAccessError,
    StoreUnavailableError,
    glob_escape,
    text,
)
from ._topology import one_slot

__all__ = ["BudgetHost", "BudgetUnavailableError", "RedisBudgetStore"]


class BudgetHost(Protocol):
    """What the budget store needs of the :class:`~callpolicy.redis.RedisStore` it lives on:
    its connection, its key prefix and TTL, its view of Redis's health (read afresh at
    each use: closing the store replaces it), and how it words an error."""

    client: Any
    prefix: str
    is_cluster: bool

    @property
    def health(self) -> Health: ...

    @property
    def key_ttl_ms(self) -> int: ...

    def _access_error(self, exc: BaseException) -> StoreAccessError: ...

    def _reaching(self, what: str) -> AbstractContextManager[None]: ...


class BudgetUnavailableError(StoreUnavailableError):
    """Raised instead of calling the model when the shared budget cannot be reached and
    the store was built with ``on_unavailable="closed"``."""


class _RedisReservation(Reservation):
    __slots__ = ("bucket", "window_ms")

    bucket: int
    """The window's time bucket it was counted in (on the server's clock)."""
    window_ms: int


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _window_ms(window: float | None) -> int:
    return 0 if window is None else max(int(window * 1000), 60)


_Owed = tuple[Any, list[str], list[Any]]
"""A script run Redis still owes this process: (script, keys, args)."""


class RedisBudgetStore(BudgetStoreBase):
    """A :class:`~callpolicy.BudgetStore` on Redis; get one from ``RedisStore.budget_store()``.

    It uses that store's connections: it has no ``close()`` of its own, and once the store
    is closed its calls raise :class:`~callpolicy.redis.StoreClosedError`. Its ``a*``
    methods are its sync ones: one short loopback round trip, one code path (a busy event
    loop can wrap Budget calls in ``asyncio.to_thread`` if Redis is remote).

    >>> Budget(max_calls=1000, store=redis_store.budget_store())  # doctest: +SKIP
    """

    def __init__(
        self,
        store: BudgetHost,
        *,
        on_unavailable: Literal["open", "closed"] = "open",
    ) -> None:
        if on_unavailable not in ("open", "closed"):
            raise ValueError(f"on_unavailable: expected 'open' or 'closed', got {on_unavailable!r}")
        self._store = store
        self.on_unavailable = on_unavailable
        # Fail open: this process's counting while Redis is away, and what it owes Redis.
        self._local = MemoryBudgetStore()
        self._local_windows: dict[int, int] = {}
        self._replay: deque[_Owed] = deque()
        self._replay_lock = threading.Lock()
        self._checked_scopes: set[str] = set()
        client = store.client
        self._reserve_script = client.register_script(RESERVE)
        self._settle_script = client.register_script(SETTLE)
        self._record_script = client.register_script(RECORD)
        self._tally_script = client.register_script(TALLY)

    def _keys(self, scope: str) -> list[str]:
        """A scope's five keys, one hash tag (``{scope}``): one slot on a cluster, checked
        once per scope there."""
        base = f"{self._store.prefix}:budget:{{{scope}}}"
        keys = [base, f"{base}:wcalls", f"{base}:wtokens", f"{base}:wcost", f"{base}:pending"]
        if self._store.is_cluster and scope not in self._checked_scopes:
            if not one_slot(keys):
                raise ValueError(
                    f"scope: budget scope {scope!r} with prefix {self._store.prefix!r} "
                    "spreads its counters over hash slots of a Redis Cluster (a scope or "
                    "prefix starting with '}' or holding '{}'): choose another key"
                )
            self._checked_scopes.add(scope)
        return keys

    # -- reaching Redis ----------------------------------------------------------------
    def _attempt(self, script: Any, keys: list[str], args: list[Any], epoch: int) -> Any:
        """Run one script: its reply, or the error when Redis could not be reached (its
        health told, as of ``epoch``). A refusal of access raises
        :class:`~callpolicy.redis.StoreAccessError`: configuration to fix, no outage."""
        try:
            return script(keys=keys, args=args)
        except REFUSED as exc:  # before UNREACHABLE: some are ConnectionErrors
            raise self._store._access_error(exc) from None
        except UNREACHABLE as exc:
            self._store.health.failed(exc, epoch)
            return _Unreached(exc)

    def _usable(self) -> bool:
        """Whether to try Redis now; if so, first replay what it is owed."""
        if not self._store.health.usable():
            return False
        if self._replay:
            self._flush()
        return self._store.health.usable()

    def _flush(self) -> None:
        """Replay what was spent or settled while Redis was away, oldest first."""
        health = self._store.health
        with self._replay_lock:
            epoch = health.epoch
            while self._replay:
                if isinstance(self._attempt(*self._replay[0], epoch), _Unreached):
                    return
                self._replay.popleft()
            health.succeeded(epoch)

    def _owe(self, script: Any, keys: list[str], args: list[Any]) -> None:
        with self._replay_lock:
            self._replay.append((script, keys, args))

    def _write(self, script: Any, keys: list[str], args: list[Any], usable: bool) -> None:
        """Run a settlement or a record now if ``usable``, else (or if Redis cannot be
        reached) owe it. Owed also when access is refused, should access come back."""
        if usable:
            try:
                reply = self._attempt(script, keys, args, self._store.health.epoch)
            except StoreAccessError:
                self._owe(script, keys, args)
                raise
            if not isinstance(reply, _Unreached):
                return
        self._owe(script, keys, args)

    def _closed_refusal(self, cause: BaseException | None) -> BudgetUnavailableError:
        detail = "" if cause is None else f" ({type(cause).__name__})"
        return BudgetUnavailableError(
            f"the shared budget on {self._store!r} is unreachable{detail} "
            "and on_unavailable='closed'"
        )

    # -- BudgetStore -------------------------------------------------------------------
    def _reserve(
        self, key: str, scope: str, tin: int, tout: int, cost: int, limits: BudgetLimits
    ) -> Reservation:
        cause: BaseException | None = None
        if self._usable():
            health = self._store.health
            epoch = health.epoch
            handle = uuid.uuid4().hex
            window_ms = _window_ms(limits.window)
            args = [
                _limit(limits.max_calls),
                _limit(limits.max_tokens),
                _limit(limits.max_cost_units),
                window_ms,
                tin,
                tout,
                cost,
                self._store.key_ttl_ms,
                handle,
            ]
            reply = self._attempt(self._reserve_script, self._keys(scope), args, epoch)
            if not isinstance(reply, _Unreached):
                health.succeeded(epoch)
                if reply[0] == 1:
                    held = _RedisReservation(key, scope, tin, tout, cost, handle)
                    held.bucket = int(reply[1])
                    held.window_ms = window_ms
                    return held
                _, kind, consumed, limit, asked = reply
                asked = None if int(asked) < 0 else int(asked)
                raise _refusal(text(kind), int(consumed), int(limit), asked, key, limits.window)
            cause = reply.error
        if self.on_unavailable == "closed":
            if cause is None:
                raise self._closed_refusal(None)
            raise self._closed_refusal(cause) from cause
        return self._reserve_here(key, scope, tin, tout, cost, limits)

    def _reserve_here(
        self, key: str, scope: str, tin: int, tout: int, cost: int, limits: BudgetLimits
    ) -> Reservation:
        """Fail open: count in this process, against the same limits (so a process cut off
        spends at most the limit, not without bound); the amounts join the shared
        counters when Redis answers again."""
        try:
            local = self._local._reserve(key, scope, tin, tout, cost, limits)
        except BudgetExceededError as refused:
            add_note(
                refused,
                "counted in this process only: the shared budget on Redis is unreachable "
                "and each process may spend up to the limit until it answers again",
            )
            raise
        self._local_windows[id(local)] = _window_ms(limits.window)
        return local

    def _settle(
        self, reservation: Reservation, tin: int, tout: int, cost: int, est: bool, refund: bool
    ) -> bool:
        flags = [1 if est else 0, 1 if refund else 0]
        ttl_ms = self._store.key_ttl_ms
        if not isinstance(reservation, _RedisReservation):
            # Reserved here during an outage: settle here, and owe Redis the result.
            local = self._local
            if not local._settle(reservation, tin, tout, cost, est, refund):
                return False
            window_ms = self._local_windows.pop(id(reservation), 0)
            calls = 0 if refund else 1
            args: list[Any] = [calls, tin, tout, cost, window_ms, ttl_ms, flags[0]]
            self._owe(self._record_script, self._keys(reservation.scope), args)
            return True
        if reservation.settled:
            return False
        reservation.settled = True
        args = [
            reservation.handle,
            tin - reservation.input_tokens,
            tout - reservation.output_tokens,
            cost - reservation.cost_units,
            *flags,
            reservation.bucket,
            reservation.window_ms,
            ttl_ms,
            tin + tout,
            cost,
        ]
        # Straight to Redis when it looks reachable, without first replaying what it is
        # owed: a settlement commutes with every other.
        keys = self._keys(reservation.scope)
        self._write(self._settle_script, keys, args, self._store.health.usable())
        return True

    def _record(
        self, scope: str, calls: int, tin: int, tout: int, cost: int, window: Window, est: bool
    ) -> None:
        window_ms = _window_ms(window)
        ttl_ms = self._store.key_ttl_ms
        args = [calls, tin, tout, cost, window_ms, ttl_ms, 1 if est else 0]
        self._write(self._record_script, self._keys(scope), args, self._usable())

    def tally(self, scope: str, *, window: float | None = None) -> Tally:
        """The shared counters of ``scope``; :class:`~callpolicy.redis.StoreUnavailableError`
        while Redis cannot be reached (what this process spent meanwhile is not there
        yet: a local figure would pass for the whole app's)."""
        with self._store._reaching(f"reading budget {scope!r}"):
            reply = self._tally_script(keys=self._keys(scope), args=[_window_ms(window)])
        # In TALLY's order: Tally's fields, the window's last (-1 without one).
        counts = [int(x) for x in reply]
        return Tally(*counts) if window is not None else Tally(*counts[:6])

    def scopes(self) -> Iterable[str]:
        prefix = f"{self._store.prefix}:budget:{{"
        found = set()
        with self._store._reaching("listing budgets"):
            for raw in self._store.client.scan_iter(match=f"{glob_escape(prefix)}*}}", count=500):
                found.add(text(raw)[len(prefix) : -1])
        return sorted(found)

    def reset(self, scope: str | None) -> None:
        scopes = list(self.scopes()) if scope is None else [scope]
        with self._store._reaching("resetting budgets"):
            for name in scopes:
                self._store.client.delete(*self._keys(name))
        self._local.reset(scope)

    def __repr__(self) -> str:
        return f"RedisBudgetStore({self._store!r}, on_unavailable={self.on_unavailable!r})"


class _Unreached:
    """What :meth:`RedisBudgetStore._attempt` returns when Redis could not be reached."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
