"""LoRA through the scheduler on the tiny random Llama: greedy output against peft, batches mixing the
base model and several adapters (same tokens as alone), the --max-loras-per-batch limit without
starvation, prefix-cache isolation per adapter, unloads that wait for running requests, and adapter
weights evicted from memory beyond --max-loaded-loras (LRU, pinned kept)."""
from __future__ import annotations

import pytest
import torch

import radixserve.lora.ops as lora_ops
from radixserve.managers.messages import GenerateReq, LoadLoRAReq, UnloadLoRAReq
from sched_util import ComputeLog, Counter, check_idle, drive, greedy, rand_ids, solo

NAMES = ["r4_qv", "r8_all", "r16_mlp_rslora", "r8_kv_alpha"]


@pytest.fixture
def lora_sched(tiny, tiny_adapters):
    """Factory: a Scheduler with the tiny adapters loaded (ids 1.. in NAMES order)."""

    def make(names=NAMES, **overrides):
        return tiny(lora_paths=[f"{n}={tiny_adapters[n]}" for n in names], **overrides)

    return make


def lreq(rid: str, ids: list[int], lora_id: int = 0, n_tokens: int = 10, **kw) -> GenerateReq:
    return GenerateReq(rid, list(ids), greedy(n_tokens, ignore_eos=True, **kw), lora_id=lora_id)


def test_greedy_matches_peft_and_differs_from_base(lora_sched, tiny_llama, tiny_adapters):
    from lora_adapters import load_hf_base, peft_merged

    s = lora_sched()
    prompt = rand_ids(12, seed=1)
    base = load_hf_base(tiny_llama)
    ours_base = solo(s, lreq("base", prompt))
    for lid, name in enumerate(NAMES, start=1):
        with torch.no_grad():
            ref = peft_merged(base, tiny_adapters[name]).generate(
                torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, 12:].tolist()
        ours = solo(s, lreq(name, prompt, lid))
        assert ours == ref, name
        assert ours != ours_base, name


def test_mixed_batch_same_tokens_as_alone(lora_sched, monkeypatch):
    """Base + 3 adapters (one used twice) in the same steps, prefill and decode: each request's greedy
    tokens equal its solo run (float32)."""
    s = lora_sched()
    prompts = [rand_ids(n, seed=10 + i) for i, n in enumerate((9, 30, 14, 21, 17))]
    loras = [0, 1, 2, 3, 2]
    reqs = [lreq(f"r{i}", p, lid) for i, (p, lid) in enumerate(zip(prompts, loras))]
    alone = {r.rid: solo(s, r) for r in reqs}
    log = ComputeLog(monkeypatch)
    run = drive(s, reqs)
    assert {r.rid: run.tokens(r.rid) for r in reqs} == alone
    assert any(len(step) == 5 for step in log.steps)  # they really shared steps
    assert len({tuple(t) for t in alone.values()}) == 5  # and the adapters changed the outputs


def test_base_only_steps_skip_lora(lora_sched, monkeypatch):
    """With adapters loaded but none used in a step, the LoRA path is not entered at all."""
    grouped = Counter(monkeypatch, lora_ops, "add_lora")
    stacked = Counter(monkeypatch, lora_ops, "add_lora_stacked")
    s = lora_sched()
    kernel = Counter(monkeypatch, s.runner, "lora_kernel") if s.runner.lora_kernel is not None else None
    paths = [grouped, stacked] + ([kernel] if kernel else [])
    drive(s, [lreq("a", rand_ids(10, seed=2)), lreq("b", rand_ids(5, seed=3))])
    assert all(p.calls == [] for p in paths)
    drive(s, [lreq("c", rand_ids(10, seed=2), lora_id=1, n_tokens=2), lreq("d", rand_ids(10, seed=3), lora_id=2)])
    assert any(p.calls for p in paths)


