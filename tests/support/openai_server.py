"""A small OpenAI-compatible chat-completions server on 127.0.0.1, with scripted faults.

Real clients (the ``openai`` SDK, ``langchain-openai``, ``llama-index-llms-openai``) talk to
it over HTTP, so the tests exercise their real error types, timeouts and stream parsing.
Each request to ``/v1/chat/completions`` consumes the next scripted behaviour
(:meth:`OpenAICompatServer.push`), or the default one when the script is empty.

A healthy stream is sent like OpenAI's: a role chunk, one chunk per word (or per tool call),
a chunk with an empty delta carrying ``finish_reason``, a usage chunk (empty ``choices``) when
the request asks for ``stream_options.include_usage``, then ``data: [DONE]``. Stream faults,
each after ``after_chunks`` SSE events (the role chunk counts as the first):

- :class:`Fail` -- an HTTP error before the first byte (plain or stream request alike);
- :class:`StreamDies` -- the connection drops (an incomplete chunked body for the client);
- :class:`StreamMalformed` -- an event whose data is not JSON, then the stream goes on;
- :class:`StreamStalls` -- nothing more for ``seconds`` (longer than the client's read
  timeout), released early when the server closes, then the connection drops;
- :class:`StreamEndsEarly` -- ``data: [DONE]`` and a clean end of the body, but no chunk ever
  carried a ``finish_reason`` (a cut-short answer that looks complete to the transport).

>>> with OpenAICompatServer() as server:
...     server.push(Fail(503), Reply("hello"))
...     server.base_url.startswith("http://127.0.0.1:")
True
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Drop",
    "Fail",
    "Hang",
    "OpenAICompatServer",
    "Raw",
    "Reply",
    "StreamDies",
    "StreamEndsEarly",
    "StreamMalformed",
    "StreamStalls",
]


@dataclass(frozen=True)
class Reply:
    """A successful answer: text, or tool calls ``[{"name": ..., "arguments": {...}}]``."""

    content: str = "ok"
    tool_calls: list[dict[str, Any]] | None = None
    usage: dict[str, int] | None = None


@dataclass(frozen=True)
class Fail:
    """An HTTP error with an OpenAI-style JSON error body."""

    status: int = 500
    message: str = "boom"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hang:
    """Hold the request this long before answering (released early when the server closes)."""

    seconds: float = 5.0
    then: Reply | Fail | None = None


@dataclass(frozen=True)
class Drop:
    """Close the connection without sending any response."""


@dataclass(frozen=True)
class StreamDies:
    """For a stream request: send ``after_chunks`` content chunks, then drop the connection.
    For a plain request, behaves like :class:`Drop`."""

    after_chunks: int = 2
    content: str = "the stream was going well until"


@dataclass(frozen=True)
class Raw:
    """Exactly these bytes as the body (a malformed answer: not JSON, not UTF-8, ...)."""

    body: bytes = b"not json"
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class StreamMalformed:
    """For a stream request: send ``after_chunks`` chunks, then an SSE event whose data is
    ``data`` (not JSON by default), then the rest of the stream as if nothing happened.
    For a plain request, behaves like :class:`Drop`."""

    after_chunks: int = 2
    content: str = "the stream was going well until"
    data: str = '{"id": "chatcmpl-broken", "choices": [{"delta": {"content": "tru'


@dataclass(frozen=True)
class StreamStalls:
    """For a stream request: send ``after_chunks`` chunks, then nothing for ``seconds``
    (released early when the server closes), then drop the connection. Give the client a
    read timeout shorter than ``seconds``. For a plain request: the same wait, then a drop."""

    after_chunks: int = 2
    seconds: float = 30.0
    content: str = "the stream was going well until"


@dataclass(frozen=True)
class StreamEndsEarly:
    """For a stream request: send up to ``after_chunks`` chunks, none of them with a
    ``finish_reason`` (nor a usage chunk), then ``data: [DONE]`` and end the body cleanly.
    For a plain request, behaves like :class:`Drop`."""

    after_chunks: int = 2
    content: str = "the stream was going well until"


StreamFault = StreamDies | StreamMalformed | StreamStalls | StreamEndsEarly
Behaviour = Reply | Fail | Hang | Drop | Raw | StreamFault
_STREAM_FAULTS = (StreamDies, StreamMalformed, StreamStalls, StreamEndsEarly)

_DEFAULT_USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
_ids = itertools.count(1)


class _QuietHTTPServer(ThreadingHTTPServer):
    """A client that hangs up (a timeout, a closed pool) is routine here, not an error."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # reset, aborted, broken pipe
            return
        super().handle_error(request, client_address)


