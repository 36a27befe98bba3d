"""build_grammar / check_constraint / SamplingParams constraint fields, and the engine's GrammarBackend
checked against the real SmolLM2 tokenizer (xgrammar's GrammarMatcher is the oracle: accept_string +
is_completed)."""
from __future__ import annotations

import json
import math
import re
from concurrent.futures import Future

import pytest
import torch
import xgrammar as xgr

from radixserve.constrained.backend import GrammarBackend
from radixserve.constrained.grammar import build_grammar, check_constraint, tokenizer_vocab
from radixserve.sampling.params import SamplingParams

VOCAB_SIZE = 49152
STOP_ID = 2

# ---------------------------------------------------------------- build_grammar: errors


@pytest.mark.parametrize(
    "kind,spec,fragment",
    [
        ("regex", "(abc", "invalid regex:"),
        ("regex", "a{2,1}", "invalid regex:"),
        ("regex", "[z-a]", "invalid regex:"),
        ("ebnf", 'root ::= "a" |', "invalid ebnf:"),
        ("ebnf", 'start ::= "a"', "invalid ebnf:"),  # no root rule
        ("ebnf", "root ::= undefined_rule", "invalid ebnf:"),
        ("json_schema", "{", "json_schema is not valid JSON"),
        ("json_schema", "not json at all", "json_schema is not valid JSON"),
        ("json_schema", '{"type": "object",}', "json_schema is not valid JSON"),
        ("json_schema", '{"not": {"type": "string"}}', "'not'"),
        ("json_schema", '{"type": "object", "properties": {"a": {"allOf": []}}}', "'allOf'"),
        ("json_schema", '{"type": "string", "format": "regex"}', "'regex'"),
        ("json_schema", "[1, 2]", "must be an object or a boolean"),
        ("json_schema", '{"type": "array", "items": [{"type": "integer"}]}', "#/items"),
        ("structural_tag", "{}", "invalid structural_tag:"),
        ("structural_tag", "not json", "invalid structural_tag:"),
    ],
)
def test_invalid_spec_is_a_readable_value_error(kind, spec, fragment):
    with pytest.raises(ValueError) as ei:
        build_grammar(kind, spec)
    msg = str(ei.value)
    assert fragment in msg, msg
    assert ".cc:" not in msg and ".h:" not in msg, msg
    assert not msg.lstrip().startswith("["), msg  # no "[12:00:00] file:line:" prefix


def test_unsupported_schema_keyword_message_names_keyword_and_path():
    with pytest.raises(ValueError) as ei:
        build_grammar("json_schema", json.dumps(
            {"type": "object", "properties": {"x": {"type": "array", "items": {"if": {}}}}}))
    msg = str(ei.value)
    assert "'if'" in msg and "#/properties/x/items" in msg, msg


@pytest.mark.parametrize(
    "kind,spec",
    [
        ("regex", r"\d{3}-[a-z]+"),
        ("regex", "(yes|no)"),
        ("ebnf", 'root ::= item ("," item)*\nitem ::= [a-z]+'),
        ("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})),
        ("json_schema", "true"),
        ("structural_tag", json.dumps({"type": "structural_tag", "format": {"type": "const_string",
                                                                              "value": "hi"}})),
    ],
)
def test_valid_spec_returns_grammar(kind, spec):
    g = build_grammar(kind, spec)
    assert isinstance(g, xgr.Grammar)
    assert build_grammar(kind, spec) is g  # memoised


def test_check_constraint():
    check_constraint(SamplingParams())
    check_constraint(SamplingParams(regex="[a-z]+"))
    check_constraint(SamplingParams(json_schema={"type": "string"}))
    with pytest.raises(ValueError, match="invalid regex"):
        check_constraint(SamplingParams(regex="(oops"))
    with pytest.raises(ValueError, match="'not'"):
        check_constraint(SamplingParams(json_schema={"not": {}}))


# ---------------------------------------------------------------- SamplingParams constraint fields


@pytest.mark.parametrize(
    "kw",
    [
        {"json_schema": "{}", "regex": "a"},
        {"regex": "a", "ebnf": 'root ::= "a"'},
        {"ebnf": 'root ::= "a"', "structural_tag": "{}"},
        {"json_schema": {"type": "string"}, "structural_tag": {"type": "structural_tag"}},
    ],
)
def test_two_constraints_fail_validate(kw):
    p = SamplingParams(**kw)
    with pytest.raises(ValueError) as ei:
        p.validate()
    msg = str(ei.value)
    for name in kw:
        assert name in msg, msg
    with pytest.raises(ValueError):
        SamplingParams.from_dict(kw)


@pytest.mark.parametrize("name", ["json_schema", "regex", "ebnf", "structural_tag"])
def test_constraint_must_be_text(name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: 5}).validate()


