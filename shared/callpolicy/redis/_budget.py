"""Budget counters on Redis: one app-wide budget for every process.

Each reservation and each settlement is one Lua script run (one round trip), atomic on the
server, so concurrent processes never overspend. A rolling window is kept as 60 time
buckets per scope (its resolution is a sixtieth of the window), timed by the server's
clock. When Redis cannot be reached, ``on_unavailable`` decides: ``"open"`` (the default)
lets calls go on, counted in this process against the same limits (each process can
spend at most the limit while cut off), and adds what they used to the shared counters
when Redis answers again; ``"closed"`` refuses them with :class:`BudgetUnavailableError`.
A settlement that cannot reach Redis is queued and replayed, so no reservation is lost.
A refusal of credentials or permissions is no outage: it raises
:class:`~callpolicy.redis.StoreAccessError`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._budget_store import (
    COST_UNITS_PER_USD,
    BudgetExceededError,
    BudgetKind,
    BudgetLimits,
    MemoryBudgetStore,
    Reservation,
    Tally,
)
from ._connection import REFUSED, UNREACHABLE, StoreUnavailableError, glob_escape, text
from ._topology import one_slot

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = ["BudgetUnavailableError", "RedisBudgetStore"]

logger = logging.getLogger("callpolicy.redis")

_COUNTERS = """
local function window_sums(window)
  local width = math.ceil(window / 60)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local current = math.floor(now / width)
  local oldest = current - 60
  local sums = {0, 0, 0}
  for i, name in ipairs({KEYS[2], KEYS[3], KEYS[4]}) do
    local all = redis.call('HGETALL', name)
    for j = 1, #all, 2 do
      local b = tonumber(all[j])
      if b <= oldest then
        redis.call('HDEL', name, all[j])
      else
        sums[i] = sums[i] + tonumber(all[j + 1])
      end
    end
  end
  return sums, current, oldest
end
"""

# KEYS: counters, window calls, window tokens, window cost, pending set
# ARGV: max_calls, max_tokens, max_cost (-1: none), window_ms (0: none), in, out, cost,
#       ttl_ms, reservation id
# -> {1, bucket} or {0, kind, consumed, limit, requested (-1: none)}
RESERVE = (
    _COUNTERS
    + """
local c = redis.call('HMGET', KEYS[1], 'calls', 'in', 'out', 'cost')
local calls = tonumber(c[1] or '0')
local tokens = tonumber(c[2] or '0') + tonumber(c[3] or '0')
local cost = tonumber(c[4] or '0')
local window = tonumber(ARGV[4])
local bucket = 0
if window > 0 then
  local sums
  sums, bucket = window_sums(window)
  calls, tokens, cost = sums[1], sums[2], sums[3]
end
local want_tokens = tonumber(ARGV[5]) + tonumber(ARGV[6])
local want_cost = tonumber(ARGV[7])
local max_calls, max_tokens, max_cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if max_calls >= 0 and calls + 1 > max_calls then return {0, 'calls', calls, max_calls, -1} end
if max_tokens >= 0 and (tokens >= max_tokens or tokens + want_tokens > max_tokens) then
  local asked = -1
  if tokens < max_tokens then asked = want_tokens end
  return {0, 'tokens', tokens, max_tokens, asked}
end
if max_cost >= 0 and (cost >= max_cost or cost + want_cost > max_cost) then
  local asked = -1
  if cost < max_cost then asked = want_cost end
  return {0, 'cost', cost, max_cost, asked}
end
redis.call('HINCRBY', KEYS[1], 'calls', 1)
redis.call('HINCRBY', KEYS[1], 'in', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'out', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'cost', ARGV[7])
redis.call('SADD', KEYS[5], ARGV[9])
if window > 0 then
  redis.call('HINCRBY', KEYS[2], bucket, 1)
  redis.call('HINCRBY', KEYS[3], bucket, want_tokens)
  redis.call('HINCRBY', KEYS[4], bucket, want_cost)
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[8]) end
return {1, bucket}
"""
)

# KEYS: as RESERVE. ARGV: reservation id, d_in, d_out, d_cost, estimated, refund, bucket,
#       window_ms, ttl_ms, actual tokens, actual cost -> 1 settled, 0 already settled
SETTLE = (
    _COUNTERS
    + """
