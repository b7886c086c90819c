"""The cache key covers everything that changes the answer, in a stable order, and never a
secret. (The reference hashed tool *names* only: a changed schema was a false hit.)"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
import json
import random
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from callpolicy._cache_key import (
    UncacheableRequestError,
    by_type,
    cache_key,
    canonical_json,
    is_secret_name,
    key_data,
    key_text,
)

SECRET = "sk-live-THIS-MUST-NEVER-BE-HASHED-1234567890"


def request() -> dict[str, Any]:
    """A request as an adapter describes it: every part that changes the answer."""
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c1", "name": "lookup", "args": {"q": "cat"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Look something up.",
                    "parameters": {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                        "required": ["q"],
                    },
                },
            }
        ],
        "tool_choice": "auto",
        "response_format": None,
        "temperature": 0.2,
        "max_tokens": 256,
        "stop": ["\n\n"],
        "params": {"top_p": 1.0, "seed": 7},
    }


def test_key_is_sha256_hex() -> None:
    key = cache_key(request())
    assert len(key) == 64
    assert int(key, 16) >= 0


def test_mapping_order_never_matters() -> None:
    original = request()

    def shuffled(value: Any, rng: random.Random) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)
            return {k: shuffled(v, rng) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v, rng) for v in value]
        return value

    for seed in range(20):
        assert cache_key(shuffled(original, random.Random(seed))) == cache_key(original)


def test_list_order_matters() -> None:
    changed = request()
    changed["messages"][0], changed["messages"][1] = changed["messages"][1], changed["messages"][0]
    assert cache_key(changed) != cache_key(request())


def _changed(path: list[Any], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(request())
    target = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["provider"], "azure"),
        (["model"], "gpt-4o"),
        (["temperature"], 0.3),
        (["temperature"], None),
        (["max_tokens"], 257),
        (["stop"], ["\n"]),
        (["tool_choice"], "required"),
        (["tool_choice"], {"type": "function", "function": {"name": "lookup"}}),
        (["response_format"], {"type": "json_schema", "schema": {"type": "object"}}),
        (["params", "seed"], 8),
        (["messages", 0, "content"], "You are verbose."),
        (["messages", 1, "content", 1, "image_url", "url"], "https://x.test/dog.png"),
        (["messages", 2, "tool_calls", 0, "args", "q"], "dog"),
        (["tools", 0, "function", "description"], "Look it up."),
        (["tools", 0, "function", "parameters", "properties", "q", "type"], "integer"),
        (["tools", 0, "function", "parameters", "required"], []),
    ],
)
def test_every_part_that_changes_the_answer_changes_the_key(path: list[Any], value: Any) -> None:
    assert cache_key(_changed(path, value)) != cache_key(request())


def test_a_dropped_content_block_changes_the_key() -> None:
    changed = request()
    del changed["messages"][1]["content"][1]
    assert cache_key(changed) != cache_key(request())


def test_int_and_float_stay_apart_but_tuples_are_lists() -> None:
    assert cache_key({"t": 1}) != cache_key({"t": 1.0})
    assert cache_key({"stop": ("a", "b")}) == cache_key({"stop": ["a", "b"]})


@pytest.mark.parametrize(
    ("secrets", "residue"),
    [
        ({"api_key": SECRET}, {}),
        ({"openai_api_key": SECRET}, {}),
        ({"ANTHROPIC_API_KEY": SECRET}, {}),
        ({"headers": {"Authorization": f"Bearer {SECRET}"}}, {"headers": {}}),
        ({"headers": {"x-api-key": SECRET, "X-Goog-Api-Key": SECRET}}, {"headers": {}}),
        ({"token": SECRET, "password": SECRET, "client_secret": SECRET}, {}),
        ({"azure_ad_token": SECRET, "aws_secret_access_key": SECRET, "access_token": SECRET}, {}),
        ({"credentials": {"key": SECRET}}, {}),
        ({"extra": SecretStr(SECRET)}, {}),
        ({"extra": [SecretStr(SECRET)]}, {"extra": []}),
    ],
)
def test_secrets_never_reach_the_key(secrets: dict[str, Any], residue: dict[str, Any]) -> None:
    with_secrets = request()
    with_secrets["params"] = {**with_secrets["params"], **secrets}
    assert SECRET not in canonical_json(with_secrets)
    # The key equals that of the request without the secrets (an emptied mapping stays).
    without = request()
    without["params"] = {**without["params"], **residue}
    assert cache_key(with_secrets) == cache_key(without)
    top_level = {**request(), **secrets}
    assert SECRET not in canonical_json(top_level)


def test_a_headers_mapping_without_secrets_stays_in_the_key() -> None:
    with_org = _changed(["params", "headers"], {"OpenAI-Beta": "assistants=v2"})
    assert "assistants=v2" in canonical_json(with_org)
    assert cache_key(with_org) != cache_key(request())


def test_secret_values_are_dropped_wherever_they_are() -> None:
    class Config(BaseModel):
        model: str
        api_key: SecretStr
        key_for_something: SecretStr

    text = canonical_json({"config": Config(model="m", api_key=SECRET, key_for_something=SECRET)})
    assert text == '{"config":{"model":"m"}}'


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("OPENAI_API_KEY", True),
        ("x-api-key", True),
        ("Authorization", True),
        ("Proxy-Authorization", True),
        ("token", True),
        ("session_token", True),
        ("password", True),
        ("my_secret", True),
        ("max_tokens", False),
        ("max_completion_tokens", False),
        ("stop_token", False),
        ("eos_token", False),
        ("tokens", False),
        ("key", False),
        ("temperature", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_rich_values_have_a_canonical_form() -> None:
    class Color(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Block:
        kind: str
        data: bytes

    class Schema(BaseModel):
        name: str
        fields: list[str]

    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    value = {
        "color": Color.RED,
        "block": Block("image", b"\x89PNG"),
        "schema": Schema(name="Answer", fields=["a", "b"]),
        "tags": {"b", "a"},
        "when": when,
        "id": uuid.UUID(int=1),
        Color.RED: 1,
        3: "three",
    }
    text = canonical_json(value)
    data = json.loads(text)
    assert data["color"] == "red"
    assert data["block"] == {"kind": "image", "data": {"$bytes": "iVBORw=="}}
    assert data["schema"] == {"name": "Answer", "fields": ["a", "b"]}
    assert data["tags"] == ["a", "b"]
    assert data["when"] == "2024-01-02T03:04:05+00:00"
    assert data["id"] == "00000000-0000-0000-0000-000000000001"
    assert data["red"] == 1
    assert data["3"] == "three"
    assert cache_key(value) == cache_key(dict(reversed(list(value.items()))))


def test_a_value_without_a_json_form_is_a_type_error_naming_where() -> None:
    with pytest.raises(
        UncacheableRequestError,
        match=r"request\['messages'\]\[1\]\['client'\] is a builtins\.object",
    ):
        cache_key({"messages": [{}, {"client": object()}]})
    with pytest.raises(TypeError, match="function"):
        cache_key({"tools": [len]})
    with pytest.raises(TypeError, match="mapping"):
        cache_key(["not", "a", "mapping"])  # type: ignore[arg-type]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(data=st.dictionaries(st.text(), _json, max_size=6), seed=st.integers(0, 1000))
def test_property_key_ignores_mapping_order(data: dict[str, Any], seed: int) -> None:
    items = list(data.items())
    random.Random(seed).shuffle(items)
    assert cache_key(dict(items)) == cache_key(data)
    # The canonical form is JSON that reads back to the data, unless secrets were removed.
    if not _names_a_secret(data):
        assert json.loads(canonical_json(data)) == data


def _names_a_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return any(is_secret_name(k) or _names_a_secret(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_names_a_secret(v) for v in value)
    return False


class _Opaque:
    pass


class _Colour(enum.Enum):
    RED = "red"
    ONE = 1


_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=8)
    | st.sets(st.integers(), max_size=3)
    | st.tuples(st.integers(), st.text())
    | st.dates()
    | st.sampled_from(list(_Colour))
    | st.text(max_size=5).map(SecretStr)
)
_mixed = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=_mixed)
def test_property_key_text_is_the_walkers_data_as_text(value: Any) -> None:
    # key_text encodes JSON natively and walks only what json does not know: the same
    # text as walking it all (with string mapping keys), secrets as null in both.
    text = key_text(value)
    assert text == json.dumps(
        key_data(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert key_text({"v": value}) == key_text({"v": value})


def test_key_text_refuses_an_opaque_value_naming_its_kind() -> None:
    with pytest.raises(UncacheableRequestError, match="_Opaque") as raised:
        key_text({"a": [1, _Opaque()]})
    assert raised.value.kind.endswith("_Opaque")
    assert key_data({"a": _Opaque()}, opaque=by_type) == {"a": {"$object": f"{__name__}._Opaque"}}
