"""Helpers for driving the Scheduler in-process: run requests to completion, check KV bookkeeping."""
from __future__ import annotations

import random

from collections.abc import Callable, Iterable

import numpy as np
import torch

from radixserve.engine.scheduler import Scheduler
from radixserve.managers.messages import GenerateReq, TokenOutput
from radixserve.sampling.params import SamplingParams


def greedy(max_new_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **kw)


def req(rid: str, ids: list[int], params: SamplingParams | None = None, group: str | None = None,
        namespace: str | None = None) -> GenerateReq:
    return GenerateReq(rid, list(ids), params or greedy(), group=group, namespace=namespace)


class Run:
    """Everything the scheduler emitted, in order, with per-request views."""

    def __init__(self) -> None:
        self.outputs: list[TokenOutput] = []
        self.steps = 0

    def of(self, rid: str) -> list[TokenOutput]:
        return [o for o in self.outputs if o.rid == rid]

    def tokens(self, rid: str) -> list[int]:
        return [o.token_id for o in self.of(rid) if o.token_id is not None]

    def final(self, rid: str) -> TokenOutput:
        """The single finishing output of rid, which must be its last output."""
        outs = self.of(rid)
        fins = [o for o in outs if o.finish_reason is not None]
        assert len(fins) == 1, f"{rid}: expected exactly one finish, got {fins}"
        assert outs[-1] is fins[0], f"{rid}: outputs after its finish: {outs[outs.index(fins[0]) + 1:]}"
        return fins[0]


def owned_slots(s: Scheduler) -> int:
    """Slots owned by running requests (computed but not handed to the radix tree)."""
    return sum(r.num_computed - r.protected_len for r in s.running)


def check_live(s: Scheduler) -> None:
    """KV accounting between steps: every slot is free, in the tree, or owned by a running request."""
    kv = s.kv
    assert len(s.running) <= s.args.max_running_requests
    assert kv.free_slots() + kv.tree.total_size() + owned_slots(s) == kv.capacity, (
        kv.free_slots(), kv.tree.total_size(), owned_slots(s), kv.capacity)
    for r in s.running:
        assert r.row >= 0 and 0 <= r.protected_len <= r.num_computed < r.seq_len, (r.rid, r.num_computed)
    for r in s.waiting:
        assert r.row == -1 and r.num_computed == 0 and r.tree_node is None


def _tree_nodes(tree) -> list:
    nodes = []
    for root in tree._roots.values():
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
    return nodes


def check_idle(s: Scheduler) -> None:
    """Once idle: every slot is either free or cached, nothing is locked, every row is free, and the
    free list and the tree hold each slot exactly once."""
    assert not s.has_work() and not s.running and not s.waiting
    assert not s.by_rid, f"requests left in by_rid: {list(s.by_rid)}"
    kv = s.kv
    assert kv.tree.protected_size() == 0
    assert kv.free_slots() + kv.tree.total_size() == kv.capacity, (
        kv.free_slots(), kv.tree.total_size(), kv.capacity)
    assert kv.pool.free_rows() == kv.pool.req_to_token.shape[0]
    free = np.flatnonzero(kv.pool.slots._free).tolist()
    nodes = _tree_nodes(kv.tree)
    assert all(n.lock_ref == 0 for n in nodes)
    cached = torch.cat([n.value for n in nodes]).tolist() if nodes else []
    assert sum(len(n.key) for n in nodes) == kv.tree.total_size()
    assert sorted(free + cached) == list(range(1, kv.capacity + 1)), "a slot is lost or held twice"
    st = s.stats()
    assert (st.num_running, st.num_waiting) == (0, 0)
    assert st.kv_free + st.kv_cached == st.kv_total == kv.capacity
    if kv.tree.disable:
        assert kv.free_slots() == kv.capacity


def drive(s: Scheduler, reqs: Iterable[GenerateReq] = (), max_steps: int = 2000,
          before_step: Callable[[Scheduler, int, Run], None] | None = None, check: bool = True) -> Run:
    """Submit reqs, step until idle (at most max_steps steps), return all outputs.
    before_step(s, step_index, run) may submit or abort between steps."""
    run = Run()
    for r in reqs:
        s.submit(r)
    run.outputs.extend(s.take_outputs())
    while True:
        if before_step is not None:
            before_step(s, run.steps, run)
            run.outputs.extend(s.take_outputs())
        if not s.has_work():
            break
        assert run.steps < max_steps, f"not finished after {max_steps} steps: {s.stats()}"
        s.step()
        run.steps += 1
        run.outputs.extend(s.take_outputs())
        if check:
            check_live(s)
    if check:
        check_idle(s)
    return run


def solo(s: Scheduler, r: GenerateReq) -> list[int]:
    """Greedy/seeded tokens of r run alone on an idle scheduler."""
    return drive(s, [r]).tokens(r.rid)


class Counter:
    """Wraps a function of a module attribute and records its calls."""

    def __init__(self, monkeypatch, module, name: str, snap: Callable | None = None):
        """snap(result) is recorded right after each call, while the objects it looks at are current."""
        self.calls: list = []
        self.results: list = []
        self.snaps: list = []
        inner = getattr(module, name)

        def wrapper(*a, **k):
            out = inner(*a, **k)
            self.calls.append((a, k))
            self.results.append(out)
            if snap is not None:
                self.snaps.append(snap(out))
            return out

        monkeypatch.setattr(module, name, wrapper)


class ComputeLog:
    """Records, per request, the token positions computed in every step (wraps build_batch)."""

    def __init__(self, monkeypatch):
        import radixserve.engine.scheduler as sched_mod

        self.steps: list[list[tuple[str, int, int]]] = []  # (rid, start, n)
        inner = sched_mod.build_batch

        def wrapper(entries, *a, **k):
            self.steps.append([(r.rid, r.num_computed, n) for r, n in entries])
            return inner(entries, *a, **k)

        monkeypatch.setattr(sched_mod, "build_batch", wrapper)

    def prompt_tokens_computed(self, prompt_len: dict[str, int]) -> dict[str, int]:
        out = {rid: 0 for rid in prompt_len}
        for step in self.steps:
            for rid, start, n in step:
                if rid in prompt_len:
                    out[rid] += max(0, min(start + n, prompt_len[rid]) - start)
        return out

    def total(self) -> int:
        return sum(n for step in self.steps for _, _, n in step)


VOCAB = 49152  # tiny model (tests/conftest.py)


def rand_ids(n: int, seed: int) -> list[int]:
    """Random prompt ids, avoiding the special ids 0..2 (EOS is 2)."""
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def sampled(max_new_tokens: int, seed: int, **kw) -> SamplingParams:
    kw.setdefault("temperature", 1.0)
    return SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **kw)
