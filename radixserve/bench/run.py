"""`radixserve bench`: run a workload against one or more OpenAI-compatible servers, one after the other,
and report throughput, latency percentiles and cache hits per concurrency level (with ratios to the
first server when several are given)."""
from __future__ import annotations

import argparse
import asyncio
import json

import httpx
from tqdm import tqdm

from radixserve.bench.client import make_prompts, run_level
from radixserve.bench.stats import summarize

COLUMNS = [("output_throughput", "out tok/s"), ("request_throughput", "req/s"), ("ttft_p50_ms", "TTFT p50"),
           ("ttft_p99_ms", "TTFT p99"), ("itl_p50_ms", "ITL p50"), ("itl_p99_ms", "ITL p99"),
           ("e2e_p50_ms", "E2E p50"), ("cache_hit_rate", "cache hit"), ("failed", "failed")]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", action="append", required=True,
                   help="server to measure, repeatable for a comparison: URL or NAME=URL")
    p.add_argument("--model", default=None, help="model id to send (default: the server's first /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--dataset", default="random", help="random | shared-prefix | a JSONL file of prompts")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--input-len", type=int, default=200, help="tokens per random prompt")
    p.add_argument("--prefix-len", type=int, default=800, help="tokens of the shared prefix")
    p.add_argument("--output-len", type=int, default=128, help="tokens per response (EOS ignored)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before each measured level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer to build prompts with (default: the default model's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json-out", default=None, help="write every level's summary to this file")


def _servers(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, _, url = spec.partition("=") if "=" in spec else (spec, "", spec)
        out.append((name, url.rstrip("/")))
    return out


def bench(ns: argparse.Namespace) -> dict:
    from radixserve.config import default_model_path
    from radixserve.model_files import load_tokenizer

    tokenizer = load_tokenizer(ns.tokenizer or default_model_path())
    prompts = make_prompts(ns.dataset, ns.num_prompts, ns.input_len, tokenizer, ns.seed, ns.prefix_len)
    warm = make_prompts("random", max(ns.warmup, 1), 16, tokenizer, ns.seed + 1)[: ns.warmup]
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else None
    report: dict = {}
    for name, url in _servers(ns.base_url):
        model = ns.model or httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        report[name] = {}
        for c in ns.concurrency:
            if warm:
                asyncio.run(run_level(url, model, ns.endpoint, warm, c, float("inf"), 8, ns.seed, headers))
            with tqdm(total=len(prompts), desc=f"{name} c={c}", leave=False) as bar:
                results, duration = asyncio.run(run_level(url, model, ns.endpoint, prompts, c, ns.request_rate,
                                                          ns.output_len, ns.seed, headers, bar.update))
            report[name][c] = summarize(results, duration)
            errors = {r.error for r in results if not r.ok}
            if errors:
                print(f"{name} c={c}: {len(results) - report[name][c]['completed']} failed, e.g. {sorted(errors)[0]}")
    _print(report, ns.concurrency)
    if ns.json_out:
        with open(ns.json_out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(ns).items() if k != "func"}, "results": report}, f, indent=2)
    return report


def _print(report: dict, levels: list[int]) -> None:
    names = list(report)
    width = max(8, *(len(n) + 2 for n in names))
    print(f"{'server':<{width}}{'c':>4}" + "".join(f"{label:>11}" for _, label in COLUMNS))
    for name in names:
        for c in levels:
            s = report[name][c]
            print(f"{name:<{width}}{c:>4}" + "".join(f"{s[key]:>11.2f}" for key, _ in COLUMNS))
    for name in names[1:]:  # ratios to the first server, same workload
        for c in levels:
            ours, ref = report[name][c], report[names[0]][c]
            ratio = ours["output_throughput"] / ref["output_throughput"] if ref["output_throughput"] else float("nan")
            print(f"{name} / {names[0]} at c={c}: output throughput x{ratio:.2f}, "
                  f"ITL p99 {ours['itl_p99_ms']:.0f} vs {ref['itl_p99_ms']:.0f} ms")