class OpenAICompatServer:
    """Serves ``POST /v1/chat/completions`` (plain and SSE stream) on 127.0.0.1."""

    def __init__(self) -> None:
        self._script: deque[Behaviour] = deque()
        self._default: Behaviour = Reply("ok")
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self._httpd = _QuietHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        # A short poll interval: close() waits for serve_forever to notice, once per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- control ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def push(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def set_default(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._default = behaviour

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAICompatServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _next(self, body: dict[str, Any]) -> Behaviour:
        with self._lock:
            self.requests.append(body)
            return self._script.popleft() if self._script else self._default

    # -- HTTP ------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two small writes; without TCP_NODELAY the body
            # waits for the client's delayed ACK (~40 ms a reply).
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                if self.path.rstrip("/").endswith("/embeddings"):
                    server._embeddings_route(self, raw)
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(raw or b"{}")
                behaviour = server._next(body)
                if isinstance(behaviour, Hang):
                    server._closing.wait(behaviour.seconds)
                    behaviour = behaviour.then or Reply("late")
                    if server._closing.is_set():
                        self._drop()
                        return
                if isinstance(behaviour, _STREAM_FAULTS) and not body.get("stream"):
                    if isinstance(behaviour, StreamStalls):
                        server._closing.wait(behaviour.seconds)
                    self._drop()
                elif isinstance(behaviour, Drop):
                    self._drop()
                elif isinstance(behaviour, Raw):
                    self._send_raw(behaviour)
                elif isinstance(behaviour, Fail):
                    self._send_json(
                        behaviour.status,
                        {
                            "error": {
                                "message": behaviour.message,
                                "type": "server_error" if behaviour.status >= 500 else "error",
                                "code": None,
                            }
                        },
                        behaviour.headers,
                    )
                elif body.get("stream"):
                    self._stream(body, behaviour)
                else:
                    assert isinstance(behaviour, Reply)
                    self._send_json(200, _completion(body, behaviour))

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _send_json(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) meanwhile
                    self.close_connection = True

            def _send_raw(self, raw: Raw) -> None:
                try:
                    self.send_response(raw.status)
                    self.send_header("content-type", raw.content_type)
                    self.send_header("content-length", str(len(raw.body)))
                    self.end_headers()
                    self.wfile.write(raw.body)
                except OSError:
                    self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _stream_fault(self, behaviour: Behaviour) -> bool:
                """Apply a stream fault at its position; True when the stream ends there."""
                if isinstance(behaviour, StreamStalls):
                    server._closing.wait(behaviour.seconds)
                if isinstance(behaviour, StreamDies | StreamStalls):
                    self._drop()
                    return True
                if isinstance(behaviour, StreamMalformed):
                    self._chunk(f"data: {behaviour.data}\n\n".encode())
                return False

            def _stream(self, body: dict[str, Any], behaviour: Behaviour) -> None:
                # Chunked encoding, so that a connection dropped midway is an error for
                # the client (an incomplete chunked body), not a quietly short stream.
                try:
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    events = _stream_events(body, behaviour)
                    if isinstance(behaviour, StreamEndsEarly):
                        events = [e for e in events if not _ends(e)][: behaviour.after_chunks]
                    limit = -1
                    if isinstance(behaviour, _STREAM_FAULTS):
                        # At most one position past the last event: a fault always applies.
                        limit = min(behaviour.after_chunks, len(events))
                    for index in range(len(events) + 1):
                        if index == limit and self._stream_fault(behaviour):
                            return
                        if index < len(events):
                            self._chunk(f"data: {json.dumps(events[index])}\n\n".encode())
                    self._chunk(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True

        return Handler


def _tool_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": call.get("id") or f"call_{next(_ids)}",
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": json.dumps(call.get("arguments", {})),
            },
        }
        for call in reply.tool_calls or []
    ]


def _completion(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    tool_calls = _tool_calls(reply)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if tool_calls else reply.content,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "unknown"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": reply.usage or _DEFAULT_USAGE,
    }


def _ends(event: dict[str, Any]) -> bool:
    """Whether an event is the end of an answer: a ``finish_reason`` or the usage chunk."""
    return "usage" in event or any(c.get("finish_reason") for c in event["choices"])


