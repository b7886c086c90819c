"""How a LangChain chat model is named: the ``(provider, model name)`` its circuit key is
made of (the key's rules live in :class:`callpolicy.ModelGuard`)."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel

__all__ = ["model_identity"]

_MODEL_ATTRIBUTES = ("model_name", "model", "model_id", "deployment_name")


def model_identity(model: BaseChatModel) -> tuple[str, str]:
    """The ``(provider, model name)`` a chat model's calls are traced and guarded under.

    From its ``_get_ls_params()`` (``ls_provider``, ``ls_model_name``: what LangSmith
    traces show), else its ``model_name``/``model`` attribute, else its class name.
    """
    try:
        params: Any = model._get_ls_params()
    except Exception:  # a broken integration must not make the wrapper unusable
        params = {}
    provider = params.get("ls_provider")
    name = params.get("ls_model_name")
    if not isinstance(provider, str) or not provider:
        provider = type(model).__name__.lower()
    if not isinstance(name, str) or not name:
        name = next(
            (
                value
                for value in (getattr(model, attr, None) for attr in _MODEL_ATTRIBUTES)
                if isinstance(value, str) and value
            ),
            type(model).__name__,
        )
    return provider, name
