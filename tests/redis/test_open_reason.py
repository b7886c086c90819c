"""RedisStore: ``CircuitOpenError`` says why the shared circuit is open.

The trip's reason is kept in the circuit's hash (field ``reason``) and returned by the
admit script with a refusal; a hash written before the field existed refuses with
``reason=None`` and the message of old. Time is the server's: cooldowns end by rewriting
``open_until`` in the hash, never by sleeping.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import pytest
import redis

from callpolicy import CallPolicy, CircuitOpenError, CircuitState
from tests.support.redis_server import MakeStore

KEY = "acme::m1"
PREFIX_OF_MESSAGE = "circuit open for acme/m1: "


class ServerError(Exception):
    """A provider's 500: a counted failure."""

    status_code = 500


def down() -> str:
    raise ServerError("500 internal server error")


def never() -> str:
    raise AssertionError("an open circuit called the model")


@pytest.fixture
def prefix() -> str:
    return f"reason-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Through ``execute`` (the sync script client) and ``aexecute`` (redis.asyncio)."""
    return str(request.param)


def _hash_key(prefix: str) -> str:
    return f"{prefix}:cb:{{{KEY}}}"


def _end_cooldown(client: redis.Redis, prefix: str) -> None:
    """Let the cooldown be over now, without waiting for it (time is the server's)."""
    client.hset(_hash_key(prefix), "open_until", 0)


def _policy(make_store: MakeStore, **options: object) -> CallPolicy:
    return CallPolicy(store=make_store(), **options)


async def _invoke(policy: CallPolicy, mode: str, call: Callable[[], str]) -> str:
    if mode == "sync":
        return policy.execute(KEY, call)

    async def acall() -> str:
        return call()

    return await policy.aexecute(KEY, acall)


async def _fail(policy: CallPolicy, mode: str) -> None:
    with pytest.raises(ServerError):
        await _invoke(policy, mode, down)


async def _ok(policy: CallPolicy, mode: str) -> None:
    assert await _invoke(policy, mode, lambda: "ok") == "ok"


async def _refusal(policy: CallPolicy, mode: str) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as refused:
        await _invoke(policy, mode, never)
    return refused.value


def _assert_message(error: CircuitOpenError, why: str, cooldown: float) -> None:
    """The message names ``why``, then the probe's time (server time: a few ms may pass)."""
    tail = r"; next probe in (\d+\.\d\d)s"
    found = re.fullmatch(re.escape(PREFIX_OF_MESSAGE + why) + tail, str(error))
    assert found is not None, str(error)
    assert 0 < float(found.group(1)) <= cooldown


async def test_consecutive_failures_give_the_threshold_reason(
    make_store: MakeStore, prefix: str, client: redis.Redis, mode: str
) -> None:
    policy = _policy(make_store, failure_threshold=2, cooldown=60)
    await _fail(policy, mode)
    await _fail(policy, mode)
    assert client.hget(_hash_key(prefix), "reason") == b"threshold"

    error = await _refusal(policy, mode)
    assert error.reason == "threshold"
    assert error.failures == 2
    _assert_message(error, "2 consecutive failures", 60)


async def test_the_failure_rate_window_gives_its_reason(
    make_store: MakeStore, prefix: str, client: redis.Redis, mode: str
) -> None:
    policy = _policy(
        make_store,
        failure_threshold=100,
        failure_rate_threshold=0.5,
        window_size=4,
        minimum_calls=4,
        cooldown=60,
    )
    for _ in range(2):  # ok, fail, ok, fail: never two failures in a row
        await _ok(policy, mode)
        await _fail(policy, mode)
    assert policy.state(KEY) is CircuitState.OPEN
    assert client.hget(_hash_key(prefix), "reason") == b"failure_rate"

    error = await _refusal(policy, mode)
    assert error.reason == "failure_rate"
    _assert_message(error, "failure rate over the window reached", 60)


