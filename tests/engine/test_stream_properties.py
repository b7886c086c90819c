"""A property of the guarded stream: whatever each stream does (completes, fails before
or after its first chunk, is cut short, or its consumer stops early), the consumer gets
exactly the model's chunks, as the same objects, and the circuit counts one outcome per
stream: success, counted failure, or neither (a stop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from callpolicy import CallPolicy, ErrorClass, IncompleteStreamError

KEY = "acme::m1"
END = "<end>"


class ServerError(Exception):
    status_code = 503


# One stream: (kind, chunks before it ends). Kinds: "done" (ends with the marker),
# "fail" (raises after that many chunks), "short" (ends without the marker),
# "stop" (the consumer stops after that many chunks; the stream had more).
plans = st.lists(
    st.tuples(st.sampled_from(["done", "fail", "short", "stop"]), st.integers(0, 4)),
    min_size=1,
    max_size=12,
)


class Made:
    def __init__(self, text: str) -> None:
        self.text = text


def script(kind: str, n: int) -> list[object]:
    items: list[object] = [f"c{i}" for i in range(n)]
    if kind == "done":
        items.append(END)
    elif kind == "fail":
        items.append(ServerError("503"))
    elif kind == "stop":
        items += ["more", END]
    return items


def sync_source(items: list[object], made: list[Made]) -> Callable[[], Iterator[Made]]:
    def start() -> Iterator[Made]:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            chunk = Made(str(item))
            made.append(chunk)
            yield chunk

    return start


def async_source(items: list[object], made: list[Made]) -> Callable[[], AsyncIterator[Made]]:
    async def start() -> AsyncIterator[Made]:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            chunk = Made(str(item))
            made.append(chunk)
            yield chunk

    return start


def finished(chunk: Made) -> bool:
    return chunk.text == END


def expected_counts(plan: list[tuple[str, int]]) -> tuple[int, int, int]:
    successes = failures = stops = 0
    for kind, n in plan:
        if kind == "done":
            successes += 1
        elif kind in ("fail", "short"):
            failures += 1
        elif kind == "stop":
            # Stopping after n chunks; a stream that stops "after 0" is consumed to its end.
            if n == 0:
                successes += 1
            else:
                stops += 1
    return successes, failures, stops


def run_sync(policy: CallPolicy, plan: list[tuple[str, int]]) -> None:
    for kind, n in plan:
        made: list[Made] = []

        start = sync_source(script(kind, n), made)

        got: list[Made] = []
        stream = policy.stream(KEY, start, finished=finished)
        try:
            for chunk in stream:
                got.append(chunk)
                if kind == "stop" and len(got) == n:
                    stream.close()  # type: ignore[attr-defined]
                    break
        except (ServerError, IncompleteStreamError):
            assert kind in ("fail", "short")
        else:
            assert kind in ("done", "stop")
        assert len(got) == len(made)
        assert all(a is b for a, b in zip(got, made, strict=True))


async def run_async(policy: CallPolicy, plan: list[tuple[str, int]]) -> None:
    for kind, n in plan:
        made: list[Made] = []

        start = async_source(script(kind, n), made)

        got: list[Made] = []
        stream = policy.astream(KEY, start, finished=finished)
        try:
            async for chunk in stream:
                got.append(chunk)
                if kind == "stop" and len(got) == n:
                    await stream.aclose()  # type: ignore[attr-defined]
                    break
        except (ServerError, IncompleteStreamError):
            assert kind in ("fail", "short")
        else:
            assert kind in ("done", "stop")
        assert len(got) == len(made)
        assert all(a is b for a, b in zip(got, made, strict=True))


def check(policy: CallPolicy, plan: list[tuple[str, int]]) -> None:
    successes, failures, stops = expected_counts(plan)
    metrics = policy.metrics()[KEY]
    assert metrics.successes == successes
    assert sum(metrics.failures.values()) == failures
    assert set(metrics.failures) <= {ErrorClass.SERVER, ErrorClass.NETWORK}
    assert metrics.cancelled == stops
    assert metrics.calls == len(plan)


@settings(max_examples=60, deadline=None)
@given(plan=plans, use_async=st.booleans())
def test_every_stream_counts_one_outcome_and_passes_its_chunks_untouched(
    plan: list[tuple[str, int]], use_async: bool
) -> None:
    policy = CallPolicy(failure_threshold=1000)
    if use_async:
        asyncio.run(run_async(policy, plan))
    else:
        run_sync(policy, plan)
    check(policy, plan)
