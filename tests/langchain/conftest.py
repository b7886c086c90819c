"""Fixtures of the LangChain wrapper's tests."""

from __future__ import annotations

import pytest

from tests.langchain.fakes import Events
from tests.support.clock import FakeClock


def pytest_configure(config: pytest.Config) -> None:
    # langchain-tests marks a test with pytest-benchmark's marker; that plugin is off.
    config.addinivalue_line("markers", "benchmark: a benchmark (pytest-benchmark's marker)")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run a test through invoke and through ainvoke."""
    return str(request.param)
