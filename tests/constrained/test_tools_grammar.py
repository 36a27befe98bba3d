"""tool_call_constraint: the structural tag that keeps tool calls well-formed, compiled by the engine's
GrammarBackend over the real SmolLM2 tokenizer; xgrammar's GrammarMatcher (accept_string + is_completed)
is the oracle of what the model may write."""
from __future__ import annotations

import json

import pytest

from radixserve.constrained.backend import GrammarBackend
from radixserve.constrained.grammar import tokenizer_vocab
from radixserve.constrained.tools import tool_call_constraint

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string"},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                  "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}  # no parameters
TOOLS = [WEATHER, TIME]
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


def call(name: str, args) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


W = call("get_weather", {"city": "Paris"})
W2 = call("get_weather", {"city": "Oslo", "days": 3, "unit": "C"})
T = call("get_time", {})
assert W == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

CASES = {
    "one_call": W,
    "one_call_all_args": W2,
    "one_call_no_params": T,
    "two_calls": W + "\n" + T,
    "three_calls": W + "\n" + W2 + "\n" + T,
    "plain_text": "The weather in Paris is sunny.",
    "text_then_call": "Let me check. " + W,
    "call_then_text": W + " Done.",
    "wrong_type": call("get_weather", {"city": 42}),
    "out_of_bounds": call("get_weather", {"city": "Paris", "days": 8}),
    "bad_enum": call("get_weather", {"city": "Paris", "unit": "K"}),
    "missing_required": call("get_weather", {"days": 2}),
    "extra_argument": call("get_weather", {"city": "Paris", "country": "FR"}),
    "args_for_no_params": call("get_time", {"zone": "UTC"}),
    "unknown_function": call("get_stock", {"symbol": "X"}),
    "unclosed_call": W[:-len("</tool_call>")],
    "two_calls_no_separator": W + T,
}
# Which texts are complete outputs, per tool_choice / parallel_tool_calls.
_CALLS_OK = {"one_call", "one_call_all_args", "one_call_no_params"}
EXPECTED = {
    ("required", True): _CALLS_OK | {"two_calls", "three_calls"},
    ("required", False): _CALLS_OK,
    # auto: free text anywhere (also none between two calls), every opened call valid.
    ("auto", True): _CALLS_OK | {"two_calls", "three_calls", "plain_text", "text_then_call", "call_then_text",
                                 "two_calls_no_separator"},
    ("auto", False): _CALLS_OK | {"plain_text", "text_then_call"},
    ("named", True): {"one_call", "one_call_all_args"},
    ("named", False): {"one_call", "one_call_all_args"},
}
# What the model writes before its answer: reasoning parser → prefix.
REASONING_PREFIX = {None: "", "qwen3": "<think>\nThe user wants the weather.\n</think>",
                    "deepseek-r1": "The user wants the weather.\n</think>"}


@pytest.fixture(scope="module")
def backend(tokenizer):
    tokens, metadata = tokenizer_vocab(tokenizer)
    be = GrammarBackend(tokens, metadata, vocab_size=49152, stop_token_ids=[2], max_rows=4)
    yield be
    be.shutdown()


def compile_tag(backend, tool_choice, parallel, reasoning=None):
    choice = NAMED_WEATHER if tool_choice == "named" else tool_choice
    spec = tool_call_constraint(TOOLS, choice, parallel, reasoning)
    json.loads(spec)
    return backend.compile("structural_tag", spec).result(timeout=60)


def complete(backend, comp, text: str) -> bool:
    m = backend.matcher(comp)
    return m.accept_string(text) and m.is_completed()


@pytest.mark.parametrize("reasoning", [None, "qwen3", "deepseek-r1"])
@pytest.mark.parametrize("tool_choice,parallel", list(EXPECTED), ids=[f"{c}-parallel={p}" for c, p in EXPECTED])
def test_acceptance_matrix(backend, tool_choice, parallel, reasoning):
    comp = compile_tag(backend, tool_choice, parallel, reasoning)
    prefix = REASONING_PREFIX[reasoning]
    got = {name for name, text in CASES.items() if complete(backend, comp, prefix + text)}
    assert got == EXPECTED[(tool_choice, parallel)]


