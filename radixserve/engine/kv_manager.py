"""Where each request's KV lives: slot rows in the pool, prefixes shared through the radix tree."""
from __future__ import annotations

import torch

from radixserve.cache.kv_pool import KVPool
from radixserve.cache.radix_cache import RadixCache
from radixserve.engine.request import Request


# Slots reserved after a request's run for its next tokens: decode steps then write consecutive slots
# (64 tokens of the default model's KV: 8 KB per layer and KV head).
_RESERVE = 64


class KVManager:
    def __init__(self, pool: KVPool, disable_radix_cache: bool):
        self.pool = pool
        self.tree = RadixCache(pool.slots, disable=disable_radix_cache)
        self.capacity = pool.slots.num_slots - 1  # slot 0 is padding

    def free_slots(self) -> int:
        return self.pool.slots.available()

    def ensure_free(self, n: int) -> bool:
        """Make n slots allocatable, evicting unreferenced cached prefixes (LRU) if needed, before the
        running requests' reserved slots."""
        short = n - self.pool.slots.unreserved()
        if short > 0:
            self.tree.evict(short)
        return self.pool.slots.available() >= n

    def admit(self, req: Request) -> bool:
        """Give req a slot row and reuse its longest cached prefix. False when no row is free."""
        row = self.pool.alloc_row()
        if row is None:
            return False
        # At least one token is always computed: its logits give the next token. Prompt logprobs
        # need logits at every prompt position, so such a request reuses nothing.
        if req.want_prompt_logprobs and not req.output_ids:
            key, req.prompt_logprobs = [], []
        else:
            key = req.tokens(0, req.seq_len - 1)
        slots, node = self.tree.match_prefix(key, req.namespace)
        self.tree.inc_lock(node)
        m = len(slots)
        self.pool.req_to_token[row, :m] = slots
        req.row, req.num_computed, req.protected_len, req.tree_node = row, m, m, node
        return True

    def cache_prefix(self, req: Request) -> None:
        """Insert req's computed tokens into the tree so other requests can share them; req then
        holds a lock on them instead of owning the slots."""
        if self.tree.disable:
            return
        n = req.num_computed
        key = req.tokens(0, n)
        row = self.pool.req_to_token[req.row]
        present = self.tree.insert(key, row[:n].clone(), req.namespace)
        if present > req.protected_len:
            # Another request cached the same tokens meanwhile: ours are duplicates.
            self.pool.slots.free(row[req.protected_len:present].clone())
        slots, node = self.tree.match_prefix(key, req.namespace)
        row[:n] = slots
        self.tree.inc_lock(node)
        self.tree.dec_lock(req.tree_node)
        req.tree_node, req.protected_len = node, n

    def release(self, req: Request) -> None:
        """Request finished, aborted or preempted: its KV goes to the cache (or back to the pool)."""
        if req.row < 0:
            return
        self.cache_prefix(req)
        row = self.pool.req_to_token[req.row]
        self.pool.slots.free(row[req.protected_len:req.num_computed].clone())
        self.tree.dec_lock(req.tree_node)
        self.pool.slots.release(req.row)
        self.pool.free_row(req.row)
        req.row, req.tree_node, req.protected_len, req.num_computed = -1, None, 0, 0

    def alloc(self, entries: list[tuple[Request, int]]) -> torch.Tensor:
        """New slots for a step's entries (request, tokens), in entry order: each request's continue
        its run, and up to _RESERVE slots stay reserved after them for the tokens it may still need."""
        rows = [req.row for req, _ in entries]
        counts = [n for _, n in entries]
        reserve = [min(_RESERVE, req.remaining - n + max(0, req.params.max_new_tokens - len(req.output_ids) - 1))
                   for req, n in entries]
        slots = self.pool.slots.alloc_rows(rows, counts, reserve, self.tree.evict)
        if slots is None:
            raise RuntimeError(f"KV allocation of {sum(counts)} slots after ensure_free: scheduler bug")
        return slots

    def cached_tokens(self) -> int:
        return self.tree.total_size()
