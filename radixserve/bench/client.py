"""A serving benchmark client for any OpenAI-compatible server: workloads, streaming requests at a given
concurrency and request rate, per-request timings."""
from __future__ import annotations

import asyncio
import json
import random
import time
from typing import AsyncIterator, Callable

import httpx

from radixserve.bench.stats import RequestResult


def make_prompts(dataset: str, num: int, input_len: int, tokenizer, seed: int, prefix_len: int = 800) -> list[str]:
    """random: distinct prompts of ~input_len tokens; shared-prefix: one ~prefix_len-token prefix plus a
    short distinct question; anything else: a JSONL file of {"prompt": ...} objects (or plain strings)."""
    rng = random.Random(seed)
    vocab = len(tokenizer)

    def text(n: int) -> str:  # random ordinary tokens, decoded: a prompt of about n tokens
        return tokenizer.decode([rng.randrange(1000, vocab - 1000) for _ in range(n)])

    if dataset == "random":
        return [text(input_len) for _ in range(num)]
    if dataset == "shared-prefix":
        prefix = text(prefix_len)
        return [f"{prefix}\nQuestion {i}: {text(16)}" for i in range(num)]
    with open(dataset) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [r if isinstance(r, str) else r["prompt"] for r in rows]
    return (prompts * (num // len(prompts) + 1))[:num]


async def consume_sse(lines: AsyncIterator[str], start: float, chat: bool,
                      clock: Callable[[], float] = time.perf_counter) -> RequestResult:
    """Time one streamed response: TTFT at the first text, ITL between text chunks; token counts from the
    final usage chunk when the server sends one (else one token per chunk)."""
    res = RequestResult()
    last = None
    chunks = 0
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:
            res.error = str(obj["error"].get("message", obj["error"]))
            break
        now = clock()
        usage = obj.get("usage")
        if usage:
            res.prompt_tokens = usage.get("prompt_tokens", 0)
            res.output_tokens = usage.get("completion_tokens", 0)
            res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
        for choice in obj.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece:
                if last is None:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last = now
                chunks += 1
    res.e2e = clock() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = not res.error and last is not None
    return res


async def _one(client: httpx.AsyncClient, base_url: str, model: str, endpoint: str, prompt: str,
               output_len: int) -> RequestResult:
    chat = endpoint == "chat"
    body = {"model": model, "max_tokens": output_len, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "return_cached_tokens_details": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return RequestResult(error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return await consume_sse(r.aiter_lines(), start, chat)
    except httpx.HTTPError as e:
        return RequestResult(error=f"{type(e).__name__}: {e}")


async def run_level(base_url: str, model: str, endpoint: str, prompts: list[str], concurrency: int,
                    request_rate: float, output_len: int, seed: int, headers: dict | None = None,
                    progress: Callable[[], None] | None = None) -> tuple[list[RequestResult], float]:
    """All prompts, at most `concurrency` in flight, arriving as a Poisson process of `request_rate`
    requests/s (inf: all at once). Returns the results (in prompt order) and the wall time."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        if request_rate != float("inf"):
            t += rng.expovariate(request_rate)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=None, headers=headers, limits=limits) as client:
        begin = time.perf_counter()

        async def task(prompt: str, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, begin + at - time.perf_counter()))
            async with gate:
                res = await _one(client, base_url, model, endpoint, prompt, output_len)
            if progress:
                progress()
            return res

        results = await asyncio.gather(*(task(p, a) for p, a in zip(prompts, arrivals)))
        return list(results), time.perf_counter() - begin
