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

Both adapters describe their requests with the same walker, :func:`key_data` (and
:func:`key_text` for parts that must stay whole, such as schemas and conversations).

Anything else (a client object, a function) has no canonical JSON form: an
:class:`UncacheableRequestError` (a ``TypeError``) naming where it was. A value we cannot
see into would otherwise make the key silently too coarse (a false hit: another request's
answer) or unstable; the engine then calls the model without the cache, with one warning
per kind of value.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic_core import PydanticSerializationError, to_jsonable_python

__all__ = [
    "ENDPOINT_ARGUMENTS",
    "SCHEMA_ARGUMENTS",
    "UncacheableRequestError",
    "by_type",
    "cache_key",
    "canonical_json",
    "describe_arguments",
    "is_secret_name",
    "key_data",
    "key_text",
]

_KEY_PREFIX = b"callpolicy.cache.v2\n"
"""Hashed before the JSON: a change of the canonical form changes the version, so old
persisted entries can never be mistaken for new ones."""

SCHEMA_ARGUMENTS: Final = frozenset(
    {
        "format",
        "function_call",
        "functions",
        "json_schema",
        "output_cls",
        "response_format",
        "response_json_schema",
        "response_schema",
        "schema",
        "text",
        "tool_choice",
        "tools",
    }
)
"""Call arguments and model settings that carry JSON schemas (tools, output formats),
for both adapters: they go into a request as :func:`key_text`, so that the secret-name
filter never drops a part of them (a changed schema of a tool parameter called
``password`` or ``token`` would otherwise be a false hit). Schemas hold no credentials."""

ENDPOINT_ARGUMENTS: Final = frozenset(
    {
        "anthropic_api_url",
        "api_base",
        "azure_endpoint",
        "base_url",
        "endpoint",
        "endpoint_url",
        "openai_api_base",
    }
)
"""Model settings naming where a request goes: kept in a request (another server may
answer another model under the same name), as URLs without their credentials (user info,
query string, fragment)."""

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


class UncacheableRequestError(TypeError):
    """A request holds a value with no canonical JSON form (a client object, a function, an
    object of an unknown class): its key could not tell two different values apart, so the
    call is not cached (the engine calls the model, with one warning per kind of value).

    Attributes:
        kind: the value's class, ``module.QualName``.
        where: where it was, e.g. ``request['kwargs']['client']``.
    """

    def __init__(self, value: object) -> None:
        cls = type(value)
        self.kind = f"{cls.__module__}.{cls.__qualname__}"
        self.path: list[str] = []
        super().__init__(self.kind)

    @property
    def where(self) -> str:
        return "request" + "".join(reversed(self.path))

    def __str__(self) -> str:
        return (
            f"cache_key: {self.where} is a {self.kind}, which has no canonical JSON form; "
            "pass JSON data (or pydantic models, dataclasses, enums) describing the request"
        )


Convert = Callable[[Any], Any]
"""An adapter's hook for values the engine does not know (a framework's tool class, say):
their data, or ``NotImplemented`` to let the engine decide."""

_DROP = object()


def key_data(value: Any, *, convert: Convert | None = None, opaque: Convert | None = None) -> Any:
    """``value`` as the JSON data a cache key is made of: the one walker the adapters and
    :func:`canonical_json` share.

    - JSON values pass as they are; mappings keep every entry (secrets *by name* are
      dropped by :func:`canonical_json`, at any depth, not here) with their names as
      strings; tuples are lists; sets are sorted; enums are their values;
    - pydantic models are their JSON form (pydantic's serializer: a ``SecretStr`` field is
      masked; in :func:`canonical_json`, their fields, secrets dropped); dataclasses are
      their fields; a pydantic *class* is its JSON schema, as JSON text (so that the name
      filter never drops a property called ``password``); bytes are base64; dates, times,
      UUIDs, decimals, paths, URLs are their ISO/str forms (pydantic's JSON form for the
      types it knows);
    - pydantic ``SecretStr``/``SecretBytes`` values are None (:func:`canonical_json` drops
      them);
    - ``convert`` (if given) is asked first about any other value; what it returns is
      walked in turn;
    - anything else has no canonical JSON form: ``opaque(value)`` if given (model settings
      such as a client object count by their type, say), else
      :class:`UncacheableRequestError` naming where it was.

    >>> key_data({"b": (1, 2), "a": {3}})
    {'b': [1, 2], 'a': [3]}
    """
    found = _walk(value, convert, opaque, False)
    return None if found is _DROP else found


def key_text(value: Any, *, convert: Convert | None = None, opaque: Convert | None = None) -> str:
    """:func:`key_data` as canonical JSON text (sorted keys, no whitespace). In a request
    this text is one opaque string: the secret-name filter of :func:`canonical_json` does
    not look into it, which is what schemas and conversations need.

    JSON data is encoded natively (a conversation is mostly strings), the walker seeing
    only the values ``json`` does not know; the text is the same as walking it all."""

    def walked(item: Any) -> Any:
        return key_data(item, convert=convert, opaque=opaque)

    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=walked
        )
    except UncacheableRequestError:
        raise
    except TypeError:  # mapping keys json cannot sort or name (enums, mixed types): walk all
        return _dumps(walked(value))


