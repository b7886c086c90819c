"""How the response cache stores an answer: JSON text, never pickle.

An entry is an envelope around the adapter's JSON-able dict::

    {"v": 1, "created": <wall-clock s>, "expires": <wall-clock s or null>, "payload": {...}}

Times are wall clock, so they survive a restart. Anything else under a key (another
version, a hand-written value, a truncated write) is not an entry: the cache treats it
as a miss (see ``_cache``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["pack_entry", "unpack_entry"]

_VERSION = 1


def pack_entry(payload: Mapping[str, Any], *, now: float, ttl: float | None) -> str:
    """The entry text of ``payload``, stored at ``now`` and fresh for ``ttl`` seconds
    (None: until evicted). ``TypeError``/``ValueError`` if it is not a JSON-able dict."""
    envelope = {
        "v": _VERSION,
        "created": now,
        "expires": None if ttl is None else now + ttl,
        "payload": payload,
    }
    if not isinstance(payload, Mapping):
        raise TypeError(f"expected a dict, got {type(payload).__name__}")
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def unpack_entry(text: str) -> tuple[dict[str, Any], float | None]:
    """The payload of an entry and when it expires (None: never). ``ValueError`` (or
    ``KeyError``, ``TypeError``) if ``text`` is not an entry."""
    envelope = json.loads(text)
    if not isinstance(envelope, dict) or envelope.get("v") != _VERSION:
        raise ValueError("not a callpolicy cache entry")
    payload = envelope["payload"]
    expires = envelope["expires"]
    if not isinstance(payload, dict) or not (expires is None or isinstance(expires, (int, float))):
        raise ValueError("malformed cache entry")
    return payload, expires
