"""Tool calling end to end on the real model: required and named choices always give calls that parse and
whose arguments validate (streamed or not), "none" gives none, and a tool round trip renders."""
from __future__ import annotations

import json

import jsonschema
import pytest
from server_util import assert_error, assert_serving

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


def assert_valid_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMA_OF)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_gives_valid_calls(client, model, temperature):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=temperature, seed=5, max_tokens=120)
    choice = r.choices[0]
    assert choice.message.content is None
    calls = choice.message.tool_calls
    if choice.finish_reason == "length":  # parallel calls: a sampling model may go on calling; the last is cut
        calls = calls[:-1]
    else:
        assert choice.finish_reason == "tool_calls"
    assert_valid_calls(calls)


def test_required_without_parallel_calls_gives_one(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=120)
    assert len(r.choices[0].message.tool_calls) == 1
    assert_valid_calls(r.choices[0].message.tool_calls)


def test_named_function(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=120,
                                       tool_choice={"type": "function", "function": {"name": "add"}}, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["add"]
        assert_valid_calls(choice.message.tool_calls, names=["add"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_arrive_as_openai_sends_them(client, model, tool_choice):
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                                 temperature=0, max_tokens=120, stream=True))
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not (delta.content or "").strip()
        for d in delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call carries its id, type and name
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert sorted(calls) == list(range(len(calls)))
    # Several argument pieces: streamed, not sent at the end in one go.
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) > len(calls) + 1
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMA_OF[call["name"]])
    # Streamed and unstreamed greedy answers agree.
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                       temperature=0, max_tokens=120)
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == \
        [(c["name"], c["arguments"]) for c in calls.values()]


def test_none_gives_no_calls(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0,
                                       max_tokens=40)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content


def test_auto_calls_parse_when_made(client, model):
    """With "auto" the model chooses; whatever it writes, calls it opens are well-formed."""
    for seed in range(2):
        r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                           max_tokens=80)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                assert_valid_calls(choice.message.tool_calls)
        else:
            assert "<tool_call>" not in (choice.message.content or "") or choice.finish_reason == "length"


def test_tool_round_trip_renders_second_turn(client, model):
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "add"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 5})},
    ]
    second = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=30)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The history (call and result) is in the prompt: it is longer than the first turn's.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20


@pytest.mark.parametrize("body, contains", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tool_choice": "required"}, "tool_choice is only allowed when tools are given"),
    ({"tools": [WEATHER, WEATHER]}, "unique"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"if": {"type": "string"}}}}}}], "tool_choice": "required"}, "'if'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
])
def test_invalid_tools_are_400(server, http, model, body, contains):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 4, **body})
    assert_error(r, 400, contains=contains)
    assert_serving(server)
