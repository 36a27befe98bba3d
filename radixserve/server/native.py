"""SGLang's native /generate: text or input_ids (one or a batch), sampling_params as a dict, results in
SGLang's shape (text, output_ids, meta_info); streamed as cumulative results."""
from __future__ import annotations

from radixserve.managers.tokenizer_manager import GenerationChunk, RequestHandle
from radixserve.server.common import ServingContext, merge_streams, sse
from radixserve.server.errors import bad_request
from radixserve.server.protocol import GenerateRequest


class SequenceResult:
    """Accumulates one sequence's chunks into SGLang's output dict: text, output_ids, meta_info."""

    def __init__(self) -> None:
        self.text, self.ids, self.logprobs, self.last = "", [], [], None

    def add(self, c: GenerationChunk) -> None:
        self.text += c.text
        self.ids += c.token_ids
        self.logprobs += c.logprobs
        self.last = c

    def to_dict(self, rid: str) -> dict:
        c = self.last
        finish: dict = {"type": c.finish_reason}
        if c.matched_stop is not None:
            finish["matched"] = c.matched_stop
        meta = {"id": rid, "finish_reason": finish if c.finish_reason else None, "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens, "cached_tokens": c.cached_tokens}
        if self.logprobs:
            meta["output_token_logprobs"] = [(lp, tok) for tok, lp, _ in self.logprobs]
            meta["output_top_logprobs"] = [[(lp, t) for t, lp in top] for _, _, top in self.logprobs]
        return {"text": self.text, "output_ids": self.ids, "meta_info": meta}


async def create_generate(ctx: ServingContext, req: GenerateRequest) -> tuple[list[RequestHandle], object]:
    try:
        params = req.to_sampling_params()
    except ValueError as e:
        raise bad_request(str(e), param="sampling_params") from None
    if req.text is not None:
        single = isinstance(req.text, str)
        prompts = [ctx.tm.tokenize(t) for t in ([req.text] if single else req.text)]
    else:
        single = bool(req.input_ids) and isinstance(req.input_ids[0], int)
        prompts = [req.input_ids] if single else list(req.input_ids)
    if not prompts or not all(prompts):
        raise bad_request("the prompt is empty")
    for ids in prompts:
        ctx.check_prompt(len(ids), param="text" if req.text is not None else "input_ids")
    ctx.check_output(params.max_new_tokens, "sampling_params.max_new_tokens")
    loras = req.lora_path if isinstance(req.lora_path, list) else [req.lora_path] * len(prompts)
    if len(loras) != len(prompts):
        raise bad_request(f"lora_path lists {len(loras)} adapters for {len(prompts)} prompts", param="lora_path")
    lora_ids = [await ctx.resolve_lora(ctx.served_model_name, name) for name in loras]
    handles: list[RequestHandle] = []
    try:
        for ids, lora_id in zip(prompts, lora_ids):
            handles.append(ctx.tm.submit(ids, params, rid=req.rid if single else None, lora_id=lora_id))
    except Exception:
        for h in handles:
            h.close()
        raise
    results = [[SequenceResult() for _ in range(params.n)] for _ in handles]

    def result(p: int, i: int) -> dict:
        return results[p][i].to_dict(handles[p].sub_rids[i])

    async def stream():
        async for p, c in merge_streams(handles):
            results[p][c.index].add(c)
            yield sse({**result(p, c.index), "index": p * params.n + c.index})

    async def collect():
        async for p, c in merge_streams(handles):
            results[p][c.index].add(c)
        out = [result(p, i) for p in range(len(handles)) for i in range(params.n)]
        return out[0] if single and params.n == 1 else out

    return handles, stream() if req.stream else collect()
