"""The policy renders as a table: ``repr`` for terminals, ``_repr_html_`` for Jupyter."""

from __future__ import annotations

from callpolicy import CallPolicy
from callpolicy._report import html_table, text_table
from tests.support.clock import FakeClock


def _down() -> str:
    raise TimeoutError("timed out")


def _rows(text: str) -> dict[str, list[str]]:
    """The table's rows by key (a row's first cell holds ``::``; headers and notes do not)."""
    return {line.split()[0]: line.split() for line in text.splitlines() if "::" in line.split()[0]}


def test_repr_and_html_show_each_key_state_failures_and_fallback_count() -> None:
    clock = FakeClock(0.0)
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=clock)
    assert policy.execute("openai::gpt-4o", _down, fallback=lambda: "fb") == "fb"
    assert policy.execute("openai::gpt-4o", _down, fallback=lambda: "fb") == "fb"
    policy.execute("acme::m1", lambda: "ok")
    clock.advance(12.5)

    text = repr(policy)
    rows = _rows(text)
    assert rows["openai::gpt-4o"][1:] == ["open", "threshold", "1", "17.5s", "1", "0", "2"]
    assert rows["acme::m1"][1:] == ["closed", "-", "0", "-", "0", "0", "0"]

    page = policy._repr_html_()
    assert page.startswith('<table class="callpolicy">')
    assert page.count("<tr>") == 3
    assert "openai::gpt-4o" in page
    assert ">open</td>" in page
    assert ">17.5s</td>" in page
    assert ">threshold</td>" in page


def test_the_columns_say_what_they_count() -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=FakeClock(0.0))
    policy.execute("openai::gpt-4o", _down, fallback=lambda: "fb")

    lines = repr(policy).splitlines()
    assert lines[0] == "CallPolicy"
    # Two header lines, read column by column: the second line completes the first.
    first, second = lines[1], lines[2]
    starts = [
        i for i, char in enumerate(first) if char != " " and (i == 0 or first[i - 2 : i] == "  ")
    ]
    heads = [
        " ".join(f"{first[a:b].strip()} {second[a:b].strip()}".split())
        for a, b in zip(starts, [*starts[1:], None], strict=True)
    ]
    assert heads == [
        "key",
        "state",
        "opened by",
        "failures in a row",
        "next probe in",
        "times opened",
        "probes in flight",
        "sent to fallback",
    ]
    # The fallback's own circuit is explained under the table.
    assert "A fallback model has a circuit of its own" in repr(policy)

    page = policy._repr_html_()
    for header in ("failures in a row", "next probe in", "probes in flight", "sent to fallback"):
        assert f">{header}</th>" in page
    assert 'title="half-open probes admitted and not finished yet"' in page
    assert "A fallback model has a circuit of its own" in page


def test_without_fallback_counts_the_table_has_no_fallback_column_nor_note() -> None:
    # The status command's table: a shared store does not know what a fallback served.
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=FakeClock(0.0))
    policy.execute("openai::gpt-4o", _down, fallback=lambda: "fb")
    text = text_table(policy.snapshot().values())
    assert "sent to" not in text
    assert "fallback" not in text
    assert _rows(text)["openai::gpt-4o"][1:] == ["open", "threshold", "1", "30.0s", "1", "0"]


def test_control_characters_in_a_key_are_escaped_not_printed() -> None:
    policy = CallPolicy(failure_threshold=1, cooldown=30, clock=FakeClock(0.0))
    nasty = "acme::line\nbreak\x1b[31mred\r\u202eevil"
    policy.execute(nasty, _down, fallback=lambda: "fb")
    policy.execute("acme::plain", lambda: "ok")

    text = repr(policy)
    assert "\x1b" not in text
    assert "\r" not in text
    assert "\u202e" not in text
    lines = text.splitlines()
    escaped = "acme::line\\nbreak\\x1b[31mred\\r\\u202eevil"
    assert [line for line in lines if line.startswith(escaped)], text
    # Every row, the nasty one included, is one line: 2 header lines + rule + 2 rows.
    assert len([line for line in lines if line.startswith("acme::")]) == 2

    page = html_table(policy.snapshot().values(), policy.fallback_served())
    assert "\n" not in page
    assert "\x1b" not in page
    assert f"<td>{escaped}</td>" in page


def test_a_new_policy_says_it_has_no_circuits() -> None:
    policy = CallPolicy()
    assert "no circuits yet" in repr(policy)
    assert "no circuits yet" in policy._repr_html_()
