"""The offline Engine end to end: a real engine process on the default model."""
from __future__ import annotations

import asyncio

import pytest

import radixserve

GREEDY = {"max_new_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def engine():
    # float32: greedy outputs are then exactly batch-invariant and comparable with transformers
    # (bfloat16 GEMMs accumulate in an order that depends on the batch size). Prompts (over 4 tokens) run
    # on the dequantised weights as transformers does; decode steps multiply the GGUF's blocks.
    with radixserve.Engine(max_total_tokens=16384, max_running_requests=16, random_seed=0, dtype="float32",
                           int4_decode_tokens=4) as e:
        yield e


def _wait_idle_and_check_pool(engine):
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    # Every slot is either free or held by the (unlocked) prefix cache.
    assert stats["kv_free"] + stats["kv_cached"] == stats["kv_total"]


def test_generate_matches_transformers_greedy(engine, default_model, tokenizer):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is"
    out = engine.generate(prompt, GREEDY)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_model),
                                              gguf_file=os.path.basename(default_model), dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(prompt)])
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out["output_ids"] == ref
    assert out["text"] == tokenizer.decode(out["output_ids"])
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length"}
    assert meta["prompt_tokens"] == ids.shape[1] and meta["completion_tokens"] == 12


def test_batch_and_input_ids(engine, tokenizer):
    prompts = ["Hello, my name is", "def add(a, b):", "The sky is"]
    batch = engine.generate(prompts, GREEDY)
    assert [b["text"] for b in batch] == [engine.generate(p, GREEDY)["text"] for p in prompts]
    by_ids = engine.generate(input_ids=[tokenizer.encode(p) for p in prompts], sampling_params=GREEDY)
    assert [b["output_ids"] for b in by_ids] == [b["output_ids"] for b in batch]


def test_second_request_reuses_prefix(engine):
    prefix = "You are a careful assistant. Answer in one short sentence, with no preamble. " * 4
    engine.generate(prefix + "What is 2 + 2?", GREEDY)
    out = engine.generate(prefix + "What colour is the sky?", GREEDY)
    assert out["meta_info"]["cached_tokens"] > 40


def test_n_samples_share_prompt_and_differ(engine):
    outs = engine.generate("Write a story about a dragon.", {"max_new_tokens": 16, "temperature": 1.0,
                                                               "n": 4, "seed": 7})
    assert len(outs) == 4
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    prompt_len = outs[0]["meta_info"]["prompt_tokens"]
    # Only the first sample computes the prompt; the others reuse all but its last token.
    assert sorted(o["meta_info"]["cached_tokens"] for o in outs)[1:] == [prompt_len - 1] * 3
    again = engine.generate("Write a story about a dragon.", {"max_new_tokens": 16, "temperature": 1.0,
                                                                "n": 4, "seed": 7})
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]


def test_stop_string_cuts_text(engine):
    free = engine.generate("1, 2, 3, 4,", {"max_new_tokens": 20, "temperature": 0})
    assert " 7," in free["text"]
    out = engine.generate("1, 2, 3, 4,", {"max_new_tokens": 20, "temperature": 0, "stop": [" 7,"]})
    assert out["text"] == free["text"][: free["text"].index(" 7,")]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 7,"}
    assert out["meta_info"]["completion_tokens"] < 20
    _wait_idle_and_check_pool(engine)


def test_stop_token_and_logprobs(engine, tokenizer):
    free = engine.generate("1, 2, 3, 4,", {"max_new_tokens": 8, "temperature": 0, "top_logprobs": 3})
    ids = free["output_ids"]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # first occurrence of a new token
    out = engine.generate("1, 2, 3, 4,", {"max_new_tokens": 8, "temperature": 0, "stop_token_ids": [ids[k]]})
    assert out["output_ids"] == ids[: k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert out["text"] == tokenizer.decode(ids[:k])  # the stop token is not in the text
    lps = free["meta_info"]["output_token_logprobs"]
    tops = free["meta_info"]["output_top_logprobs"]
    assert [t for _, t in lps] == free["output_ids"]
    for (lp, tok), top in zip(lps, tops):
        assert len(top) == 3 and top[0][1] == tok and top[0][0] == pytest.approx(lp)
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_stream_increments_and_early_close(engine):
    async def collect():
        pieces = []
        async for c in await engine.async_generate("Once upon a time", GREEDY, stream=True):
            pieces.append(c)
        return pieces

    pieces = asyncio.run(collect())
    full = engine.generate("Once upon a time", GREEDY)
    assert "".join(p["text"] for p in pieces) == full["text"]
    assert sum(len(p["output_ids"]) for p in pieces) == 12
    assert pieces[-1]["finish_reason"] == "length"

    async def close_early():
        stream = await engine.async_generate("Once upon a time", {"max_new_tokens": 2000, "temperature": 0,
                                                                  "ignore_eos": True}, stream=True)
        async for c in stream:
            if c["meta_info"]["completion_tokens"] >= 3:
                break
        await stream.aclose()

    asyncio.run(close_early())
    for _ in range(50):  # the abort reaches the engine asynchronously
        if engine.get_stats()["num_running"] == 0:
            break
    _wait_idle_and_check_pool(engine)


def test_errors_are_clear_and_engine_keeps_serving(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("hi", {"temperature": -1})
    with pytest.raises(ValueError, match="unknown"):
        engine.generate("hi", {"max_tokens": 3})
    with pytest.raises(ValueError, match="context length"):
        engine.generate(input_ids=[5] * 9000, sampling_params=GREEDY)
    with pytest.raises(ValueError, match="is not a token id of this model"):
        engine.generate(input_ids=[10**6], sampling_params=GREEDY)
    assert engine.generate("The sky is", GREEDY)["meta_info"]["completion_tokens"] == 12


def test_shutdown_stops_engine_process():
    e = radixserve.Engine(max_total_tokens=4096)
    engine = e.tokenizer_manager.client.engine
    assert e.generate("Hi", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    e.shutdown()
    assert not engine.alive()
    e.shutdown()  # idempotent
