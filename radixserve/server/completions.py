"""/v1/completions: prompts as text or token ids (one or a batch), echo, logprobs, streaming."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from radixserve.managers.tokenizer_manager import GenerationChunk, RequestHandle
from radixserve.server.common import ServingContext, merge_streams, sse
from radixserve.server.protocol import CompletionRequest
from radixserve.server.responses import CompletionChoice, CompletionLogprobs, CompletionResponse


def _prompts(ctx: ServingContext, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [ctx.tm.tokenize(prompt)]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [ctx.tm.tokenize(p) for p in prompt]
    return [list(p) for p in prompt]


class _Choice:
    """One choice's text and logprobs in the completions shape (text_offset counts characters)."""

    def __init__(self, ctx: ServingContext, index: int, prompt_ids: list[int], echo_text: str, want_logprobs: bool):
        self.ctx, self.index, self.prompt_ids, self.text = ctx, index, prompt_ids, echo_text
        self.logprobs = CompletionLogprobs() if want_logprobs else None
        self.final: GenerationChunk | None = None

    def add(self, c: GenerationChunk) -> CompletionLogprobs | None:
        """Append a chunk; returns the logprobs of just this chunk (for streaming)."""
        piece = None
        if self.logprobs is not None and (c.logprobs or c.prompt_logprobs is not None):
            piece = CompletionLogprobs()
            offset = len(self.text)
            if c.prompt_logprobs is not None:  # echo: the prompt's tokens come first, the first unscored
                offset = self._extend(piece, [(self.prompt_ids[0], None, [])] + c.prompt_logprobs, 0)
            self._extend(piece, c.logprobs, offset)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(piece, name))
        self.text += c.text
        if c.finish_reason is not None:
            self.final = c
        return piece

    def _extend(self, piece: CompletionLogprobs, logprobs, offset: int) -> int:
        for tok, lp, top in logprobs:
            text = self.ctx.token_text(tok)
            piece.tokens.append(text)
            piece.token_logprobs.append(lp)
            piece.top_logprobs.append({self.ctx.token_text(t): p for t, p in top} if top else None)
            piece.text_offset.append(offset)
            offset += len(text)
        return offset


async def create_completion(ctx: ServingContext, req: CompletionRequest) -> tuple[list[RequestHandle], object]:
    lora_id = await ctx.resolve_lora(req.model, req.lora_path)
    prompts = _prompts(ctx, req.prompt)
    params = [req.to_sampling_params(ctx.max_new_tokens(req.max_tokens, len(ids))) for ids in prompts]
    handles: list[RequestHandle] = []
    score_prompt = req.echo and req.logprobs is not None
    try:
        for ids, p in zip(prompts, params):
            handles.append(ctx.tm.submit(ids, p, prompt_logprobs=score_prompt, lora_id=lora_id))
    except Exception:
        for h in handles:
            h.close()
        raise
    echoes = [ctx.tm.tokenizer.decode(ids) if req.echo else "" for ids in prompts]  # once per prompt, not per choice
    choices = [_Choice(ctx, p * req.n + i, prompts[p], echoes[p], req.logprobs is not None)
               for p in range(len(prompts)) for i in range(req.n)]
    run = (_stream if req.stream else _collect)(ctx, req, handles, choices, [len(ids) for ids in prompts])
    return handles, run


async def _collect(ctx, req: CompletionRequest, handles, choices: list[_Choice], prompt_lens) -> CompletionResponse:
    async for p, c in merge_streams(handles):
        choices[p * req.n + c.index].add(c)
    completion = sum(ch.final.completion_tokens for ch in choices)
    cached = sum(choices[p * req.n].final.cached_tokens for p in range(len(handles)))
    return CompletionResponse(
        model=req.model,
        choices=[CompletionChoice(index=ch.index, text=ch.text, logprobs=ch.logprobs,
                                  finish_reason=ch.final.finish_reason, matched_stop=ch.final.matched_stop)
                 for ch in choices],
        usage=ctx.usage(req, sum(prompt_lens), completion, cached))


async def _stream(ctx, req: CompletionRequest, handles, choices: list[_Choice], prompt_lens) -> AsyncIterator[str]:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    opts = req.stream_options
    completion: dict[int, int] = {}
    cached: dict[int, int] = {}

    def usage():
        return ctx.usage(req, sum(prompt_lens), sum(completion.values()), sum(cached.values()))

    def event(choice: CompletionChoice) -> str:
        body = CompletionResponse(id=rid, created=created, model=req.model, choices=[choice],
                                  usage=usage() if opts and opts.continuous_usage_stats else None)
        return sse(body)

    if req.echo:
        for ch in choices:
            yield event(CompletionChoice(index=ch.index, text=ch.text, finish_reason=None))
    async for p, c in merge_streams(handles):
        ch = choices[p * req.n + c.index]
        completion[ch.index], cached[p] = c.completion_tokens, c.cached_tokens
        piece = ch.add(c)
        if c.text or piece or c.finish_reason is not None:
            yield event(CompletionChoice(index=ch.index, text=c.text, logprobs=piece, finish_reason=c.finish_reason,
                                         matched_stop=c.matched_stop))
    if opts and opts.include_usage:
        yield sse(CompletionResponse(id=rid, created=created, model=req.model, choices=[], usage=usage()))
