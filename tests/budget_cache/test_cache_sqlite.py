"""The SQLite backend: survives reopening, serves a tool-calling answer equal to the
original, misses on a changed tool schema, bounds and TTL, unreadable rows, threads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from callpolicy._cache import ResponseCache
from callpolicy._cache_backend import CacheBackend
from callpolicy._cache_key import cache_key
from callpolicy._cache_sqlite import SQLiteCacheBackend
from tests.support.clock import FakeClock

TABLE = "callpolicy_cache_v1"


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    args: dict[str, Any]


@dataclasses.dataclass
class Answer:
    """A framework answer, as an adapter would encode and decode it."""

    content: str | list[dict[str, Any]]
    tool_calls: list[ToolCall]
    usage: dict[str, int]
    response_metadata: dict[str, Any]


def encode(answer: Answer) -> dict[str, Any]:
    return dataclasses.asdict(answer)


def decode(payload: dict[str, Any]) -> Answer:
    calls = [ToolCall(**call) for call in payload["tool_calls"]]
    return Answer(payload["content"], calls, payload["usage"], payload["response_metadata"])


TOOL_ANSWER = Answer(
    content=[{"type": "text", "text": "Let me look that up."}],
    tool_calls=[
        ToolCall("call_1", "get_weather", {"city": "Paris", "units": "metric"}),
        ToolCall("call_2", "get_time", {"tz": "Europe/Paris", "nested": {"a": [1, 2.5, None]}}),
    ],
    usage={"input_tokens": 120, "output_tokens": 42, "total_tokens": 162},
    response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "tool_calls", "id": "r-1"},
)


def request(city_type: str = "string") -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
        "tools": [
            {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": city_type}}},
            }
        ],
        "tool_choice": "auto",
        "temperature": 0,
    }


def test_sqlite_cache_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    key = cache_key(request())
    with SQLiteCacheBackend(path) as backend:
        cache = ResponseCache(backend=backend)
        value, status = cache.get_or_compute(key, lambda: TOOL_ANSWER, encode=encode, decode=decode)
        assert (value, status) == (TOOL_ANSWER, "miss")
    calls: list[int] = []

    def never() -> Answer:
        calls.append(1)
        raise AssertionError("the model must not be called on a hit")

    with SQLiteCacheBackend(path) as reopened:  # a new process, a restarted kernel
        cache = ResponseCache(backend=reopened)
        served, status = cache.get_or_compute(key, never, encode=encode, decode=decode)
        assert status == "hit"
        assert served == TOOL_ANSWER  # content, tool calls, usage and metadata, all equal
        assert served is not TOOL_ANSWER
        # A changed tool schema is another request: a miss.
        changed = cache_key(request(city_type="integer"))
        assert changed != key
        assert cache.get(changed) is None
    assert not calls


async def test_async_access_goes_through_a_thread(tmp_path: Path) -> None:
    backend = SQLiteCacheBackend(tmp_path / "a.sqlite")
    assert backend.is_async_native
    cache = ResponseCache(backend=backend)

    async def compute() -> Answer:
        await asyncio.sleep(0)
        return TOOL_ANSWER

    assert await cache.aget_or_compute("k", compute, encode=encode, decode=decode) == (
        TOOL_ANSWER,
        "miss",
    )
    assert await cache.aget_or_compute("k", compute, encode=encode, decode=decode) == (
        TOOL_ANSWER,
        "hit",
    )
    assert await cache.aset("k2", {"a": 1})
    assert await cache.aget("k2") == {"a": 1}
    await backend.adelete("k2")
    assert await backend.aget("k2") is None
    backend.close()


def test_wal_mode_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    SQLiteCacheBackend(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({TABLE})")]
    assert columns == ["key", "payload", "created", "expires", "size", "last_used"]
    with SQLiteCacheBackend(":memory:") as in_memory:
        assert isinstance(in_memory, CacheBackend)


def test_lru_by_entries_survives_reopening(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "lru.sqlite"
    with SQLiteCacheBackend(path, max_entries=3, clock=clock) as backend:
        for key in "abc":
            backend.set(key, "1", ttl=None)
        assert backend.get("a") == "1"  # same clock tick: LRU order still exact
    with SQLiteCacheBackend(path, max_entries=3, clock=clock) as backend:
        backend.set("d", "1", ttl=None)
        assert [backend.get(k) for k in "abcd"] == ["1", None, "1", "1"]
        assert len(backend) == 3


def test_lru_by_bytes(tmp_path: Path, clock: FakeClock) -> None:
    with SQLiteCacheBackend(tmp_path / "b.sqlite", max_bytes=30, clock=clock) as backend:
        for key in "abc":
            backend.set(key, "x" * 9, ttl=None)  # 10 bytes each
        backend.get("a")
        backend.set("d", "é" * 4, ttl=None)  # 9 bytes: b must go
        assert [backend.get(k) is not None for k in "abcd"] == [True, False, True, True]
        backend.set("huge", "x" * 100, ttl=None)
        assert backend.get("huge") is None
        assert len(backend) == 3


def test_ttl_uses_wall_clock_time_that_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "ttl.sqlite"
    with SQLiteCacheBackend(path, clock=clock) as backend:
        backend.set("short", "1", ttl=10)
        backend.set("long", "1", ttl=1000)
    clock.advance(11)
    with SQLiteCacheBackend(path, clock=clock) as backend:
        assert backend.get("short") is None
        assert backend.get("long") == "1"
        backend.set("other", "1", ttl=None)  # a write purges expired rows
    with sqlite3.connect(path) as db:
        keys = sorted(row[0] for row in db.execute(f"SELECT key FROM {TABLE}"))
    assert keys == ["long", "other"]


def test_a_corrupt_row_is_a_miss_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "corrupt.sqlite"
    backend = SQLiteCacheBackend(path)
    cache = ResponseCache(backend=backend)
    cache.set("json", {"a": 1})
    cache.set("utf8", {"a": 1})
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE {TABLE} SET payload = '{{\"v\": 1, \"payl' WHERE key = 'json'")
        db.execute(f"UPDATE {TABLE} SET payload = CAST(x'7bff' AS TEXT) WHERE key = 'utf8'")
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        assert cache.get("json") is None
        assert cache.get("utf8") is None
        value, status = cache.get_or_compute("utf8", lambda: {"a": 2}, encode=dict, decode=dict)
    assert (value, status) == ({"a": 2}, "miss")
    assert caplog.text.count("unreadable entry") == 2
    assert cache.get("json") is None  # deleted, not read again
    assert cache.get("utf8") == {"a": 2}  # replaced by the fresh answer
    backend.close()


def test_a_file_that_is_not_a_database_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(ValueError, match=r"path: .*notes\.txt.* not a usable SQLite cache"):
        SQLiteCacheBackend(path)


def test_threads_share_one_backend(tmp_path: Path) -> None:
    backend = SQLiteCacheBackend(tmp_path / "threads.sqlite", max_entries=50)
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for n in range(40):
                key = f"k{(index * 7 + n) % 60}"
                backend.set(key, f'{{"n": {n}}}', ttl=None)
                backend.get(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(backend) == 50
    backend.clear()
    assert len(backend) == 0
    backend.close()


def test_two_connections_to_one_file_see_each_other(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    first = SQLiteCacheBackend(path)
    second = SQLiteCacheBackend(path)
    first.set("k", '{"a": 1}', ttl=None)
    assert second.get("k") == '{"a": 1}'
    second.delete("k")
    assert first.get("k") is None
    first.close()
    second.close()
