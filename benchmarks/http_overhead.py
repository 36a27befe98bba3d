"""The HTTP layer's cost: the same workload through the offline Engine and through the server.

    .venv/bin/python benchmarks/http_overhead.py [--concurrency 8] [--num-prompts 32]

Each request: a distinct ~200-token prompt, 128 new tokens (EOS ignored), greedy. Offline: all prompts
given to Engine.generate with the engine capped at `concurrency` running requests. HTTP: `concurrency`
streaming /v1/completions clients (the official openai client) against `radixserve serve`, same cap.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from offline_throughput import make_prompts  # noqa: E402

VOCAB = 49152


def bench_engine(prompts, args) -> float:
    import radixserve

    with radixserve.Engine(max_running_requests=args.concurrency, max_total_tokens=65536,
                           disable_radix_cache=True) as engine:
        engine.generate(input_ids=prompts[:2], sampling_params={"max_new_tokens": 4})
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": args.new_tokens, "temperature": 0,
                                                             "ignore_eos": True})
        return time.perf_counter() - start


async def _http_run(base: str, prompts, args) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    queue = list(prompts)

    async def worker():
        while queue:
            p = queue.pop()
            stream = await client.completions.create(model=model, prompt=p, max_tokens=args.new_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:
                pass

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return time.perf_counter() - start
    finally:
        await client.close()


def bench_http(prompts, args) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--port", str(port), "--max-running-requests",
           str(args.concurrency), "--max-total-tokens", "65536", "--disable-radix-cache", "--log-level", "warning"]
    server = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        asyncio.run(_http_run(base, prompts[:2], argparse.Namespace(**{**vars(args), "new_tokens": 4})))
        return asyncio.run(_http_run(base, prompts, args))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    prompts = make_prompts(args.num_prompts, args.prompt_len, VOCAB, seed=7)
    offline = bench_engine(prompts, args)
    http = bench_http(prompts, args)
    tokens = args.num_prompts * args.new_tokens
    print(f"{'':<10}{'req/s':>8}{'out tok/s':>11}")
    for name, t in (("engine", offline), ("http", http)):
        print(f"{name:<10}{args.num_prompts / t:>8.2f}{tokens / t:>11.1f}")
    print(f"http / engine throughput: {offline / http:.3f}")


if __name__ == "__main__":
    main()
