"""httpx clients that a test hands to SDK clients, so that the test can close them.

``llama_index.llms.openai.OpenAI`` builds one ``openai.AsyncOpenAI`` per instance and
never closes it; nothing closes it later either (the SDK only schedules ``aclose`` from
``__del__`` when an event loop is running). Its keep-alive connections outlive the test's
event loop and surface as ``ResourceWarning: unclosed transport`` / ``unclosed socket`` in
whichever later test the garbage collector happens to run. Passing clients we own (the
SDK's own defaults, :class:`openai.DefaultAsyncHttpxClient` and
:class:`openai.DefaultHttpxClient`) changes nothing else: timeouts and retries are the
SDK client's, set per request.

Use the ``http_clients`` fixture (tests/conftest.py), which closes them in the test's
event loop when the test ends:

>>> OpenAI(model="gpt-4o-mini", api_base=url, **http_clients.llamaindex())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import httpx
import openai

__all__ = ["HttpClients"]


class HttpClients:
    """Hands out SDK-default httpx clients and closes every one of them in :meth:`aclose`."""

    def __init__(self) -> None:
        self._sync: list[httpx.Client] = []
        self._async: list[httpx.AsyncClient] = []

    def sync(self) -> httpx.Client:
        client = openai.DefaultHttpxClient()
        self._sync.append(client)
        return client

    def asynchronous(self) -> httpx.AsyncClient:
        client = openai.DefaultAsyncHttpxClient()
        self._async.append(client)
        return client

    def llamaindex(self) -> dict[str, Any]:
        """Keyword arguments for ``llama_index.llms.openai.OpenAI``: both of its clients."""
        return {"http_client": self.sync(), "async_http_client": self.asynchronous()}

    async def aclose(self) -> None:
        """Close every client handed out (call it in the event loop the test ran in)."""
        for client in self._sync:
            client.close()
        for aclient in self._async:
            await aclient.aclose()
        self._sync.clear()
        self._async.clear()
