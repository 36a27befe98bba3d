"""/v1/chat/completions: the model's chat template, then generation, as one response or an SSE stream."""
from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from radixserve.managers.tokenizer_manager import GenerationChunk, RequestHandle
from radixserve.server.common import ServingContext, sse
from radixserve.server.errors import bad_request
from radixserve.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                        ChatStreamChoice, ChoiceLogprobs, DeltaMessage, ResponseMessage, TokenLogprob,
                                        TopLogprob)


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


def render_prompt(ctx: ServingContext, req: ChatCompletionRequest) -> list[int]:
    """Messages → prompt token ids through the model's (or the operator's) chat template."""
    tokenizer = ctx.tm.tokenizer
    kwargs = dict(req.chat_template_kwargs or {})
    if ctx.chat_template:
        kwargs["chat_template"] = ctx.chat_template
    try:
        text = tokenizer.apply_chat_template(
            [_template_message(m) for m in req.messages], tokenize=False,
            add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
            **kwargs)
    except Exception as e:  # jinja errors raised by the template itself ("roles must alternate", ...)
        raise bad_request(f"the chat template rejected the messages: {e}", param="messages") from None
    # The template already wrote the special tokens (BOS included) it wants.
    return ctx.tm.tokenize(text, add_special_tokens=False)


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
    params = ctx.sampling_params(req, len(prompt_ids), req.max_completion_tokens or req.max_tokens,
                                 req.logprobs, req.top_logprobs or 0)
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
    choices = [ChatChoice(index=i, message=ResponseMessage(content=texts[i]),
                          logprobs=ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None,
                          finish_reason=f.finish_reason, matched_stop=f.matched_stop) for i, f in enumerate(finals)]
    completion = sum(f.completion_tokens for f in finals)
    return ChatCompletionResponse(model=req.model, choices=choices,
                                  usage=ctx.usage(req, prompt_tokens, completion, finals[0].cached_tokens))


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, handle: RequestHandle,
                  prompt_tokens: int) -> AsyncIterator[str]:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    opts = req.stream_options
    completion = [0] * req.n
    cached = 0

    def chunk_of(choice: ChatStreamChoice) -> ChatCompletionChunk:
        usage = None
        if opts and opts.continuous_usage_stats:
            usage = ctx.usage(req, prompt_tokens, sum(completion), cached)
        return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice], usage=usage)

    for i in range(req.n):  # OpenAI's first chunk of each choice carries the role
        yield sse(chunk_of(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))))
    async for c in handle:
        completion[c.index], cached = c.completion_tokens, c.cached_tokens
        logprobs = _logprobs(ctx, c) if req.logprobs and c.logprobs else None
        if c.text or logprobs:
            yield sse(chunk_of(ChatStreamChoice(index=c.index, delta=DeltaMessage(content=c.text), logprobs=logprobs)))
        if c.finish_reason is not None:
            yield sse(chunk_of(ChatStreamChoice(index=c.index, delta=DeltaMessage(), finish_reason=c.finish_reason,
                                                matched_stop=c.matched_stop)))
    if opts and opts.include_usage:
        yield sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                      usage=ctx.usage(req, prompt_tokens, sum(completion), cached)))

