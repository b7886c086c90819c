"""The policy renders as a table: ``repr`` for terminals, ``_repr_html_`` for Jupyter."""

from __future__ import annotations

from callpolicy import CallPolicy
from tests.support.clock import FakeClock


def _down() -> str:
    raise TimeoutError("timed out")


def test_repr_and_html_show_each_key_state_failures_and_fallback_count() -> None:
    clock = FakeClock(0.0)
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=clock)
    assert policy.execute("openai::gpt-4o", _down, fallback=lambda: "fb") == "fb"
    assert policy.execute("openai::gpt-4o", _down, fallback=lambda: "fb") == "fb"
    policy.execute("acme::m1", lambda: "ok")
    clock.advance(12.5)

    text = repr(policy)
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:]}
    assert rows["openai::gpt-4o"][1:] == ["open", "threshold", "1", "17.5s", "1", "0", "2"]
    assert rows["acme::m1"][1:] == ["closed", "-", "0", "-", "0", "0", "0"]

    page = policy._repr_html_()
    assert page.startswith('<table class="callpolicy">')
    assert page.count("<tr>") == 3
    assert "openai::gpt-4o" in page
    assert ">open</td>" in page
    assert ">17.5s</td>" in page
    assert ">threshold</td>" in page


def test_a_new_policy_says_it_has_no_circuits() -> None:
    policy = CallPolicy()
    assert "no circuits yet" in repr(policy)
    assert "no circuits yet" in policy._repr_html_()
