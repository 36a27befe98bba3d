"""Scheduler end to end on a tiny random Llama (2 layers): chunked prefill, request errors, stop
conditions, seeded sampling and logprobs (radix cache, preemption, abort and n-groups are in
test_scheduler_kv.py).

Every run goes through `drive`, which bounds the number of steps and checks the KV accounting after
every step and once idle (every slot free or cached exactly once, nothing locked, every row free)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import radixserve.engine.scheduler as sched_mod
from radixserve.sampling.params import SamplingParams
from sched_util import VOCAB, ComputeLog, Counter, drive, greedy, rand_ids, req, sampled, solo


# ---------------------------------------------------------------- chunked prefill

@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_chunked_prefill_matches_one_shot_prefill(tiny, monkeypatch, cache):
    prompt = rand_ids(300, seed=1)
    params = greedy(16, ignore_eos=True)
    ref = solo(tiny(chunked_prefill_size=4096, disable_radix_cache=not cache), req("a", prompt, params))
    assert len(ref) == 16

    log = ComputeLog(monkeypatch)
    for chunk in (64, 7):
        log.steps.clear()
        s = tiny(chunked_prefill_size=chunk, disable_radix_cache=not cache)
        run = drive(s, [req("a", prompt, params)])
        assert run.tokens("a") == ref, f"chunk {chunk}"
        assert run.final("a").finish_reason == "length"
        # The prompt really was computed in chunks of at most `chunk` tokens, one chunk per step.
        prefill = [n for step in log.steps for _, start, n in step if start < len(prompt)]
        full, rest = divmod(len(prompt), chunk)
        assert prefill == [chunk] * full + ([rest] if rest else [])
        assert run.steps == len(prefill) + 15


def test_chunked_prefill_next_to_running_decodes(tiny):
    """A long prompt prefilled in chunks while another request decodes: both as if alone."""
    long_p, short_p = rand_ids(300, seed=2), rand_ids(12, seed=3)
    ref_s = tiny(chunked_prefill_size=4096, disable_radix_cache=True)
    ref_long = solo(ref_s, req("long", long_p, greedy(10, ignore_eos=True)))
    ref_short = solo(ref_s, req("short", short_p, greedy(20, ignore_eos=True)))

    s = tiny(chunked_prefill_size=64)

    def later(s, step, run):
        if step == 3:  # "short" is decoding by now
            s.submit(req("long", long_p, greedy(10, ignore_eos=True)))

    run = drive(s, [req("short", short_p, greedy(20, ignore_eos=True))], before_step=later)
    assert run.tokens("short") == ref_short
    assert run.tokens("long") == ref_long


# ---------------------------------------------------------------- errors

def test_invalid_requests_get_errors_and_serving_continues(tiny):
    s = tiny(max_total_tokens=200)  # context (2048) capped by the pool: sequences of < 200 tokens
    assert s.max_seq_len == 200
    good = rand_ids(20, seed=90)
    ref = solo(tiny(), req("ok", good, greedy(5, ignore_eos=True)))

    s.submit(req("ok", good, greedy(5, ignore_eos=True)))
    bad = {
        "empty": ([], "empty"),
        "too-long": (rand_ids(200, seed=91), "context length is 200"),
        "vocab": (good[:5] + [VOCAB], f"[0, {VOCAB})"),
        "negative": ([-1] + good[:5], f"[0, {VOCAB})"),
        "ok": (good, "already in use"),  # duplicate of a request in flight
    }
    for rid, (ids, _) in bad.items():
        s.submit(req(rid, ids, greedy(5)))
    errors = s.take_outputs()
    assert [o.rid for o in errors] == list(bad)
    for o in errors:
        assert o.finish_reason == "error" and o.token_id is None
        assert bad[o.rid][1] in o.error, o.error
    assert errors[1].prompt_tokens == 200

    # The engine still serves: the original "ok" is untouched, and new requests run.
    run = drive(s, [req("after", good, greedy(5, ignore_eos=True)),
                    req("longest", rand_ids(199, seed=92), greedy(5, ignore_eos=True))])
    assert run.tokens("ok") == ref and run.final("ok").finish_reason == "length"
    assert run.tokens("after") == ref
    # The longest prompt allowed gets exactly one token before reaching the limit.
    assert len(run.tokens("longest")) == 1 and run.final("longest").finish_reason == "length"
    for rid in bad:
        if rid != "ok":
            assert rid not in s.by_rid

    # The model's context length (here set below the pool size) bounds prompts the same way.
    s = tiny(context_length=64)
    assert s.max_seq_len == 64
    s.submit(req("ctx", rand_ids(64, seed=93), greedy(5)))
    (err,) = s.take_outputs()
    assert err.finish_reason == "error" and "context length is 64" in err.error
    assert drive(s, [req("fits", rand_ids(63, seed=93), greedy(5))]).final("fits").finish_reason == "length"


# ---------------------------------------------------------------- stop conditions

def _with_eos(src: str, dst: str, eos: int) -> str:
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(dst, name)
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f)
            cfg["eos_token_id"] = eos
            with open(path, "w") as f:
                json.dump(cfg, f)
    return dst


def test_stop_token_ids_eos_and_ignore_eos(tiny, tiny_llama, tmp_path):
    prompt = rand_ids(25, seed=100)
    s = tiny()
    full = solo(s, req("full", prompt, greedy(12, ignore_eos=True)))
    assert len(full) == 12
    k = next(i for i in range(3, 12) if full[i] not in full[:i])  # first occurrence at k >= 3
    stop = full[k]

    run = drive(s, [req("st", prompt, greedy(12, stop_token_ids=[stop]))])
    fin = run.final("st")
    assert run.tokens("st") == full[:k + 1]
    assert (fin.finish_reason, fin.matched_stop, fin.token_id) == ("stop", stop, stop)

    # The same token as the model's EOS: stops unless ignore_eos.
    s_eos = tiny(model_path=_with_eos(tiny_llama, str(tmp_path / "eos"), stop))
    assert s_eos.eos_ids == {stop}
    run = drive(s_eos, [req("eos", prompt, greedy(12)), req("ign", prompt, greedy(12, ignore_eos=True)),
                        req("ign-stop", prompt, greedy(12, ignore_eos=True, stop_token_ids=[stop]))])
    assert run.tokens("eos") == full[:k + 1]
    assert (run.final("eos").finish_reason, run.final("eos").matched_stop) == ("stop", stop)
    assert run.tokens("ign") == full
    assert (run.final("ign").finish_reason, run.final("ign").matched_stop) == ("length", None)
    assert run.tokens("ign-stop") == full[:k + 1]  # explicit stop ids still apply
    assert run.final("ign-stop").matched_stop == stop


def test_max_new_tokens_zero_finishes_without_a_token(tiny):
    prompt = rand_ids(15, seed=101)
    s = tiny()
    run = drive(s, [req("zero", prompt, greedy(0, logprobs=True)), req("one", prompt, greedy(1))])
    (out,) = run.of("zero")
    assert (out.finish_reason, out.token_id, out.matched_stop) == ("length", None, None)
    assert out.prompt_tokens == len(prompt)
    (one,) = run.of("one")
    assert one.finish_reason == "length" and one.token_id is not None


@pytest.mark.parametrize("limit", ["context_length", "pool"])
def test_sequence_reaching_context_limit_finishes_with_length(tiny, limit):
    prompt = rand_ids(60, seed=102)
    full = solo(tiny(), req("full", prompt, greedy(20, ignore_eos=True)))
    s = tiny(context_length=64) if limit == "context_length" else tiny(max_total_tokens=64)
    assert s.max_seq_len == 64
    run = drive(s, [req("r", prompt, greedy(100, ignore_eos=True))])
    assert run.tokens("r") == full[:4]  # 60 + 4 == 64 tokens
    assert run.final("r").finish_reason == "length"


# ---------------------------------------------------------------- seeded sampling

def test_seeded_sampling_is_reproducible(tiny):
    prompt = rand_ids(20, seed=110)
    s = tiny()
    a = solo(s, req("a", prompt, sampled(16, seed=1234, ignore_eos=True)))
    b = solo(s, req("b", prompt, sampled(16, seed=1234, ignore_eos=True)))
    assert a == b
    twins = drive(s, [req("t1", prompt, sampled(16, seed=1234, ignore_eos=True)),
                      req("t2", prompt, sampled(16, seed=1234, ignore_eos=True))])
    assert twins.tokens("t1") == twins.tokens("t2") == a
    others = [solo(s, req(f"o{i}", prompt, sampled(16, seed=i, ignore_eos=True))) for i in range(4)]
    assert len({tuple(t) for t in others + [a]}) == 5
    # Not greedy: the sample differs from the argmax path.
    assert a != solo(s, req("g", prompt, greedy(16, ignore_eos=True)))


def test_seeded_sampling_same_in_batch_as_alone(tiny):
    specs = {
        "plain": (rand_ids(20, 120), sampled(12, seed=7, ignore_eos=True)),
        "topk": (rand_ids(33, 121), sampled(12, seed=8, top_k=20, ignore_eos=True)),
        "topp": (rand_ids(9, 122), sampled(12, seed=9, top_p=0.9, temperature=0.7, ignore_eos=True)),
        "minp": (rand_ids(41, 123), sampled(12, seed=10, min_p=0.05, ignore_eos=True)),
        "pen": (rand_ids(17, 124), sampled(12, seed=11, repetition_penalty=1.3, frequency_penalty=0.5,
                                            ignore_eos=True)),
        "greedy": (rand_ids(25, 125), greedy(12, ignore_eos=True)),
    }
    reqs = [req(rid, p, params) for rid, (p, params) in specs.items()]
    ref_s = tiny()
    refs = {r.rid: solo(ref_s, r) for r in reqs}
    # Staggered arrival: prefills join decoding batches, rows get reused in a different order.
    s = tiny(chunked_prefill_size=16)
    pending = list(reversed(reqs))

    def arrive(s, step, run):
        if pending and step % 2 == 0:
            s.submit(pending.pop())

    run = drive(s, [], before_step=arrive)
    for r in reqs:
        assert run.tokens(r.rid) == refs[r.rid], r.rid


def test_unseeded_requests_follow_random_seed(tiny):
    prompt = rand_ids(20, seed=130)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    x = drive(tiny(random_seed=5), [req("a", prompt, p), req("b", prompt, p)])
    y = drive(tiny(random_seed=5), [req("a", prompt, p), req("b", prompt, p)])
    assert x.tokens("a") == y.tokens("a") and x.tokens("b") == y.tokens("b")
    assert x.tokens("a") != x.tokens("b")  # each request draws its own seed


# ---------------------------------------------------------------- logprobs

@pytest.fixture(scope="module")
def hf_tiny(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_match_an_independent_forward_pass(tiny, hf_tiny):
    specs = {
        "top3": (rand_ids(30, 140), greedy(10, ignore_eos=True, top_logprobs=3)),
        "lp": (rand_ids(12, 141), greedy(10, ignore_eos=True, logprobs=True)),
        "top2-sampled": (rand_ids(22, 142), sampled(10, seed=3, temperature=0.8, top_logprobs=2,
                                                   ignore_eos=True)),
        "none": (rand_ids(18, 143), greedy(10, ignore_eos=True)),
    }
    s = tiny(chunked_prefill_size=16)
    run = drive(s, [req(rid, p, params) for rid, (p, params) in specs.items()])
    for rid, (prompt, params) in specs.items():
        outs = [o for o in run.of(rid) if o.token_id is not None]
        assert len(outs) == 10
        if not params.logprobs:
            assert all(o.logprob is None and o.top_logprobs is None for o in outs)
            continue
        ref = _hf_logprobs(hf_tiny, prompt + [o.token_id for o in outs])
        for i, o in enumerate(outs):
            row = ref[len(prompt) + i - 1]  # the logits that chose output token i
            # The model's own distribution, whatever the temperature/filters used for sampling.
            assert o.logprob == pytest.approx(row[o.token_id].item(), abs=1e-4), (rid, i)
            if params.top_logprobs == 0:
                assert o.top_logprobs is None
                continue
            top = o.top_logprobs
            assert len(top) == params.top_logprobs
            values = [lp for _, lp in top]
            assert values == sorted(values, reverse=True)
            ref_vals, ref_ids = row.topk(params.top_logprobs)
            assert [t for t, _ in top] == ref_ids.tolist()
            assert values == pytest.approx(ref_vals.tolist(), abs=1e-4)
            if params.is_greedy():
                assert top[0] == (o.token_id, pytest.approx(o.logprob, abs=1e-6))


def _check_prompt_logprobs(scores, prompt: list[int], ref: torch.Tensor, top: int) -> None:
    assert [t for t, _, _ in scores] == prompt[1:]
    for p, (tok, lp, alts) in enumerate(scores, start=1):
        assert lp == pytest.approx(ref[p - 1, tok].item(), abs=1e-4), p
        assert len(alts) == top
        if top:
            vals, ids = ref[p - 1].topk(top)
            assert [t for t, _ in alts] == ids.tolist()
            assert [v for _, v in alts] == pytest.approx(vals.tolist(), abs=1e-4)


def test_prompt_logprobs_match_an_independent_forward_pass(tiny, hf_tiny):
    prompt = rand_ids(40, seed=150)
    other = rand_ids(25, seed=151)
    s = tiny(chunked_prefill_size=16)
    drive(s, [req("warm", prompt, greedy(2))])  # cached, but scoring the prompt needs every position
    msgs = [req("echo", prompt, greedy(3, ignore_eos=True, top_logprobs=2)),
            req("other", other, greedy(3, ignore_eos=True)),
            req("score-only", other, greedy(0, logprobs=True))]
    msgs[0].prompt_logprobs = msgs[2].prompt_logprobs = True
    run = drive(s, msgs)

    first = run.of("echo")[0]
    assert first.token_id is not None and first.cached_tokens == 0
    assert all(o.prompt_logprobs is None for o in run.of("echo")[1:])
    _check_prompt_logprobs(first.prompt_logprobs, prompt, _hf_logprobs(hf_tiny, prompt), top=2)
    (score_only,) = run.of("score-only")
    assert score_only.finish_reason == "length" and score_only.token_id is None
    _check_prompt_logprobs(score_only.prompt_logprobs, other, _hf_logprobs(hf_tiny, other), top=0)
    assert all(o.prompt_logprobs is None for o in run.of("other"))


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_prompt_logprobs_survive_preemption(tiny, hf_tiny, monkeypatch, cache):
    prompts = [rand_ids(30, seed=160 + i) for i in range(3)]
    msgs = [req(f"r{i}", p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)]
    for m in msgs:
        m.prompt_logprobs = True
    s = tiny(max_total_tokens=90, max_running_requests=3, disable_radix_cache=not cache)
    plans = Counter(monkeypatch, sched_mod, "plan_step", snap=lambda plan: [len(r.output_ids) for r in plan.preempted])
    run = drive(s, msgs, max_steps=1000)
    assert any(n > 0 for outs in plans.snaps for n in outs)  # preempted after its first token
    for m, p in zip(msgs, prompts):
        assert len(run.tokens(m.rid)) == 40
        first = run.of(m.rid)[0]
        _check_prompt_logprobs(first.prompt_logprobs, p, _hf_logprobs(hf_tiny, p), top=0)
