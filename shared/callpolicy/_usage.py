"""What one call used: :class:`Usage`, read from whatever a provider or framework reports,
and :func:`approx_tokens`, the estimate of a prompt's input tokens before it is sent.

The bottom of the budget's layers: it imports nothing of the engine, so the budget, its
stream meter and the engine all read usage the same way without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Usage", "approx_tokens"]


def approx_tokens(text: str) -> int:
    """The reference crate's token estimate: UTF-8 bytes / 4, rounded down.

    >>> approx_tokens("Hello, world!")
    3
    """
    if text.isascii():  # one byte a character: skip the encode
        return len(text) // 4
    return len(text.encode("utf-8")) // 4


_USAGE_SECTIONS = ("usage_metadata", "usage", "token_usage", "usageMetadata")
_INPUT_NAMES = ("input_tokens", "prompt_tokens", "prompt_token_count", "promptTokenCount")
_OUTPUT_NAMES = (
    "output_tokens",
    "completion_tokens",
    "candidates_token_count",
    "candidatesTokenCount",
)
# Anthropic's raw usage counts cached prompt tokens apart from input_tokens (LangChain's
# usage_metadata already folds them in, under input_token_details, which is not read).
_EXTRA_INPUT_NAMES = ("cache_creation_input_tokens", "cache_read_input_tokens")


def _field(source: object, name: str) -> object:
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _count(source: object, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = _field(source, name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used, as the model reported them (or estimated: ``estimated=True``).

    >>> Usage(input_tokens=12, output_tokens=30).total_tokens
    42
    >>> Usage.from_report({"usage": {"prompt_tokens": 12, "completion_tokens": 30}})
    Usage(input_tokens=12, output_tokens=30, estimated=False)
    """

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a count >= 0, got {value!r}")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.estimated or other.estimated,
        )

    @classmethod
    def from_report(cls, report: object) -> Usage | None:
        """Read usage from what a provider or framework reports, or None if it says nothing.

        Understands a mapping or an object (attributes) with ``input_tokens`` /
        ``output_tokens`` (LangChain ``usage_metadata``, Anthropic), ``prompt_tokens`` /
        ``completion_tokens`` (OpenAI; LlamaIndex's raw response), or Gemini's
        ``prompt_token_count`` / ``candidates_token_count``; also one or two levels down
        under ``usage_metadata``, ``usage``, ``token_usage`` or ``usageMetadata``.
        """
        return cls._read(report, depth=0)

    @classmethod
    def _read(cls, report: object, depth: int) -> Usage | None:
        if report is None or isinstance(report, (str, bytes, int, float)):
            return None
        found_in = _count(report, _INPUT_NAMES)
        found_out = _count(report, _OUTPUT_NAMES)
        if found_in is not None or found_out is not None:
            extra = sum(_count(report, (name,)) or 0 for name in _EXTRA_INPUT_NAMES)
            return cls((found_in or 0) + extra, found_out or 0)
        if depth < 2:
            for section in _USAGE_SECTIONS:
                inner = _field(report, section)
                if inner is not None:
                    found = cls._read(inner, depth + 1)
                    if found is not None:
                        return found
        return None
