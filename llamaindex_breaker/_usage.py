"""What the budget reads of a LlamaIndex answer, and how a stream is counted as it passes.

- **usage**: from ``raw`` (OpenAI's ``usage``, Anthropic's, ...), else the response's
  ``additional_kwargs`` (``prompt_tokens``/``completion_tokens``); None when neither says.
- **streams** go through the engine's meter unchanged; a chunk a fallback produced counts
  against that fallback's key (its mark says which).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse

from callpolicy import Budget, Usage

from ._served import fallback_mark

__all__ = ["meter_stream", "usage_of"]

logger = logging.getLogger("callpolicy")

R = TypeVar("R", ChatResponse, CompletionResponse)


# -- usage -------------------------------------------------------------------------------
def usage_of(response: ChatResponse | CompletionResponse) -> Usage | None:
    """The tokens ``response`` reports: from ``raw`` (OpenAI's ``usage``, ...), else the
    response's ``additional_kwargs`` (``prompt_tokens``/``completion_tokens``, as
    llama-index-llms-openai sets them); None when neither says. Never raises."""
    try:
        raw = response.raw
        found = None if raw is None else Usage.from_report(raw)
        if found is None and response.additional_kwargs:
            found = Usage.from_report(response.additional_kwargs)
        return found
    except Exception:  # a strange raw object must not fail a call that succeeded
        logger.debug("callpolicy budget: could not read usage", exc_info=True)
        return None


# -- streams: counted as they pass, never altered -----------------------------------------
def _answered_by(chunk: ChatResponse | CompletionResponse) -> str | None:
    """The key of the fallback that produced ``chunk``, or None (the primary)."""
    mark = fallback_mark(chunk)
    key = mark.get("key") if mark is not None else None
    return key if isinstance(key, str) else None


def meter_stream(
    chunks: Iterator[R] | AsyncIterator[R],
    budget: Budget,
    key: str,
    input_text: Callable[[], str],
    *,
    asynchronous: bool,
) -> Any:
    """``chunks``, each unchanged, with the stream and its reported usage counted (the
    engine's meter: ``Budget.metered``, or ``ametered`` for an ``asynchronous`` stream).
    Providers report a stream's usage once at its end (OpenAI) or as running totals
    (Anthropic's output count, Gemini's every chunk), so a report is read as the stream's
    usage so far: ``cumulative=True``."""
    meter: Any = budget.ametered if asynchronous else budget.metered
    return meter(
        chunks,
        key=key,
        usage_of=usage_of,
        estimate=lambda: budget.estimate(input_text()),
        cumulative=True,
        key_of=_answered_by,
    )
