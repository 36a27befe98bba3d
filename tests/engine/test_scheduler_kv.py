"""Scheduler end to end on a tiny random Llama: where KV lives. Radix cache reuse, preemption under KV
pressure, abort in every state, and n-group prompt sharing.

Every run goes through `drive`, which bounds the number of steps and checks the KV accounting after
every step and once idle (every slot free or cached exactly once, nothing locked, every row free)."""
from __future__ import annotations

import pytest

import radixserve.engine.scheduler as sched_mod
from radixserve.sampling.params import SamplingParams
from sched_util import ComputeLog, Counter, drive, greedy, rand_ids, req, sampled, solo


# ---------------------------------------------------------------- radix cache

def test_radix_cache_reuses_shared_prefix(tiny, monkeypatch):
    shared = rand_ids(120, seed=10)
    a = shared + rand_ids(10, seed=11)
    b = shared + rand_ids(12, seed=12)
    assert a[120] != b[120]
    params = greedy(8, ignore_eos=True)
    ref_s = tiny(disable_radix_cache=True)

    s = tiny()
    log = ComputeLog(monkeypatch)
    run_a = drive(s, [req("a", a, params)])
    assert run_a.final("a").cached_tokens == 0
    assert run_a.tokens("a") == solo(ref_s, req("a", a, params))

    log.steps.clear()
    run_b = drive(s, [req("b", b, params)])
    out_b = run_b.tokens("b")
    # Every output of b reports the reuse; only the tail of b's prompt was computed.
    assert {o.cached_tokens for o in run_b.of("b")} == {len(shared)}
    assert all(o.prompt_tokens == len(b) for o in run_b.of("b"))
    assert log.prompt_tokens_computed({"b": len(b)})["b"] == len(b) - len(shared)
    assert out_b == solo(ref_s, req("b", b, params))

    # The same prompt again: all but the last prompt token come from the cache (its logits are needed).
    log.steps.clear()
    run_b2 = drive(s, [req("b2", b, params)])
    assert run_b2.final("b2").cached_tokens == len(b) - 1
    assert log.prompt_tokens_computed({"b2": len(b)})["b2"] == 1
    assert run_b2.tokens("b2") == out_b

    # A follow-up turn (prompt + answer + more): the answer's KV, except its last token, is cached too.
    c = b + out_b + rand_ids(5, seed=13)
    run_c = drive(s, [req("c", c, params)])
    assert run_c.final("c").cached_tokens == len(b) + len(out_b) - 1
    assert run_c.tokens("c") == solo(ref_s, req("c", c, params))

    # A prompt that is a strict prefix of a cached sequence.
    p = b[:50]
    run_p = drive(s, [req("p", p, params)])
    assert run_p.final("p").cached_tokens == len(p) - 1
    assert run_p.tokens("p") == solo(ref_s, req("p", p, params))


def test_each_request_writes_runs_of_consecutive_slots_while_the_cache_churns(tiny):
    """With the pool full of cached prefixes that keep being evicted, a running request's own KV (what
    it computed past its cached prefix) still lies in consecutive slots: attention streams it."""
    s = tiny(max_total_tokens=1024, max_running_requests=8, chunked_prefill_size=64)
    own = {}

    def check(s, step, run):
        for r in s.running:
            own[r.rid] = s.kv.pool.req_to_token[r.row, r.cached_tokens:r.num_computed].tolist()

    reqs = [req(f"r{i}", rand_ids(40 + i % 50, seed=100 + i), greedy(24 + i % 16, ignore_eos=True))
            for i in range(60)]
    drive(s, reqs, before_step=check)
    assert s.kv.cached_tokens() > 1024 // 2  # the cache filled the pool (6,000 tokens computed)
    breaks = {rid: sum(b != a + 1 for a, b in zip(slots, slots[1:])) for rid, slots in own.items()}
    # A break where a request's reservation (64 slots) ran out or the free runs were too short; the
    # previous allocator broke the run at every decode token (one slot per running request per step).
    assert sum(breaks.values()) <= sum(len(slots) for slots in own.values()) // 32, breaks


