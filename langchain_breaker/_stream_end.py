"""Which chunk of a LangChain chat model's stream carries the provider's end marker.

A stream that ends without its provider's end marker was cut short (a proxy that closed
the connection cleanly, a server that gave up): the engine raises
:class:`callpolicy.IncompleteStreamError` and counts a failure. Only integrations known to
report a marker are checked; for any other model the stream's end is taken as it comes.

Recognised (by the model's class, LangChain never imported for it):

- ``langchain_openai`` (``ChatOpenAI``, ``AzureChatOpenAI`` and every model built on its
  ``BaseChatOpenAI``): ``response_metadata["finish_reason"]`` (Chat Completions), or a
  ``response_metadata["status"]`` of ``"completed"``/``"incomplete"`` (the Responses API).
- ``langchain_anthropic`` (``ChatAnthropic``): ``response_metadata["stop_reason"]``, sent
  with the final usage, so only while ``stream_usage`` is on (its default).

Another model: give the wrapper ``stream_finished=`` (``fallback_stream_finished=`` for the
fallback), a function of one chunk that is True for the chunk carrying the marker, or
``None`` to check nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from langchain_core.language_models import BaseChatModel

__all__ = ["AUTO", "StreamFinished", "end_marker"]

Finished = Callable[[Any], bool]

StreamFinished = Literal["auto"] | Finished | None
"""A wrapper's ``stream_finished`` option: ``"auto"`` (the recognised integrations), a
function of one chunk, or None (no check)."""

AUTO: Final = "auto"


def openai_finished(chunk: Any) -> bool:
    """A chunk of ``langchain_openai`` carrying the end of the answer."""
    metadata = getattr(chunk, "response_metadata", None)
    if not metadata:
        return False
    return bool(metadata.get("finish_reason")) or metadata.get("status") in (
        "completed",
        "incomplete",
    )


def anthropic_finished(chunk: Any) -> bool:
    """A chunk of ``langchain_anthropic`` carrying the end of the answer."""
    metadata = getattr(chunk, "response_metadata", None)
    return bool(metadata and metadata.get("stop_reason"))


# Qualified class name -> (the marker, the model flag without which it is never sent).
_KNOWN: Final[Mapping[str, tuple[Finished, str | None]]] = {
    "langchain_openai.chat_models.base.BaseChatOpenAI": (openai_finished, None),
    "langchain_anthropic.chat_models.ChatAnthropic": (anthropic_finished, "stream_usage"),
}

_by_class: dict[type, tuple[Finished, str | None] | None] = {}


def _known(cls: type) -> tuple[Finished, str | None] | None:
    try:
        return _by_class[cls]
    except KeyError:
        pass
    found = None
    for base in cls.__mro__:
        found = _KNOWN.get(f"{base.__module__}.{base.__qualname__}")
        if found is not None:
            break
    _by_class[cls] = found
    return found


def end_marker(
    model: BaseChatModel, option: StreamFinished, kwargs: Mapping[str, Any]
) -> Finished | None:
    """The end-marker check for a stream of ``model`` called with ``kwargs``: the
    wrapper's ``option`` when it is not ``"auto"``, else the recognised integration's, or
    None (no marker to expect)."""
    if option != AUTO:
        return option
    known = _known(type(model))
    if known is None:
        return None
    finished, flag = known
    if flag is not None:
        on = kwargs.get(flag, getattr(model, flag, True))
        if not on:
            return None
    return finished
