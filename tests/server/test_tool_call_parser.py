"""ToolCallParser: Hermes-style <tool_call>…</tool_call> text → content + OpenAI tool-call deltas,
incrementally (pure Python, no server)."""
from __future__ import annotations

import json

import pytest

from radixserve.server.tool_calls import ParsedCall, ToolCallDelta, ToolCallParser

ARGS1 = {"city": "Paris", "days": 3, "tags": ["a", {"b": [1, 2]}], "ok": True, "none": None}
ARGS2 = {}
ARGS1_TEXT = json.dumps(ARGS1)
ARGS2_TEXT = json.dumps(ARGS2)
CALL1 = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS1_TEXT}}}\n</tool_call>'
CALL2 = f'<tool_call>\n{{"name": "get_time", "arguments": {ARGS2_TEXT}}}\n</tool_call>'
CANONICAL = "Let me check that for you.\n" + CALL1 + "\n" + CALL2
CANONICAL_CONTENT = "Let me check that for you.\n\n"
CANONICAL_CALLS = [("get_weather", ARGS1_TEXT), ("get_time", ARGS2_TEXT)]


def run(pieces: list[str]) -> tuple[str, list[ToolCallDelta], ToolCallParser]:
    p = ToolCallParser()
    content, deltas = "", []
    for piece in pieces:
        c, d = p.feed(piece)
        content += c
        deltas += d
    c, d = p.finish()
    return content + c, deltas + d, p


def calls_of(p: ToolCallParser) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in p.calls]


def check_deltas(deltas: list[ToolCallDelta], calls: list[ParsedCall]) -> None:
    """OpenAI streaming shape: per index, the first delta has id + name, and the argument pieces add up."""
    assert sorted({d.index for d in deltas}) == list(range(len(calls)))
    for i, call in enumerate(calls):
        mine = [d for d in deltas if d.index == i]
        assert mine[0].id == call.id and mine[0].id.startswith("call_")
        assert mine[0].name == call.name
        assert all(d.id is None and d.name is None for d in mine[1:])
        assert "".join(d.arguments for d in mine) == call.arguments
    # Deltas come in call order.
    assert [d.index for d in deltas] == sorted(d.index for d in deltas)


# ---------------------------------------------------------------- (a) whole text


def test_whole_text():
    content, deltas, p = run([CANONICAL])
    assert content == CANONICAL_CONTENT
    assert calls_of(p) == CANONICAL_CALLS
    assert json.loads(p.calls[0].arguments) == ARGS1
    assert json.loads(p.calls[1].arguments) == ARGS2
    assert p.calls[0].id != p.calls[1].id
    check_deltas(deltas, p.calls)


def test_no_calls_is_all_content():
    text = "Just an answer, with <b>tags</b> and a < sign and <tool but no call."
    content, deltas, p = run([text])
    assert content == text and deltas == [] and p.calls == []


def test_content_after_calls():
    content, _, p = run([CALL2 + " and more text"])
    assert content == " and more text"
    assert calls_of(p) == [("get_time", "{}")]


# ---------------------------------------------------------------- (b) streaming


@pytest.mark.parametrize("k", range(len(CANONICAL) + 1))
def test_split_in_two_at_every_position(k):
    content, deltas, p = run([CANONICAL[:k], CANONICAL[k:]])
    assert content == CANONICAL_CONTENT
    assert calls_of(p) == CANONICAL_CALLS
    check_deltas(deltas, p.calls)


def test_char_by_char():
    content, deltas, p = run(list(CANONICAL))
    assert content == CANONICAL_CONTENT
    assert calls_of(p) == CANONICAL_CALLS
    check_deltas(deltas, p.calls)
    # The arguments really streamed: more than one piece for the non-trivial call.
    assert len([d for d in deltas if d.index == 0 and d.arguments]) > 1


def test_head_whole_then_rest_char_by_char():
    content, deltas, p = run(_head_whole_then_chars(CANONICAL))
    assert content == CANONICAL_CONTENT
    assert calls_of(p) == CANONICAL_CALLS
    check_deltas(deltas, p.calls)


def _head_whole_then_chars(text: str) -> list[str]:
    """Every character its own piece, except that each call head up to `"arguments": ` is one piece."""
    pieces, i = [], 0
    while i < len(text):
        j = text.find("<tool_call>", i)
        if j == i:
            end = text.index('"arguments": ', i) + len('"arguments": ')
            pieces.append(text[i:end])
            i = end
        else:
            pieces.append(text[i])
            i += 1
    return pieces


def test_name_and_arguments_stream_before_end_tag():
    p = ToolCallParser()
    head = '<tool_call>\n{"name": "get_weather", "arguments": '
    c, d = p.feed("Hi " + head)
    assert c == "Hi " and d == []  # the head is complete once the arguments begin
    c, d = p.feed('{"city": "Pa')
    assert c == "" and [(x.index, x.name) for x in d] == [(0, "get_weather"), (0, None)] and d[0].id
    assert [x.arguments for x in d] == ["", '{"city": "Pa']
    c, d = p.feed('ris"}}\n</tool_call>')
    assert c == "" and [x.arguments for x in d] == ['ris"}']
    assert calls_of(p) == [("get_weather", '{"city": "Paris"}')]


def test_split_right_after_arguments_colon():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    k = text.index('"arguments":') + len('"arguments":')
    _, deltas, p = run([text[:k], text[k:]])
    assert calls_of(p) == [("f", '{"a": 1}')]
    check_deltas(deltas, p.calls)


# ---------------------------------------------------------------- (c) non-canonical key order


