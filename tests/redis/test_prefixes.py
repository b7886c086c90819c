"""Prefixes are exact: a store whose prefix holds glob characters (``*``, ``?``, ``[``,
``]``, ``\\``) lists, clears and resets only its own keys, and finds them all."""

from __future__ import annotations

import uuid

import pytest
import redis

from callpolicy import Budget, CallPolicy, ResponseCache
from callpolicy.redis import RedisStore
from tests.support.redis_server import MakeStore

KEY = "acme::model-1"


def _fill(store: RedisStore, tag: str) -> tuple[Budget, ResponseCache]:
    """A tripped circuit, a per-key budget's counters and a cached answer under ``store``."""
    policy = CallPolicy(store=store, failure_threshold=1)

    def down() -> str:
        raise ConnectionError("connection refused")

    with pytest.raises(ConnectionError):
        policy.execute(f"{tag}::model", down)
    budget = Budget(per_key=True, store=store)
    budget.commit(budget.reserve(f"{tag}::model", 3), None)
    cache = ResponseCache(backend=store)
    cache.set(f"entry-{tag}", {"tag": tag})
    return budget, cache


# Each glob prefix beside a plain one its pattern would match (or that would hide it).
PAIRS = [
    ("t*", "tX"),
    ("q?", "qZ"),
    ("a[b]", "ab"),
    ("r[!x]", "ry"),
    ("back\\slash", "backslash"),
    ("x]y", "x]y-other"),
]


@pytest.mark.parametrize(("glob", "plain"), PAIRS)
def test_a_glob_prefix_lists_clears_and_resets_only_its_own_keys(
    make_store: MakeStore, client: redis.Redis, glob: str, plain: str
) -> None:
    run = uuid.uuid4().hex[:6]  # this test's own keys on the shared server
    glob, plain = f"{run}{glob}", f"{run}{plain}"
    glob_store, plain_store = make_store(prefix=glob), make_store(prefix=plain)
    glob_budget, glob_cache = _fill(glob_store, "g")
    plain_budget, plain_cache = _fill(plain_store, "p")

    assert glob_store.shared_keys() == ["g::model"]  # its own, and only its own
    assert plain_store.shared_keys() == ["p::model"]
    assert list(glob_budget.usages()) == ["g::model"]
    assert list(plain_budget.usages()) == ["p::model"]
    assert len(glob_cache.backend) == 1

    glob_cache.clear()
    glob_budget.reset()
    assert glob_cache.get("entry-g") is None
    assert list(glob_budget.usages()) == []
    # The other prefix's keys are all still there.
    assert plain_cache.get("entry-p") == {"tag": "p"}
    assert plain_budget.usage("p::model").calls == 1
    assert plain_store.shared_keys() == ["p::model"]
    assert all(
        name.decode().startswith(f"{plain}:") or name.decode().startswith(f"{glob}:cb:")
        for name in client.keys(f"{run}*")
    )
