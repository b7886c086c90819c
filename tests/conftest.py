"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.openai_server import OpenAICompatServer
from tests.support.redis_server import RedisServer


@pytest.fixture
def openai_server() -> Iterator[OpenAICompatServer]:
    """An OpenAI-compatible server on 127.0.0.1 (see tests/support/openai_server.py)."""
    with OpenAICompatServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 for the whole session: the one .ci/run started
    (``CALLPOLICY_TEST_REDIS_URL``), else one of our own. Tests isolate by key prefix."""
    url = os.environ.get("CALLPOLICY_TEST_REDIS_URL")
    if url:
        yield RedisServer.existing(url)
        return
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
