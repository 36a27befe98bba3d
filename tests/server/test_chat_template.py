"""Chat prompts with tools: through a template that knows tools, or (SmolLM2's template knows none) in the
Hermes format written by the server; history with tool calls and results renders for the next turn."""
from __future__ import annotations

import json
from types import SimpleNamespace

from radixserve.server.chat import render_prompt
from radixserve.server.protocol import ChatCompletionRequest

TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
HISTORY = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 5}'},
]
TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
                  "{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}\n{% endfor %}")


def render(tokenizer, template: str | None = None, **body) -> str:
    tm = SimpleNamespace(tokenizer=tokenizer, tokenize=lambda text, add_special_tokens: tokenizer.encode(
        text, add_special_tokens=add_special_tokens))
    ctx = SimpleNamespace(tm=tm, chat_template=template)
    req = ChatCompletionRequest(model="m", **body)
    return tokenizer.decode(render_prompt(ctx, req))


def test_template_without_tools_gets_hermes_prompt(tokenizer):
    text = render(tokenizer, messages=HISTORY, tools=[TOOL])
    assert "<tools>" in text and json.dumps(TOOL) in text and "<tool_call>" in text
    call = text.index('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')
    result = text.index('<tool_response>\n{"result": 5}\n</tool_response>')
    assert text.index("What is 2 + 3?") < call < result
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_hides_the_tools_but_keeps_the_history(tokenizer):
    text = render(tokenizer, messages=HISTORY, tools=[TOOL], tool_choice="none")
    assert "<tools>" not in text
    assert '{"name": "add", "arguments": {"a": 2, "b": 3}}' in text and '{"result": 5}' in text


def test_template_with_tools_receives_them(tokenizer):
    text = render(tokenizer, TOOLS_TEMPLATE, messages=HISTORY, tools=[TOOL])
    assert text.startswith("TOOLS:") and '"name": "add"' in text and "<tools>" not in text
    assert '"arguments": {"a": 2, "b": 3}' in text  # the template indexes the arguments as an object
    assert "tool: {\"result\": 5}" in text


def test_existing_system_message_is_extended(tokenizer):
    text = render(tokenizer, messages=[{"role": "system", "content": "Be terse."}, HISTORY[0]], tools=[TOOL])
    assert text.count("<|im_start|>system") == 1
    assert text.index("Be terse.") < text.index("<tools>")
