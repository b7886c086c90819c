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

:func:`register_end_marker` adds one (or, with ``None``, turns the check off for a class,
say an OpenAI-compatible server that never sends ``finish_reason``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import LLM

__all__ = [
    "EndMarker",
    "anthropic_finished",
    "end_marker_of",
    "openai_finished",
    "register_end_marker",
]

EndMarker = Callable[[ChatResponse | CompletionResponse], bool]
"""True for a chunk that carries the provider's end marker. Called on every chunk until
one does: it must be cheap and must not raise."""


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
_KNOWN: dict[str, Callable[[], EndMarker | None]] = {
    "llama_index.llms.openai.base.OpenAI": lambda: openai_finished,
    "llama_index.llms.anthropic.base.Anthropic": _anthropic,
}
_registered: dict[type[LLM], EndMarker | None] = {}
_lock = threading.Lock()


def register_end_marker(model_class: type[LLM], finished: EndMarker | None) -> None:
    """Use ``finished`` as the end marker of ``model_class``'s streams (and its
    subclasses'), or, with ``None``, check none. Applies to wrappers built afterwards.

    >>> from llama_index.core.llms import MockLLM
    >>> register_end_marker(MockLLM, lambda chunk: chunk.delta == "")
    >>> end_marker_of(MockLLM()) is not None
    True
    >>> register_end_marker(MockLLM, None)

    Raises:
        TypeError: ``model_class`` is not a LlamaIndex LLM class, or ``finished`` is not
            callable (the error names the argument).
    """
    if not (isinstance(model_class, type) and issubclass(model_class, LLM)):
        raise TypeError(f"model_class: expected a LlamaIndex LLM class, got {model_class!r}")
    if finished is not None and not callable(finished):
        raise TypeError(f"finished: expected a callable or None, got {type(finished).__name__}")
    with _lock:
        _registered[model_class] = finished


def end_marker_of(model: LLM) -> EndMarker | None:
    """The end marker of ``model``'s streams (None: its integration reports none): the
    nearest class in its MRO that is registered or known."""
    for cls in type(model).__mro__:
        if cls in _registered:
            return _registered[cls]
        known = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
        if known is not None:
            return known()
    return None
