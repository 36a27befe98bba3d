"""/v1/chat/completions: the model's chat template (with tools), then generation, as one response or an SSE
stream; reasoning and tool calls are separated from the content."""
from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from radixserve.constrained.tools import tool_call_constraint
from radixserve.managers.tokenizer_manager import GenerationChunk, RequestHandle
from radixserve.server.common import ServingContext, sse
from radixserve.server.errors import bad_request
from radixserve.server.protocol import ChatCompletionRequest, ToolCall, ToolCallFunction
from radixserve.server.responses import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChatStreamChoice,
                                         ChoiceLogprobs, DeltaFunction, DeltaMessage, DeltaToolCall, ResponseMessage,
                                         TokenLogprob, TopLogprob)
from radixserve.server.reasoning import ReasoningParser
from radixserve.server.tool_calls import END, START, ToolCallDelta, ToolCallParser


def _template_message(m) -> dict:
    # Templates concatenate content: an assistant turn with only tool calls renders as "".
    msg: dict = {"role": m.role, "content": m.text() or ""}
    if m.name:
        msg["name"] = m.name
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:  # templates index into the arguments object; keep the string if it is not JSON
                args = json.loads(c.function.arguments)
            except json.JSONDecodeError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        msg["tool_calls"] = calls
    if m.tool_call_id:
        msg["tool_call_id"] = m.tool_call_id
    return msg


def _template_source(ctx: ServingContext) -> str:
    return ctx.chat_template or ctx.tm.tokenizer.chat_template or ""


def _hermes_tool_turns(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """For chat templates that know nothing of tools: describe the tools in the system message and write
    past calls and results as the text the model produces and reads (Hermes style)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [f"{START}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
                     f"\n{END}" for c in m.pop("tool_calls")]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + calls)
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = (f"You may call functions to answer. Their signatures, as JSON schemas, are within <tools></tools>:"
                  f"\n<tools>\n{listing}\n</tools>\nTo call a function, write one JSON object per call within "
                  f"{START}{END} tags:\n{START}\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON "
                  f"object>}}\n{END}")
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_prompt(ctx: ServingContext, req: ChatCompletionRequest) -> list[int]:
    """Messages (and tools) → prompt token ids through the model's (or the operator's) chat template."""
    tokenizer = ctx.tm.tokenizer
    kwargs = dict(req.chat_template_kwargs or {})
    if ctx.chat_template:
        kwargs["chat_template"] = ctx.chat_template
    messages = [_template_message(m) for m in req.messages]
    # With tool_choice "none" the model is not shown the tools, so it does not try to call them.
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tool_mode != "none" else None
    if "tools" in _template_source(ctx):
        if tools:
            kwargs["tools"] = tools
    elif tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages = _hermes_tool_turns(messages, tools)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, **kwargs)
    except Exception as e:  # jinja errors raised by the template itself ("roles must alternate", ...)
        raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
    # The template already wrote the special tokens (BOS included) it wants.
    return ctx.tm.tokenize(text, add_special_tokens=False)


class _ChoiceOutput:
    """One choice's text → reasoning, content and tool calls, incrementally (streamed or not alike)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self.reasoning, self.tools = reasoning, tools

    @property
    def calls(self):
        return self.tools.calls if self.tools else []

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if final and self.reasoning:
            more_reasoning, more = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more
        deltas: list[ToolCallDelta] = []
        if self.tools:
            content, deltas = self.tools.feed(content)
            if final:
                more, _ = self.tools.finish()
                content += more
            if self.calls and not content.strip():
                content = ""  # the line breaks between calls are not an answer
        return reasoning, content, deltas

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if engine_reason == "stop" and self.calls else engine_reason


def _reasoning_parser(ctx: ServingContext, req: ChatCompletionRequest) -> str | None:
    thinking = (req.chat_template_kwargs or {}).get("enable_thinking", True) is not False
    return ctx.args.reasoning_parser if req.separate_reasoning and thinking else None


def _outputs(ctx: ServingContext, req: ChatCompletionRequest) -> list[_ChoiceOutput]:
    parser = _reasoning_parser(ctx, req)
    return [_ChoiceOutput(ReasoningParser(starts_inside=parser == "deepseek-r1") if parser else None,
                          ToolCallParser() if req.tool_mode != "none" else None) for _ in range(req.n)]