if redis.call('SREM', KEYS[5], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'in', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'out', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'cost', ARGV[4])
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[1], 'estimated', 1) end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[1], 'calls', -1) end
local window = tonumber(ARGV[8])
if window > 0 then
  local _, current, oldest = window_sums(window)
  local bucket = tonumber(ARGV[7])
  if bucket > oldest then
    redis.call('HINCRBY', KEYS[3], bucket, tonumber(ARGV[2]) + tonumber(ARGV[3]))
    redis.call('HINCRBY', KEYS[4], bucket, ARGV[4])
    if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[2], bucket, -1) end
  else
    redis.call('HINCRBY', KEYS[3], current, ARGV[10])
    redis.call('HINCRBY', KEYS[4], current, ARGV[11])
  end
end
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[9]) end
return 1
"""
)

# KEYS: as RESERVE. ARGV: calls, in, out, cost, window_ms, ttl_ms, estimated (1/0)
RECORD = (
    _COUNTERS
    + """
redis.call('HINCRBY', KEYS[1], 'calls', ARGV[1])
if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'estimated', 1) end
redis.call('HINCRBY', KEYS[1], 'in', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'out', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'cost', ARGV[4])
local window = tonumber(ARGV[5])
if window > 0 then
  local _, current = window_sums(window)
  redis.call('HINCRBY', KEYS[2], current, ARGV[1])
  redis.call('HINCRBY', KEYS[3], current, tonumber(ARGV[2]) + tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[4], current, ARGV[4])
end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
return 1
"""
)

# KEYS: as RESERVE. ARGV: window_ms -> {calls, in, out, cost, estimated, in flight, w calls,
#       w tokens, w cost}
TALLY = (
    _COUNTERS
    + """
local c = redis.call('HMGET', KEYS[1], 'calls', 'in', 'out', 'cost', 'estimated')
local out = {}
for i = 1, 5 do out[i] = tonumber(c[i] or '0') end
out[6] = redis.call('SCARD', KEYS[5])
local window = tonumber(ARGV[1])
if window > 0 then
  local sums = window_sums(window)
  out[7], out[8], out[9] = sums[1], sums[2], sums[3]
else
  out[7], out[8], out[9] = -1, -1, -1
