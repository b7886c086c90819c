"""Circuit keys: which ``provider::model`` circuit a LlamaIndex model's calls count against.

The provider is the model's class name, lowercased (``OpenAI`` -> ``openai``,
``Anthropic`` -> ``anthropic``, ``MockLLM`` -> ``mockllm``) and the model is
``metadata.model_name``. LangChain's own provider names (``ChatOpenAI`` -> ``openai``)
follow the same rule, so the LangChain wrapper and this one key the same deployment
alike (``openai::gpt-4o-mini``) and, sharing a policy, share its circuit. The keys and
their rules are :class:`callpolicy.ModelGuard`'s; this is only how a LlamaIndex model is
named.
"""

from __future__ import annotations

from llama_index.core.llms import LLM

__all__ = ["model_identity", "model_name_of"]


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
