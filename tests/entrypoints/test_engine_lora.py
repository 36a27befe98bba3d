"""LoRA adapters through the offline Engine on the default model (float32): greedy output against peft,
prompts of several adapters and the base in one batch, cache isolation, adapters loaded by path, at run
time, streaming, n and stop strings."""
from __future__ import annotations

import asyncio

import pytest
import torch

import radixserve
from radixserve.lora.refs import LoRANotFoundError

GREEDY = {"max_new_tokens": 12, "temperature": 0}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(default_adapters):
    # Deterministic: the tests compare a request's tokens alone and in mixed batches.
    with radixserve.Engine(max_total_tokens=16384, max_running_requests=16, random_seed=0, dtype="float32",
                           enable_deterministic_inference=True,
                           lora_paths=[f"{n}={default_adapters[n]}" for n in ("attn", "mlp", "qv")],
                           max_loras_per_batch=4, max_lora_rank=16, lora_target_modules=["all"]) as e:
        yield e


@pytest.fixture(scope="module")
def peft_greedy(default_hf_model, default_adapters, tokenizer):
    """name → peft's greedy tokens for PROMPT (None → the base model's)."""
    from lora_adapters import peft_merged

    ids = torch.tensor([tokenizer.encode(PROMPT)])
    out = {}
    with torch.no_grad():
        for name in (None, "attn", "mlp", "qv"):
            model = default_hf_model if name is None else peft_merged(default_hf_model, default_adapters[name])
            out[name] = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    return out


@pytest.mark.parametrize("name", ["attn", "mlp", "qv"])
def test_greedy_matches_peft_and_differs_from_base(engine, peft_greedy, name):
    out = engine.generate(PROMPT, GREEDY, lora_path=name)
    assert out["output_ids"] == peft_greedy[name]
    assert out["output_ids"] != peft_greedy[None]


def test_batch_mixing_base_and_adapters_equals_alone(engine):
    prompts = ["Hello, my name is", "def add(a, b):", "The sky is", "Once upon a time", "The sky is"]
    loras = [None, "attn", "mlp", "qv", "attn"]
    batch = engine.generate(prompts, GREEDY, lora_path=loras)
    alone = [engine.generate(p, GREEDY, lora_path=lo) for p, lo in zip(prompts, loras)]
    assert [b["output_ids"] for b in batch] == [a["output_ids"] for a in alone]


def test_cache_isolation(engine):
    prompt = "You are a careful assistant. Answer in one short sentence, with no preamble. " * 3 + "Why?"
    engine.flush_cache()
    reference = engine.generate(prompt, GREEDY, lora_path="mlp")["output_ids"]
    engine.flush_cache()
    base = engine.generate(prompt, GREEDY)
    adapter = engine.generate(prompt, GREEDY, lora_path="mlp")
    assert base["meta_info"]["cached_tokens"] == 0 and adapter["meta_info"]["cached_tokens"] == 0
    assert adapter["output_ids"] == reference != base["output_ids"]
    again = engine.generate(prompt, GREEDY, lora_path="mlp")
    assert again["meta_info"]["cached_tokens"] > 40 and again["output_ids"] == reference


def test_adapter_by_path_and_run_time_load_unload(engine, default_adapters):
    path = default_adapters["all"]
    by_path = engine.generate(PROMPT, GREEDY, lora_path=path)  # loaded now, named after its path
    assert path in engine.tokenizer_manager.lora.loaded()
    assert engine.generate(PROMPT, GREEDY, lora_path=path)["output_ids"] == by_path["output_ids"]
    loaded = engine.load_lora_adapter("all2", path)
    assert loaded["all2"] == path
    assert engine.generate(PROMPT, GREEDY, lora_path="all2")["output_ids"] == by_path["output_ids"]
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora_adapter("all2", path)
    assert "all2" not in engine.unload_lora_adapter("all2")
    assert path not in engine.unload_lora_adapter(path)
    with pytest.raises(LoRANotFoundError, match="not loaded; loaded: attn, mlp, qv"):
        engine.generate(PROMPT, GREEDY, lora_path="all2")
    with pytest.raises(LoRANotFoundError):
        engine.unload_lora_adapter("all2")


def test_stream_n_and_stop_strings(engine):
    full = engine.generate(PROMPT, GREEDY, lora_path="attn")

    async def collect():
        chunks = await engine.async_generate(PROMPT, GREEDY, stream=True, lora_path="attn")
        return [c async for c in chunks]

    chunks = asyncio.run(collect())
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    sampled = engine.generate(PROMPT, {"max_new_tokens": 8, "temperature": 0.8, "n": 3, "seed": 5}, lora_path="qv")
    again = engine.generate(PROMPT, {"max_new_tokens": 8, "temperature": 0.8, "n": 3, "seed": 5}, lora_path="qv")
    assert len(sampled) == 3 and [s["output_ids"] for s in sampled] == [s["output_ids"] for s in again]
    stop = full["text"].strip().split()[1]
    cut = engine.generate(PROMPT, {**GREEDY, "stop": [stop]}, lora_path="attn")
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert full["text"].startswith(cut["text"]) and stop not in cut["text"]


def test_pool_is_clean_afterwards(engine):
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_free"] + stats["kv_cached"] == stats["kv_total"]
