"""Circuit keys: which ``provider::model`` circuit a chat model's calls count against."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel

from callpolicy import circuit_key, split_key

__all__ = ["CircuitKeys", "model_identity"]

_MODEL_ATTRIBUTES = ("model_name", "model", "model_id", "deployment_name")
_MAX_OVERRIDES = 256


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


class CircuitKeys:
    """The keys of one wrapper: its primary's (per model name) and its fallback's.

    The default key is computed once; a per-call ``model=`` override is looked up in a
    small cache, so the hot path never calls ``_get_ls_params`` again.
    """

    __slots__ = ("_by_model", "default", "fallback", "model", "provider")

    def __init__(
        self,
        primary: BaseChatModel,
        fallback: BaseChatModel | None,
        *,
        key: str | None = None,
        fallback_key: str | None = None,
    ) -> None:
        for name, value in (("key", key), ("fallback_key", fallback_key)):
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name}: expected a non-empty string, got {value!r}")
        if key is None:
            self.provider, self.model = model_identity(primary)
            self.default = circuit_key(self.provider, self.model)
        else:
            self.provider, self.model = split_key(key)
            self.default = key
        self._by_model: dict[str, str] = {self.model: self.default}
        self.fallback: str | None = None
        """The fallback's circuit (None without a fallback)."""
        if fallback is None:
            if fallback_key is not None:
                raise ValueError("fallback_key: given without a fallback")
            return
        self.fallback = fallback_key or circuit_key(*model_identity(fallback))
        if self.fallback == self.default:
            # Sharing the circuit would refuse the fallback whenever the primary is refused.
            raise ValueError(
                f"fallback: its circuit key {self.default!r} is the inner model's too, so "
                "one outage would refuse both; pass fallback_key= (or key=) to tell them apart"
            )

    def for_model(self, model: str | None) -> str:
        """The key of ``model`` (a model name of the primary's provider); default if None."""
        if model is None:
            return self.default
        key = self._by_model.get(model)
        if key is None:
            key = circuit_key(self.provider, model)
            if len(self._by_model) < _MAX_OVERRIDES:
                self._by_model[model] = key
        return key
