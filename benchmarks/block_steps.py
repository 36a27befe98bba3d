"""Decode throughput with the GGUF block step sizes measured at start-up vs a fixed --int4-decode-tokens.

    .venv/bin/python benchmarks/block_steps.py [--dtype float32] [--fixed 4] [--rounds 2]

The default model in the offline Engine, both settings started in turn (--rounds times, so that the
machine's drift hits both): 32 distinct 200-token prompts, 64 greedy tokens each (EOS ignored), at
batch 1 and batch 32; output tokens per second, prefill included. float32 is what an AVX2-only CPU
runs (`--dtype auto` there), where the measured step sizes differ most from a fixed 4.
"""
from __future__ import annotations

import argparse
import random
import time

import radixserve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fixed", type=int, default=4, help="the --int4-decode-tokens to compare with")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 48000) for _ in range(200)] for _ in range(32)]
    params = {"max_new_tokens": 64, "ignore_eos": True, "temperature": 0}
    settings = {"measured": {}, f"fixed {args.fixed}": {"int4_decode_tokens": args.fixed}}
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for label, kw in settings.items():
            with radixserve.Engine(dtype=args.dtype, max_running_requests=32, max_total_tokens=16384, **kw) as engine:
                engine.generate(input_ids=prompts[:2], sampling_params={"max_new_tokens": 4})  # warm-up
                for batch in (1, 32):
                    start = time.perf_counter()
                    engine.generate(input_ids=prompts[:batch], sampling_params=params)
                    results.setdefault((label, batch), []).append(batch * 64 / (time.perf_counter() - start))
    print(f"dtype {args.dtype}; output tok/s per round")
    for (label, batch), values in results.items():
        print(f"  {label:10s} batch {batch:2d}: " + "  ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
