"""Scheduler end to end on the real default model (SmolLM2-135M GGUF, float32): batch invariance of greedy
decoding, chunked prefill and prefix-cache reuse on real text, natural EOS.

One ModelRunner is loaded for the module and shared by every Scheduler (they share its KV pool, so they
are used one at a time, and the previous one's cache is flushed before the next is built)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from radixserve.config import ServerArgs
from radixserve.engine.scheduler import Scheduler
from radixserve.model.runner import ModelRunner
from sched_util import drive, greedy, req, sampled, solo

TEXTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "List three colors of the rainbow: red, orange,",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
    "Question: A train leaves the station at 3 pm travelling at 60 miles per hour. How far has it gone by "
    "5 pm?\nAnswer:",
    "The mitochondria is often described as the powerhouse of the cell because it produces most of the "
    "chemical energy needed to power the biochemical reactions of the cell. This energy is stored in a "
    "molecule called",
    "<|im_start|>user\nWhat is the boiling point of water at sea level, in degrees Celsius? Please answer "
    "briefly.<|im_end|>\n<|im_start|>assistant\n",
]

LONG_TEXT = (
    "The history of timekeeping is a long story of people trying to measure something they could not see. "
    "Early farmers watched the sun and the stars to decide when to plant and when to harvest. In Egypt, tall "
    "obelisks cast shadows that moved across the ground, and priests marked the hours along their path. "
    "Water clocks, which let water drip slowly from one bowl into another, worked at night and on cloudy "
    "days, so they spread to Babylon, Greece, China and Rome. Medieval monasteries needed to ring bells for "
    "prayers at fixed times, and in the thirteenth century European craftsmen built the first mechanical "
    "clocks, driven by falling weights and regulated by a swinging bar called a foliot. These clocks were "
    "large, loud and not very accurate; they could drift by fifteen minutes in a single day. In 1656 the "
    "Dutch scientist Christiaan Huygens built a clock regulated by a pendulum, and the error fell to less "
    "than a minute a day. Sailors still had a problem: to find their longitude at sea they needed to know "
    "the time at their home port, and no clock could survive the motion of a ship. John Harrison, a "
    "carpenter from Yorkshire, spent most of his life building marine chronometers, and his fourth design "
    "finally solved the problem in 1761. Today the most precise clocks count the vibrations of atoms, and "
    "they would lose less than a second in"
)

MAX_TOTAL = 4096
MAX_RUNNING = 8


def _args(model_path: str, **kw) -> ServerArgs:
    # Deterministic: these tests compare a request's tokens across batches (batch invariance).
    base = dict(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=MAX_TOTAL,
                max_running_requests=MAX_RUNNING, chunked_prefill_size=256, enable_deterministic_inference=True)
    base.update(kw)
    return ServerArgs(**base)


@pytest.fixture(scope="module")
def runner(default_model) -> ModelRunner:
    return ModelRunner(_args(default_model))


@pytest.fixture
def real(runner, default_model):
    """Factory: real(**ServerArgs overrides) -> a Scheduler on the shared runner (the previous one's
    cache is flushed first, so the new one starts with the whole pool free)."""
    made: list[Scheduler] = []

    def make(**kw) -> Scheduler:
        if made:
            assert not made[-1].has_work() and made[-1].flush_cache()
        s = Scheduler(_args(default_model, **kw), runner=runner)
        assert s.kv.free_slots() == s.kv.capacity == MAX_TOTAL
        made.append(s)
        return s

    yield make
    if made:
        assert made[-1].flush_cache()  # leave the shared pool empty for the next test


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    out = {f"p{i}": tokenizer.encode(t) for i, t in enumerate(TEXTS)}
    assert len({len(p) for p in out.values()}) == len(out)  # all lengths differ
    return out


def test_greedy_batch_invariance(real, prompts):
    """The same tokens whether each prompt runs alone, all 8 run together, or they arrive one by one
    into a running batch (mixed prefill chunks and decodes), and again from the prefix cache."""
    params = greedy(24, ignore_eos=True)
    alone_s = real(disable_radix_cache=True)
    refs = {rid: solo(alone_s, req(rid, p, params)) for rid, p in prompts.items()}
    assert all(len(t) == 24 for t in refs.values())
    assert len({tuple(t) for t in refs.values()}) == len(refs)

    together = drive(real(disable_radix_cache=True), [req(rid, p, params) for rid, p in prompts.items()])
    assert {rid: together.tokens(rid) for rid in prompts} == refs
    assert together.steps == 24  # all 8 prefills in the first step, then decoded together

    s = real(chunked_prefill_size=16)
    pending = [req(rid, p, params) for rid, p in reversed(prompts.items())]

    def arrive(s, step, run):
        if pending and step % 3 == 0:
            s.submit(pending.pop())

    staggered = drive(s, [], before_step=arrive)
    assert {rid: staggered.tokens(rid) for rid in prompts} == refs

    # Everything is cached now: all but the last token of each prompt comes from the cache.
    cached = drive(s, [req(f"again-{rid}", p, params) for rid, p in prompts.items()])
    for rid, p in prompts.items():
        assert cached.tokens(f"again-{rid}") == refs[rid], rid
        assert cached.final(f"again-{rid}").cached_tokens == len(p) - 1


def test_chunked_prefill_real_text(real, tokenizer):
    prompt = tokenizer.encode(LONG_TEXT)
    assert len(prompt) > 256
    params = greedy(8, ignore_eos=True)
    ref = solo(real(chunked_prefill_size=4096, disable_radix_cache=True), req("a", prompt, params))
    run = drive(real(chunked_prefill_size=64), [req("a", prompt, params)])
    assert run.steps == -(-len(prompt) // 64) + 7
    assert run.tokens("a") == ref


def test_shared_prefix_real_text(real, tokenizer):
    system = tokenizer.encode(LONG_TEXT)
    a = system + tokenizer.encode("\n\nQuestion: who built the first pendulum clock?\nAnswer:")
    b = system + tokenizer.encode("\n\nSummarise the text above in one sentence:")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    params = greedy(8, ignore_eos=True)
    off = real(disable_radix_cache=True)
    refs = {"a": solo(off, req("a", a, params)), "b": solo(off, req("b", b, params))}
    s = real()
    run_a = drive(s, [req("a", a, params)])
    run_b = drive(s, [req("b", b, params)])
    assert run_a.final("a").cached_tokens == 0
    assert run_b.final("b").cached_tokens == shared
    assert run_a.tokens("a") == refs["a"] and run_b.tokens("b") == refs["b"]


def test_natural_eos(real, prompts, runner):
    prompt = prompts["p7"]  # a chat turn: the model answers and ends with <|im_end|>
    s = real()
    full = solo(s, req("full", prompt, greedy(40, ignore_eos=True)))
    eos = next(i for i, t in enumerate(full) if t in runner.config.eos_token_ids)
    run = drive(s, [req("r", prompt, greedy(40))])
    fin = run.final("r")
    assert run.tokens("r") == full[:eos + 1]
    assert (fin.finish_reason, fin.matched_stop) == ("stop", full[eos])


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}
CODE = r"[0-9]{3}-[a-z]{4}"


def test_constrained_neighbours_leave_free_requests_unchanged(real, prompts, tokenizer, runner):
    """A batch mixing grammar-constrained requests with free ones: the free ones decode exactly as they do
    without them, and the constrained ones follow their grammar to a complete output."""
    params = greedy(16, ignore_eos=True)
    free = {rid: prompts[rid] for rid in ("p1", "p4", "p6")}
    alone = drive(real(disable_radix_cache=True), [req(rid, p, params) for rid, p in free.items()])
    s = real(disable_radix_cache=True)
    schema = json.dumps(PERSON)
    for kind, spec in (("json_schema", schema), ("regex", CODE)):
        s.grammar.compile(kind, spec).result()  # compiled before the first step: deterministic batches
    constrained = [req("json", prompts["p2"], sampled(60, seed=3, json_schema=schema)),
                   req("regex", prompts["p3"], greedy(20, regex=CODE))]
    mixed = drive(s, [req(rid, p, params) for rid, p in free.items()] + constrained)
    assert {rid: mixed.tokens(rid) for rid in free} == {rid: alone.tokens(rid) for rid in free}
    eos = set(runner.config.eos_token_ids)
    for rid in ("json", "regex"):
        fin = mixed.final(rid)
        assert fin.finish_reason == "stop" and fin.matched_stop in eos, rid
    jsonschema.validate(json.loads(tokenizer.decode(mixed.tokens("json")[:-1])), PERSON)
    assert re.fullmatch(CODE, tokenizer.decode(mixed.tokens("regex")[:-1]))