end
return out
"""
)


class BudgetUnavailableError(StoreUnavailableError):
    """Raised instead of calling the model when the shared budget cannot be reached and
    the store was built with ``on_unavailable="closed"``."""


class _RedisReservation(Reservation):
    __slots__ = ("bucket", "window_ms")

    def __init__(
        self,
        key: str,
        scope: str,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        handle: str,
        bucket: int,
        window_ms: int,
    ) -> None:
        super().__init__(key, scope, input_tokens, output_tokens, cost_units, handle)
        self.bucket = bucket
        self.window_ms = window_ms


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _window_ms(window: float | None) -> int:
    return 0 if window is None else max(int(window * 1000), 60)


class RedisBudgetStore:
    """A :class:`~callpolicy.BudgetStore` on Redis; get one from ``RedisStore.budget_store()``.

    It uses that store's connections: it has no ``close()`` of its own, and once the store
    is closed its calls raise :class:`~callpolicy.redis.StoreClosedError`.

    >>> Budget(max_calls=1000, store=redis_store.budget_store())  # doctest: +SKIP
    """

    is_async_native = False  # redis-py sync client; one short round trip per decision

    def __init__(
        self,
        store: RedisStore,
        *,
        on_unavailable: Literal["open", "closed"] = "open",
    ) -> None:
        if on_unavailable not in ("open", "closed"):
            raise ValueError(f"on_unavailable: expected 'open' or 'closed', got {on_unavailable!r}")
        self._store = store
        self.on_unavailable = on_unavailable
        self._local = MemoryBudgetStore()
        self._local_windows: dict[int, int] = {}
        self._replay: deque[tuple[str, list[Any], list[str]]] = deque()
        self._replay_lock = threading.Lock()
        self._plain_keys = self._keys
        self._checked_scopes: set[str] = set()
        if store.is_cluster:
            self._keys = self._cluster_keys  # type: ignore[method-assign]
        client = store.client
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._record = client.register_script(RECORD)
        self._tally = client.register_script(TALLY)

    def _keys(self, scope: str) -> list[str]:
        """A scope's five keys, one hash tag (``{scope}``): one slot on a cluster."""
        base = f"{self._store.prefix}:budget:{{{scope}}}"
        return [base, f"{base}:wcalls", f"{base}:wtokens", f"{base}:wcost", f"{base}:pending"]

    def _cluster_keys(self, scope: str) -> list[str]:
        """:meth:`_keys`, checked once per scope to share one slot of the cluster."""
        keys = self._plain_keys(scope)
        if scope not in self._checked_scopes:
            if not one_slot(keys):
                raise ValueError(
                    f"scope: budget scope {scope!r} with prefix {self._store.prefix!r} "
                    "spreads its counters over hash slots of a Redis Cluster (a scope or "
                    "prefix starting with '}' or holding '{}'): choose another key"
                )
            self._checked_scopes.add(scope)
        return keys

    @property
    def _ttl_ms(self) -> int:
        return self._store.key_ttl_ms

    # -- reaching Redis ----------------------------------------------------------------
    def _usable(self) -> bool:
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
                kind, args, keys = self._replay[0]
                script = self._settle if kind == "settle" else self._record
                try:
                    script(keys=keys, args=args)
                except REFUSED as exc:
                    raise self._store._access_error(exc) from None
                except UNREACHABLE as exc:
                    health.failed(exc, epoch)
                    return
                self._replay.popleft()
            health.succeeded(epoch)

    def _unavailable(self, exc: BaseException, epoch: int) -> None:
        self._store.health.failed(exc, epoch)
        if self.on_unavailable == "closed":
            raise BudgetUnavailableError(
                f"the shared budget on {self._store!r} is unreachable "
                f"({type(exc).__name__}) and on_unavailable='closed'"
            ) from exc

    # -- BudgetStore -------------------------------------------------------------------
    def reserve(
        self,
        key: str,
        scope: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        limits: BudgetLimits,
    ) -> Reservation:
        health = self._store.health
        if self._usable():
            epoch = health.epoch
            handle = uuid.uuid4().hex
            window_ms = _window_ms(limits.window)
            try:
                reply: Sequence[Any] = self._reserve(
                    keys=self._keys(scope),
                    args=[
                        _limit(limits.max_calls),
                        _limit(limits.max_tokens),
                        _limit(limits.max_cost_units),
                        window_ms,
                        input_tokens,
                        output_tokens,
                        cost_units,
                        self._ttl_ms,
                        handle,
                    ],
                )
            except REFUSED as exc:  # before UNREACHABLE: some are ConnectionErrors
                raise self._store._access_error(exc) from None
            except UNREACHABLE as exc:
                self._unavailable(exc, epoch)
            else:
                health.succeeded(epoch)
                if reply[0] == 1:
                    return _RedisReservation(
                        key,
                        scope,
                        input_tokens,
                        output_tokens,
                        cost_units,
                        handle,
                        int(reply[1]),
                        window_ms,
                    )
                _, kind, consumed, limit, asked = reply
                raise _refusal(text(kind), int(consumed), int(limit), int(asked), key, limits)
        elif self.on_unavailable == "closed":
            raise BudgetUnavailableError(
                f"the shared budget on {self._store!r} is unreachable and on_unavailable='closed'"
            )
        # Fail open: count in this process, against the same limits (so a process cut
        # off spends at most the limit, not without bound); the amounts join the shared
        # counters when Redis answers again.
        try:
            local = self._local.reserve(
                key,
                scope,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_units=cost_units,
                limits=limits,
            )
        except BudgetExceededError as refusal:
            _note(
                refusal,
                "counted in this process only: the shared budget on Redis is unreachable "
                "and each process may spend up to the limit until it answers again",
            )
            raise
        self._local_windows[id(local)] = _window_ms(limits.window)
        return local

    def settle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        estimated: bool,
        refund_call: bool,
    ) -> bool:
        if not isinstance(reservation, _RedisReservation):
            # Reserved locally during an outage: settle there, and owe Redis the result.
            settled = self._local.settle(
                reservation,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_units=cost_units,
                estimated=estimated,
                refund_call=refund_call,
            )
            if settled:
                self._owe_record(
                    reservation.scope,
                    0 if refund_call else 1,
                    input_tokens,
                    output_tokens,
                    cost_units,
                    reservation,
                    estimated=estimated,
                )
            return settled
        if reservation.settled:
            return False
        reservation.settled = True
        args: list[Any] = [
            reservation.handle,
            input_tokens - reservation.input_tokens,
            output_tokens - reservation.output_tokens,
            cost_units - reservation.cost_units,
            1 if estimated else 0,
            1 if refund_call else 0,
            reservation.bucket,
            reservation.window_ms,
            self._ttl_ms,
            input_tokens + output_tokens,
            cost_units,
        ]
        keys = self._keys(reservation.scope)
        health = self._store.health
        if health.usable():
            epoch = health.epoch
            try:
                self._settle(keys=keys, args=args)
                return True
            except REFUSED as exc:
                with self._replay_lock:  # owed still, should access come back
                    self._replay.append(("settle", args, keys))
                raise self._store._access_error(exc) from None
            except UNREACHABLE as exc:
                health.failed(exc, epoch)
        with self._replay_lock:
            self._replay.append(("settle", args, keys))
        return True

    def _owe_record(
        self,
        scope: str,
        calls: int,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        reservation: Reservation,
        *,
        estimated: bool,
    ) -> None:
        window_ms = self._local_windows.pop(id(reservation), 0)
        args: list[Any] = [
            calls,
            input_tokens,
            output_tokens,
            cost_units,
            window_ms,
            self._ttl_ms,
            1 if estimated else 0,
        ]
        with self._replay_lock:
            self._replay.append(("record", args, self._keys(scope)))

    def record(
        self,
        scope: str,
        *,
        calls: int,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        window: float | None,
        estimated: bool = False,
    ) -> None:
        args: list[Any] = [
            calls,
            input_tokens,
            output_tokens,
            cost_units,
            _window_ms(window),
            self._ttl_ms,
            1 if estimated else 0,
        ]
        keys = self._keys(scope)
        if self._usable():
            health = self._store.health
            epoch = health.epoch
            try:
                self._record(keys=keys, args=args)
                return
            except REFUSED as exc:
                with self._replay_lock:
                    self._replay.append(("record", args, keys))
                raise self._store._access_error(exc) from None
            except UNREACHABLE as exc:
                health.failed(exc, epoch)
        with self._replay_lock:
            self._replay.append(("record", args, keys))

    def tally(self, scope: str, *, window: float | None = None) -> Tally:
        """The shared counters of ``scope``; :class:`~callpolicy.redis.StoreUnavailableError`
        while Redis cannot be reached (what this process spent meanwhile is not there
        yet: a local figure would pass for the whole app's)."""
        with self._store._reaching(f"reading budget {scope!r}"):
            reply = self._tally(keys=self._keys(scope), args=[_window_ms(window)])
        calls, tin, tout, cost, estimated, in_flight, wcalls, wtokens, wcost = (
            int(x) for x in reply
        )
        has_window = window is not None
        return Tally(
            calls=calls,
            input_tokens=tin,
            output_tokens=tout,
            cost_units=cost,
            estimated_calls=estimated,
            in_flight=in_flight,
            window_calls=wcalls if has_window else None,
            window_tokens=wtokens if has_window else None,
            window_cost_units=wcost if has_window else None,
        )

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

    async def areserve(
        self,
        key: str,
        scope: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        limits: BudgetLimits,
    ) -> Reservation:
        # One short loopback round trip; the sync client keeps one code path. A busy
        # event loop can wrap Budget calls in asyncio.to_thread if Redis is remote.
        return self.reserve(
            key,
            scope,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_units=cost_units,
            limits=limits,
        )

    async def asettle(
        self,
        reservation: Reservation,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_units: int,
        estimated: bool,
        refund_call: bool,
    ) -> bool:
        return self.settle(
            reservation,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_units=cost_units,
            estimated=estimated,
            refund_call=refund_call,
        )


def _note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+), or its equivalent before."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def _refusal(
    kind: str, consumed: int, limit: int, asked: int, key: str, limits: BudgetLimits
) -> BudgetExceededError:
    budget_kind: BudgetKind = (
        "calls" if kind == "calls" else "tokens" if kind == "tokens" else "cost"
    )
    if budget_kind == "cost":
        units = COST_UNITS_PER_USD
        return BudgetExceededError(
            "cost",
            consumed / units,
            limit / units,
            key=key,
            requested=None if asked < 0 else asked / units,
            window=limits.window,
        )
    return BudgetExceededError(
        budget_kind,
        consumed,
        limit,
        key=key,
        requested=None if asked < 0 else asked,
        window=limits.window,
    )
