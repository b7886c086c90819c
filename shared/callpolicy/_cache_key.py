"""The response cache's key: SHA-256 over a canonical JSON form of the request.

The adapters describe a request as a plain mapping — provider, model, every message with
all its content blocks, bound tools with their schemas, tool_choice, the structured-output
schema, temperature, max_tokens, stop and the other call parameters — and
:func:`cache_key` hashes it. Two requests get the same key exactly when their canonical
forms are equal:

- mapping order never matters (keys are sorted); list order always does;
- tuples are lists; sets are sorted; enums are their values; pydantic models and
  dataclasses are their fields; bytes are base64; dates, times, UUIDs, decimals and paths
  are their ISO/str forms; ``1`` and ``1.0`` stay different (``"1"`` vs ``"1.0"``);
- secrets are removed first, at any depth: a mapping entry whose name is an API key,
  token, password, secret or authorization header (see :func:`is_secret_name`), and any
  pydantic ``SecretStr``/``SecretBytes`` value. A key never depends on who pays.

Anything else (a client object, a function) is a ``TypeError`` naming where it was: the
adapters should pass what changes the answer, not whole objects, and a value we cannot
see into would otherwise make the key silently too coarse (a wrong answer) or unstable.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import hashlib
import json
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

__all__ = ["cache_key", "canonical_json", "is_secret_name"]

_KEY_PREFIX = b"callpolicy.cache.v1\n"
"""Hashed before the JSON: a change of the canonical form changes the version, so old
persisted entries can never be mistaken for new ones."""

_SECRET_NAMES = frozenset(
    {
        "access_key",
        "access_token",
        "api_key",
        "api_token",
        "apikey",
        "auth",
        "auth_token",
        "authorization",
        "bearer",
        "bearer_token",
        "client_secret",
        "cookie",
        "credentials",
        "id_token",
        "passwd",
        "password",
        "private_key",
        "proxy_authorization",
        "refresh_token",
        "secret",
        "secret_access_key",
        "secret_key",
        "session_token",
        "set_cookie",
        "token",
        "x_api_key",
        "x_goog_api_key",
    }
)
# Suffixes are explicit on purpose: a bare "_token" would also drop answer-changing
# parameters such as "stop_token" or "eos_token", and a false cache hit is worse than
# a secret's digest inside a SHA-256.
_SECRET_SUFFIXES = (
    "_access_key",
    "_access_token",
    "_ad_token",
    "_api_key",
    "_api_token",
    "_apikey",
    "_auth_token",
    "_bearer_token",
    "_password",
    "_refresh_token",
    "_secret",
    "_secret_key",
    "_session_token",
)


def is_secret_name(name: str) -> bool:
    """Whether a mapping entry called ``name`` holds a secret (case and ``-``/``_``
    insensitive): ``api_key``, ``openai_api_key``, ``Authorization``, ``x-api-key``,
    ``token``, ``password``, ``client_secret``, ... but not ``max_tokens``.

    >>> [is_secret_name(n) for n in ("OPENAI_API_KEY", "X-Api-Key", "max_tokens")]
    [True, True, False]
    """
    found = _secret_names_seen.get(name)
    if found is None:
        normal = name.lower().replace("-", "_")
        found = normal in _SECRET_NAMES or normal.endswith(_SECRET_SUFFIXES)
        if len(_secret_names_seen) >= 4096:  # requests use few names; stay bounded anyway
            _secret_names_seen.clear()
        _secret_names_seen[name] = found
    return found


# Mapping names seen so far, and whether each is a secret's: a request repeats the same
# few names ("role", "content", "type", ...) hundreds of times.
_secret_names_seen: dict[str, bool] = {}


class _Unhashable(TypeError):
    def __init__(self, value: object) -> None:
        self.value_type = type(value).__name__
        self.path: list[str] = []
        super().__init__(self.value_type)

    def describe(self) -> str:
        where = "request" + "".join(reversed(self.path))
        return (
            f"cache_key: {where} is a {self.value_type}, which has no canonical JSON form; "
            "pass JSON data (or pydantic models, dataclasses, enums) describing the request"
        )


_DROP = object()


def _plain(value: Any) -> Any:
    """``value`` as JSON-native data, with secrets removed (``_DROP`` for a secret)."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for raw_name, item in value.items():
            name = raw_name if type(raw_name) is str else _plain_name(raw_name)
            if is_secret_name(name):
                continue
            try:
                plain = _plain(item)
            except _Unhashable as exc:
                exc.path.append(f"[{name!r}]")
                raise
            if plain is not _DROP:
                out[name] = plain
        return out
    if kind is list or kind is tuple:
        return _plain_items(value)
    if isinstance(value, (SecretStr, SecretBytes)):
        return _DROP
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (str, int, float)):  # subclasses (bool is covered above)
        return value
    if isinstance(value, BaseModel):
        # Python mode keeps SecretStr objects as they are, so they are recognised and dropped.
        return _plain(value.model_dump(mode="python"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return _plain_items(value)
    if isinstance(value, (set, frozenset)):
        items = _plain_items(value)
        return sorted(items, key=_dumps)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal, PurePath)):
        return str(value)
    raise _Unhashable(value)


def _plain_items(values: Any) -> list[Any]:
    out = []
    for index, item in enumerate(values):
        try:
            plain = _plain(item)
        except _Unhashable as exc:
            exc.path.append(f"[{index}]")
            raise
        if plain is not _DROP:
            out.append(plain)
    return out


def _plain_name(name: object) -> str:
    if isinstance(name, enum.Enum):
        name = name.value
    if isinstance(name, str):
        return str(name)
    if isinstance(name, (int, float, bool)) or name is None:
        return json.dumps(name)
    raise _Unhashable(name)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(request: Mapping[str, Any]) -> str:
    """The canonical JSON text :func:`cache_key` hashes: secrets removed, keys sorted,
    no whitespace, non-ASCII kept as is.

    >>> canonical_json({"model": "m1", "temperature": 0.2, "api_key": "sk-123"})
    '{"model":"m1","temperature":0.2}'
    """
    if not isinstance(request, Mapping):
        raise TypeError(f"cache_key: expected a mapping, got {type(request).__name__}")
    try:
        plain = _plain(request)
    except _Unhashable as exc:
        raise TypeError(exc.describe()) from None
    return _dumps(plain)


def cache_key(request: Mapping[str, Any]) -> str:
    """The cache key of a request: 64 hex digits of SHA-256 over :func:`canonical_json`.

    >>> a = cache_key({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
    >>> b = cache_key({"messages": [{"content": "hi", "role": "user"}], "model": "m1"})
    >>> a == b, len(a)
    (True, 64)
    >>> a == cache_key({"model": "m1", "messages": [{"role": "user", "content": "hi!"}]})
    False
    """
    return hashlib.sha256(_KEY_PREFIX + canonical_json(request).encode("utf-8")).hexdigest()