def _tool_constraint(ctx: ServingContext, req: ChatCompletionRequest) -> dict[str, str] | None:
    """The grammar that keeps tool calls well-formed (a response_format or regex of the request wins)."""
    if req.tool_mode == "none" or req.output_constraint():
        return None
    choice = req.tool_choice.model_dump() if req.tool_mode == "named" else req.tool_mode
    tag = tool_call_constraint([t.model_dump(exclude_none=True) for t in req.tools], choice, req.parallel_tool_calls,
                               reasoning=_reasoning_parser(ctx, req))
    return {"structural_tag": tag}


def _logprobs(ctx: ServingContext, chunk: GenerationChunk) -> ChoiceLogprobs:
    content = []
    for tok, lp, top in chunk.logprobs:
        content.append(TokenLogprob(token=ctx.token_text(tok), logprob=lp, bytes=ctx.token_bytes(tok), top_logprobs=[
            TopLogprob(token=ctx.token_text(t), logprob=p, bytes=ctx.token_bytes(t)) for t, p in top]))
    return ChoiceLogprobs(content=content)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest) -> tuple[RequestHandle, object]:
    """Validate and submit; returns the handle and either a response builder (await it) or an SSE iterator."""
    lora_id = await ctx.resolve_lora(req.model, req.lora_path)
    prompt_ids = render_prompt(ctx, req)
    params = req.to_sampling_params(ctx.max_new_tokens(req.requested_max_tokens, len(prompt_ids)),
                                    constraint=_tool_constraint(ctx, req))
    handle = ctx.tm.submit(prompt_ids, params, lora_id=lora_id)
    if req.stream:
        return handle, _stream(ctx, req, handle, len(prompt_ids))
    return handle, _collect(ctx, req, handle, len(prompt_ids))


async def _collect(ctx: ServingContext, req: ChatCompletionRequest, handle: RequestHandle,
                   prompt_tokens: int) -> ChatCompletionResponse:
    texts = [""] * req.n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(req.n)]
    finals: list[GenerationChunk | None] = [None] * req.n
    async for chunk in handle:
        texts[chunk.index] += chunk.text
        if req.logprobs:
            logprobs[chunk.index] += _logprobs(ctx, chunk).content
        if chunk.finish_reason is not None:
            finals[chunk.index] = chunk
    choices = []
    for i, (out, final) in enumerate(zip(_outputs(ctx, req), finals)):
        reasoning, content, _ = out.feed(texts[i], final=True)
        calls = [ToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in out.calls]
        message = ResponseMessage(content=content if content or not calls else None, tool_calls=calls or None,
                                  reasoning_content=reasoning if out.reasoning else None)
        choices.append(ChatChoice(index=i, message=message, logprobs=ChoiceLogprobs(content=logprobs[i]) if req.logprobs
                                  else None, finish_reason=out.finish_reason(final.finish_reason),
                                  matched_stop=final.matched_stop))
    completion = sum(f.completion_tokens for f in finals)
    return ChatCompletionResponse(model=req.model, choices=choices,
                                  usage=ctx.usage(req, prompt_tokens, completion, finals[0].cached_tokens))


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, handle: RequestHandle,
                  prompt_tokens: int) -> AsyncIterator[str]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    opts = req.stream_options
    completion = [0] * req.n
    cached = 0
    outs = _outputs(ctx, req)

    def chunk_of(choice: ChatStreamChoice) -> ChatCompletionChunk:
        usage = None
        if opts and opts.continuous_usage_stats:
            usage = ctx.usage(req, prompt_tokens, sum(completion), cached)
        return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice], usage=usage)

    for i in range(req.n):  # OpenAI's first chunk of each choice carries the role
        yield sse(chunk_of(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))))
    async for c in handle:
        completion[c.index], cached = c.completion_tokens, c.cached_tokens
        out = outs[c.index]
        reasoning, content, calls = out.feed(c.text, final=c.finish_reason is not None)
        logprobs = _logprobs(ctx, c) if req.logprobs and c.logprobs else None
        if reasoning or content or calls or logprobs:
            delta = DeltaMessage(content=content or None if (reasoning or calls) else content,
                                 reasoning_content=reasoning or None, tool_calls=[
                                     DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                                   function=DeltaFunction(name=d.name, arguments=d.arguments))
                                     for d in calls] or None)
            yield sse(chunk_of(ChatStreamChoice(index=c.index, delta=delta, logprobs=logprobs)))
        if c.finish_reason is not None:
            yield sse(chunk_of(ChatStreamChoice(index=c.index, delta=DeltaMessage(),
                                                finish_reason=out.finish_reason(c.finish_reason),
                                                matched_stop=c.matched_stop)))
    if opts and opts.include_usage:
        yield sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                      usage=ctx.usage(req, prompt_tokens, sum(completion), cached)))
