"""Stream end markers: which chunk of a model's stream says the answer is complete.

A guarded stream that ends without its provider's end marker was cut short (a proxy that
closed the connection cleanly, a server that gave up): the engine raises
:class:`callpolicy.IncompleteStreamError` and counts a failure. Only models whose
integration reports a marker are checked; for any other model a stream that ends is
complete. The marker is resolved per model class, once, when a wrapper is built:

- ``llama_index.llms.openai.OpenAI`` and its subclasses (``AzureOpenAI``, ``OpenAILike``,
  ...): the raw ``ChatCompletionChunk`` (or legacy ``Completion``) in ``chunk.raw`` has
  ``choices[0].finish_reason`` set on its last content chunk;
- ``llama_index.llms.anthropic.Anthropic`` from llama-index-llms-anthropic 0.10.2 (the
  first release that yields the ``message_delta`` event): ``chunk.raw`` is that event as a
  dict, ``{"type": "message_delta", "delta": {"stop_reason": ...}, ...}``.

Another model: give the wrapper ``stream_finished=`` (``fallback_stream_finished=`` for the
fallback), a function of one chunk that is True for the chunk carrying the marker, or
``None`` to check nothing (say, an OpenAI-compatible server that never sends
``finish_reason``). The default, ``"auto"``, is the recognised integrations' marker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, Final, Literal

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM

__all__ = [
    "AUTO",
    "EndMarker",
    "StreamFinished",
    "anthropic_finished",
    "end_marker",
    "openai_finished",
]

EndMarker = Callable[[ChatResponse | CompletionResponse], bool]
"""True for a chunk that carries the provider's end marker. Called on every chunk until
one does: it must be cheap and must not raise."""

StreamFinished = Literal["auto"] | EndMarker | None
"""A wrapper's ``stream_finished`` option: ``"auto"`` (the recognised integrations), a
function of one chunk, or None (no check)."""

AUTO: Final = "auto"


def _field(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def openai_finished(chunk: ChatResponse | CompletionResponse) -> bool:
    """OpenAI's end marker: ``chunk.raw.choices[0].finish_reason`` is set.

    >>> from types import SimpleNamespace
    >>> chunk = ChatResponse(message={"role": "assistant", "content": ""})
    >>> chunk.raw = SimpleNamespace(choices=[SimpleNamespace(finish_reason="stop")])
    >>> openai_finished(chunk)
    True
    """
    choices = _field(chunk.raw, "choices")
    if not choices:  # a usage chunk (empty choices), or no raw chunk at all
        return False
    try:
        return _field(choices[0], "finish_reason") is not None
    except (IndexError, KeyError, TypeError):
        return False


def anthropic_finished(chunk: ChatResponse | CompletionResponse) -> bool:
    """Anthropic's end marker: ``chunk.raw`` is the ``message_delta`` event, whose
    ``delta.stop_reason`` is set."""
    raw = chunk.raw
    if _field(raw, "type") != "message_delta":
        return False
    return _field(_field(raw, "delta"), "stop_reason") is not None


def _anthropic() -> EndMarker | None:
    # Releases before 0.10.2 never yield the message_delta event: checking their streams
    # would fail every one of them.
    try:
        found = _release(metadata.version("llama-index-llms-anthropic"))
    except metadata.PackageNotFoundError:
        return None
    return anthropic_finished if found is not None and found >= (0, 10, 2) else None


def _release(version: str) -> tuple[int, ...] | None:
    parts: list[int] = []
    for part in version.split(".")[:3]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            return None
        parts.append(int(digits))
    return tuple(parts)


# Known integrations by qualified class name: their packages need not be installed.
_KNOWN: Final[Mapping[str, Callable[[], EndMarker | None]]] = {
    "llama_index.llms.openai.base.OpenAI": lambda: openai_finished,
    "llama_index.llms.anthropic.base.Anthropic": _anthropic,
}


def end_marker(model: LLM, option: StreamFinished) -> EndMarker | None:
    """The end-marker check for ``model``'s streams: the wrapper's ``option`` when it is
    not ``"auto"``, else the recognised integration's (the nearest class in the model's
    MRO), or None (no marker to expect)."""
    if option != AUTO:
        return option
    for cls in type(model).__mro__:
        known = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
        if known is not None:
            return known()
    return None
