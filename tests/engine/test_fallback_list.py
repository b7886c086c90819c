"""A list of fallbacks (``Fallbacks``): tried in order, each under its own circuit; an
open one skipped without a call; ``AllModelsFailedError`` naming every model tried."""

from __future__ import annotations

import pytest

from callpolicy import (
    AllModelsFailedError,
    Budget,
    CallPolicy,
    CallRequest,
    CircuitOpenError,
    CircuitState,
    EventKind,
    Fallbacks,
)

KEY, B, C = "acme::m1", "backup::m2", "spare::m3"


class ServerError(Exception):
    status_code = 503


class BadRequest(Exception):
    status_code = 400


class Model:
    def __init__(self, answer: str = "ok", error: type[BaseException] | None = None) -> None:
        self.answer, self.error, self.calls = answer, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error("the message carries request data: secret-prompt")
        return self.answer

    async def acall(self) -> str:
        return self()


async def run(
    policy: CallPolicy, primary: Model, steps: list[tuple[str | None, Model]], mode: str
) -> str:
    if mode == "sync":
        return policy.execute(KEY, primary, fallback=Fallbacks(steps))
    chain = Fallbacks([(key, model.acall) for key, model in steps])
    return await policy.aexecute(KEY, primary.acall, fallback=chain)


async def test_the_second_fallback_answers_when_the_first_fails_too(clock, mode, events) -> None:
    policy = CallPolicy(clock=clock, listeners=[events])
    primary, b, c = Model(error=ServerError), Model("b", ServerError), Model("c")
    assert await run(policy, primary, [(B, b), (C, c)], mode) == "c"
    assert (primary.calls, b.calls, c.calls) == (1, 1, 1)
    assert policy.snapshot()[B].failures == 1, "the first fallback's failure counts on its circuit"
    assert policy.metrics()[C].successes == 1
    handed = [(e.key, e.error_type) for e in events.of(EventKind.FALLBACK)]
    assert handed == [(KEY, "ServerError"), (B, "ServerError")]


async def test_an_open_fallback_is_skipped_without_a_call(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    policy.trip(KEY)
    policy.trip(B)
    primary, b, c = Model(), Model("b"), Model("c")
    assert await run(policy, primary, [(B, b), (C, c)], mode) == "c"
    assert (primary.calls, b.calls, c.calls) == (0, 0, 1)
    assert policy.metrics()[B].refusals == 1


async def test_when_every_model_fails_the_error_names_each_in_order(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    policy.trip(B)
    primary, b, c = Model(error=ServerError), Model("b"), Model(error=TimeoutError)
    with pytest.raises(AllModelsFailedError) as caught:
        await run(policy, primary, [(B, b), (C, c)], mode)
    error = caught.value
    assert error.keys == (KEY, B, C)
    assert [type(e) for e in error.errors] == [ServerError, CircuitOpenError, TimeoutError]
    assert error.exceptions is error.errors
    assert error.__cause__ is error.errors[-1]
    text = str(error)
    assert text.index(KEY) < text.index(B) < text.index(C)
    for named in ("ServerError", "circuit open", "TimeoutError"):
        assert named in text
    assert "secret-prompt" not in text, "error messages (request data) stay out"
    assert b.calls == 0


async def test_a_client_error_of_a_fallback_ends_the_list_by_default(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    primary, b, c = Model(error=ServerError), Model(error=BadRequest), Model("c")
    with pytest.raises(AllModelsFailedError) as caught:
        await run(policy, primary, [(B, b), (C, c)], mode)
    assert caught.value.keys == (KEY, B)
    assert c.calls == 0


async def test_fallback_on_error_moves_on_after_any_error(clock, mode) -> None:
    policy = CallPolicy(clock=clock, fallback_on="error")
    primary, b, c = Model(error=BadRequest), Model(error=BadRequest), Model("c")
    assert await run(policy, primary, [(B, b), (C, c)], mode) == "c"


async def test_an_unguarded_step_runs_without_a_circuit(clock, mode) -> None:
    policy = CallPolicy(clock=clock)
    primary, b, c = Model(error=ServerError), Model(error=ServerError), Model("c")
    assert await run(policy, primary, [(None, b), (C, c)], mode) == "c"
    assert set(policy.metrics()) == {KEY, C}


async def test_the_budget_prices_the_call_as_the_model_that_answered(clock, mode) -> None:
    # USD per million tokens: the primary is cheap, the second fallback dear.
    prices = {KEY: (1.0, 1.0), B: (2.0, 2.0), C: (100.0, 100.0)}
    budget = Budget(max_cost_usd=1_000.0, prices=prices)
    policy = CallPolicy(clock=clock)
    request: CallRequest[str] = CallRequest(
        describe=lambda: {},
        input_text=lambda: "hi",
        usage=lambda _: {"input_tokens": 1_000_000, "output_tokens": 0},
    )
    primary, b, c = Model(error=ServerError), Model(error=ServerError), Model("c")
    if mode == "sync":
        answer = policy.execute(
            KEY, primary, fallback=Fallbacks([(B, b), (C, c)]), budget=budget, request=request
        )
    else:
        answer = await policy.aexecute(
            KEY,
            primary.acall,
            fallback=Fallbacks([(B, b.acall), (C, c.acall)]),
            budget=budget,
            request=request,
        )
    assert answer == "c"
    assert budget.usage().calls == 1
    assert budget.usage().cost_usd == pytest.approx(100.0)


def test_a_list_is_checked_when_built() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Fallbacks([])
    with pytest.raises(ValueError, match="given twice"):
        Fallbacks([(B, Model()), (B, Model())])
    with pytest.raises(TypeError, match=r"steps\[0\]: call"):
        Fallbacks([(B, "not callable")])  # type: ignore[list-item]


def test_the_states_stay_apart(clock) -> None:
    policy = CallPolicy(clock=clock, failure_threshold=1)
    primary, b, c = Model(error=ServerError), Model(error=ServerError), Model("c")
    assert policy.execute(KEY, primary, fallback=Fallbacks([(B, b), (C, c)])) == "c"
    assert policy.state(KEY) is CircuitState.OPEN
    assert policy.state(B) is CircuitState.OPEN
    assert policy.state(C) is CircuitState.CLOSED
    # Now both are open: the list goes straight to C, calling nobody else.
    assert policy.execute(KEY, primary, fallback=Fallbacks([(B, b), (C, c)])) == "c"
    assert (primary.calls, b.calls, c.calls) == (1, 1, 2)