def test_radix_cache_disabled_reports_nothing_cached(tiny, monkeypatch):
    prompt = rand_ids(80, seed=20)
    s = tiny(disable_radix_cache=True)
    log = ComputeLog(monkeypatch)
    first = drive(s, [req("x", prompt, greedy(6))])
    second = drive(s, [req("y", prompt, greedy(6)), req("z", prompt[:40] + rand_ids(5, seed=21), greedy(6))])
    for run, rid in ((first, "x"), (second, "y"), (second, "z")):
        assert {o.cached_tokens for o in run.of(rid)} == {0}
    assert log.prompt_tokens_computed({"x": 80, "y": 80, "z": 45}) == {"x": 80, "y": 80, "z": 45}
    assert second.tokens("y") == first.tokens("x")
    assert s.kv.tree.total_size() == 0 and s.kv.free_slots() == s.kv.capacity


def test_radix_cache_namespaces_and_flush(tiny):
    prompt = rand_ids(60, seed=30)
    params = greedy(5)
    s = tiny()
    base = drive(s, [req("a", prompt, params)])
    other_ns = drive(s, [req("b", prompt, params, namespace="salt-1")])
    assert other_ns.final("b").cached_tokens == 0  # a different namespace never sees other entries
    same_ns = drive(s, [req("c", prompt, params, namespace="salt-1")])
    assert same_ns.final("c").cached_tokens == len(prompt) - 1
    assert base.tokens("a") == other_ns.tokens("b") == same_ns.tokens("c")

    # flush_cache is refused while busy, and empties the cache when idle.
    s.submit(req("busy", prompt, params))
    assert s.flush_cache() is False
    drive(s)
    assert s.kv.tree.total_size() > 0
    assert s.flush_cache() is True
    assert s.kv.tree.total_size() == 0 and s.kv.free_slots() == s.kv.capacity
    after = drive(s, [req("d", prompt, params)])
    assert after.final("d").cached_tokens == 0
    assert after.tokens("d") == base.tokens("a")


def test_max_new_tokens_zero_warms_the_cache(tiny):
    prompt = rand_ids(40, seed=31)
    s = tiny()
    warm = drive(s, [req("warm", prompt, greedy(0))])
    assert warm.of("warm") == [warm.final("warm")]
    assert warm.final("warm").token_id is None and warm.final("warm").finish_reason == "length"
    run = drive(s, [req("use", prompt, greedy(4))])
    assert run.final("use").cached_tokens == len(prompt) - 1


def test_cached_tokens_reported_from_the_admission_that_ran(tiny, monkeypatch):
    """Pool of 40: a and b (20-token prompts) fill it in the first step, so r's admission in that step
    is undone (nothing cached yet). a and b finish and are cached; r is admitted in the next step and
    reuses 15 tokens of a's prompt, and must report it."""
    a, b = rand_ids(20, seed=40), rand_ids(20, seed=41)
    r = a[:15] + rand_ids(10, seed=42)
    s = tiny(max_total_tokens=40)
    log = ComputeLog(monkeypatch)
    run = drive(s, [req("a", a, greedy(1)), req("b", b, greedy(1)), req("r", r, greedy(3))])
    assert [rid for rid, _, _ in log.steps[0]] == ["a", "b"]
    assert log.prompt_tokens_computed({"r": len(r)})["r"] == len(r) - 15  # 15 tokens were reused ...
    assert run.final("r").cached_tokens == 15  # ... but reported as 0


# ---------------------------------------------------------------- preemption

