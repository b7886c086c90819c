"""What the outer policies (cache, budget) need to know about one call.

The adapters describe a call in framework-free terms: the parameters that change its
answer (for the cache key), its input text (for the budget's token estimate), and how
to turn its result into JSON and back (for the cache) and read its usage (for the
budget). Each is a callable, so nothing is computed for a policy that is not in use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["CallRequest"]

T = TypeVar("T")


def _no_text() -> str:
    return ""


# Not slotted: a slotted frozen generic dataclass breaks ``CallRequest[T](...)``.
@dataclass(frozen=True)
class CallRequest(Generic[T]):
    """One call, as the cache and the budget see it.

    >>> request = CallRequest(describe=lambda: {"messages": ["hi"], "temperature": 0})
    """

    describe: Callable[[], Mapping[str, Any]]
    """Everything that changes the answer (messages with all their blocks, tools with
    their schemas, tool_choice, output schema, temperature, stop, ...), JSON-able.
    Secrets are dropped by the cache key anyway."""
    input_text: Callable[[], str] = _no_text
    """The request's input as text, for the budget's token estimate."""
    encode: Callable[[T], Mapping[str, Any]] | None = None
    """A result as a JSON-able dict (for the cache)."""
    decode: Callable[[dict[str, Any]], T] | None = None
    """A cached dict back to a result."""
    mark: Callable[[T, str], T] | None = None
    """Mark a result that did not come from this call's own model call: ``status`` is
    ``"hit"``, ``"shared"`` (another caller's identical call, single flight) or ``"stale"``."""
    usage: Callable[[T], object] | None = None
    """The usage report of a result (e.g. LangChain ``usage_metadata``), for the budget."""
