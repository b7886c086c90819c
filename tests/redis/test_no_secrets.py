"""No secret in any output: a Redis URL's password never appears in the status command's
messages, exceptions, log records, reprs or events."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from callpolicy import Budget, CallPolicy, Event, ResponseCache
from callpolicy._redact import redact
from callpolicy.redis import RedisStore, StoreAccessError, StoreUnavailableError
from tests.support.redis_server import MakeStore, RedisServer

KEY = "acme::model-1"
PASSWORD = "hunter2-Zq9x"


@pytest.fixture(scope="module")
def locked_server() -> Iterator[RedisServer]:
    server = RedisServer(requirepass=PASSWORD)
    try:
        yield server
    finally:
        server.stop()


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callpolicy", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "url",
    [
        f"redis://default:{PASSWORD}@127.0.0.1:1/0",  # unreachable
        f"redis://:{PASSWORD}@127.0.0.1:1/0",
        f"redis://127.0.0.1:1/0?password={PASSWORD}",
        f"redis://{PASSWORD}@127.0.0.1:1/0",  # a password where the user goes
    ],
)
def test_the_status_command_never_prints_the_password_of_an_unreachable_redis(url: str) -> None:
    done = _status("--redis", url, "--timeout", "0.2")
    assert done.returncode == 1
    assert "cannot read redis://" in done.stderr
    assert "127.0.0.1:1" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_the_status_command_never_prints_the_password_redis_refused(
    locked_server: RedisServer,
) -> None:
    wrong = "not-" + PASSWORD
    done = _status("--redis", locked_server.url_as("default", wrong))
    assert done.returncode == 1
    assert "refused access" in done.stderr
    assert wrong not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    ok = _status("--redis", locked_server.url, "--json")  # the right one: it reads
    assert ok.returncode == 0, ok.stderr
    assert PASSWORD not in ok.stdout + ok.stderr


def test_no_password_in_reprs_errors_logs_or_events(
    locked_server: RedisServer, make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def listener(event: Event) -> None:
        seen.append(repr(event))

    wrong = "not-" + PASSWORD
    refused = make_store(locked_server.url_as("app", wrong))
    good = make_store(locked_server.url, socket_timeout=0.2)
    with caplog.at_level(logging.DEBUG):
        policy = CallPolicy(store=refused, listeners=[listener], failure_threshold=1)
        with pytest.raises(StoreAccessError) as refusal:
            policy.execute(KEY, lambda: "ok")
        seen.append(str(refusal.value))
        seen.append(repr(refusal.value))
        cache = ResponseCache(backend=refused)
        cache.get_or_compute("k", lambda: {"a": 1}, encode=dict, decode=dict)  # a logged miss
        for store in (refused, good):
            seen += [repr(store), str(store.url), repr(store.budget_store())]
            seen += [repr(store.cache_backend()), repr(ResponseCache(backend=store))]
        # An outage of the good store (its server is stopped and started again).
        healthy = CallPolicy(store=good, listeners=[listener], failure_threshold=1)
        healthy.execute(KEY, lambda: "ok")
        locked_server.stop()
        try:
            healthy.execute(KEY, lambda: "ok")  # local state, a warning
            with pytest.raises(StoreUnavailableError) as down:
                Budget(store=good).usage()
            seen.append(str(down.value))
            asyncio.run(healthy.aexecute(KEY, _answer))
        finally:
            locked_server.start()
        healthy.execute(KEY, lambda: "ok")
    seen += [record.getMessage() for record in caplog.records]
    seen += [str(record.exc_info) for record in caplog.records if record.exc_info]
    assert any("unreachable" in text for text in seen)  # the outage was reported...
    assert any("refused access" in text for text in seen)
    for text in seen:  # ...and nothing carried either password
        assert PASSWORD not in text, text
        assert wrong not in text, text


async def _answer() -> str:
    return "ok"


def test_a_store_given_a_client_names_it_without_its_password(
    locked_server: RedisServer,
) -> None:
    client = locked_server.client()
    try:
        store = RedisStore(client, prefix="given")
        assert repr(store) == f"RedisStore('redis://:***@127.0.0.1:{locked_server.port}/0', " + (
            "prefix='given')"
        )
        store.close()
    finally:
        client.close()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://u:p@h:1/0", "redis://u:***@h:1/0"),
        ("rediss://:p@h", "rediss://:***@h"),
        ("unix://u:p@/tmp/redis.sock?db=0", "unix://u:***@/tmp/redis.sock?db=0"),
        ("redis://p@h", "redis://***@h"),
        ("redis://u:p@ss:w@rd@h/0", "redis://u:***@h/0"),
        ("redis://h/0?password=p&db=1", "redis://h/0?password=***&db=1"),
        ("see redis://u:p@h and redis://v:q@k", "see redis://u:***@h and redis://v:***@k"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("mail me@example.com", "mail me@example.com"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown
