"""Keep LlamaIndex from wrapping the adapter's delegating methods in dispatcher spans.

``BaseLLM`` mixes in ``DispatcherSpanMixin``, whose ``__init_subclass__`` wraps every
subclass implementation of an abstract method (``chat``, ``achat``, ``complete``, ...) in
``dispatcher.span``. The adapter only delegates, and the model it delegates to opens its
own span (and fires its own ``LLMChatStartEvent``/``LLMChatEndEvent``), so a span of the
adapter's would sit around the model's as a second, empty layer, and cost time on every
call.

``dispatcher.span`` is idempotent: it returns a function already carrying
``DISPATCHER_SPAN_DECORATED_ATTR`` unchanged. Marking a method with that attribute
before the class is created therefore exempts it from the automatic wrapping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from llama_index_instrumentation.dispatcher import DISPATCHER_SPAN_DECORATED_ATTR

__all__ = ["unspanned"]

F = TypeVar("F", bound=Callable[..., Any])


def unspanned(method: F) -> F:
    """Exempt ``method`` from ``DispatcherSpanMixin``'s automatic ``dispatcher.span``.

    A subclass overriding the method still gets a span (the mixin treats the marked
    method as "decorated" and wraps overrides of it), as LlamaIndex users expect.
    """
    setattr(method, DISPATCHER_SPAN_DECORATED_ATTR, True)
    return method
