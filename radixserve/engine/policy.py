"""Which requests compute which tokens in the next step: decodes first, then prefill chunks within
the token budget; preemption of the newest request when the KV pool runs out."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from radixserve.engine.kv_manager import KVManager
from radixserve.engine.request import Request


@dataclass
class StepPlan:
    entries: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    admitted: list[Request] = field(default_factory=list)  # newly given a row (sampler state to set)
    preempted: list[Request] = field(default_factory=list)


def plan_step(running: list[Request], waiting: deque[Request], kv: KVManager, max_running: int,
              token_budget: int, max_loras: int | None = None) -> StepPlan:
    """Mutates running/waiting (admissions, preemptions) and returns the step's work.

    Every running request in the decode phase computes one token. Prefill chunks of running then
    waiting requests (oldest first) share token_budget. If the pool cannot hold the decode tokens even
    after evicting the prefix cache, the newest running requests are preempted: their KV is released
    (into the cache, so recomputing it is cheap unless it gets evicted) and they wait at the front.

    With max_loras, the running requests use at most that many distinct LoRA adapters (the base model
    not counted). A waiting request whose adapter would exceed it waits, while later requests of the
    adapters already running may pass it; to bound that wait, one running adapter (see _drain_choice)
    admits nothing new until it has drained and its place goes to the blocked request.
    """
    plan = StepPlan()
    decodes = [r for r in running if r.remaining == 1]
    while decodes and not kv.ensure_free(len(decodes)):
        victim = max(running, key=lambda r: r.order)
        running.remove(victim)
        if victim in decodes:
            decodes.remove(victim)
        kv.release(victim)
        plan.preempted.append(victim)
    waiting.extendleft(sorted(plan.preempted, key=lambda r: r.order, reverse=True))
    need = len(decodes)
    chunks: list[tuple[Request, int]] = []

    def fit(n: int) -> int:
        """Tokens of an n-token chunk that the pool can take now (0 if none)."""
        if kv.ensure_free(need + n):
            return n
        return max(0, min(n, kv.free_slots() - need))

    for req in sorted((r for r in running if r.remaining > 1), key=lambda r: r.order):
        n = fit(min(req.remaining, token_budget))
        if n == 0:
            break
        chunks.append((req, n))
        need += n
        token_budget -= n

    # Members of an n-group wait while one of them prefills the shared prompt; they then reuse its KV.
    share = not kv.tree.disable
    prefilling = {r.group for r in running if share and r.group and r.num_computed < len(r.prompt_ids)}
    deferred: list[Request] = []
    active = {r.lora_id for r in running if r.lora_id}
    draining = 0  # the adapter that admits nothing this step (0: none)
    while waiting and token_budget > 0 and len(running) < max_running and not plan.preempted:
        req = waiting.popleft()
        if req.group is not None and req.group in prefilling:
            deferred.append(req)
            continue
        lora = req.lora_id
        if lora and max_loras is not None:
            blocked = lora not in active and len(active) >= max_loras
            if blocked and not draining:
                draining = _drain_choice(running, active)
            if blocked or lora == draining:
                deferred.append(req)
                continue
        if not kv.admit(req):
            waiting.appendleft(req)
            break
        n = fit(min(req.remaining, token_budget))
        if n == 0:
            kv.release(req)
            waiting.appendleft(req)
            break
        running.append(req)
        plan.admitted.append(req)
        if lora:
            active.add(lora)
        if not req.admitted:  # the first admission that runs sets the reported reuse
            req.cached_tokens = min(req.num_computed, len(req.prompt_ids))
            req.admitted = True
        if n == 1:
            decodes.append(req)
        else:
            chunks.append((req, n))
        need += n
        token_budget -= n
        if share and req.group is not None and req.num_computed < len(req.prompt_ids) - 1:
            prefilling.add(req.group)  # it computes the prompt, cached only at the end of this step
    waiting.extendleft(reversed(deferred))
    plan.entries = [(r, 1) for r in decodes] + chunks
    return plan


def _drain_choice(running: list[Request], active: set[int]) -> int:
    """The running adapter to drain for a request blocked by the adapter limit: the one with the fewest
    running requests (lowest id on ties). Its count only falls while it is drained, and another adapter
    takes over only with a smaller count, so the smallest count reaches zero: no request waits forever."""
    counts = dict.fromkeys(active, 0)
    for r in running:
        if r.lora_id:
            counts[r.lora_id] += 1
    return min(counts, key=lambda lid: (counts[lid], lid))
