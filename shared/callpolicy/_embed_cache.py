"""``VectorCache``: every text embedded once, across calls and processes.

An embedding is a pure function of the model and the text, so a vector, once computed, can
be served again for as long as the model is the same: re-embedding the text of a document
re-indexed, or of a query asked again, is money spent twice. Entries live in any
:class:`~callpolicy.CacheBackend` (memory, SQLite, Redis), as JSON: a float's ``repr`` is
the shortest text that reads back as the same float, so vectors round-trip exactly.

The key is a SHA-256 of the model's identity (its circuit key), the kind of input
(``"document"`` or ``"query"``: some providers embed them differently) and the text. It
never holds an API key, and the text itself is not stored in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

from ._cache_backend import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, CacheBackend, MemoryCacheBackend

__all__ = ["EmbedKind", "VectorCache"]

logger = logging.getLogger("callpolicy")

EmbedKind = Literal["document", "query"]
Texts = Sequence[str]
Vectors = Sequence[Sequence[float]]

_PREFIX = "callpolicy:embed:v1:"


class VectorCache:
    """Vectors by model and text, in a :class:`~callpolicy.CacheBackend`.

    Args:
        backend: a :class:`~callpolicy.MemoryCacheBackend` (the default),
            :class:`~callpolicy.SQLiteCacheBackend` (survives restarts), or a shared store
            such as ``RedisStore`` (its cache backend is used; shared between processes).
        ttl: seconds an entry is kept (None: until evicted).
        max_entries, max_bytes: bounds of the default memory backend.

    A backend that fails (Redis down, a locked file) is a miss, logged, never a failed
    call; an entry that does not read back as a list of numbers is a miss and deleted.

    >>> cache = VectorCache()
    >>> cache.put("openai::text-embedding-3-small", "document", ["hi"], [[0.1, -2.5e-07]])
    >>> cache.get("openai::text-embedding-3-small", "document", ["hi", "there"])
    [[0.1, -2.5e-07], None]
    """

    def __init__(
        self,
        backend: CacheBackend | Any | None = None,
        *,
        ttl: float | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if backend is None:
            backend = MemoryCacheBackend(
                max_entries=DEFAULT_MAX_ENTRIES if max_entries is None else max_entries,
                max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
            )
        else:
            if max_entries is not None or max_bytes is not None:
                raise TypeError(
                    "max_entries/max_bytes bound the default memory backend; "
                    "give your backend its own bounds instead"
                )
            if not isinstance(backend, CacheBackend):
                as_backend = getattr(backend, "cache_backend", None)
                if not callable(as_backend):
                    raise TypeError(
                        f"backend: {type(backend).__name__} does not implement CacheBackend"
                    )
                backend = as_backend()
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
                raise ValueError(f"ttl: expected a positive number of seconds or None, got {ttl!r}")
            ttl = float(ttl)
        self.backend: CacheBackend = backend
        self.ttl = ttl

    @staticmethod
    def key(model: str, kind: EmbedKind, text: str) -> str:
        """The backend key of ``text`` embedded by ``model`` (a circuit key) as ``kind``."""
        digest = hashlib.sha256(
            json.dumps([model, kind, text], ensure_ascii=False).encode("utf-8")
        ).hexdigest()
        return _PREFIX + digest

    # -- sync ------------------------------------------------------------------------------
    def get(self, model: str, kind: EmbedKind, texts: Sequence[str]) -> list[list[float] | None]:
        """The cached vector of each text, or None where there is none."""
        return [self._read(self.key(model, kind, text)) for text in texts]

    def put(self, model: str, kind: EmbedKind, texts: Texts, vectors: Vectors) -> None:
        """Store each text's vector (``texts`` and ``vectors`` in the same order)."""
        for key, payload in self._entries(model, kind, texts, vectors):
            try:
                self.backend.set(key, payload, ttl=self.ttl)
            except Exception as exc:  # a cache that cannot store is not a failed call
                _failed("write", exc)

    # -- async -----------------------------------------------------------------------------
    async def aget(
        self, model: str, kind: EmbedKind, texts: Sequence[str]
    ) -> list[list[float] | None]:
        """Async :meth:`get` (the backend's async methods when it needs them)."""
        if not self.backend.is_async_native:
            return self.get(model, kind, texts)
        found: list[list[float] | None] = []
        for text in texts:
            key = self.key(model, kind, text)
            try:
                payload = await self.backend.aget(key)
            except Exception as exc:
                _failed("read", exc)
                payload = None
            found.append(await self._aparsed(key, payload))
        return found

    async def aput(self, model: str, kind: EmbedKind, texts: Texts, vectors: Vectors) -> None:
        """Async :meth:`put`."""
        if not self.backend.is_async_native:
            self.put(model, kind, texts, vectors)
            return
        for key, payload in self._entries(model, kind, texts, vectors):
            try:
                await self.backend.aset(key, payload, ttl=self.ttl)
            except Exception as exc:
                _failed("write", exc)

    def _entries(
        self, model: str, kind: EmbedKind, texts: Texts, vectors: Vectors
    ) -> list[tuple[str, str]]:
        """The backend key and JSON payload of each text's vector."""
        return [
            (self.key(model, kind, text), _dumps(vector))
            for text, vector in zip(texts, vectors, strict=True)
        ]

    def clear(self) -> None:
        """Remove every entry of the backend (the backend may hold other entries too)."""
        self.backend.clear()

    def __len__(self) -> int:
        return len(self.backend)

    def __repr__(self) -> str:
        return f"VectorCache(backend={type(self.backend).__name__}, ttl={self.ttl})"

    # -- reading ---------------------------------------------------------------------------
    def _read(self, key: str) -> list[float] | None:
        try:
            payload = self.backend.get(key)
        except Exception as exc:
            _failed("read", exc)
            return None
        vector = _loads(payload)
        if vector is None and payload is not None:
            self._drop(key)
        return vector

    async def _aparsed(self, key: str, payload: str | None) -> list[float] | None:
        vector = _loads(payload)
        if vector is None and payload is not None:
            try:
                await self.backend.adelete(key)
            except Exception:
                logger.warning("callpolicy: vector cache delete failed")
        return vector

    def _drop(self, key: str) -> None:
        logger.warning("callpolicy: an unreadable vector cache entry was dropped")
        try:
            self.backend.delete(key)
        except Exception:
            logger.warning("callpolicy: vector cache delete failed")


def _dumps(vector: Sequence[float]) -> str:
    # repr of a float is its shortest exact text: the vector reads back bit for bit.
    return json.dumps([float(x) for x in vector], separators=(",", ":"))


def _loads(payload: str | None) -> list[float] | None:
    if payload is None:
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, list) or not data:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data):
        return None
    vector = [float(x) for x in data]
    return vector if all(math.isfinite(x) or math.isinf(x) for x in vector) else None


def _failed(action: str, exc: Exception) -> None:
    """A backend that failed is a miss (or an entry not stored), said at WARNING; never a
    failed call. Names the error's class only (its message may quote the backend's URL)."""
    logger.warning("callpolicy: vector cache %s failed: %s", action, type(exc).__name__)