@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_preemption_under_kv_pressure(tiny, monkeypatch, cache, mode):
    lens, new = [30, 35, 40, 45], 40
    prompts = {f"r{i}": rand_ids(n, seed=50 + i) for i, n in enumerate(lens)}

    def params(i: int) -> SamplingParams:
        if mode == "greedy":
            return greedy(new, ignore_eos=True)
        return sampled(new, seed=500 + i, top_k=50, ignore_eos=True)

    reqs = [req(rid, p, params(i)) for i, (rid, p) in enumerate(prompts.items())]
    ref_s = tiny(disable_radix_cache=not cache)
    refs = {r.rid: solo(ref_s, r) for r in reqs}

    # Room for one request's whole sequence (45 + 40) and little more, 4 requests running.
    s = tiny(max_total_tokens=max(lens) + new + 5, max_running_requests=4, disable_radix_cache=not cache)
    preemptions = []
    inner = sched_mod.plan_step

    def plan_step(running, *a, **k):
        plan = inner(running, *a, **k)
        if plan.preempted:  # the newest requests go first: every survivor is older than every victim
            preemptions.append(([r.order for r in plan.preempted], [r.order for r in running]))
        return plan

    monkeypatch.setattr(sched_mod, "plan_step", plan_step)
    run = drive(s, reqs, max_steps=1500)
    assert preemptions, "the pool never ran out"
    for victims, survivors in preemptions:
        assert max(survivors, default=-1) < min(victims)
    for r in reqs:
        assert run.tokens(r.rid) == refs[r.rid], r.rid
        assert run.final(r.rid).finish_reason == "length"
        assert len(run.tokens(r.rid)) == new


# ---------------------------------------------------------------- abort

@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_abort_running_prefilling_and_waiting(tiny, cache):
    pa, pb, pc, pd = rand_ids(10, 60), rand_ids(100, 61), rand_ids(12, 62), rand_ids(12, 63)
    ref_s = tiny(disable_radix_cache=not cache)
    ref_c = solo(ref_s, req("c", pc, greedy(5, ignore_eos=True)))
    s = tiny(max_running_requests=2, chunked_prefill_size=16, disable_radix_cache=not cache)

    def actions(s, step, run):
        if step == 2:  # b is mid-prefill, c and d wait (two rows only)
            b = s.by_rid["b"]
            assert b in s.running and 0 < b.num_computed < len(pb)
            assert s.by_rid["c"] in s.waiting and s.by_rid["d"] in s.waiting
            s.abort("b")
        if step == 3:  # c took b's place; d still waits
            assert s.by_rid["c"] in s.running and s.by_rid["d"] in s.waiting
            s.abort("d")
        if step == 5:  # a is decoding
            assert len(run.tokens("a")) >= 3
            s.abort("a")
        # Unknown, finished and already aborted rids: nothing happens.
        s.abort("never-submitted")
        if step >= 3:
            s.abort("b")
        if step >= 6:
            s.abort("a")
            s.abort("d")

    reqs = [req("a", pa, greedy(50, ignore_eos=True)), req("b", pb, greedy(50, ignore_eos=True)),
            req("c", pc, greedy(5, ignore_eos=True)), req("d", pd, greedy(5, ignore_eos=True))]
    run = drive(s, reqs, before_step=actions)
    for rid in ("a", "b", "d"):
        fin = run.final(rid)
        assert (fin.finish_reason, fin.token_id, fin.error) == ("abort", None, None)
    assert run.tokens("b") == [] and run.tokens("d") == []
    assert 3 <= len(run.tokens("a")) < 50
    assert run.tokens("c") == ref_c
    assert {o.rid for o in run.outputs} == {"a", "b", "c", "d"}
    # Finished: aborting again is harmless, and the rid can be used again.
    s.abort("c")
    assert s.take_outputs() == []
    again = drive(s, [req("c", pc, greedy(5, ignore_eos=True))])
    assert again.tokens("c") == ref_c


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_abort_preempted_request(tiny, monkeypatch, cache):
    prompts = [rand_ids(30, 70 + i) for i in range(3)]
    s = tiny(max_total_tokens=80, max_running_requests=3, disable_radix_cache=not cache)
    plans = Counter(monkeypatch, sched_mod, "plan_step")
    victims = []

    def actions(s, step, run):
        for p in plans.results:
            for r in p.preempted:
                if r.rid not in victims and r.rid in s.by_rid and r in s.waiting and r.row == -1:
                    victims.append(r.rid)
                    s.abort(r.rid)

    reqs = [req(f"r{i}", p, greedy(40, ignore_eos=True)) for i, p in enumerate(prompts)]
    run = drive(s, reqs, before_step=actions, max_steps=1000)
    assert victims, "no request was preempted"
    for rid in victims:
        assert run.final(rid).finish_reason == "abort"
    for r in reqs:
        if r.rid not in victims:
            assert run.final(r.rid).finish_reason == "length"