def test_dict_constraints_become_json_text():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    p = SamplingParams(json_schema=schema)
    p.validate()
    assert isinstance(p.json_schema, str) and json.loads(p.json_schema) == schema
    assert p.grammar == ("json_schema", p.json_schema)
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}
    p = SamplingParams.from_dict({"structural_tag": tag})
    assert json.loads(p.structural_tag) == tag
    assert p.grammar == ("structural_tag", p.structural_tag)


def test_grammar_property():
    assert SamplingParams().grammar is None
    assert SamplingParams(regex="a+").grammar == ("regex", "a+")
    assert SamplingParams(ebnf='root ::= "a"').grammar == ("ebnf", 'root ::= "a"')
    assert SamplingParams(json_schema='{"type": "string"}').grammar == ("json_schema", '{"type": "string"}')


# ---------------------------------------------------------------- GrammarBackend with the real tokenizer


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return tokenizer_vocab(tokenizer)


@pytest.fixture(scope="module")
def backend(vocab):
    tokens, metadata = vocab
    be = GrammarBackend(tokens, metadata, vocab_size=VOCAB_SIZE, stop_token_ids=[STOP_ID], max_rows=4)
    yield be
    be.shutdown()


def compiled(backend, kind, spec):
    if isinstance(spec, dict):
        spec = json.dumps(spec)
    return backend.compile(kind, spec).result(timeout=60)


def full_match(backend, comp, text: str) -> bool:
    m = backend.matcher(comp)
    return m.accept_string(text) and m.is_completed()


