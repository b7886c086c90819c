"""Circuit keys: which ``provider::model`` circuit a LlamaIndex model's calls count against.

The provider is the model's class name, lowercased (``OpenAI`` -> ``openai``,
``Anthropic`` -> ``anthropic``, ``MockLLM`` -> ``mockllm``) and the model is
``metadata.model_name``. LangChain's own provider names (``ChatOpenAI`` -> ``openai``)
follow the same rule, so the LangChain wrapper and this one key the same deployment
alike (``openai::gpt-4o-mini``) and, sharing a policy, share its circuit.
"""

from __future__ import annotations

from llama_index.core.llms import LLM

from callpolicy import circuit_key, split_key

__all__ = ["CircuitKeys", "model_identity", "model_name_of"]

_MAX_OVERRIDES = 256


def model_name_of(llm: LLM) -> str:
    """``llm.metadata.model_name`` (``"unknown"`` when the integration does not say)."""
    name = llm.metadata.model_name
    return name if isinstance(name, str) and name else "unknown"


def model_identity(llm: LLM) -> tuple[str, str]:
    """``(provider, model name)`` of ``llm``.

    >>> from llama_index.core.llms import MockLLM
    >>> model_identity(MockLLM())
    ('mockllm', 'unknown')
    """
    return type(llm).__name__.lower(), model_name_of(llm)


class CircuitKeys:
    """The keys of one wrapper: its inner model's (per model name) and its fallback's.

    Computed once; a per-call ``model=`` override is looked up in a small cache, so the
    hot path never reads ``metadata`` again.
    """

    __slots__ = ("_by_model", "default", "fallback", "fallback_model", "model", "provider")

    def __init__(
        self,
        inner: LLM,
        fallback: LLM | None,
        *,
        key: str | None = None,
        fallback_key: str | None = None,
    ) -> None:
        if key is None:
            self.provider, self.model = model_identity(inner)
            self.default = circuit_key(self.provider, self.model)
        else:
            self.provider, self.model = split_key(key)
            self.default = key
        self._by_model: dict[str, str] = {self.model: self.default}
        self.fallback: str | None = None
        """The fallback's circuit, or None: no fallback, or one that runs unguarded."""
        self.fallback_model: str | None = None
        if fallback is not None:
            self.fallback_model = model_name_of(fallback)
            if fallback_key is not None:
                if fallback_key == self.default:
                    raise ValueError(
                        f"fallback_key: {fallback_key!r} is the inner model's key too; "
                        "one circuit cannot guard both"
                    )
                self.fallback = fallback_key
            else:
                derived = circuit_key(*model_identity(fallback))
                # A fallback with the inner model's very key (another endpoint of the
                # same model) must not share the circuit that just refused the primary:
                # it runs unguarded, as in the LangChain wrapper.
                self.fallback = None if derived == self.default else derived

    def for_model(self, model: str | None) -> str:
        """The key of ``model`` (a model name of the inner model's provider); default if None."""
        if model is None:
            return self.default
        key = self._by_model.get(model)
        if key is None:
            key = circuit_key(self.provider, model)
            if len(self._by_model) < _MAX_OVERRIDES:
                self._by_model[model] = key
        return key