# ---------------------------------------------------------------- n > 1 (groups)

@pytest.mark.parametrize("chunk", [256, 16])
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_group_computes_shared_prompt_once(tiny, monkeypatch, cache, chunk):
    prompt = rand_ids(60, seed=80)
    n = 4
    reqs = [req(f"g{i}", prompt, sampled(6, seed=800 + i, ignore_eos=True), group="grp") for i in range(n)]
    ref_s = tiny(disable_radix_cache=True)
    refs = {r.rid: solo(ref_s, r) for r in reqs}
    assert len({tuple(t) for t in refs.values()}) > 1  # different seeds sample differently

    log = ComputeLog(monkeypatch)
    s = tiny(chunked_prefill_size=chunk, disable_radix_cache=not cache)
    run = drive(s, reqs)
    computed = log.prompt_tokens_computed({r.rid: len(prompt) for r in reqs})
    cached = {r.rid: run.final(r.rid).cached_tokens for r in reqs}
    if cache:
        # One member computes the prompt; each other one recomputes only its last token.
        assert sum(computed.values()) == len(prompt) + (n - 1)
        assert sorted(cached.values()) == [0] + [len(prompt) - 1] * (n - 1)
        assert cached["g0"] == 0
    else:
        assert computed == {r.rid: len(prompt) for r in reqs}
        assert set(cached.values()) == {0}
    for r in reqs:
        assert run.tokens(r.rid) == refs[r.rid], r.rid


@pytest.mark.parametrize("chunk", [256, 16])
def test_group_members_start_together_once_prompt_is_cached(tiny, monkeypatch, chunk):
    prompt = rand_ids(60, seed=82)
    n = 4
    reqs = [req(f"g{i}", prompt, sampled(5, seed=820 + i, ignore_eos=True), group="grp") for i in range(n)]
    log = ComputeLog(monkeypatch)
    run = drive(tiny(chunked_prefill_size=chunk), reqs)
    prompt_done = next(i for i, step in enumerate(log.steps)
                       for rid, start, k in step if rid == "g0" and start + k == len(prompt))
    # Only g0 computed before; once its prompt is cached, every other member starts in the next step.
    assert {rid for step in log.steps[:prompt_done + 1] for rid, _, _ in step} == {"g0"}
    assert {rid for rid, _, _ in log.steps[prompt_done + 1]} == {r.rid for r in reqs}
    assert run.steps == prompt_done + 1 + 5


def test_group_survives_abort_of_its_prefilling_member(tiny):
    prompt = rand_ids(80, seed=81)
    reqs = [req(f"g{i}", prompt, sampled(4, seed=810 + i), group="grp") for i in range(3)]
    s = tiny(chunked_prefill_size=16)

    def actions(s, step, run):
        if step == 1:
            g0 = s.by_rid["g0"]
            assert g0 in s.running and g0.num_computed < len(prompt)
            s.abort("g0")

    run = drive(s, reqs, before_step=actions)
    assert run.final("g0").finish_reason == "abort"
    assert run.final("g1").finish_reason in ("length", "stop")
    assert run.final("g2").finish_reason in ("length", "stop")
    assert run.final("g2").cached_tokens == len(prompt) - 1
