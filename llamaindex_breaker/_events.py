"""The engine's events through LlamaIndex's instrumentation dispatcher.

Every event of a policy that guards a :class:`CircuitBreakerLLM` — state changes,
refusals, retries, fallbacks, cache hits, budget refusals — is dispatched as a
:class:`CallPolicyEvent`, so an event handler on the root dispatcher (or any
observability integration built on it) sees what the breaker did, inside the span of the
call it happened in. A policy shared with LangChain wrappers reports their events too.
"""

from __future__ import annotations

from typing import Any

from llama_index_instrumentation import get_dispatcher
from llama_index_instrumentation.base import BaseEvent

from callpolicy import CallPolicy, Event

__all__ = ["CallPolicyEvent", "relay_events"]

_dispatcher = get_dispatcher(__name__)


class CallPolicyEvent(BaseEvent):
    """One engine event (see :class:`callpolicy.Event`), as LlamaIndex instrumentation sees it."""

    kind: str
    """``state_change``, ``refused``, ``retry``, ``fallback``, ``cache_hit`` or
    ``budget_refused``."""
    key: str
    provider: str
    model: str
    state: str | None = None
    old_state: str | None = None
    reason: str | None = None
    failures: int | None = None
    error_class: str | None = None
    error_type: str | None = None
    attempt: int | None = None
    delay: float | None = None

    @classmethod
    def class_name(cls) -> str:
        return "CallPolicyEvent"


def _relay(event: Event) -> None:
    fields: dict[str, Any] = {
        name.removeprefix("callpolicy_"): value for name, value in event.log_extra().items()
    }
    fields["kind"] = fields.pop("event")
    _dispatcher.event(CallPolicyEvent(**fields))


def relay_events(policy: CallPolicy) -> None:
    """Send ``policy``'s events to LlamaIndex's dispatcher (once per policy)."""
    policy.add_listener(_relay)
