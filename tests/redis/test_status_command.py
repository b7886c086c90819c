"""``python -m callpolicy status --redis URL`` prints every shared circuit's state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest

from callpolicy import CallPolicy
from tests.support.redis_server import MakeStore, RedisServer


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callpolicy", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_lists_every_key_with_its_state(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    prefix = f"status-{uuid.uuid4().hex[:8]}"
    policy = CallPolicy(store=make_store(prefix=prefix), failure_threshold=1)

    def down() -> str:
        raise ConnectionError("connection refused")

    with pytest.raises(ConnectionError):
        policy.execute("openai::gpt-4o-mini", down)
    policy.execute("anthropic::claude", lambda: "ok")  # closed and clean: nothing stored
    with pytest.raises(ConnectionError):
        policy.execute("anthropic::claude", down)

    table = _status("--redis", redis_server.url, "--prefix", prefix)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1] for line in table.stdout.splitlines()[3:]}
    assert rows == {"anthropic::claude": "open", "openai::gpt-4o-mini": "open"}

    as_json = _status("--redis", redis_server.url, "--prefix", prefix, "--json")
    found = {item["key"]: item for item in json.loads(as_json.stdout)}
    assert found["openai::gpt-4o-mini"]["failures"] == 1
    assert found["openai::gpt-4o-mini"]["state"] == "open"


def test_status_reports_an_unreachable_redis_plainly() -> None:
    done = _status("--redis", "redis://127.0.0.1:1/0", "--timeout", "0.2")
    assert done.returncode == 1
    assert "cannot read redis://127.0.0.1:1/0" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_help_describes_the_command_and_shows_every_default() -> None:
    top = subprocess.run(
        [sys.executable, "-m", "callpolicy", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert top.returncode == 0
    assert "command-line tools" in top.stdout
    done = _status("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines by terminal width
    assert "Which circuits are listed" in text
    assert "A circuit that has only ever succeeded has nothing in Redis" in text
    for default in (
        "(default: redis://127.0.0.1:6379/0)",
        "(default: callpolicy)",
        "(default: 2.0)",
        "(default: False)",
    ):
        assert default in text, default


def test_status_lists_circuits_with_state_in_redis_and_rounds_its_figures(
    redis_server: RedisServer, make_store: MakeStore
) -> None:
    prefix = f"status-{uuid.uuid4().hex[:8]}"
    policy = CallPolicy(store=make_store(prefix=prefix), failure_threshold=1, cooldown=30)

    def down() -> str:
        raise ConnectionError("connection refused")

    policy.execute("acme::only-succeeds", lambda: "ok")  # nothing in Redis: not listed
    with pytest.raises(ConnectionError):
        policy.execute("acme::failed", down)
    policy.trip("acme::tripped")
    policy.reset("acme::tripped")  # forced closed: written, so listed (closed)

    found = {
        item["key"]: item
        for item in json.loads(
            _status("--redis", redis_server.url, "--prefix", prefix, "--json").stdout
        )
    }
    assert set(found) == {"acme::failed", "acme::tripped"}
    assert found["acme::tripped"]["state"] == "closed"
    retry_in = found["acme::failed"]["retry_in"]
    assert 0 < retry_in <= 30
    assert retry_in == round(retry_in, 3)
    table = _status("--redis", redis_server.url, "--prefix", prefix).stdout
    row = next(line for line in table.splitlines() if line.startswith("acme::failed"))
    assert re.search(r"\s\d+\.\ds\s", row), row  # "29.9s", not 29.995152729999916
