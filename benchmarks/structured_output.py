"""Cost of constrained decoding: grammar compile time (cold and cached) and decode tokens/s of a batch of
json_schema requests vs the same batch unconstrained, through the offline Engine, same run.

    .venv/bin/python benchmarks/structured_output.py [--batch 8] [--new-tokens 96] [--rounds 3]

Every request runs exactly --new-tokens tokens: the free ones ignore EOS, the constrained ones follow a
schema whose array must hold more items than fit. Rounds alternate free/constrained; best of each.
"""
from __future__ import annotations

import argparse
import json
import time

# A typical structured-extraction schema: nested object, enum, bounded integer, array of objects.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "status": {"enum": ["open", "closed", "pending"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string",
                                                                                        "format": "email"}},
                  "required": ["name", "email"]},
        "tasks": {"type": "array", "minItems": 200,
                  "items": {"type": "object", "properties": {"id": {"type": "integer"}, "done": {"type": "boolean"}},
                            "required": ["id", "done"]}},
    },
    "required": ["title", "status", "priority", "owner", "tasks"],
}


def compile_times(engine_args: dict) -> dict:
    from radixserve.config import ServerArgs
    from radixserve.constrained.backend import GrammarBackend
    from radixserve.constrained.grammar import build_grammar, tokenizer_vocab
    from radixserve.model_files import load_tokenizer

    args = ServerArgs(**engine_args)
    backend = GrammarBackend(*tokenizer_vocab(load_tokenizer(args.model_path)), vocab_size=49152,
                             stop_token_ids=[2], max_rows=8)
    spec = json.dumps(SCHEMA)
    start = time.perf_counter()
    backend.compile("json_schema", spec).result()
    cold = time.perf_counter() - start
    build_grammar.cache_clear()  # the cached path below must not lean on the API process's cache either
    start = time.perf_counter()
    backend.compile("json_schema", spec).result()
    cached = time.perf_counter() - start
    backend.shutdown()
    return {"compile_cold_ms": cold * 1e3, "compile_cached_ms": cached * 1e3}


def decode_rate(engine, prompts: list[str], params: dict) -> float:
    start = time.perf_counter()
    outs = engine.generate(prompts, [params] * len(prompts))
    elapsed = time.perf_counter() - start
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert tokens == len(prompts) * params["max_new_tokens"], [o["meta_info"] for o in outs]
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import radixserve

    engine_args = {"model_path": a.model_path} if a.model_path else {}
    results = compile_times(engine_args)
    prompts = [f"Write ticket number {i} of the bug tracker as JSON." for i in range(a.batch)]
    free = {"max_new_tokens": a.new_tokens, "temperature": 0.7, "seed": 1, "ignore_eos": True}
    constrained = {**free, "ignore_eos": False, "json_schema": json.dumps(SCHEMA)}
    with radixserve.Engine(max_running_requests=a.batch, disable_radix_cache=True, **engine_args) as engine:
        engine.generate(prompts[:2], {"max_new_tokens": 4, "json_schema": json.dumps(SCHEMA)})  # warm-up
        free_rates, con_rates = [], []
        for _ in range(a.rounds):
            free_rates.append(decode_rate(engine, prompts, free))
            con_rates.append(decode_rate(engine, prompts, constrained))
    results.update(free_tok_s=max(free_rates), constrained_tok_s=max(con_rates),
                   ratio=max(con_rates) / max(free_rates))
    print(json.dumps({k: round(v, 3) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