@pytest.mark.parametrize("parallel", [True, False])
def test_named_other_function(backend, parallel):
    comp = compile_tag(backend, NAMED_TIME, parallel)
    assert complete(backend, comp, T)
    assert not complete(backend, comp, W)
    assert not complete(backend, comp, T + "\n" + T)
    assert not complete(backend, comp, "hi " + T)


@pytest.mark.parametrize("tool_choice", ["required", "named"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forced_call_cannot_end_empty(backend, tool_choice, parallel):
    comp = compile_tag(backend, tool_choice, parallel)
    m = backend.matcher(comp)
    assert not m.is_completed()
    assert not m.accept_string("Sure")  # no free text before the call


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_allows_empty_and_prefix_text(backend, parallel):
    comp = compile_tag(backend, "auto", parallel)
    assert complete(backend, comp, "")
    m = backend.matcher(comp)
    assert m.accept_string("I will call <tool_call>\n")
    assert not m.accept_string('{"name": "get_stock"')  # an opened call is held to the grammar


@pytest.mark.parametrize("tool_choice", ["required", "auto", "named"])
def test_qwen3_requires_the_think_block_first(backend, tool_choice):
    comp = compile_tag(backend, tool_choice, True, "qwen3")
    assert not complete(backend, comp, W)
    assert complete(backend, comp, "<think></think>" + W)


@pytest.mark.parametrize("tool_choice", ["required", "named"])
def test_deepseek_call_needs_the_end_of_thinking(backend, tool_choice):
    comp = compile_tag(backend, tool_choice, True, "deepseek-r1")
    assert not complete(backend, comp, W)  # still inside the reasoning the template opened
    assert complete(backend, comp, "</think>" + W)
    assert not complete(backend, comp, "<think>x</think>" + W + "</think>" + W)


def test_calls_inside_reasoning_are_free_text(backend):
    comp = compile_tag(backend, "required", False, "qwen3")
    bad_call_in_thinking = call("get_stock", {})
    assert complete(backend, comp, f"<think>{bad_call_in_thinking}</think>{W}")


def test_structural_tag_shape():
    tag = json.loads(tool_call_constraint(TOOLS, "required", False))
    assert tag["type"] == "structural_tag"
    fmt = tag["format"]
    assert fmt["at_least_one"] is True and fmt["stop_after_first"] is True
    begins = [t["begin"] for t in fmt["tags"]]
    assert begins == ['<tool_call>\n{"name": "get_weather", "arguments": ',
                      '<tool_call>\n{"name": "get_time", "arguments": ']
    assert all(t["end"] == "}\n</tool_call>" for t in fmt["tags"])
    # A tool without parameters takes an empty object.
    assert fmt["tags"][1]["content"]["json_schema"] == {"type": "object", "properties": {}}
    seq = json.loads(tool_call_constraint(TOOLS, "auto", True, "deepseek-r1"))["format"]
    assert seq["type"] == "sequence" and seq["elements"][0]["begin"] == ""


@pytest.mark.parametrize(
    "params,keyword",
    [
        ({"type": "object", "properties": {"q": {"not": {"type": "string"}}}}, "not"),
        ({"type": "object", "allOf": [{"required": ["q"]}]}, "allOf"),
        ({"type": "object", "properties": {"d": {"type": "string", "format": "regex"}}}, "regex"),
    ],
)
@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "search"}}])
def test_unsupported_parameters_name_the_tool(params, keyword, tool_choice):
    bad = {"type": "function", "function": {"name": "search", "parameters": params}}
    with pytest.raises(ValueError) as ei:
        tool_call_constraint([TIME, bad], tool_choice, True)
    msg = str(ei.value)
    assert "'search'" in msg and repr(keyword) in msg, msg
