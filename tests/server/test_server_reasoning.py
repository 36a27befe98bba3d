"""--reasoning-parser end to end: <think>…</think> goes to reasoning_content (and delta.reasoning_content when
streaming), the rest to content; separate_reasoning=false and enable_thinking=false leave the text alone.
The default model does not think on its own, so an EBNF grammar makes it write a reasoning block."""
from __future__ import annotations

import re

import pytest

THINKING = ('root ::= "<think>" thought "</think>\\n\\n" answer\n'
            'thought ::= [a-z] [a-z ]{4,40}\n'
            'answer ::= "The answer is " ("yes" | "no") "."')
ASK = [{"role": "user", "content": "Is the sea salty? Think first."}]


@pytest.fixture(scope="module")
def thinker(launch_server):
    with launch_server("--reasoning-parser", "qwen3") as s:
        c = s.client()
        yield c, s.model
        c.close()


def ask(thinker, **kw):
    client, model = thinker
    return client.chat.completions.create(model=model, messages=ASK, temperature=1.0, seed=2, max_tokens=80,
                                          extra_body={"ebnf": THINKING, **kw.pop("extra_body", {})}, **kw)


def test_reasoning_is_separated(thinker):
    m = ask(thinker).choices[0].message
    assert re.fullmatch(r"[a-z][a-z ]{4,40}", m.reasoning_content)
    assert re.fullmatch(r"The answer is (yes|no)\.", m.content)


def test_streamed_reasoning_deltas_match(thinker):
    whole = ask(thinker).choices[0].message
    reasoning = content = ""
    for chunk in ask(thinker, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
    assert (reasoning, content) == (whole.reasoning_content, whole.content)


@pytest.mark.parametrize("extra", [{"separate_reasoning": False}, {"chat_template_kwargs": {"enable_thinking": False}}])
def test_reasoning_left_in_content_when_not_separated(thinker, extra):
    m = ask(thinker, extra_body=extra).choices[0].message
    assert m.content.startswith("<think>") and "</think>" in m.content
    assert getattr(m, "reasoning_content", None) is None