def test_max_loras_per_batch(lora_sched, monkeypatch):
    """Four adapters, at most two per batch: every step respects it, and everyone gets the same tokens
    as alone."""
    s = lora_sched(max_loras_per_batch=2)
    reqs = [lreq(f"r{i}", rand_ids(8 + i, seed=20 + i), lora_id=i % 5) for i in range(10)]
    alone = {r.rid: solo(s, r) for r in reqs}
    lora_of = {r.rid: r.lora_id for r in reqs}
    log = ComputeLog(monkeypatch)
    run = drive(s, reqs)
    assert {r.rid: run.tokens(r.rid) for r in reqs} == alone
    per_step = [{lora_of[rid] for rid, _, _ in step} - {0} for step in log.steps]
    assert max(len(a) for a in per_step) == 2


def test_no_starvation_behind_busy_adapters(lora_sched):
    """Adapters 1 and 2 fill the batch's two adapter places and keep receiving requests; a request for
    adapter 3 still starts after a bounded wait, while they keep coming."""
    s = lora_sched(max_loras_per_batch=2, max_running_requests=6)
    feed_until = 60
    started: dict[str, int] = {}

    def feed(sched, step, run):
        if step < feed_until:
            for lid in (1, 2):
                sched.submit(lreq(f"f{step}-{lid}", rand_ids(6, seed=step * 3 + lid), lid, n_tokens=4))
        if step == 3:
            sched.submit(lreq("blocked", rand_ids(6, seed=999), 3, n_tokens=4))
        for o in run.outputs:
            started.setdefault(o.rid, step)

    run = drive(s, before_step=feed)
    assert run.final("blocked").finish_reason == "length"
    assert started["blocked"] < feed_until, started["blocked"]


def test_cache_isolation_between_base_and_adapters(lora_sched):
    s = lora_sched()
    prompt = rand_ids(40, seed=4)
    adapter_alone = solo(lora_sched(), lreq("x", prompt, 2))
    base = drive(s, [lreq("base", prompt)])
    assert base.final("base").cached_tokens == 0
    first = drive(s, [lreq("a1", prompt, 2)])
    assert first.final("a1").cached_tokens == 0  # the base's KV of the same prompt is not reused
    assert first.tokens("a1") == adapter_alone
    other = drive(s, [lreq("b1", prompt, 1)])
    assert other.final("b1").cached_tokens == 0  # nor another adapter's
    again = drive(s, [lreq("a2", prompt, 2)])
    assert again.final("a2").cached_tokens > 30 and again.tokens("a2") == adapter_alone
    assert drive(s, [lreq("base2", prompt)]).final("base2").cached_tokens > 30


def test_unload_waits_for_running_requests(lora_sched):
    s = lora_sched()
    s.submit(lreq("long", rand_ids(10, seed=5), 1, n_tokens=30))
    s.submit(lreq("queued", rand_ids(10, seed=6), 1, n_tokens=5))
    for _ in range(3):
        s.step()
    s.unload_lora(UnloadLoRAReq("u1", "r4_qv"))
    assert s.take_control() == []  # not before its requests are done
    s.submit(lreq("late", rand_ids(10, seed=7), 1))
    late = [o for o in s.take_outputs() if o.rid == "late"]
    assert late[0].finish_reason == "error" and "not loaded" in late[0].error
    run = drive(s, check=False)
    assert len(run.tokens("long")) == 27 and run.final("long").finish_reason == "length"
    assert run.final("queued").finish_reason == "length"
    reply = s.take_control()
    assert [(r.req_id, r.success) for r in reply] == [("u1", True)]
    assert "r4_qv" not in [a.name for a in reply[0].adapters]
    assert not any(isinstance(ns, tuple) and ns[1] == 1 for ns in s.kv.tree._roots)  # its cache is gone
    check_idle(s)
    s.unload_lora(UnloadLoRAReq("u2", "r4_qv"))
    assert s.take_control()[0].not_found


