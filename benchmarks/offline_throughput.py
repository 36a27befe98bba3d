"""Offline throughput of radixserve's Engine vs transformers.generate on the same model, same run.

    .venv/bin/python benchmarks/offline_throughput.py [--model-path PATH] [--batches 1 8 32]

Output tokens/s per batch size (each request: a distinct ~200-token prompt, 128 new tokens, EOS
ignored; the time includes prefill), and prefill tokens/s (prompts with one new token each).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Distinct random ids from the ordinary part of the vocabulary: no shared prefixes to cache.
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


def bench_radixserve(model_path: str, batches: list[int], prompt_len: int, new_tokens: int,
                     dtype: str = "auto") -> dict:
    import radixserve

    results = {}
    with radixserve.Engine(model_path=model_path, max_running_requests=max(batches), max_total_tokens=65536,
                           disable_radix_cache=True, dtype=dtype) as engine:
        vocab = engine.tokenizer_manager.info.vocab_size
        engine.generate(input_ids=make_prompts(2, 32, vocab, seed=99), sampling_params={"max_new_tokens": 8})
        params = {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        for b in batches:
            prompts = make_prompts(b, prompt_len, vocab, seed=b)
            start = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            elapsed = time.perf_counter() - start
            assert all(o["meta_info"]["completion_tokens"] == new_tokens for o in outs)
            results[f"batch{b}_output_tok_s"] = b * new_tokens / elapsed
        prompts = make_prompts(16, prompt_len, vocab, seed=1234)
        start = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1})
        results["prefill_tok_s"] = 16 * prompt_len / (time.perf_counter() - start)
    return results


def bench_transformers(model_path: str, batches: list[int], prompt_len: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), dtype=torch.bfloat16,
                                                     gguf_file=os.path.basename(model_path))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    model.eval()
    vocab = model.config.vocab_size
    results = {}
    with torch.inference_mode():
        model.generate(torch.tensor(make_prompts(2, 32, vocab, seed=99)), max_new_tokens=8, do_sample=False)
        for b in batches:
            ids = torch.tensor(make_prompts(b, prompt_len, vocab, seed=b))  # equal lengths: no padding needed
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            elapsed = time.perf_counter() - start
            assert out.shape[1] - prompt_len == new_tokens
            results[f"batch{b}_output_tok_s"] = b * new_tokens / elapsed
        ids = torch.tensor(make_prompts(16, prompt_len, vocab, seed=1234))
        start = time.perf_counter()
        model(ids)
        results["prefill_tok_s"] = 16 * prompt_len / (time.perf_counter() - start)
    return results


def main() -> None:
    from radixserve.config import default_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--dtype", default="auto", help="radixserve's --dtype (transformers runs bfloat16)")
    args = ap.parse_args()
    path = args.model_path or default_model_path()
    ours = bench_radixserve(path, args.batches, args.prompt_len, args.new_tokens, args.dtype)
    theirs = {} if args.skip_transformers else bench_transformers(path, args.batches, args.prompt_len, args.new_tokens)
    print(f"{'metric':<24}{'radixserve':>12}{'transformers':>14}{'ratio':>8}")
    for key, value in ours.items():
        ref = theirs.get(key)
        print(f"{key:<24}{value:>12.1f}" + (f"{ref:>14.1f}{value / ref:>8.2f}" if ref else ""))
    print(json.dumps({"radixserve": ours, "transformers": theirs}))


if __name__ == "__main__":
    main()