def _stream_events(body: dict[str, Any], behaviour: Behaviour) -> list[dict[str, Any]]:
    if isinstance(behaviour, Reply):
        reply = behaviour
    elif isinstance(behaviour, _STREAM_FAULTS):
        reply = Reply(behaviour.content)
    else:
        reply = Reply("the stream was going well until")
    base = {
        "id": f"chatcmpl-{next(_ids)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "unknown"),
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    tool_calls = _tool_calls(reply)
    if tool_calls:
        for index, call in enumerate(tool_calls):
            events.append(chunk({"tool_calls": [{"index": index, **call}]}))
    else:
        words = reply.content.split(" ")
        for position, word in enumerate(words):
            events.append(chunk({"content": word if position == 0 else " " + word}))
    events.append(chunk({}, "tool_calls" if tool_calls else "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**base, "choices": [], "usage": reply.usage or _DEFAULT_USAGE})
    return events


# -- /v1/embeddings ----------------------------------------------------------------------
# A separate block: its own script, log and counters, so that the chat route's API is
# untouched. Vectors are deterministic (a hash of model and text), so a test can compare a
# cached vector with a freshly embedded one; ``dimensions`` in the request sets their size.

EMBEDDING_DIMENSIONS = 8


def embedding_of(model: str, text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The vector the server answers for ``text`` embedded by ``model`` (before the float32
    rounding of a base64 answer)."""
    import hashlib

    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{model}\0{text}\0{counter}".encode()).digest()
        for offset in range(0, len(digest), 4):
            if len(values) == dimensions:
                break
            word = int.from_bytes(digest[offset : offset + 4], "little")
            values.append(word / 2**31 - 1.0)
        counter += 1
    return values


def _embeddings_state(server: OpenAICompatServer) -> dict[str, Any]:
    state = server.__dict__.get("_embeddings")
    if state is None:
        state = {"script": deque(), "default": None, "requests": []}
        server.__dict__["_embeddings"] = state
    return state


def _push_embeddings(self: OpenAICompatServer, *behaviours: Fail | Hang | Drop | None) -> None:
    """Script the next ``/v1/embeddings`` requests (``None``: answer normally)."""
    with self._lock:
        _embeddings_state(self)["script"].extend(behaviours)


def _set_embeddings_default(self: OpenAICompatServer, behaviour: Fail | Hang | Drop | None) -> None:
    """What ``/v1/embeddings`` does when its script is empty (``None``: answer)."""
    with self._lock:
        _embeddings_state(self)["default"] = behaviour


def _embedding_requests(self: OpenAICompatServer) -> list[dict[str, Any]]:
    """The body of every ``/v1/embeddings`` request, in order."""
    with self._lock:
        return list(_embeddings_state(self)["requests"])


def _embedded_texts(self: OpenAICompatServer) -> list[str]:
    """Every text sent to ``/v1/embeddings``, in order (a batch's texts one by one)."""
    texts: list[str] = []
    for body in _embedding_requests(self):
        given = body.get("input")
        texts.extend([given] if isinstance(given, str) else list(given or []))
    return texts


def _embeddings_route(self: OpenAICompatServer, handler: Any, raw: bytes) -> None:
    import base64
    import struct

    body = json.loads(raw or b"{}")
    with self._lock:
        state = _embeddings_state(self)
        state["requests"].append(body)
        behaviour = state["script"].popleft() if state["script"] else state["default"]
    if isinstance(behaviour, Hang):
        self._closing.wait(behaviour.seconds)
        behaviour = behaviour.then if isinstance(behaviour.then, Fail) else None
        if self._closing.is_set():
            handler._drop()
            return
    if isinstance(behaviour, Drop):
        handler._drop()
        return
    if isinstance(behaviour, Fail):
        handler._send_json(
            behaviour.status,
            {"error": {"message": behaviour.message, "type": "error", "code": None}},
            behaviour.headers,
        )
        return
    given = body.get("input")
    texts = [given] if isinstance(given, str) else list(given or [])
    model = str(body.get("model", "unknown"))
    size = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
    data = []
    for index, text in enumerate(texts):
        vector = embedding_of(model, str(text), size)
        if body.get("encoding_format") == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            encoded: Any = base64.b64encode(packed).decode("ascii")
        else:
            encoded = vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(max(1, len(str(text).split())) for text in texts)
    handler._send_json(
        200,
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
    )


OpenAICompatServer.push_embeddings = _push_embeddings  # type: ignore[attr-defined]
OpenAICompatServer.set_embeddings_default = _set_embeddings_default  # type: ignore[attr-defined]
OpenAICompatServer.embedding_requests = property(_embedding_requests)  # type: ignore[attr-defined]
OpenAICompatServer.embedded_texts = property(_embedded_texts)  # type: ignore[attr-defined]
OpenAICompatServer._embeddings_route = _embeddings_route  # type: ignore[attr-defined]
