"""Runs one documentation page's Python snippets, in order, in one namespace.

``python -m tests.support.docs_runner`` reads ``{"prelude": str, "blocks": [{"page": str,
"line": int, "code": str}, ...]}`` as JSON on stdin, runs the prelude, then each block as a
reader would paste it (a block with a top-level ``await`` runs in ``asyncio.run``), and
prints ``ran PAGE:LINE`` after each block that finished. The first failing block prints
``FAILED PAGE:LINE`` and its traceback, whose line numbers are the page's, and ends the run
with exit status 1.

It runs in its own process, so what a snippet sets globally (``Settings.llm``, logging,
environment) ends with the page. Only the loopback host resolves: a snippet that tries to
reach any other fails its page, even if a fallback answered in its place. The OpenAI
clients are the real ones, pointed by ``OPENAI_BASE_URL``/``OPENAI_API_BASE`` at the
loopback server the test started. Anthropic has no loopback server here:
``langchain_anthropic.ChatAnthropic`` and ``llama_index.llms.anthropic.Anthropic`` are
replaced by fake models that answer at once, under the provider ``anthropic`` and the model
name given (whether or not the real packages are installed).
"""

from __future__ import annotations

import ast
import asyncio
import importlib.abc
import importlib.machinery
import inspect
import json
import socket
import sys
import traceback
import types
from typing import Any

FALLBACK_ANSWER = "(anthropic stand-in) hello"


def _fake_langchain_anthropic() -> types.ModuleType:
    from langchain_core.language_models import FakeListChatModel
    from langchain_core.language_models.base import LangSmithParams

    class ChatAnthropic(FakeListChatModel):
        """Stands in for ``langchain_anthropic.ChatAnthropic``: answers at once."""

        model: str = "claude-3-5-haiku-latest"
        max_retries: int = 2
        responses: list[str] = [FALLBACK_ANSWER]  # noqa: RUF012 (a pydantic field)

        def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
            params = super()._get_ls_params(stop=stop, **kwargs)
            params["ls_provider"] = "anthropic"
            params["ls_model_name"] = self.model
            return params

    module = types.ModuleType("langchain_anthropic")
    module.ChatAnthropic = ChatAnthropic  # type: ignore[attr-defined]
    return module


def _fake_llama_index_anthropic() -> types.ModuleType:
    from collections.abc import Iterator

    from llama_index.core.llms import (
        CompletionResponse,
        CompletionResponseGen,
        CustomLLM,
        LLMMetadata,
    )
    from llama_index.core.llms.callbacks import llm_completion_callback

    class Anthropic(CustomLLM):
        """Stands in for ``llama_index.llms.anthropic.Anthropic``: answers at once."""

        model: str = "claude-3-5-haiku-latest"
        max_retries: int = 3

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name=self.model)

        @llm_completion_callback()
        def complete(
            self, prompt: str, formatted: bool = False, **kwargs: Any
        ) -> CompletionResponse:
            return CompletionResponse(text=FALLBACK_ANSWER)

        @llm_completion_callback()
        def stream_complete(
            self, prompt: str, formatted: bool = False, **kwargs: Any
        ) -> CompletionResponseGen:
            def chunks() -> Iterator[CompletionResponse]:
                yield CompletionResponse(text=FALLBACK_ANSWER, delta=FALLBACK_ANSWER)

            return chunks()

    module = types.ModuleType("llama_index.llms.anthropic")
    module.Anthropic = Anthropic  # type: ignore[attr-defined]
    return module


_FAKES = {
    "langchain_anthropic": _fake_langchain_anthropic,
    "llama_index.llms.anthropic": _fake_llama_index_anthropic,
}


class _Fakes(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the fake modules when a snippet imports them (building one imports its
    framework, which a page that never asks for it should not pay for)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _FAKES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _FAKES[spec.name]()

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _install_fakes() -> None:
    sys.meta_path.insert(0, _Fakes())


_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _loopback_only() -> list[str]:
    """Refuse to resolve any host but the loopback one, and remember who asked: a snippet
    must never reach a real provider, and one that tried (a client not pointed at the
    loopback server) must fail the page even when a fallback then answered."""
    refused: list[str] = []
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and str(name) not in _LOOPBACK:
            refused.append(str(name))
            raise socket.gaierror(
                socket.EAI_NONAME, f"docs test: no network but 127.0.0.1 ({name})"
            )
        return resolve(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    return refused


def _run(page: str, line: int, code: str, namespace: dict[str, Any]) -> None:
    # Blank lines in front, so that a traceback's line numbers are the page's.
    source = "\n" * (line - 1) + code
    compiled = compile(source, page, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(compiled, namespace))
    else:
        exec(compiled, namespace)


def main() -> int:
    job = json.load(sys.stdin)
    _install_fakes()
    refused = _loopback_only()
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    label = "prelude"
    try:
        _run("prelude", 1, job["prelude"], namespace)
        for block in job["blocks"]:
            label = f"{block['page']}:{block['line']}"
            _run(block["page"], block["line"], block["code"], namespace)
            print(f"\nran {label}", flush=True)  # on a line of its own, whatever the block printed
    except BaseException:
        print(f"FAILED {label}", flush=True)
        traceback.print_exc()
        return 1
    if refused:
        print(f"FAILED network: the snippets tried to reach {sorted(set(refused))}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
