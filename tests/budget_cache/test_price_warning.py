"""A price warning names the model really priced, and never claims a price it did not use."""

from __future__ import annotations

import logging

import pytest

from callpolicy import Budget, Usage


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_the_warning_names_the_price_table_entry_really_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = Budget(prices={"gpt-4o-mini": (0.15, 0.6)})
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        reservation = budget.reserve("openai::gpt-4o-mini", 0)
        budget.commit(reservation, Usage(1_000_000, 0), key="openai::backup")
    assert budget.usage().cost_usd == pytest.approx(0.15)
    [message] = warnings(caplog)
    assert "no price for 'openai::backup'" in message
    assert "priced as 'gpt-4o-mini' (0.15 / 0.6 USD per million" in message


def test_a_fallback_priced_as_two_primaries_in_turn_says_so_for_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = Budget(prices={"cheap": (1, 1), "openai::dear": (10, 10)})
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        for primary in ("acme::cheap", "openai::dear", "acme::cheap"):
            reservation = budget.reserve(primary, 0)
            budget.commit(reservation, Usage(1_000_000, 0), key="acme::backup")
    assert budget.usage().cost_usd == pytest.approx(1 + 10 + 1)
    assert [m.split("; ")[1] for m in warnings(caplog)] == [
        "priced as 'cheap' (1 / 1 USD per million input / output tokens)",
        "priced as 'openai::dear' (10 / 10 USD per million input / output tokens)",
    ]


def test_an_unpriced_stand_in_is_not_claimed_as_a_price(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = Budget(prices={"other": (1, 1)})  # tracked, no limit: neither model priced
    with caplog.at_level(logging.WARNING, logger="callpolicy"):
        reservation = budget.reserve("acme::primary", 0)
        budget.commit(reservation, Usage(1_000_000, 0), key="acme::backup")
    assert budget.usage().cost_usd == 0
    [message] = warnings(caplog)
    assert "no price for 'acme::backup'" in message
    assert "its cost is not counted" in message
    assert "priced as" not in message
