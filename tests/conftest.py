"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.http_clients import HttpClients
from tests.support.openai_server import OpenAICompatServer
from tests.support.redis_server import RedisServer

# Warnings raised inside third-party code that our tests only drive; each filter names the
# package, the message and the module the warning is attributed to, so that anything else
# (and any such warning from our own code) still shows. A ``-W`` on the command line takes
# precedence over these, so ``pytest -W default`` still shows them all.
UPSTREAM_WARNINGS = [
    # llama-index-workflows: Workflow.__init__ -> workflows.utils.get_steps_from_instance
    # runs inspect.getmembers() over the agent, a pydantic model, which touches pydantic's
    # deprecated v1 attributes (attributed to inspect, pydantic's stacklevel=2). Every
    # FunctionAgent/ReActAgent run; nothing of ours reads them.
    r"ignore:The `__fields__` attribute is deprecated"
    r":pydantic.warnings.PydanticDeprecatedSince20:inspect",
    r"ignore:The `__fields_set__` attribute is deprecated"
    r":pydantic.warnings.PydanticDeprecatedSince20:inspect",
    r"ignore:Accessing the '(model_fields|model_computed_fields)' attribute on the instance"
    r":pydantic.warnings.PydanticDeprecatedSince211:inspect",
    # llama-index-core: ReActAgent reads ctx.is_running inside a step, which
    # llama-index-workflows deprecates (react_agent.py).
    r"ignore:is_running called from within a step"
    r":DeprecationWarning:llama_index.core.agent.workflow.react_agent",
]

# An exception in a thread (a worker outliving its test's event loop, say) fails the test
# it surfaces in, rather than scrolling by as a warning. (The one cause seen, llama-index's
# unclosed aiosqlite chat memory, is closed by the test that opens it.)
OUR_ERRORS = ["error::pytest.PytestUnhandledThreadExceptionWarning"]


def pytest_configure(config: pytest.Config) -> None:
    for line in [*UPSTREAM_WARNINGS, *OUR_ERRORS]:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture
def openai_server() -> Iterator[OpenAICompatServer]:
    """An OpenAI-compatible server on 127.0.0.1 (see tests/support/openai_server.py)."""
    with OpenAICompatServer() as server:
        yield server


@pytest.fixture
async def http_clients() -> AsyncIterator[HttpClients]:
    """httpx clients to give the SDK clients a test builds; closed when the test ends, in
    its event loop (see tests/support/http_clients.py)."""
    clients = HttpClients()
    try:
        yield clients
    finally:
        await clients.aclose()


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
