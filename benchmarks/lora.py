"""LoRA serving cost: decode throughput of a batch spread over several adapters and the base model vs
the same batch all on the base model, and the time to load an adapter at run time.

    .venv/bin/python benchmarks/lora.py [--model-path PATH] [--batch 16] [--adapters 4] [--rank 16]

Adapters: random PEFT folders (rank --rank, every projection targeted) written for the model. Each
batch runs with --short and with --long new tokens (EOS ignored, greedy, distinct prompts, prefix
cache off), --repeats times, interleaved; decode tokens/s = the extra tokens over the difference of
the best times (decode only: prefill cancels out). The mixed batch assigns requests round-robin to the
base model and the adapters.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(path: str, cfg, rank: int, seed: int) -> str:
    """A PEFT LoRA folder for a model of this LlamaConfig with random weights (lora_B non-zero)."""
    from safetensors.torch import save_file

    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (cfg.hidden_size, q), "k_proj": (cfg.hidden_size, kv), "v_proj": (cfg.hidden_size, kv),
              "o_proj": (q, cfg.hidden_size), "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
              "up_proj": (cfg.hidden_size, cfg.intermediate_size),
              "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg.num_layers):
        for t, (fan_in, fan_out) in shapes.items():
            group = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            pre = f"base_model.model.model.layers.{layer}.{group}.{t}"
            weights[f"{pre}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            weights[f"{pre}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    os.makedirs(path, exist_ok=True)
    save_file(weights, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
                   "bias": "none", "task_type": "CAUSAL_LM"}, f)
    return path


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


def timed(engine, ids: list[list[int]], loras: list[str | None], new: int) -> float:
    params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    outs = engine.generate(input_ids=ids, sampling_params=params, lora_path=loras)
    assert all(o["meta_info"]["completion_tokens"] == new for o in outs)
    return time.perf_counter() - start


def main() -> None:
    import radixserve
    from radixserve.config import default_model_path
    from radixserve.model.loader import load_model_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=72)
    ap.add_argument("--repeats", type=int, default=5, help="runs per batch and length (the best counts)")
    args = ap.parse_args()
    path = args.model_path or default_model_path()
    cfg = load_model_config(path)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(args.adapters)]
        folders = {n: write_adapter(os.path.join(tmp, n), cfg, args.rank, seed=i) for i, n in enumerate(names)}
        spare = write_adapter(os.path.join(tmp, "spare"), cfg, args.rank, seed=99)
        with radixserve.Engine(model_path=path, dtype=args.dtype, max_running_requests=args.batch,
                               max_total_tokens=65536, disable_radix_cache=True,
                               lora_paths=[f"{n}={p}" for n, p in folders.items()],
                               max_loras_per_batch=max(args.adapters, 1)) as engine:
            vocab = engine.tokenizer_manager.info.vocab_size
            ids = prompts(args.batch, args.prompt_len, vocab, seed=1)
            mixed = [([None] + names)[i % (args.adapters + 1)] for i in range(args.batch)]
            batches = {"base": [None] * args.batch, "mixed": mixed}
            timed(engine, ids, mixed, 4)  # warm-up
            times: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
                for label, loras in batches.items():
                    for new in (args.short, args.long):
                        times.setdefault((label, new), []).append(timed(engine, ids, loras, new))
            # Decode tokens/s from the best times: the long run's extra tokens over its extra time.
            rate = {label: args.batch * (args.long - args.short) / (min(times[(label, args.long)]) -
                                                                     min(times[(label, args.short)]))
                    for label in batches}
            loads = []
            for i in range(5):
                start = time.perf_counter()
                engine.load_lora_adapter(f"spare{i}", spare)
                loads.append(time.perf_counter() - start)
                engine.unload_lora_adapter(f"spare{i}")
    result = {"batch": args.batch, "adapters": args.adapters, "rank": args.rank,
              "base_decode_tok_s": rate["base"], "mixed_decode_tok_s": rate["mixed"],
              "ratio": rate["mixed"] / rate["base"],
              "times_s": {f"{label}/{new}": [round(t, 3) for t in v] for (label, new), v in times.items()},
              "load_ms_median": sorted(loads)[len(loads) // 2] * 1e3, "load_ms_min": min(loads) * 1e3}
    print(f"decode tok/s, batch {args.batch}: all on the base model {result['base_decode_tok_s']:.1f}; "
          f"spread over {args.adapters} adapters (rank {args.rank}, all projections) + base "
          f"{result['mixed_decode_tok_s']:.1f} ({result['ratio']:.2f}x)")
    print(f"adapter load at run time: {result['load_ms_median']:.0f} ms median, {result['load_ms_min']:.0f} ms best")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
