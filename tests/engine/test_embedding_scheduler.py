"""Embedding requests through the engine's schedulers.

Encoder (tiny random BERT): the waiting texts of a step are packed under the token budget and embedded
in one forward pass; nothing is kept between steps; errors and aborts. Decoder (tiny random Llama with
is_embedding): prompts that generate nothing, prefilled through the usual path (chunked, prefix-cached),
embedded by their last token's final hidden state, normalised, compared with transformers; their KV is
released when they finish (`drive` checks the pool after every step and once idle).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from radixserve.config import ServerArgs
from radixserve.engine.encoder_scheduler import EncoderScheduler
from radixserve.managers.messages import EmbedReq
from sched_util import VOCAB, Counter, drive, greedy, rand_ids, req
from tiny_models import build_tiny_bert


def vec(out) -> np.ndarray:
    return np.frombuffer(out.embedding, dtype="<f4")


# ---------------------------------------------------------------- encoder

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, default_embedding_model) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")), default_embedding_model, max_seq_length=128)


@pytest.fixture
def encoder(tiny_bert):
    def make(**kw) -> EncoderScheduler:
        return EncoderScheduler(ServerArgs(**{"model_path": tiny_bert, "dtype": "float32", "device": "cpu", **kw}))

    return make


def bert_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 30000, (n,), generator=g).tolist()


def run_encoder(s: EncoderScheduler, msgs: list[EmbedReq], max_steps: int = 100):
    for m in msgs:
        s.submit(m)
    outputs, steps = s.take_outputs(), 0
    while s.has_work():
        assert steps < max_steps
        s.step()
        steps += 1
        outputs.extend(s.take_outputs())
    return {o.rid: o for o in outputs}, steps


def test_encoder_packs_waiting_texts_under_the_token_budget(encoder, monkeypatch):
    s = encoder(max_prefill_tokens=200, max_running_requests=64)
    assert s.token_budget == 200
    lens = [10, 60, 25, 128, 3, 90, 40, 40, 7, 55, 31, 100, 12, 64, 1, 77, 20, 45, 9, 33]
    texts = {f"t{i}": bert_ids(n, seed=i) for i, n in enumerate(lens)}
    calls = Counter(monkeypatch, s.runner, "embed")
    forwards = Counter(monkeypatch, s.runner.model, "forward")
    outs, steps = run_encoder(s, [EmbedReq(rid, ids) for rid, ids in texts.items()])

    step_lens = [[len(t) for t in a[0]] for a, _ in calls.calls]
    assert len(forwards.calls) == len(step_lens) == steps  # one forward pass per step
    assert [n for step in step_lens for n in step] == lens  # FIFO, every text exactly once
    for i, step in enumerate(step_lens):
        assert sum(step) <= 200
        if i + 1 < len(step_lens):  # greedy: the next text did not fit
            assert sum(step) + step_lens[i + 1][0] > 200
    assert steps < len(lens) // 2  # many texts per step

    solo = encoder()
    for rid, ids in texts.items():
        o = outs[rid]
        assert o.finish_reason == "stop" and o.prompt_tokens == len(ids) and o.error is None
        alone, _ = run_encoder(solo, [EmbedReq(rid, ids)])
        np.testing.assert_allclose(vec(o), vec(alone[rid]), atol=2e-6)  # batch-invariant
        assert abs(np.linalg.norm(vec(o)) - 1) < 1e-5


def test_encoder_budget_always_fits_the_longest_text(encoder):
    s = encoder(max_prefill_tokens=1, max_running_requests=4)
    assert s.max_seq_len == 128 and s.token_budget == 128
    outs, steps = run_encoder(s, [EmbedReq("long", bert_ids(128, 1)), EmbedReq("short", bert_ids(5, 2))])
    assert steps == 2 and outs["long"].embedding and outs["short"].embedding


def test_encoder_caps_texts_per_step_at_max_running_requests(encoder):
    s = encoder(max_running_requests=3)
    outs, steps = run_encoder(s, [EmbedReq(f"r{i}", bert_ids(4, i)) for i in range(7)])
    assert steps == 3 and all(o.embedding for o in outs.values())


def test_encoder_errors_and_serving_continues(encoder):
    s = encoder()
    good = bert_ids(10, 3)
    s.submit(EmbedReq("ok", good))
    bad = {
        "empty": (EmbedReq("empty", []), "empty"),
        "too-long": (EmbedReq("too-long", bert_ids(129, 4)), "has 129 tokens; this model's maximum input length is 128"),
        "vocab": (EmbedReq("vocab", good + [30522]), "[0, 30522)"),
        "negative": (EmbedReq("negative", [-1] + good), "[0, 30522)"),
        "dup": (EmbedReq("ok", good), "already in use"),
        "generate": (req("generate", good), "does not generate"),
    }
    for m, _ in bad.values():
        s.submit(m)
    errors = s.take_outputs()
    assert len(errors) == len(bad)
    for out, (_, expected) in zip(errors, bad.values()):
        assert out.finish_reason == "error" and expected in out.error, out
    outs, _ = run_encoder(s, [])
    assert outs["ok"].finish_reason == "stop" and len(vec(outs["ok"])) == 32


def test_encoder_abort_of_waiting_texts(encoder):
    s = encoder()
    for i in range(4):
        s.submit(EmbedReq(f"r{i}", bert_ids(6, i)))
    s.abort("r1")
    s.abort("r3")
    s.abort("unknown")  # already finished: nothing to do
    assert s.stats().num_waiting == 2
    outs, steps = run_encoder(s, [])
    assert {r: o.finish_reason for r, o in outs.items()} == {"r0": "stop", "r1": "abort", "r2": "stop", "r3": "abort"}
    assert steps == 1 and not s.has_work() and not s.waiting
    assert s.info().is_generation is False and s.info().embedding_dim == 32


def test_encoder_dimensions_per_request(tiny_bert, encoder):
    s = encoder(matryoshka_dimensions=[8, 16])
    ids = bert_ids(12, 5)
    outs, steps = run_encoder(s, [EmbedReq("full", ids), EmbedReq("d8", ids, 8), EmbedReq("d16", ids, 16)])
    assert steps == 1
    full = vec(outs["full"])
    for rid, d in (("d8", 8), ("d16", 16)):
        np.testing.assert_allclose(vec(outs[rid]), full[:d] / np.linalg.norm(full[:d]), atol=1e-6)


# ---------------------------------------------------------------- decoder (Llama --is-embedding)

@pytest.fixture(scope="module")
def hf_llama(tiny_llama):
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def hf_embedding(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(h, dim=-1).numpy()


def test_decoder_embeds_last_token_like_transformers(tiny, hf_llama, monkeypatch):
    s = tiny(is_embedding=True, chunked_prefill_size=64)
    assert s.embedding is not None and s.info().is_generation is False
    prompts = {"short": rand_ids(5, 1), "mid": rand_ids(40, 2), "long": rand_ids(150, 3), "one": rand_ids(1, 4)}
    samples = Counter(monkeypatch, s.sampler, "sample")
    run = drive(s, [EmbedReq(rid, ids) for rid, ids in prompts.items()])
    assert not samples.calls  # embedding requests never sample
    for rid, ids in prompts.items():
        out = run.final(rid)
        assert out.finish_reason == "stop" and out.token_id is None and out.prompt_tokens == len(ids)
        ours = vec(out)
        np.testing.assert_allclose(ours, hf_embedding(hf_llama, ids), atol=2e-5)
        assert abs(np.linalg.norm(ours) - 1) < 1e-5


def test_decoder_embedding_reuses_cached_prefixes(tiny, hf_llama):
    s = tiny(is_embedding=True)
    prefix = rand_ids(80, 5)
    a, b = prefix + rand_ids(10, 6), prefix + rand_ids(12, 7)
    first = drive(s, [EmbedReq("a", a)]).final("a")
    second = drive(s, [EmbedReq("b", b)]).final("b")  # drive checks every slot is free or cached after
    assert first.cached_tokens == 0 and second.cached_tokens == 80
    np.testing.assert_allclose(vec(second), hf_embedding(hf_llama, b), atol=2e-5)
    again = drive(s, [EmbedReq("a2", a)]).final("a2")  # the whole text is cached but its last token
    assert again.cached_tokens == len(a) - 1
    np.testing.assert_allclose(vec(again), vec(first), atol=2e-6)


def test_decoder_embedding_limits_and_kinds(tiny):
    s = tiny(is_embedding=True, max_total_tokens=200, matryoshka_dimensions=[16])
    assert s.max_seq_len == 200
    s.submit(EmbedReq("full-length", rand_ids(200, 8)))  # no generated token needed: the whole context
    s.submit(EmbedReq("too-long", rand_ids(201, 9)))
    s.submit(EmbedReq("vocab", [VOCAB]))
    s.submit(req("generate", rand_ids(5, 10), greedy(2)))
    s.submit(EmbedReq("d16", rand_ids(5, 11), 16))
    run = drive(s)
    assert run.final("full-length").embedding is not None
    assert "maximum input length is 200" in run.final("too-long").error
    assert f"[0, {VOCAB})" in run.final("vocab").error
    assert "embeddings only" in run.final("generate").error
    assert len(vec(run.final("d16"))) == 16

    gen = tiny()
    gen.submit(EmbedReq("e", rand_ids(5, 12)))
    assert "does not serve embeddings" in gen.take_outputs()[0].error
