"""Grammar-constrained requests in the scheduler (tiny random Llama, the real tokenizer): compilation off
the step path, the matcher across preemption, abort while compiling, completion ends the request."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest

import radixserve.engine.scheduler as sched_mod
from radixserve.managers.messages import GenerateReq
from sched_util import check_idle, drive, greedy, rand_ids, req, sampled, solo

DIGITS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 10, "maxItems": 10}
WORD = r"[a-z]{2,6}( [a-z]{2,6}){3}"


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens[:-1])  # the last token is the stop token that ended the grammar


@pytest.fixture
def grammar_tiny(tiny):
    def make(**kw):
        s = tiny(**kw)
        for kind, spec in (("json_schema", json.dumps(DIGITS)), ("regex", WORD)):
            s.grammar.compile(kind, spec).result()  # compiled up front: steps are deterministic
        return s
    return make


def test_random_model_follows_the_grammar(grammar_tiny, tokenizer):
    """A random model has no idea of JSON; the grammar alone makes its output valid, greedy and sampled."""
    s = grammar_tiny()
    reqs = [req("g", rand_ids(20, 1), greedy(80, json_schema=json.dumps(DIGITS))),
            req("s", rand_ids(25, 2), sampled(80, seed=4, json_schema=json.dumps(DIGITS))),
            req("r", rand_ids(30, 3), sampled(40, seed=5, regex=WORD))]
    run = drive(s, reqs)
    for rid in ("g", "s"):
        assert run.final(rid).finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(tokenizer, run.tokens(rid))), DIGITS)
    assert re.fullmatch(WORD, text_of(tokenizer, run.tokens("r")))


def test_ignore_eos_still_ends_a_complete_grammar(grammar_tiny, tokenizer):
    s = grammar_tiny()
    run = drive(s, [req("r", rand_ids(10, 7), greedy(40, regex=WORD, ignore_eos=True))])
    assert run.final("r").finish_reason == "stop"
    assert re.fullmatch(WORD, text_of(tokenizer, run.tokens("r")))


def test_length_cut_is_length(grammar_tiny):
    run = drive(grammar_tiny(), [req("r", rand_ids(10, 8), greedy(3, json_schema=json.dumps(DIGITS)))])
    assert run.final("r").finish_reason == "length" and len(run.tokens("r")) == 3


def test_matcher_survives_preemption(grammar_tiny, monkeypatch, tokenizer):
    """Preempted constrained requests resume where their grammar was: the same tokens as run alone."""
    spec = json.dumps(DIGITS)
    reqs = [req(f"r{i}", rand_ids(30 + 5 * i, 60 + i), sampled(60, seed=70 + i, json_schema=spec)) for i in range(4)]
    alone = grammar_tiny(disable_radix_cache=True)
    refs = {r.rid: solo(alone, r) for r in reqs}
    preempted = []
    inner = sched_mod.plan_step

    def plan_step(*a, **k):
        plan = inner(*a, **k)
        preempted.extend(plan.preempted)
        return plan

    monkeypatch.setattr(sched_mod, "plan_step", plan_step)
    s = grammar_tiny(max_total_tokens=60 + 45 + 5, max_running_requests=4, disable_radix_cache=True)
    run = drive(s, reqs, max_steps=1500)
    assert preempted, "the pool never ran out"
    for r in reqs:
        assert run.tokens(r.rid) == refs[r.rid], r.rid
        jsonschema.validate(json.loads(text_of(tokenizer, run.tokens(r.rid))), DIGITS)


def test_free_requests_keep_decoding_while_a_grammar_compiles(tiny, monkeypatch, tokenizer):
    s = tiny()
    pending = Future()  # the compilation, finished by the test when it chooses
    real_compile = s.grammar.compile
    monkeypatch.setattr(s.grammar, "compile", lambda kind, spec: pending)
    s.submit(req("free", rand_ids(12, 9), greedy(4, ignore_eos=True)))
    s.submit(req("slow", rand_ids(12, 10), greedy(8, regex=WORD)))
    for _ in range(3):
        s.step()
        assert [r.rid for r in s.running] == ["free"] and [r.rid for r in s.compiling] == ["slow"]
    pending.set_result(real_compile("regex", WORD).result())
    run = drive(s, [])
    assert len(run.tokens("free")) == 4 and run.final("free").finish_reason == "length"
    assert re.fullmatch(WORD, text_of(tokenizer, run.tokens("slow")))


def test_abort_while_compiling(tiny):
    s = tiny()
    s.submit(GenerateReq("a", rand_ids(12, 11), greedy(8, regex=r"[0-9]{1,3}(,[0-9]{1,3}){100}")))
    s.abort("a")
    assert not s.compiling and not s.has_work()
    assert s.take_outputs()[0].finish_reason == "abort"
    check_idle(s)


def test_compile_failure_is_an_error_output(tiny, monkeypatch):
    s = tiny()

    def broken(kind, spec):
        raise RuntimeError("backend fault")

    monkeypatch.setattr("radixserve.constrained.backend.build_grammar", broken)
    s.submit(GenerateReq("a", rand_ids(12, 12), greedy(8, regex="x+")))
    run = drive(s, [])
    fin = run.final("a")
    assert fin.finish_reason == "error" and "backend fault" in fin.error