def describe_arguments(
    arguments: Mapping[Any, Any],
    *,
    convert: Convert | None = None,
    schema_convert: Convert | None = None,
    opaque: Convert | None = None,
    where: str = "kwargs",
) -> dict[str, Any]:
    """Call arguments or model settings as a part of a request, the one way both adapters
    describe them: those carrying schemas (:data:`SCHEMA_ARGUMENTS`) as :func:`key_text`
    (whole: the secret-name filter must not drop a tool parameter called ``password``;
    ``schema_convert``, else ``convert``, knows the framework's tools), endpoints
    (:data:`ENDPOINT_ARGUMENTS`) without credentials, the rest as :func:`key_data`. A value
    with no JSON form raises :class:`UncacheableRequestError` naming
    ``request[where][name]``.

    >>> describe_arguments({"temperature": 0.2, "tools": [{"name": "f"}]})
    {'temperature': 0.2, 'tools': '[{"name":"f"}]'}
    >>> describe_arguments({"base_url": "https://user:pw@api.acme.test/v1?k=1"})
    {'base_url': 'https://api.acme.test/v1'}
    """
    described: dict[str, Any] = {}
    for name, value in arguments.items():
        label = name if isinstance(name, str) else key_text(name)
        try:
            if name in SCHEMA_ARGUMENTS and value is not None:
                described[label] = key_text(value, convert=schema_convert or convert)
            elif name in ENDPOINT_ARGUMENTS and isinstance(value, str):
                described[label] = _endpoint(value)
            else:
                described[label] = key_data(value, convert=convert, opaque=opaque)
        except UncacheableRequestError as exc:
            exc.path.append(f"[{label!r}]")
            exc.path.append(f"[{where!r}]")
            raise
    return described


def _endpoint(url: str) -> str:
    """``url`` without its user info, query string and fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable endpoint>"
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def by_type(value: Any) -> dict[str, str]:
    """An ``opaque`` hook for :func:`key_data`: a value counted by its class only (for
    settings that stay the same across calls, such as a client object)."""
    cls = type(value)
    return {"$object": f"{cls.__module__}.{cls.__qualname__}"}


def _walk(value: Any, convert: Convert | None, opaque: Convert | None, secrets: bool) -> Any:
    """``value`` as JSON-native data (``_DROP`` for a secret); ``secrets``: drop mapping
    entries named like secrets too."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for raw_name, item in value.items():
            name = raw_name if type(raw_name) is str else _plain_name(raw_name)
            if secrets and is_secret_name(name):
                continue
            plain = _walk_at(name, item, convert, opaque, secrets)
            if plain is not _DROP:
                out[name] = plain
        return out
    if kind is list or kind is tuple:
        return _walk_items(value, convert, opaque, secrets)
    if isinstance(value, (SecretStr, SecretBytes)):
        # Dropped from a request; a null in an adapter's data (where json would put it).
        return _DROP if secrets else None
    if convert is not None:
        converted = convert(value)
        if converted is not NotImplemented:
            return _walk(converted, convert, opaque, secrets)
    if isinstance(value, enum.Enum):
        return _walk(value.value, convert, opaque, secrets)
    if isinstance(value, (str, int, float)):  # subclasses (bool is covered above)
        return value
    if isinstance(value, BaseModel):
        if not secrets:
            try:  # pydantic's own JSON form, in one native call (SecretStr masked)
                return to_jsonable_python(value, bytes_mode="base64")
            except PydanticSerializationError:
                pass  # a field pydantic cannot serialise: walk it (convert may know it)
        # Python mode keeps SecretStr objects as they are, so they are recognised and dropped.
        return _walk(value.model_dump(mode="python"), convert, opaque, secrets)
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"$schema": _schema_text(value), "$name": value.__name__}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _walk(fields, convert, opaque, secrets)
    if isinstance(value, (list, tuple)):
        return _walk_items(value, convert, opaque, secrets)
    if isinstance(value, (set, frozenset)):
        return sorted(_walk_items(value, convert, opaque, secrets), key=_dumps)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal, PurePath)):
        return str(value)
    if not callable(value):
        try:  # URLs, timedeltas, IP addresses, patterns, ...: pydantic's JSON form
            return to_jsonable_python(value, bytes_mode="base64")
        except PydanticSerializationError:
            pass
    if opaque is not None:
        return _walk(opaque(value), None, None, secrets)
    raise UncacheableRequestError(value)


def _walk_items(
    values: Any, convert: Convert | None, opaque: Convert | None, secrets: bool
) -> list[Any]:
    out = []
    for index, item in enumerate(values):
        plain = _walk_at(index, item, convert, opaque, secrets)
        if plain is not _DROP:
            out.append(plain)
    return out


def _walk_at(
    where: str | int, item: Any, convert: Convert | None, opaque: Convert | None, secrets: bool
) -> Any:
    """:func:`_walk` of the entry ``where`` (a name or an index) of a mapping or list: an
    error names it."""
    try:
        return _walk(item, convert, opaque, secrets)
    except UncacheableRequestError as exc:
        exc.path.append(f"[{where!r}]")
        raise


@functools.lru_cache(maxsize=256)
def _schema_text(cls: type[BaseModel]) -> str:
    return _dumps(cls.model_json_schema())


def _plain_name(name: object) -> str:
    if isinstance(name, enum.Enum):
        name = name.value
    if isinstance(name, str):
        return str(name)
    if isinstance(name, (int, float, bool)) or name is None:
        return json.dumps(name)
    raise UncacheableRequestError(name)


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
    plain = _walk(request, None, None, True)
    return _dumps({} if plain is _DROP else plain)


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