@pytest.mark.parametrize(
    "body,name,args",
    [
        ('{"arguments": {"city": "Paris"}, "name": "get_weather"}', "get_weather", {"city": "Paris"}),
        ('{"name":"get_weather","parameters":{"city":"Oslo"}}', "get_weather", {"city": "Oslo"}),
        ('  {"arguments": {}, "name": "noop"}  ', "noop", {}),
    ],
    ids=["arguments-first", "parameters-compact", "padded"],
)
def test_non_canonical_call_parsed_at_end_tag(body, name, args):
    text = f"<tool_call>{body}</tool_call>"
    for pieces in ([text], list(text)):
        p = ToolCallParser()
        deltas = []
        for piece in pieces[:-1]:
            c, d = p.feed(piece)
            assert c == ""
            deltas += d
        if body.lstrip().startswith('{"arguments"'):
            assert deltas == []  # nothing is known before the end tag
        content, d = p.feed(pieces[-1])
        deltas += d
        assert content == ""
        assert len(p.calls) == 1 and p.calls[0].name == name
        assert json.loads(p.calls[0].arguments) == args
        check_deltas(deltas, p.calls)


@pytest.mark.parametrize("value", ['"{\\"x\\": 1}"', "5"], ids=["string", "number"])
def test_scalar_arguments_do_not_swallow_the_wrapper(value):
    _, _, p = run([f'<tool_call>\n{{"name": "f", "arguments": {value}}}\n</tool_call>'])
    assert [c.name for c in p.calls] == ["f"]
    json.loads(p.calls[0].arguments)


# ---------------------------------------------------------------- (d) not a call


@pytest.mark.parametrize(
    "inner",
    ["not json at all", '{"name": get_weather}', '{"arguments": {"a": 1}}', '["get_weather", {}]',
     '{"name": 5, "arguments": {}}', '"just a string"', ""],
)
def test_invalid_call_is_content_verbatim(inner):
    text = f"before <tool_call>{inner}</tool_call> after"
    for pieces in ([text], list(text)):
        content, deltas, p = run(pieces)
        assert content == text
        assert deltas == [] and p.calls == []


def test_invalid_call_between_valid_calls():
    bad = "<tool_call>oops</tool_call>"
    content, deltas, p = run([CALL2 + bad + CALL2])
    assert content == bad
    assert calls_of(p) == [("get_time", "{}"), ("get_time", "{}")]
    check_deltas(deltas, p.calls)


# ---------------------------------------------------------------- (e) partial start tag


@pytest.mark.parametrize("partial", ["<", "<tool", "<tool_ca", "<tool_call"])
def test_partial_start_tag_held_back_then_released(partial):
    p = ToolCallParser()
    content, deltas = p.feed("answer " + partial)
    assert content == "answer " and deltas == []
    assert p.finish() == (partial, [])
    assert p.calls == []


def test_partial_start_tag_that_is_not_a_tag():
    p = ToolCallParser()
    assert p.feed("a <tool_ca") == ("a ", [])
    assert p.feed("t is here") == ("<tool_cat is here", [])
    assert p.finish() == ("", [])


def test_unparsed_open_call_is_content_at_finish():
    p = ToolCallParser()
    assert p.feed("x <tool_call>\n{\"na") == ("x ", [])
    assert p.finish() == ('<tool_call>\n{"na', [])
    assert p.calls == []


# ---------------------------------------------------------------- (f) cut off mid-arguments


def test_call_cut_off_mid_arguments():
    cut = CALL1[:CALL1.index('"days"') + 3]
    content, deltas, p = run(["ok " + cut[:20], cut[20:]])
    assert content == "ok "
    assert [c.name for c in p.calls] == ["get_weather"]
    partial = cut[cut.index('"arguments": ') + len('"arguments": '):]
    assert p.calls[0].arguments == partial
    check_deltas(deltas, p.calls)


@pytest.mark.parametrize("tail", ["}\n</tool_c", '"x": "a<'], ids=["cut-end-tag", "cut-after-lt"])
def test_call_cut_off_does_not_leak_into_content(tail):
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1' + ("}" if tail.startswith("}") else ", ") + tail
    content, _, p = run([text])
    assert [c.name for c in p.calls] == ["f"]
    assert content == ""


# ---------------------------------------------------------------- (g) strings inside arguments


TRICKY = {"q": 'say "}" and \\"{', "path": "C:\\dir\\", "braces": "}}]]{{[[", "nested": {"s": "\"}"},
          "unicode": "héllo ✓", "end": "]"}


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_escapes_and_braces_in_strings(ensure_ascii):
    args_text = json.dumps(TRICKY, ensure_ascii=ensure_ascii)
    text = f'<tool_call>\n{{"name": "run", "arguments": {args_text}}}\n</tool_call>tail'
    k = text.index('"arguments": ') + len('"arguments": ')
    # char by char after the head (escape and string state carried across pieces), and odd splits
    pieces_list = [[text], _head_whole_then_chars(text)] + [[text[:k + n], text[k + n:]] for n in range(len(args_text))]
    for pieces in pieces_list:
        content, deltas, p = run(pieces)
        assert content == "tail"
        assert calls_of(p) == [("run", args_text)]
        assert json.loads(p.calls[0].arguments) == TRICKY
        check_deltas(deltas, p.calls)


def test_escaped_quote_in_name():
    text = '<tool_call>{"name": "we\\"ird", "arguments": {}}</tool_call>'
    _, _, p = run(_head_whole_then_chars(text))
    assert calls_of(p) == [('we"ird', "{}")]
    k = text.index("ird")  # split inside the name
    _, _, p = run([text[:k], text[k:]])
    assert calls_of(p) == [('we"ird', "{}")]
