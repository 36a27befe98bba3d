"""Grammars for tool calls: with tool_choice "required" or a named function the model can only write
well-formed calls whose arguments validate; with "auto" it writes free text, but any call it opens is
held to the same grammar. The syntax is Hermes style, shared by SmolLM2, Hermes, Qwen2.5 and Qwen3:
<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
from __future__ import annotations

import json

from radixserve.constrained.schema import check_schema

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"
# Blank space allowed in a row inside arguments: a small model given unlimited whitespace can spend
# its whole budget on it.
_MAX_WHITESPACE = 4


def _call_tag(fn: dict) -> dict:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    try:
        check_schema(params)
    except ValueError as e:
        raise ValueError(f"tools: the parameters of {fn['name']!r}: {e}") from None
    return {"type": "tag", "begin": f'{CALL_START}\n{{"name": {json.dumps(fn["name"])}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": _MAX_WHITESPACE},
            "end": f"}}\n{CALL_END}"}


def tool_call_constraint(tools: list[dict], tool_choice: str | dict, parallel: bool,
                         reasoning: str | None = None) -> str:
    """An xgrammar structural tag (JSON text, for SamplingParams.structural_tag).
    tools: OpenAI's [{"type": "function", "function": {...}}]; tool_choice: "auto" | "required" |
    {"type": "function", "function": {"name"}}; reasoning: None, or the reasoning parser whose
    <think>…</think> block comes first ("deepseek-r1": the template already opened it)."""
    if isinstance(tool_choice, dict):
        chosen = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
        fmt = _call_tag(chosen[0]["function"])
    else:
        tags = [_call_tag(t["function"]) for t in tools]
        if tool_choice == "required":
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                   "stop_after_first": not parallel}
        else:
            fmt = {"type": "triggered_tags", "triggers": [CALL_START], "tags": tags, "at_least_one": False,
                   "stop_after_first": not parallel}
    if reasoning:
        think = {"type": "tag", "begin": "" if reasoning == "deepseek-r1" else THINK_START,
                 "content": {"type": "any_text"}, "end": THINK_END}
        fmt = {"type": "sequence", "elements": [think, fmt]}
    return json.dumps({"type": "structural_tag", "format": fmt})
