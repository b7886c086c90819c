"""Fixtures shared by every test directory."""

from __future__ import annotations

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
    """A real redis-server on 127.0.0.1 for the whole session (flushed per test by users)."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
