"""``python -m callpolicy status --redis URL`` prints every shared circuit's state."""

from __future__ import annotations

import json
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
