"""Budget rules, one caller at a time: limits, the reference scenario, prices, windows,
per-key counters, unknown usage, streams, and bad input.

Windows pass by advancing the fake clock, never by sleeping.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from pydantic import ValidationError

from callpolicy._budget import (
    Budget,
    BudgetExceededError,
    BudgetUsage,
    MissingPriceError,
    Price,
    Usage,
    approx_tokens,
)
from callpolicy._budget_memory import MemoryBudgetStore
from callpolicy._budget_store import Reservation
from callpolicy._errors import CallPolicyError
from tests.support.clock import FakeClock

KEY = "acme::m1"


def spend(budget: Budget, key: str, estimate: int, used_in: int, used_out: int) -> None:
    budget.commit(budget.reserve(key, estimate), Usage(used_in, used_out))


# -- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_calls": 0}, "max_calls"),
        ({"max_calls": -1}, "max_calls"),
        ({"max_calls": True}, "max_calls"),
        ({"max_calls": 2.5}, "max_calls"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -100}, "max_tokens"),
        ({"max_cost_usd": 0, "prices": {"m1": (1, 1)}}, "max_cost_usd"),
        ({"max_cost_usd": -5.0, "prices": {"m1": (1, 1)}}, "max_cost_usd"),
        ({"max_cost_usd": float("nan"), "prices": {"m1": (1, 1)}}, "max_cost_usd"),
        ({"window": 0}, "window"),
        ({"window": -60}, "window"),
        ({"window": True}, "window"),
        ({"prices": {"m1": (1.0, -0.5)}}, "output_per_million"),
        ({"prices": {"m1": (-1.0, 0.5)}}, "input_per_million"),
        ({"prices": {"m1": (1.0, 2.0, 3.0)}}, "prices"),
        ({"prices": {"": (1.0, 2.0)}}, "prices"),
        ({"prices": [("m1", 1.0)]}, "prices"),
        ({"per_key": "yes"}, "per_key"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Budget(**options)  # type: ignore[arg-type]
    assert field in str(caught.value)
    assert "Budget" in str(caught.value)


def test_a_cost_limit_without_prices_is_refused_at_construction() -> None:
    with pytest.raises(ValidationError, match="max_cost_usd needs prices"):
        Budget(max_cost_usd=5.0)


def test_an_unknown_model_is_refused_before_the_call_when_cost_is_limited() -> None:
    budget = Budget(max_cost_usd=1.0, prices={"gpt-4o-mini": (0.15, 0.60)})
    with pytest.raises(MissingPriceError, match="'gpt-4o'") as caught:
        budget.require_price("openai::gpt-4o")
    assert caught.value.model == "gpt-4o"
    assert "gpt-4o-mini" in str(caught.value)  # lists what is priced
    with pytest.raises(MissingPriceError):
        budget.reserve("openai::gpt-4o", 10)
    assert budget.usage().calls == 0  # nothing was counted
    assert isinstance(caught.value, CallPolicyError)
    assert isinstance(caught.value, LookupError)


def test_other_bad_arguments() -> None:
    with pytest.raises(TypeError, match="store"):
        Budget(store=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="estimate_tokens"):
        Budget(estimate_tokens=3)  # type: ignore[arg-type]
    budget = Budget()
    with pytest.raises(ValueError, match="estimated tokens"):
        budget.reserve(KEY, -1)
    with pytest.raises(ValueError, match="calls"):
        budget.record(KEY, Usage(), calls=-1)
    with pytest.raises(ValueError, match="input_tokens"):
        Usage(input_tokens=-3)
    with pytest.raises(ValueError, match="output_tokens"):
        Usage(output_tokens=True)


def test_timedelta_window_and_price_forms() -> None:
    budget = Budget(
        window=timedelta(hours=1),
        prices={"m1": Price(input_per_million=1, output_per_million=2), "m2": [3, 4]},
    )
    assert budget.window == 3600.0
    assert budget.price_for("acme::m2") == Price(input_per_million=3, output_per_million=4)


# -- the reference crate's scenario, and the limits ---------------------------------
def test_reference_scenario_120_token_limit_100_tokens_per_call() -> None:
    budget = Budget(max_tokens=120)
    prompt = "hi"  # ~0 tokens by bytes/4
    spend(budget, KEY, budget.estimate(prompt), 40, 60)
    # 2nd call: 100 used < 120, and 100 + the estimate of "hi" fits: allowed.
    spend(budget, KEY, budget.estimate(prompt), 40, 60)
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY, budget.estimate(prompt))
    refusal = caught.value
    assert (refusal.kind, refusal.consumed, refusal.limit) == ("tokens", 200, 120)
    assert refusal.key == KEY
    assert budget.usage().calls == 2  # the refused call was not counted


def test_token_preflight_counts_the_estimate_of_this_request() -> None:
    budget = Budget(max_tokens=120)
    spend(budget, KEY, 0, 50, 50)  # 100 used
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY, budget.estimate("x" * 100))  # ~25 tokens: 125 > 120
    assert caught.value.requested == 25
    assert "needs ~25 more" in str(caught.value)
    budget.reserve(KEY, 20)  # exactly to the limit: allowed


def test_call_limit_counts_failed_calls_as_the_reference() -> None:
    budget = Budget(max_calls=2)
    budget.release(budget.reserve(KEY))  # a failed call still used a round
    budget.commit(budget.reserve(KEY), None)
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY)
    assert (caught.value.kind, caught.value.consumed, caught.value.limit) == ("calls", 2, 2)
    assert budget.usage().remaining_calls == 0


def test_refund_call_for_a_call_that_reached_no_model() -> None:
    budget = Budget(max_calls=1)
    budget.release(budget.reserve(KEY), refund_call=True)
    budget.reserve(KEY)  # the refunded round is available again
    assert budget.usage().calls == 1


def test_cost_limit_from_prices() -> None:
    budget = Budget(max_cost_usd=0.01, prices={"m1": (2.5, 10.0)})
    spend(budget, KEY, 100, 1000, 500)  # 1000 * 2.5e-6 + 500 * 1e-5 = 0.0075
    assert budget.usage().cost_usd == pytest.approx(0.0075)
    # The estimate of 1000 input tokens costs 0.0025: 0.0075 + 0.0025 = 0.01 fits exactly.
    reservation = budget.reserve(KEY, 1000)
    budget.commit(reservation, Usage(1000, 1))
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY, 0)
    assert caught.value.kind == "cost"
    assert caught.value.consumed == pytest.approx(0.01001)
    assert caught.value.limit == 0.01
    assert caught.value.requested is None  # the limit was already used up
    assert "$0.01" in str(caught.value)


def test_cost_preflight_refuses_when_the_input_estimate_would_pass_the_limit() -> None:
    budget = Budget(max_cost_usd=0.001, prices={"m1": (1.0, 0.0)})
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY, 1001)  # $0.001001 > $0.001
    assert caught.value.kind == "cost"
    assert caught.value.requested == pytest.approx(0.001001)
    budget.reserve(KEY, 1000)


def test_estimated_output_tokens_hold_room_for_the_answer() -> None:
    budget = Budget(max_tokens=1000)
    budget.reserve(KEY, 100, estimated_output_tokens=800)
    with pytest.raises(BudgetExceededError):
        budget.reserve(KEY, 50, estimated_output_tokens=100)
    assert budget.usage().output_tokens == 800


def test_price_math_in_usage_and_price() -> None:
    price = Price(input_per_million=0.15, output_per_million=0.60)
    assert price.cost_usd(1_000_000, 1_000_000) == pytest.approx(0.75)
    assert price.cost_usd(1, 0) == pytest.approx(1.5e-7)
    budget = Budget(prices={"gpt-4o-mini": (0.15, 0.60), "openai::gpt-4o-mini": (0.3, 1.2)})
    spend(budget, "azure::gpt-4o-mini", 0, 1_000_000, 0)  # by model name: $0.15
    spend(budget, "openai::gpt-4o-mini", 0, 1_000_000, 0)  # the exact key wins: $0.30
    assert budget.usage().cost_usd == pytest.approx(0.45)


def test_cost_is_exact_over_many_small_calls() -> None:
    budget = Budget(prices={"m1": (0.1, 0.3)})
    for _ in range(10_000):
        spend(budget, KEY, 0, 7, 3)
    # 10 000 * (7 * 0.1 + 3 * 0.3) / 1e6 = 0.016, with no float drift along the way.
    assert budget.usage().cost_usd == 0.016


def test_commit_prices_the_model_that_answered() -> None:
    budget = Budget(max_cost_usd=10, prices={"primary": (1.0, 1.0), "backup": (10.0, 10.0)})
    reservation = budget.reserve("p::primary", 0)
    budget.commit(reservation, Usage(1_000_000, 0), key="q::backup")
    assert budget.usage().cost_usd == pytest.approx(10.0)


def test_commit_never_raises_for_an_unpriced_answering_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = Budget(max_cost_usd=10, prices={"primary": (1.0, 1.0)})
    reservation = budget.reserve("p::primary", 0)
    with caplog.at_level("WARNING", logger="callpolicy"):
        assert budget.commit(reservation, Usage(1_000_000, 0), key="q::unknown")
    assert budget.usage().cost_usd == pytest.approx(1.0)  # priced as the primary
    assert "q::unknown" in caplog.text


def test_unpriced_model_without_a_cost_limit_is_tracked_at_zero_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = Budget(prices={"m1": (1.0, 1.0)})
    with caplog.at_level("WARNING", logger="callpolicy"):
        spend(budget, "acme::other", 0, 1000, 1000)
        spend(budget, "acme::other", 0, 1000, 1000)
    assert budget.usage().cost_usd == 0.0
    assert budget.usage().tokens == 4000
    assert caplog.text.count("acme::other") == 1  # warned once


# -- settlement ---------------------------------------------------------------------
def test_commit_replaces_the_estimate_with_the_reported_usage() -> None:
    budget = Budget(max_tokens=10_000)
    reservation = budget.reserve(KEY, 500)
    during = budget.usage()
    assert (during.input_tokens, during.in_flight) == (500, 1)
    assert budget.commit(reservation, Usage(input_tokens=420, output_tokens=80))
    after = budget.usage()
    assert (after.input_tokens, after.output_tokens, after.in_flight) == (420, 80, 0)
    assert after.estimated_calls == 0


def test_unknown_usage_is_counted_by_its_estimate_and_says_so() -> None:
    budget = Budget(prices={"m1": (1.0, 0.0)})
    budget.commit(budget.reserve(KEY, 300), None)
    budget.commit(budget.reserve(KEY, 10), Usage(10, 5, estimated=True))
    budget.commit(budget.reserve(KEY, 10), Usage(10, 5))
    usage = budget.usage()
    assert usage.estimated_calls == 2
    assert usage.input_tokens == 320
    assert usage.cost_usd == pytest.approx(320e-6)


def test_release_frees_the_estimate_but_keeps_the_call() -> None:
    budget = Budget(max_tokens=100, prices={"m1": (1.0, 1.0)})
    budget.release(budget.reserve(KEY, 90))
    usage = budget.usage()
    assert (usage.calls, usage.tokens, usage.cost_usd, usage.in_flight) == (1, 0, 0.0, 0)
    budget.reserve(KEY, 100)


def test_settling_twice_changes_nothing() -> None:
    budget = Budget()
    reservation = budget.reserve(KEY, 10)
    assert budget.commit(reservation, Usage(10, 10))
    assert not budget.commit(reservation, Usage(1000, 1000))
    assert not budget.release(reservation, refund_call=True)
    usage = budget.usage()
    assert (usage.calls, usage.tokens, usage.in_flight) == (1, 20, 0)


def test_a_reservation_from_another_kind_of_store_is_refused() -> None:
    budget = Budget()
    foreign = Reservation(KEY, "*", 0, 0, 0, handle="id-from-a-server-store")
    with pytest.raises(TypeError, match="reservation"):
        budget.commit(foreign, None)


# -- windows, keys, streams, reports -------------------------------------------------
def test_rolling_window_lets_spend_fall_out(clock: FakeClock) -> None:
    budget = Budget(max_calls=3, window=60, clock=clock)
    for _ in range(3):
        budget.commit(budget.reserve(KEY), Usage(1, 1))
        clock.advance(10)  # calls at t=0, 10, 20
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY)  # t=30: three calls in the last 60 s
    assert caught.value.window == 60
    assert "in the last 60s" in str(caught.value)
    clock.advance(30)  # t=60: the call at t=0 falls out
    budget.reserve(KEY)
    with pytest.raises(BudgetExceededError):
        budget.reserve(KEY)
    usage = budget.usage()
    assert (usage.calls, usage.window_calls, usage.remaining_calls) == (4, 3, 0)
    clock.advance(3600)
    usage = budget.usage()
    assert (usage.calls, usage.window_calls, usage.remaining_calls) == (4, 0, 3)


def test_rolling_window_for_tokens_and_cost(clock: FakeClock) -> None:
    budget = Budget(
        max_tokens=1000, max_cost_usd=1.0, prices={"m1": (100.0, 100.0)}, window=60, clock=clock
    )
    spend(budget, KEY, 0, 500, 400)  # 900 tokens, $0.09
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve(KEY, 200)
    assert caught.value.kind == "tokens"
    clock.advance(61)
    budget.reserve(KEY, 200)
    usage = budget.usage()
    assert usage.window_tokens == 200
    assert usage.tokens == 1100
    assert usage.window_cost_usd == pytest.approx(0.02)


def test_a_commit_within_the_window_corrects_the_windowed_amounts(clock: FakeClock) -> None:
    budget = Budget(max_tokens=100, window=60, clock=clock)
    reservation = budget.reserve(KEY, 10)
    clock.advance(5)
    budget.commit(reservation, Usage(60, 30))
    assert budget.usage().window_tokens == 90
    with pytest.raises(BudgetExceededError):
        budget.reserve(KEY, 11)


def test_a_call_longer_than_the_window_counts_when_it_ends(clock: FakeClock) -> None:
    budget = Budget(max_tokens=100, window=60, clock=clock)
    reservation = budget.reserve(KEY, 10)
    clock.advance(120)
    assert budget.usage().window_tokens == 0
    budget.commit(reservation, Usage(70, 20))
    assert budget.usage().window_tokens == 90
    assert budget.usage().tokens == 90


def test_per_key_counters_are_separate(clock: FakeClock) -> None:
    budget = Budget(max_calls=1, per_key=True, clock=clock)
    budget.reserve("a::m1")
    budget.reserve("b::m2")  # its own counter
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve("a::m1")
    assert caught.value.key == "a::m1"
    assert budget.usage("a::m1").calls == 1
    assert budget.usage("b::m2").key == "b::m2"
    assert set(budget.usages()) == {"a::m1", "b::m2"}
    with pytest.raises(ValueError, match="per_key"):
        budget.usage()
    budget.reset("a::m1")
    budget.reserve("a::m1")
    with pytest.raises(BudgetExceededError):
        budget.reserve("b::m2")


def test_shared_counters_span_keys() -> None:
    budget = Budget(max_calls=2)
    budget.reserve("a::m1")
    budget.reserve("b::m2")
    with pytest.raises(BudgetExceededError) as caught:
        budget.reserve("c::m3")
    assert caught.value.key == "c::m3"
    assert budget.usage("ignored::key").calls == 2
    assert list(budget.usages()) == ["*"]
    budget.reset()
    assert budget.usage().calls == 0


def test_stream_usage_is_recorded_without_a_check(clock: FakeClock) -> None:
    budget = Budget(max_tokens=100, prices={"m1": (1.0, 2.0)}, window=60, clock=clock)
    budget.record(KEY, Usage(), calls=1)  # the stream starts
    for chunk in (Usage(80, 0), Usage(0, 30), Usage(0, 10)):  # usage as chunks report it
        budget.record(KEY, chunk)
    usage = budget.usage()
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (1, 80, 40)
    assert (usage.window_calls, usage.window_tokens) == (1, 120)
    assert usage.cost_usd == pytest.approx(160e-6)
    with pytest.raises(BudgetExceededError):  # streams spent it: the next call is refused
        budget.reserve(KEY)


def test_an_estimated_stream_record_counts_among_estimated_calls() -> None:
    budget = Budget()
    budget.record(KEY, Usage(), calls=1)  # a stream starts, reporting nothing
    budget.record(KEY, Usage(input_tokens=40, estimated=True))  # its end: an estimate
    budget.record(KEY, Usage(3, 4), calls=1)  # another stream, which reported
    usage = budget.usage()
    assert (usage.calls, usage.input_tokens, usage.estimated_calls) == (2, 43, 1)


def test_stream_records_without_a_window_keep_no_entries() -> None:
    store = MemoryBudgetStore()
    budget = Budget(store=store)
    for _ in range(1000):
        budget.record(KEY, Usage(1, 1))
    assert not store._scopes["*"].entries  # nothing to expire, nothing kept
    assert budget.usage().tokens == 2000


def test_usage_report_is_json_able() -> None:
    budget = Budget(max_calls=10, max_tokens=1000, max_cost_usd=1.0, prices={"m1": (1, 1)})
    spend(budget, KEY, 10, 100, 50)
    report = budget.usage()
    assert isinstance(report, BudgetUsage)
    data = report.to_dict()
    assert data == {
        "key": None,
        "calls": 1,
        "input_tokens": 100,
        "output_tokens": 50,
        "tokens": 150,
        "cost_usd": pytest.approx(150e-6),
        "estimated_calls": 0,
        "in_flight": 0,
        "window": None,
        "window_calls": None,
        "window_tokens": None,
        "window_cost_usd": None,
        "max_calls": 10,
        "max_tokens": 1000,
        "max_cost_usd": 1.0,
        "remaining_calls": 9,
        "remaining_tokens": 850,
        "remaining_cost_usd": pytest.approx(1.0 - 150e-6),
    }
    assert "max_calls=10" in repr(budget)


def test_remaining_never_goes_negative() -> None:
    budget = Budget(max_tokens=100)
    spend(budget, KEY, 0, 500, 500)  # the answer was longer than the room left
    assert budget.usage().remaining_tokens == 0


# -- the error, usage parsing, the estimate -------------------------------------------
def test_budget_error_is_copyable_with_its_fields() -> None:
    error = BudgetExceededError("cost", 1.5, 1.0, key=KEY, requested=0.2, window=3600.0)
    for clone in (copy.copy(error), copy.deepcopy(error)):
        assert isinstance(clone, BudgetExceededError)
        assert (clone.kind, clone.consumed, clone.limit) == ("cost", 1.5, 1.0)
        assert (clone.key, clone.requested, clone.window) == (KEY, 0.2, 3600.0)
        assert str(clone) == str(error)
    missing = copy.deepcopy(MissingPriceError(KEY))
    assert missing.model == "m1"


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}, Usage(10, 5)),
        ({"prompt_tokens": 7, "completion_tokens": 3}, Usage(7, 3)),
        ({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}, Usage(7, 3)),
        ({"raw": 1, "usage_metadata": {"input_tokens": 2}}, Usage(2, 0)),
        ({"token_usage": {"prompt_tokens": 1, "completion_tokens": 1}}, Usage(1, 1)),
        ({"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 6}}, Usage(4, 6)),
        (
            {"input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 1},
            Usage(105, 1),
        ),
        ({"model": "m1"}, None),
        ({"usage": None}, None),
        ({"input_tokens": "12"}, None),
        (None, None),
        ("text", None),
    ],
)
def test_usage_from_report(report: object, expected: Usage | None) -> None:
    assert Usage.from_report(report) == expected


def test_usage_from_an_object_with_attributes() -> None:
    class OpenAIUsage:
        prompt_tokens = 11
        completion_tokens = 22

    class Completion:
        usage = OpenAIUsage()

    assert Usage.from_report(Completion()) == Usage(11, 22)
    assert Usage(1, 2) + Usage(3, 4, estimated=True) == Usage(4, 6, estimated=True)


def test_estimate_is_bytes_over_four() -> None:
    assert approx_tokens("") == 0
    assert approx_tokens("abcdefgh") == 2
    assert approx_tokens("é" * 4) == 2  # 8 UTF-8 bytes
    budget = Budget(estimate_tokens=lambda text: len(text.split()))
    assert budget.estimate("three little words") == 3


# -- async variants -----------------------------------------------------------------
async def test_async_variants_share_the_counters() -> None:
    budget = Budget(max_calls=2)
    assert not budget.is_async_native
    first = await budget.areserve(KEY, 5)
    assert await budget.acommit(first, Usage(5, 5))
    second = await budget.areserve(KEY, 5)
    assert await budget.arelease(second)
    assert not await budget.arelease(second)
    with pytest.raises(BudgetExceededError):
        await budget.areserve(KEY)
    assert budget.usage().tokens == 10