async def test_a_failed_probe_gives_its_reason(
    make_store: MakeStore, prefix: str, client: redis.Redis, mode: str
) -> None:
    policy = _policy(make_store, failure_threshold=1, cooldown=60)
    await _fail(policy, mode)
    assert (await _refusal(policy, mode)).reason == "threshold"
    _end_cooldown(client, prefix)
    await _fail(policy, mode)  # the probe

    error = await _refusal(policy, mode)
    assert error.reason == "probe_failed"
    _assert_message(error, "the half-open probe failed", 60)


async def test_force_open_gives_the_manual_reason_and_reset_clears_it(
    make_store: MakeStore, prefix: str, client: redis.Redis, mode: str
) -> None:
    policy = _policy(make_store, failure_threshold=1, cooldown=60)
    policy.force_open(KEY)
    assert client.hget(_hash_key(prefix), "reason") == b"manual"

    error = await _refusal(policy, mode)
    assert error.reason == "manual"
    assert error.retry_in is None
    assert str(error) == PREFIX_OF_MESSAGE + "opened by hand (force_open); held until reset"

    policy.reset(KEY)
    assert client.hget(_hash_key(prefix), "reason") is None
    await _fail(policy, mode)
    error = await _refusal(policy, mode)
    assert error.reason == "threshold"
    _assert_message(error, "1 consecutive failures", 60)


async def test_a_store_forced_open_without_hold_names_the_manual_reason_and_the_probe(
    make_store: MakeStore, mode: str
) -> None:
    policy = _policy(make_store, cooldown=60)
    policy.circuit(KEY).force(CircuitState.OPEN, hold=False)

    error = await _refusal(policy, mode)
    assert error.reason == "manual"
    _assert_message(error, "opened by hand (force_open)", 60)


async def test_half_open_with_its_probe_in_flight_keeps_the_trip_reason(
    make_store: MakeStore, prefix: str, client: redis.Redis, mode: str
) -> None:
    policy = _policy(make_store, failure_threshold=1, cooldown=60)
    await _fail(policy, mode)
    _end_cooldown(client, prefix)
    probe = policy.circuit(KEY).admit()  # the probe, still in flight
    assert probe.probe

    error = await _refusal(policy, mode)
    assert error.reason == "threshold"
    assert error.retry_in == 0.0
    assert str(error) == PREFIX_OF_MESSAGE + "1 consecutive failures; half-open, probe in flight"


async def test_a_hash_written_without_the_reason_field_refuses_with_no_reason(
    make_store: MakeStore, prefix: str, client: redis.Redis, mode: str
) -> None:
    # What a store of an earlier version left: an open circuit with no reason field,
    # cooling down for another minute of the server's time.
    seconds, micros = client.time()
    open_until = seconds * 1000 + micros // 1000 + 60_000
    client.hset(
        _hash_key(prefix),
        mapping={"state": "open", "gen": 3, "failures": 4, "open_until": open_until, "ctrips": 1},
    )
    policy = _policy(make_store, failure_threshold=4, cooldown=60)

    error = await _refusal(policy, mode)
    assert error.reason is None
    assert error.failures == 4
    assert re.fullmatch(
        re.escape(PREFIX_OF_MESSAGE + "4 consecutive failures") + r"; next probe in \d+\.\d\ds",
        str(error),
    ), str(error)

    # ...and held open by an earlier version: the old "forced open" message.
    client.hset(_hash_key(prefix), "hold", 1)
    error = await _refusal(policy, mode)
    assert error.reason is None
    assert str(error) == PREFIX_OF_MESSAGE + "4 consecutive failures; forced open until reset"


def test_a_snapshot_and_the_status_view_still_read_a_hash_with_a_reason(
    make_store: MakeStore,
) -> None:
    store = make_store()
    policy = CallPolicy(store=store, failure_threshold=1, cooldown=60)
    with pytest.raises(ServerError):
        policy.execute(KEY, down)

    assert store.shared_keys() == [KEY]
    snapshot = store.circuit_for_key(KEY).snapshot()
    assert snapshot.state is CircuitState.OPEN
    assert snapshot.opened_by == "threshold"
    assert snapshot.failures == 1
    policy.reset(KEY)
    assert store.circuit_for_key(KEY).snapshot().opened_by is None