def test_load_at_run_time_and_errors(lora_sched, tiny_adapters, tmp_path):
    s = lora_sched(names=["r8_all"])
    s.load_lora(LoadLoRAReq("l1", "new", tiny_adapters["r4_qv"]))
    s.load_lora(LoadLoRAReq("l2", "new", tiny_adapters["r4_qv"]))
    s.load_lora(LoadLoRAReq("l3", "missing", str(tmp_path / "nothing")))
    ok, dup, missing = s.take_control()
    assert ok.success and [a.name for a in ok.adapters] == ["r8_all", "new"]
    assert not dup.success and "already loaded" in dup.message
    assert not missing.success and "not a directory" in missing.message
    new_id = ok.adapters[1].id
    ref = solo(lora_sched(names=["r4_qv"]), lreq("ref", rand_ids(10, seed=8), 1))
    assert solo(s, lreq("x", rand_ids(10, seed=8), new_id)) == ref
    # The buffers cover the start-up adapters' ranks and targets (4; q, v) unless the flags widen them.
    narrow = lora_sched(names=["r4_qv"])
    narrow.load_lora(LoadLoRAReq("l4", "wide", tiny_adapters["r8_all"]))
    assert "rank 8, above --max-lora-rank 4" in narrow.take_control()[0].message
    narrow = lora_sched(names=["r4_qv"], max_lora_rank=16)
    narrow.load_lora(LoadLoRAReq("l4", "wide", tiny_adapters["r8_all"]))
    assert "outside --lora-target-modules (q_proj, v_proj;" in narrow.take_control()[0].message
    wide = lora_sched(names=["r4_qv"], lora_target_modules=["all"], max_lora_rank=8)
    wide.load_lora(LoadLoRAReq("l5", "wide", tiny_adapters["r8_all"]))
    assert wide.take_control()[0].success


def test_unknown_adapter_id_and_lora_disabled(lora_sched, tiny):
    s = lora_sched()
    s.submit(lreq("x", rand_ids(5, seed=9), 42))
    out = s.take_outputs()[0]
    assert out.finish_reason == "error" and "not loaded" in out.error
    plain = tiny()
    plain.submit(lreq("y", rand_ids(5, seed=9), 1))
    assert "not enabled" in plain.take_outputs()[0].error
    plain.load_lora(LoadLoRAReq("l", "a", "/x"))
    assert "not enabled" in plain.take_control()[0].message


def test_lru_eviction_and_pinning(lora_sched, tiny_adapters):
    """--max-loaded-loras 2 with three adapters, one pinned: the least recently used unpinned one is
    evicted from memory, reloaded from its folder when asked again (same tokens); the pinned one stays."""
    s = lora_sched(names=[], enable_lora=True, max_loras_per_batch=2, max_loaded_loras=2)
    for i, name in enumerate(["r4_qv", "r8_all", "r16_mlp_rslora"]):
        s.load_lora(LoadLoRAReq(f"l{i}", name, tiny_adapters[name], pinned=(name == "r4_qv")))
    replies = s.take_control()
    assert all(r.success for r in replies), replies
    resident = lambda: {e.name for e in s.lora.entries.values() if e.adapter is not None}  # noqa: E731
    assert resident() == {"r4_qv", "r16_mlp_rslora"}  # r8_all: least recently used, unpinned
    prompt = rand_ids(10, seed=11)
    ref = solo(lora_sched(names=["r8_all"]), lreq("ref", prompt, 1))
    assert solo(s, lreq("a", prompt, 2)) == ref  # reloaded from disk
    assert resident() == {"r4_qv", "r8_all"}
    solo(s, lreq("b", prompt, 3))
    assert resident() == {"r4_qv", "r16_mlp_rslora"}
    solo(s, lreq("c", prompt, 1))
    assert "r4_qv" in resident()  # never evicted
    # Adapters in use stay in memory past the limit; the extra one goes once they are done.
    for lid in (1, 2, 3):
        s.submit(lreq(f"busy{lid}", prompt, lid, n_tokens=3))
    assert resident() == {"r4_qv", "r8_all", "r16_mlp_rslora"}
    drive(s)
    assert len(resident()) == 2