def allowed(mask_row: torch.Tensor, token_id: int) -> bool:
    return bool((int(mask_row[token_id // 32]) >> (token_id % 32)) & 1)


def test_tokenizer_vocab(tokenizer, vocab):
    tokens, metadata = vocab
    assert len(tokens) == len(tokenizer.get_vocab())
    brace = tokenizer.convert_tokens_to_ids("{")
    assert tokens[brace] == "{"
    meta = json.loads(metadata)
    assert meta["vocab_size"] == len(tokens)
    json.dumps(tokens)  # cheap to send to the engine: plain strings


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "role"],
}


@pytest.mark.parametrize(
    "text,ok",
    [
        ('{"name": "Ann", "age": 30, "role": "admin"}', True),
        ('{"name": "Ann", "role": "user"}', True),
        ('{"name": "Ann", "age": 0, "role": "user"}', True),
        ('{"name": "Ann", "age": 120, "role": "user"}', True),
        ('{"name": "Ann", "age": 121, "role": "user"}', False),  # above maximum
        ('{"name": "Ann", "age": -1, "role": "user"}', False),  # below minimum
        ('{"name": "Ann", "age": 3.5, "role": "user"}', False),  # not an integer
        ('{"name": "Ann", "age": 30, "role": "root"}', False),  # not in the enum
        ('{"name": "Ann", "age": 30}', False),  # required "role" missing
        ('{"role": "user"}', False),  # required "name" missing
        ('{"name": "Ann", "role": "user", "extra": 1}', False),  # strict: no extra properties
        ('{"name": 5, "role": "user"}', False),  # wrong type
        ('{"name": "Ann", "role": "user"', False),  # unfinished
        ('["Ann"]', False),
    ],
)
def test_json_schema_oracle(backend, text, ok):
    comp = compiled(backend, "json_schema", PERSON)
    assert full_match(backend, comp, text) is ok
    if ok:
        json.loads(text)


REGEX = r"\d{3}-[a-z]+"


@pytest.mark.parametrize("text", ["123-abc", "000-z", "12-abc", "1234-abc", "123-", "123-ABC", "123-abc1",
                                  "abc-123", "123_abc", "999-hello"])
def test_regex_oracle(backend, text):
    comp = compiled(backend, "regex", REGEX)
    assert full_match(backend, comp, text) is bool(re.fullmatch(REGEX, text))


EBNF = 'root ::= item ("," item)*\nitem ::= [a-z]+ | "(" root ")"'


@pytest.mark.parametrize(
    "text,ok",
    [("a", True), ("ab,c", True), ("a,(b,c),d", True), ("", False), ("a,", False), ("a,,b", False),
     ("(a", False), ("A", False), ("a b", False)],
)
def test_ebnf_oracle(backend, text, ok):
    comp = compiled(backend, "ebnf", EBNF)
    assert full_match(backend, comp, text) is ok


def test_prefix_is_accepted_but_not_complete(backend):
    comp = compiled(backend, "regex", REGEX)
    m = backend.matcher(comp)
    assert m.accept_string("12")
    assert not m.is_completed()
    assert m.accept_string("3-x")
    assert m.is_completed()


def test_compile_is_cached_per_spec(backend):
    spec = json.dumps({"type": "object", "properties": {"cache_me": {"type": "boolean"}}})
    f1 = backend.compile("json_schema", spec)
    f2 = backend.compile("json_schema", spec)
    assert isinstance(f1, Future) and f1 is f2
    assert backend.compile("regex", spec) is not f1  # the kind is part of the key
    assert isinstance(f1.result(timeout=60), xgr.CompiledGrammar)


def test_compile_error_surfaces_in_future(backend):
    fut = backend.compile("regex", "(unclosed")
    with pytest.raises(ValueError, match="invalid regex"):
        fut.result(timeout=60)


def test_bitmask_rows(backend, tokenizer):
    comp = compiled(backend, "json_schema", PERSON)
    mask = backend.bitmask([backend.matcher(comp), None])
    assert mask.dtype == torch.int32
    assert tuple(mask.shape) == (2, math.ceil(VOCAB_SIZE / 32))
    assert bool((mask[1] == -1).all())  # unconstrained row: everything allowed
    brace = tokenizer.convert_tokens_to_ids("{")
    hello = tokenizer.convert_tokens_to_ids("hello")
    assert brace != tokenizer.unk_token_id and hello != tokenizer.unk_token_id
    assert allowed(mask[0], brace)
    assert not allowed(mask[0], hello)
    assert not allowed(mask[0], STOP_ID)  # an empty output is not a complete object
    assert not bool((mask[0] == -1).all())


def test_bitmask_allows_only_stop_after_complete_output(backend, tokenizer):
    comp = compiled(backend, "json_schema", PERSON)
    m = backend.matcher(comp)
    assert m.accept_string('{"name": "A", "role": "user"}')
    mask = backend.bitmask([None, m, None])
    assert tuple(mask.shape) == (3, math.ceil(VOCAB_SIZE / 32))
    assert bool((mask[0] == -1).all()) and bool((mask[2] == -1).all())
    assert allowed(mask[1], STOP_ID)
    assert not allowed(mask[1], tokenizer.convert_tokens_to_ids("{"))
    n_allowed = sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in mask[1].tolist())
    assert n_allowed == 1
    # The engine's stop token, not the tokenizer's guess, ends the output.
    assert m.accept_token(STOP_ID) and m.is_terminated()


def test_bitmask_regex_first_token(backend, tokenizer):
    comp = compiled(backend, "regex", REGEX)
    mask = backend.bitmask([backend.matcher(comp)])
    assert tuple(mask.shape) == (1, math.ceil(VOCAB_SIZE / 32))
    assert allowed(mask[0], tokenizer.convert_tokens_to_ids("1"))
    assert not allowed(mask[0], tokenizer.convert_tokens_to_ids("a"))
    assert not allowed(mask[0], tokenizer.convert_tokens_to_ids("{"))


# ---------------------------------------------------------------- allowlisted keywords really are enforced

ENFORCED_CASES = {
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "9", "10"),
    "minProperties": ({"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
                      '{"a": 1, "b": 2}', '{"a": 1}'),
    "maxProperties": ({"type": "object", "maxProperties": 1, "additionalProperties": {"type": "integer"}},
                      '{"a": 1}', '{"a": 1, "b": 2}'),
    "unevaluatedProperties": ({"type": "object", "properties": {"a": {"type": "integer"}},
                               "unevaluatedProperties": False}, '{"a": 1}', '{"a": 1, "z": 2}'),
    "additionalProperties": ({"type": "object", "additionalProperties": {"type": "integer"}},
                             '{"a": 1}', '{"a": "x"}'),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                          "[1, 2]", "[1, 2, 3]"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    '[1, "a"]', '["a", 1]'),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, '"ab"', '"abcd"'),
    "pattern": ({"type": "string", "pattern": "^[a-z]+$"}, '"ab"', '"aB"'),
    "format-email": ({"type": "string", "format": "email"}, '"a@b.com"', '"nope"'),
    "format-date-time": ({"type": "string", "format": "date-time"}, '"2024-01-02T03:04:05Z"', '"yesterday"'),
    "format-uuid": ({"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"123"'),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 0}, "1", "0"),
    "exclusiveMaximum": ({"type": "number", "exclusiveMaximum": 1}, "0.5", "1"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, '"a"', "true"),
    "const": ({"const": "x"}, '"x"', '"y"'),
    "ref": ({"$defs": {"N": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/N"}},
            "[1, 2]", '["a"]'),
}


@pytest.mark.parametrize("schema,good,bad", list(ENFORCED_CASES.values()), ids=list(ENFORCED_CASES))
def test_allowlisted_keyword_is_enforced(backend, schema, good, bad):
    comp = compiled(backend, "json_schema", schema)
    assert full_match(backend, comp, good)
    assert not full_match(backend, comp, bad)


@pytest.mark.parametrize(
    "schema,bad",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1, 2]"),
        ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
          "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    ],
    ids=["uniqueItems", "contains", "dependentRequired"],
)
def test_allowlisted_keyword_is_enforced_or_refused(backend, schema, bad):
    spec = json.dumps(schema)
    try:
        comp = backend.compile("json_schema", spec).result(timeout=60)
    except ValueError:
        return  # refused: fine
    assert not full_match(backend, comp, bad)


def test_bitmask_without_constrained_rows(backend):
    mask = backend.bitmask([None, None])
    assert tuple(mask.shape) == (2, math.ceil(VOCAB_SIZE / 32)) and bool((mask == -1).all())


def test_bitmask_rows_are_refilled_each_step(backend, tokenizer):
    comp = compiled(backend, "regex", REGEX)
    backend.bitmask([backend.matcher(comp), backend.matcher(comp)])
    mask = backend.bitmask([None, backend.matcher(comp)])
    assert bool((mask[0] == -1).all())  # a row constrained last step is unconstrained now
    assert not allowed(mask[1], tokenizer.convert_tokens_to_ids("a"))


def test_compile_cache_evicts_least_recently_used(vocab, monkeypatch):
    import radixserve.constrained.backend as backend_mod

    monkeypatch.setattr(backend_mod, "_MAX_CACHED", 2)
    tokens, metadata = vocab
    be = GrammarBackend(tokens, metadata, vocab_size=VOCAB_SIZE, stop_token_ids=[STOP_ID], max_rows=1)
    try:
        a, b = be.compile("regex", "a+"), be.compile("regex", "b+")
        assert be.compile("regex", "a+") is a  # a is now the most recently used
        be.compile("regex", "c+")  # evicts b
        assert be.compile("regex", "a+") is a
        b2 = be.compile("regex", "b+")
        assert b2 is not b
        for fut in (a, b, b2):
            assert isinstance(fut.result(timeout=60), xgr.CompiledGrammar)
    finally:
        be.shutdown()
