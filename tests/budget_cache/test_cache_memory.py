"""The in-memory backend (LRU by entries and bytes, TTL) and the ResponseCache around it:
freshness, stale answers, unreadable entries, stats, bad options."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from callpolicy._cache import ResponseCache
from callpolicy._cache_backend import CacheBackend, MemoryCacheBackend
from callpolicy._errors import CircuitOpenError
from tests.support.clock import FakeClock

ANSWER = {"content": "Paris", "tool_calls": [], "usage": {"input_tokens": 5}}


def circuit_open() -> CircuitOpenError:
    return CircuitOpenError("acme", "m1", 5, 12.0)


# -- the backend -------------------------------------------------------------------------
def test_lru_by_entries(clock: FakeClock) -> None:
    backend = MemoryCacheBackend(max_entries=3, clock=clock)
    for key in "abc":
        backend.set(key, "1", ttl=None)
    assert backend.get("a") == "1"  # a is now the most recently used
    backend.set("d", "1", ttl=None)
    assert backend.keys() == ["c", "a", "d"]
    assert backend.get("b") is None
    assert len(backend) == 3


def test_lru_by_bytes(clock: FakeClock) -> None:
    backend = MemoryCacheBackend(max_bytes=30, clock=clock)
    backend.set("a", "x" * 9, ttl=None)  # 10 bytes charged (key + payload)
    backend.set("b", "x" * 9, ttl=None)
    backend.set("c", "x" * 9, ttl=None)
    assert backend.bytes_used == 30
    backend.get("a")
    backend.set("d", "é" * 4, ttl=None)  # 1 + 8 UTF-8 bytes: b must go
    assert backend.keys() == ["c", "a", "d"]
    assert backend.bytes_used == 29
    backend.set("e", "x" * 19, ttl=None)  # 20 bytes: c and a must go
    assert backend.keys() == ["d", "e"]
    backend.set("huge", "x" * 100, ttl=None)  # bigger than the bound: not stored
    assert backend.get("huge") is None
    assert backend.keys() == ["d", "e"]


def test_replacing_an_entry_recharges_its_size(clock: FakeClock) -> None:
    backend = MemoryCacheBackend(max_bytes=100, clock=clock)
    backend.set("a", "x" * 50, ttl=None)
    backend.set("a", "x" * 10, ttl=None)
    assert backend.bytes_used == 11
    backend.delete("a")
    backend.delete("missing")
    assert backend.bytes_used == 0


def test_ttl(clock: FakeClock) -> None:
    backend = MemoryCacheBackend(clock=clock)
    backend.set("a", "1", ttl=10)
    backend.set("b", "1", ttl=None)
    clock.advance(9.9)
    assert backend.get("a") == "1"
    clock.advance(0.1)
    assert backend.get("a") is None
    assert backend.get("b") == "1"
    assert backend.keys() == ["b"]  # the expired entry is gone, its bytes too
    assert backend.bytes_used == 2


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_entries": 0}, "max_entries"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"max_entries": True}, "max_entries"),
    ],
)
def test_backend_bounds_are_validated(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        MemoryCacheBackend(**options)


def test_memory_backend_implements_the_protocol() -> None:
    assert isinstance(MemoryCacheBackend(), CacheBackend)


# -- the cache: freshness and payloads --------------------------------------------------------
def test_get_set_returns_a_fresh_copy_each_time(clock: FakeClock) -> None:
    cache = ResponseCache(clock=clock)
    assert cache.get("k") is None
    assert cache.set("k", ANSWER)
    first = cache.get("k")
    assert first == ANSWER
    assert first is not None
    first["content"] = "mutated"
    assert cache.get("k") == ANSWER
    assert cache.stats().to_dict() == {
        "hits": 2,
        "misses": 1,
        "shared": 0,
        "stale": 0,
        "errors": 0,
        "unreadable": 0,
        "entries": 1,
    }


def test_ttl_of_the_cache(clock: FakeClock) -> None:
    cache = ResponseCache(ttl=timedelta(minutes=1), clock=clock)
    cache.set("k", ANSWER)
    clock.advance(59)
    assert cache.get("k") == ANSWER
    clock.advance(1)
    assert cache.get("k") is None
    assert cache.get_stale("k") is None  # not serving stale: the entry is gone
    assert len(cache.backend) == 0


def test_the_cache_bounds_its_default_backend() -> None:
    cache = ResponseCache(max_entries=2)
    for key in "abc":
        cache.set(key, ANSWER)
    assert cache.get("a") is None
    assert cache.stats().entries == 2


def test_not_json_is_not_cached(caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache()
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        assert not cache.set("k", {"when": object()})
        assert not cache.set("k", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert cache.get("k") is None
    assert "not JSON" in caplog.text


def test_an_unreadable_entry_is_a_miss_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryCacheBackend()
    cache = ResponseCache(backend=backend)
    bad = ["{not json", "[1, 2]", '{"v": 99, "payload": {}}', '{"v": 1, "expires": null}']
    for index, text in enumerate(bad):
        backend.set(f"k{index}", text, ttl=None)
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        for index in range(len(bad)):
            assert cache.get(f"k{index}") is None
    assert caplog.text.count("unreadable entry") == len(bad)
    assert len(backend) == 0  # removed
    assert cache.stats().unreadable == len(bad)


def test_an_entry_the_adapter_cannot_decode_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache()
    cache.set("k", {"content": "old format"})
    calls = []

    def decode(payload: dict[str, Any]) -> str:
        if "text" not in payload:
            raise KeyError("text")
        return str(payload["text"])

    def compute() -> str:
        calls.append(1)
        return "fresh"

    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        value, status = cache.get_or_compute(
            "k", compute, encode=lambda v: {"text": v}, decode=decode
        )
    assert (value, status, len(calls)) == ("fresh", "miss", 1)
    assert "unreadable entry" in caplog.text
    assert cache.get_or_compute("k", compute, encode=lambda v: {"text": v}, decode=decode) == (
        "fresh",
        "hit",
    )


def test_a_failing_backend_is_a_miss_not_a_failed_call(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(MemoryCacheBackend):
        def get(self, key: str) -> str | None:
            raise OSError("disk gone")

        def set(self, key: str, payload: str, *, ttl: float | None) -> None:
            raise OSError("disk gone")

    cache = ResponseCache(backend=Broken())
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        assert cache.get_or_compute("k", lambda: 1, encode=lambda v: {"v": v}, decode=dict) == (
            1,
            "miss",
        )
    assert "disk gone" in caplog.text


def test_errors_are_never_cached() -> None:
    cache = ResponseCache()
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("slow")
        return "ok"

    with pytest.raises(TimeoutError):
        cache.get_or_compute("k", flaky, encode=lambda v: {"v": v}, decode=lambda p: p["v"])
    assert cache.get("k") is None
    assert cache.get_or_compute("k", flaky, encode=lambda v: {"v": v}, decode=lambda p: p["v"]) == (
        "ok",
        "miss",
    )
    assert cache.stats().errors == 1


def test_an_answer_that_does_not_encode_is_returned_but_not_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = ResponseCache()

    def encode(value: object) -> dict[str, Any]:
        raise ValueError("cannot encode")

    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        assert cache.get_or_compute("k", lambda: "x", encode=encode, decode=dict) == ("x", "miss")
    assert len(cache.backend) == 0
    assert "encode failed" in caplog.text


def test_stored_envelope_is_plain_json(clock: FakeClock) -> None:
    backend = MemoryCacheBackend(clock=clock)
    cache = ResponseCache(backend=backend, ttl=10, clock=clock)
    cache.set("k", {"text": "héllo"})
    text = backend.get("k")
    assert text is not None
    assert "héllo" in text  # UTF-8, not \\u escapes
    assert json.loads(text) == {
        "v": 1,
        "created": clock.now,
        "expires": clock.now + 10,
        "payload": {"text": "héllo"},
    }


# -- stale answers while the circuit is open --------------------------------------------------
def _stale_cache(clock: FakeClock, **options: Any) -> ResponseCache:
    cache = ResponseCache(ttl=60, serve_stale_when_open=True, clock=clock, **options)
    cache.set("k", ANSWER)
    clock.advance(61)
    return cache


def _refused() -> dict[str, Any]:
    raise circuit_open()


def test_stale_answer_served_when_the_circuit_is_open(clock: FakeClock) -> None:
    cache = _stale_cache(clock)
    assert cache.get("k") is None  # expired for ordinary lookups
    assert cache.get_or_compute("k", _refused, encode=dict, decode=dict) == (ANSWER, "stale")
    assert cache.stats().stale == 1


async def test_stale_answer_served_async(clock: FakeClock) -> None:
    cache = _stale_cache(clock)

    async def refused() -> dict[str, Any]:
        raise circuit_open()

    assert await cache.aget_or_compute("k", refused, encode=dict, decode=dict) == (
        ANSWER,
        "stale",
    )
    assert await cache.aget_stale("k") == ANSWER


def test_stale_only_for_an_open_circuit(clock: FakeClock) -> None:
    cache = _stale_cache(clock)

    def fails() -> dict[str, Any]:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        cache.get_or_compute("k", fails, encode=dict, decode=dict)


def test_stale_is_off_by_default(clock: FakeClock) -> None:
    cache = ResponseCache(ttl=60, clock=clock)
    cache.set("k", ANSWER)
    clock.advance(61)
    with pytest.raises(CircuitOpenError):
        cache.get_or_compute("k", _refused, encode=dict, decode=dict)


def test_stale_answers_end_after_stale_ttl(clock: FakeClock) -> None:
    cache = _stale_cache(clock, stale_ttl=100)
    assert cache.get_stale("k") == ANSWER
    clock.advance(100)  # 161 s old: past ttl + stale_ttl
    assert cache.get_stale("k") is None
    with pytest.raises(CircuitOpenError):
        cache.get_or_compute("k", _refused, encode=dict, decode=dict)


def test_a_fresh_answer_replaces_a_stale_one(clock: FakeClock) -> None:
    cache = _stale_cache(clock)
    assert cache.get_or_compute("k", lambda: {"content": "Lyon"}, encode=dict, decode=dict) == (
        {"content": "Lyon"},
        "miss",
    )
    assert cache.get("k") == {"content": "Lyon"}


# -- options --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"stale_ttl": 0}, "stale_ttl"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_bytes": -5}, "max_bytes"),
        ({"serve_stale_when_open": "yes"}, "serve_stale_when_open"),
    ],
)
def test_bad_cache_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ResponseCache(**options)
    assert field in str(caught.value)
    assert "ResponseCache" in str(caught.value)


def test_bounds_belong_to_a_given_backend() -> None:
    with pytest.raises(TypeError, match="own bounds"):
        ResponseCache(backend=MemoryCacheBackend(), max_entries=5)
    with pytest.raises(TypeError, match="CacheBackend"):
        ResponseCache(backend=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        ResponseCache(clock=None)  # type: ignore[arg-type]


def test_clear_empties_and_zeroes() -> None:
    cache = ResponseCache()
    cache.set("k", ANSWER)
    cache.get("k")
    cache.clear()
    assert cache.stats().to_dict() == dict.fromkeys(
        ("hits", "misses", "shared", "stale", "errors", "unreadable", "entries"), 0
    )
    cache.set("k", ANSWER)
    cache.delete("k")
    assert cache.get("k") is None
