"""Structured output end to end on the real model: JSON schema, json_object, regex and EBNF constraints,
checked by oracles (jsonschema, re.fullmatch, a parser), also while sampling at temperature 1.0."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from server_util import assert_error, assert_serving, sse_json

ASK = [{"role": "user", "content": "Describe one example as JSON."}]

# Strings are bounded so every output can complete well within max_tokens, even when sampling.
NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"]},
    "enum_const": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                    "kind": {"const": "paint"}, "ok": {"type": "boolean"}},
                   "required": ["color", "kind", "ok"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": NAME, "address": {
            "type": "object", "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"]}}, "required": ["name", "address"]}}, "required": ["user"]},
    "array_bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2,
                                                               "maxItems": 3}}, "required": ["tags"]},
    "numbers": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                                 "qty": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}},
                "required": ["price", "qty"]},
    "any_of": {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                                 {"type": "string", "pattern": "^[a-z]{3}$"}]}},
               "required": ["id"]},
    "defs_ref": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                                           "maximum": 9},
                                                                     "y": {"type": "integer", "minimum": -9,
                                                                           "maximum": 9}},
                                     "required": ["x", "y"]}},
                 "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
                 "required": ["a", "b"]},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
                                         "in_stock": {"type": "boolean"}}, "required": ["sku", "in_stock"]}},
    "formats": {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                                                 "id": {"type": "string", "format": "uuid"}},
                "required": ["day", "id"]},
    "nullable_optional": {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 8},
                                                           "score": {"type": "integer", "minimum": 1, "maximum": 5}},
                          "required": ["note", "score"]},
    "enum_array": {"type": "object", "properties": {"days": {"type": "array", "maxItems": 3, "items": {
        "enum": ["mon", "tue", "wed"]}}}, "required": ["days"]},
}


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_every_schema_holds_while_sampling(client, model):
    """Eleven schemas at temperature 1.0, sent together so they share batches: every output parses and
    validates (formats included)."""
    def ask(name: str):
        return name, client.chat.completions.create(model=model, messages=ASK, temperature=1.0, max_tokens=160,
                                                    seed=7, response_format=schema_format(name))

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        results = list(pool.map(ask, SCHEMAS))
    checker = jsonschema.Draft202012Validator
    for name, r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        doc = json.loads(choice.message.content)
        checker(SCHEMAS[name], format_checker=checker.FORMAT_CHECKER).validate(doc)


def test_json_schema_with_n_and_streaming(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ASK, temperature=1.0, max_tokens=120, n=3,
                                                 stream=True, response_format=schema_format("nested")))
    texts = ["", "", ""]
    finish = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "stop", 1: "stop", 2: "stop"}
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def test_json_object(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=1.0, max_tokens=200, seed=3,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an unbounded object may run out of tokens: then it must say so, and be a JSON object's prefix
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content.startswith("{")


def test_length_cut_is_reported_as_length(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=5,
                                       response_format=schema_format("nested"))
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_stop_string_cuts_constrained_output(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=60, stop=['"age"'],
                                       response_format=schema_format("flat"))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.startswith('{"name": "') and '"age"' not in r.choices[0].message.content


def test_constraint_with_penalties_and_top_p(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, temperature=1.0, top_p=0.9, frequency_penalty=1.5,
                                       presence_penalty=1.0, max_tokens=120, seed=11,
                                       response_format=schema_format("enum_const"))
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS["enum_const"])


# ---- regex and EBNF (SGLang's extensions), on chat, completions and /generate

PHONE = r"\(\d{3}\) \d{3}-\d{4}"
EBNF = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | "maybe"'
EBNF_RE = r"The answer is (yes|no|maybe)\."


def test_regex_on_chat_streamed_and_completions(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A phone number?"}],
                                       temperature=1.0, max_tokens=40, extra_body={"regex": PHONE})
    assert re.fullmatch(PHONE, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Call me"}], stream=True,
                                            temperature=1.0, max_tokens=40, extra_body={"regex": PHONE})
    assert re.fullmatch(PHONE, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    c = client.completions.create(model=model, prompt=["My number is", "Dial"], temperature=1.0, max_tokens=40,
                                  extra_body={"regex": PHONE})
    assert all(re.fullmatch(PHONE, ch.text) and ch.finish_reason == "stop" for ch in c.choices)


def test_ebnf_on_chat_and_completions(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                       temperature=1.0, max_tokens=20, extra_body={"ebnf": EBNF})
    assert re.fullmatch(EBNF_RE, r.choices[0].message.content)
    c = client.completions.create(model=model, prompt="Q: Is water wet? A:", max_tokens=20, temperature=0,
                                  extra_body={"ebnf": EBNF})
    assert re.fullmatch(EBNF_RE, c.choices[0].text)


def test_completions_json_schema(client, model):
    c = client.completions.create(model=model, prompt="A product record:", max_tokens=80, temperature=1.0, n=2,
                                  extra_body={"response_format": schema_format("array_of_objects")})
    for ch in c.choices:
        jsonschema.validate(json.loads(ch.text), SCHEMAS["array_of_objects"])


def test_native_generate_constraints(http):
    for params, check in [
        ({"regex": PHONE}, lambda t: re.fullmatch(PHONE, t)),
        ({"ebnf": EBNF}, lambda t: re.fullmatch(EBNF_RE, t)),
        ({"json_schema": json.dumps(SCHEMAS["flat"])}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS["flat"])
         or True),
    ]:
        r = http.post("/generate", json={"text": "Answer:", "sampling_params": {
            "max_new_tokens": 60, "temperature": 1.0, **params}})
        assert r.status_code == 200, r.text
        assert check(r.json()["text"]), (params, r.json()["text"])


def test_streamed_generate_regex(http):
    r = http.post("/generate", json={"text": "Phone:", "stream": True, "sampling_params": {
        "max_new_tokens": 40, "regex": PHONE}})
    events = [e for e in sse_json(r.text)]
    assert re.fullmatch(PHONE, events[-1]["text"])


# ---- bad specs: 400 naming the problem, and the server keeps serving


@pytest.mark.parametrize("body, contains", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer", "not": {"const": 1}}}}}}}, "'not'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "regex"}}}}, "format 'regex'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "invalid json_schema"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"regex": "(unclosed"}, "invalid regex"),
    ({"ebnf": "root ::= undefined_rule"}, "invalid ebnf"),
    ({"regex": "a+", "ebnf": 'root ::= "a"'}, "at most one output constraint"),
])
def test_invalid_constraints_are_400(server, http, model, body, contains):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 4, **body})
    assert_error(r, 400, contains=contains)
    assert_serving(server)


def test_invalid_constraint_through_openai_client(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=4, extra_body={"regex": "(?=lookahead)x"})
    assert "Lookahead" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=4, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"allOf": [{"type": "object"}]}}}})
    r = client.completions.create(model=model, prompt="x", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
