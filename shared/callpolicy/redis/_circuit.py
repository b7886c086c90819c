"""One circuit of a :class:`~callpolicy.redis.RedisStore`: its state in Redis, shared by
every process, read and changed by the Lua scripts of ``_scripts``.

Each admission and each recorded outcome is one script run (one round trip), atomic on
the server and timed by the server's clock. While Redis cannot be reached (the store's
link says so) the circuit goes on with local in-process state; once it answers again,
the shared state takes over.

The sync and async calls share every decision: what to send (``_admit_args``,
``_outcome_args``), what needs no round trip (``_settled_locally``), and what a reply
means (``_admitted``, ``_recorded``); each driver only makes the round trip, through
:meth:`RedisLink.run <._link.RedisLink.run>` or :meth:`~._link.RedisLink.arun`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

from .._config import BreakerConfig
from .._errors import CircuitOpenError
from .._store import Circuit, Permit, Transition, TransitionListener
from .._types import CircuitSnapshot, CircuitState, Outcome
from ._connection import StoreUnavailableError, text
from ._link import OUTAGE, RedisLink
from ._topology import one_slot

__all__ = ["RedisCircuit", "RedisPermit"]

logger = logging.getLogger("callpolicy.redis")

_OUTCOME_CODES = {Outcome.SUCCESS: "s", Outcome.FAILURE: "f", Outcome.IGNORED: "i"}
_STATES = {s.value: s for s in CircuitState}


def _new_permit_id() -> str:
    """A probe's lease id, unique across processes: 16 random bytes, as a uuid4 has,
    without building a UUID object on every admission (~5 us -> ~1 us)."""
    return os.urandom(16).hex()


class RedisPermit(Permit):
    __slots__ = ("clean", "permit_id")

    def __init__(self, generation: int, probe: bool, permit_id: str, clean: bool = False) -> None:
        super().__init__(generation, probe)
        self.permit_id = permit_id
        self.clean = clean
        """Admitted while closed with no failure on record: a success changes nothing."""


class RedisCircuit:
    """A circuit whose state lives in Redis; ``local`` serves while Redis is away."""

    is_async_native = True

    def __init__(
        self,
        link: RedisLink,
        local: Circuit,
        config: BreakerConfig,
        notify: TransitionListener,
        *,
        lease_ms: int,
        ttl_ms: int,
    ) -> None:
        key = local.key
        self.key = key
        self.provider = local.provider
        self.model = local.model
        self._link = link
        self._local = local
        self._config = config
        self._notify = notify
        base = f"{link.prefix}:cb:{{{key}}}"  # braces: one hash slot on a cluster
        self._keys = [base, f"{base}:probes", f"{base}:window"]
        if link.is_cluster and not one_slot(self._keys):
            raise ValueError(
                f"key: {key!r} with prefix {link.prefix!r} spreads a circuit over hash "
                "slots of a Redis Cluster (a key or prefix starting with '}' or holding "
                "'{}'): choose another"
            )
        self._ttl_ms = ttl_ms
        self._admit_tail = [config.half_open_max_calls, lease_ms, ttl_ms]
        self._record_args: list[Any] = [
            config.failure_threshold,
            int(config.cooldown * 1000),
            config.success_threshold,
            config.failure_rate_threshold or 0,
            config.window_size,
            config.minimum_calls,
            config.cooldown_multiplier,
            int(config.cooldown_cap * 1000),
            ttl_ms,
        ]
        self._clean_permit = RedisPermit(0, False, "", clean=True)
        # A success needs no round trip when the call was admitted closed with a clean
        # record (nothing to reset) and no failure-rate window needs the sample. Another
        # process's failure in between is then not reset by this success: across
        # processes "consecutive" is approximate anyway, and this halves the round trips.
        self._skip_clean_success = config.failure_rate_threshold is None

    # -- the decisions, shared by the sync and async calls ------------------------------
    def _admit_args(self, permit_id: str) -> list[Any]:
        return [*self._admit_tail, permit_id]

    def _admitted(self, reply: Any, permit_id: str) -> Permit:
        """The permit a reply of the admit script grants (or the refusal it raises); a
        local one when Redis could not be reached (:data:`OUTAGE`)."""
        if reply is OUTAGE:
            return self._local.admit()
        # 5 elements; a refusal adds a 6th, the trip's reason (see _scripts.ADMIT).
        decision, generation, failures, retry_in_ms, moved = reply[:5]
        moved = text(moved)
        if moved:
            self._tell(_STATES[moved], CircuitState.HALF_OPEN, failures, "cooldown_elapsed")
        if decision == 1:
            if failures:
                return RedisPermit(int(generation), False, "")
            if generation != self._clean_permit.generation:
                self._clean_permit = RedisPermit(int(generation), False, "", clean=True)
            return self._clean_permit
        if decision == 2:
            return RedisPermit(int(generation), True, permit_id)
        retry_in = None if retry_in_ms < 0 else retry_in_ms / 1000.0
        reason = text(reply[5]) if len(reply) > 5 else ""
        raise CircuitOpenError(
            self.provider, self.model, int(failures), retry_in, reason=reason or None
        )

    def _settled_locally(self, permit: Permit, outcome: Outcome) -> CircuitState | None:
        """The state after ``outcome`` when recording it needs no round trip; None when
        it does."""
        if not isinstance(permit, RedisPermit):  # admitted locally during an outage
            return self._local.record(permit, outcome)
        if permit.clean and outcome is Outcome.SUCCESS and self._skip_clean_success:
            return CircuitState.CLOSED
        return None

    def _outcome_args(self, permit: Permit, outcome: Outcome) -> list[Any]:
        permit_id = permit.permit_id if isinstance(permit, RedisPermit) else ""
        return [
            permit.generation,
            1 if permit.probe else 0,
            _OUTCOME_CODES[outcome],
            permit_id,
            *self._record_args,
        ]

    def _recorded(self, reply: Any) -> CircuitState:
        """The state a reply of the record script reports (and the transition it made);
        closed when Redis could not be reached (:data:`OUTAGE`): the outcome is lost to
        the shared state, and a probe's lease frees its slot when it ends."""
        if reply is OUTAGE:
            return CircuitState.CLOSED
        state, old, reason, failures, cooldown_ms = reply
        new = _STATES[text(state)]
        old_text = text(old)
        if old_text:
            cooldown = cooldown_ms / 1000.0 if new is CircuitState.OPEN else None
            self._tell(_STATES[old_text], new, failures, text(reason), cooldown)
        return new

    def _tell(
        self,
        old: CircuitState,
        new: CircuitState,
        failures: Any,
        reason: str,
        cooldown: float | None = None,
    ) -> None:
        transition = Transition(
            self.key, self.provider, self.model, old, new, int(failures), reason, cooldown
        )
        self._notify(transition)

    # -- the round trips ---------------------------------------------------------------
    def admit(self) -> Permit:
        if not self._link.health.usable():
            return self._local.admit()
        permit_id = _new_permit_id()
        reply = self._link.run("admit", self._keys, self._admit_args(permit_id))
        return self._admitted(reply, permit_id)

    def record(self, permit: Permit, outcome: Outcome) -> CircuitState:
        state = self._settled_locally(permit, outcome)
        if state is not None:
            return state
        reply = self._link.run("record", self._keys, self._outcome_args(permit, outcome))
        return self._recorded(reply)

    async def aadmit(self) -> Permit:
        link = self._link
        if not link.health.usable():
            return self._local.admit()
        permit_id = _new_permit_id()
        then = functools.partial(self._after_cancelled_admit, permit_id)
        reply = await link.arun("admit", self._keys, self._admit_args(permit_id), then)
        return self._admitted(reply, permit_id)

    async def arecord(self, permit: Permit, outcome: Outcome) -> CircuitState:
        state = self._settled_locally(permit, outcome)
        if state is not None:
            return state
        args = self._outcome_args(permit, outcome)
        # Cancelled: the transition the reply reports is still told, once it is in.
        reply = await self._link.arun("record", self._keys, args, self._recorded)
        return self._recorded(reply)

    def _after_cancelled_admit(self, permit_id: str, reply: Sequence[Any]) -> None:
        """The admission of a cancelled call is done: a probe lease it took is freed
        (recorded as ignored, as the policy records any cancelled call)."""
        try:
            permit = self._admitted(reply, permit_id)
        except CircuitOpenError:
            return
        if permit.probe:
            self._link.spawn(self._release(permit))

    async def _release(self, permit: Permit) -> None:
        """Free the lease of a cancelled call's probe (in the background: nobody awaits
        it, so a failure is logged here; the lease then ends on its own)."""
        try:
            await self.arecord(permit, Outcome.IGNORED)
        except Exception as exc:  # closed meanwhile, or refused
            logger.debug(
                "callpolicy: a cancelled probe's lease on %s was not freed: %r", self.key, exc
            )

    # -- inspection and control ------------------------------------------------------------
    def snapshot(self) -> CircuitSnapshot:
        """The shared state; this process's local state while Redis is unreachable."""
        try:
            return self.shared_snapshot()
        except StoreUnavailableError:
            return self._local.snapshot()

    def shared_snapshot(self) -> CircuitSnapshot:
        """The state in Redis; :class:`StoreUnavailableError` if it cannot be reached."""
        with self._link.reaching(f"reading circuit {self.key!r}"):
            reply = self._link.script("snapshot")(keys=self._keys, args=[])
        state, failures, retry_in_ms, trips, probes, hold, calls, bad, reason = reply
        state_value = _STATES[text(state)]
        opened_by = text(reason) or None
        return CircuitSnapshot(
            key=self.key,
            provider=self.provider,
            model=self.model,
            state=state_value,
            failures=int(failures),
            retry_in=None if retry_in_ms < 0 else retry_in_ms / 1000.0,
            trips=int(trips),
            probes_in_flight=int(probes),
            forced=state_value if hold else None,
            calls_in_window=int(calls),
            failures_in_window=int(bad),
            opened_by=None if state_value is CircuitState.CLOSED else opened_by,
        )

    def force(self, state: CircuitState | None, *, hold: bool) -> None:
        if state is CircuitState.HALF_OPEN:
            raise ValueError("state: cannot force a circuit to half_open")
        target = "open" if state is CircuitState.OPEN else "closed"
        cooldown_ms = 0 if hold else int(self._config.cooldown_for(1) * 1000)
        if hold and target == "open":
            cooldown_ms = 2**40  # held open: no probe until reset
        held = 1 if hold and state is not None else 0
        with self._link.reaching(f"forcing circuit {self.key!r} {target}"):
            reply = self._link.script("force")(
                keys=self._keys, args=[target, held, cooldown_ms, self._ttl_ms]
            )
        old, failures, _ = reply
        new = _STATES[target]
        if _STATES[text(old)] is not new:
            cooldown = None if new is CircuitState.CLOSED or hold else cooldown_ms / 1000.0
            self._tell(_STATES[text(old)], new, failures, "manual", cooldown)
