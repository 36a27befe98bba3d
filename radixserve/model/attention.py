"""Attention over the paged KV pool for a step that mixes prefill chunks (with cached prefixes) and decodes.

A step's sequences are split into at most two groups, decodes (one query each) and prefills (many), so
that neither is padded to the other's query length. A prefill group runs as one batched SDPA call over
the KV gathered from the pool through the requests' slot tables. A decode group runs on the C++ kernel
that reads the pool in place (radixserve/kernels, CPU), or else as batched matmuls over the gathered KV.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class AttnGroup:
    q_index: torch.Tensor  # [G, Q] positions of each sequence's queries in the step (padding → 0)
    kv_slots: torch.Tensor  # [G * K] pool slots of each sequence's keys, cached prefix first (padding → 0)
    mask: torch.Tensor  # [G, 1, Q, K] prefill: True where a query may attend a key; decode: 0 / -inf bias
    valid: torch.Tensor | None  # [G, Q] real (non-padding) queries; None for decode groups (Q == 1)
    out_index: torch.Tensor  # [N] step positions of the real queries, in `valid` order
    # Decode groups whose sequences all start with the same slots (a prefix-cache hit they share):
    # those keys are read once for the whole group, and only the rest per sequence (kv_slots, mask).
    shared_slots: torch.Tensor | None = None  # [P]
    kv_lens: torch.Tensor | None = None  # [G] keys of each sequence in kv_slots (decode groups)
    kv_rows: torch.Tensor | None = None  # kv_slots per KV head as rows of the flat [KVH * slots, D] cache
    shared_rows: torch.Tensor | None = None  # the same for shared_slots

    @classmethod
    def build(cls, q_starts: torch.Tensor, q_lens: torch.Tensor, prefix_lens: torch.Tensor,
              req_to_token: torch.Tensor, rows: torch.Tensor) -> "AttnGroup":
        """q_starts/q_lens/prefix_lens/rows: [G]; req_to_token[rows] lists each sequence's slots."""
        device = q_lens.device
        max_q = int(q_lens.max())
        kv_lens = prefix_lens + q_lens
        max_kv = int(kv_lens.max())
        if max_q == 1:  # decode: a key count that changes every step only every _DECODE_KEY_BUCKET steps
            max_kv = min(-(-max_kv // _DECODE_KEY_BUCKET) * _DECODE_KEY_BUCKET, req_to_token.shape[1])
        ar_q = torch.arange(max_q, device=device)
        valid = ar_q[None, :] < q_lens[:, None]
        q_index = torch.where(valid, q_starts[:, None] + ar_q[None, :], 0)
        ar_k = torch.arange(max_kv, device=device)
        # Rows past q_len still see key 0, so no softmax row is empty (those rows are discarded).
        mask = (ar_k[None, None, :] <= (prefix_lens[:, None] + ar_q[None, :])[:, :, None]) & (
            ar_k[None, None, :] < kv_lens[:, None, None]
        )
        mask = mask.unsqueeze(1)
        table = req_to_token[rows, :max_kv]
        shared = None
        if max_q == 1:  # the decode kernel adds the mask to float32 scores
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(~mask, float("-inf"))
            if len(rows) > 1:
                # Leading slots every sequence has (within every sequence's length; one key stays per row).
                same = (table == table[:1]).all(0).cumprod(0).sum()
                p = min(int(same), int(kv_lens.min()), max_kv - 1)
                if p >= _MIN_SHARED_KEYS:
                    shared, table, mask = table[0, :p], table[:, p:], mask[..., p:]
        return cls(
            q_index=q_index,
            kv_slots=table.reshape(-1),
            mask=mask,
            valid=None if max_q == 1 else valid,
            out_index=q_index[valid],
            shared_slots=shared,
            kv_lens=kv_lens if max_q == 1 and shared is None else None,
        )


# A shared prefix shorter than this is gathered per sequence like the rest (one matmul less).
_MIN_SHARED_KEYS = 16
# Decode groups pad their keys (masked) to a multiple of this: oneDNN builds a matmul kernel for every
# new shape, which costs as much as ~30 of the small matmuls themselves, and a sequence's key count
# grows by one each step.
_DECODE_KEY_BUCKET = 32


@dataclass
class AttentionMetadata:
    out_cache_loc: torch.Tensor  # [T] slot where each new token's K/V is written
    groups: list[AttnGroup]
    # kernels.decode_attention() where the runner has it (CPU), else None. It reads decode groups' keys
    # and values in place; measured on the default model, decode steps of 1 / 32 sequences take 12.3 /
    # 62 ms with it against 16.2 / 73 ms gathering them for batched matmuls (benchmarks/RESULTS.md).
    # Groups with a shared prefix keep the matmuls, which read that prefix once for all sequences.
    decode_kernel: Callable | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; k_cache/v_cache: [KVH, slots, D] of this layer. Returns [T, H, D]."""
    k_cache.index_copy_(1, meta.out_cache_loc, k.transpose(0, 1))
    v_cache.index_copy_(1, meta.out_cache_loc, v.transpose(0, 1))
    kv_heads, slots, d = k_cache.shape
    out = torch.empty_like(q)
    for g in meta.groups:
        n = g.q_index.shape[0]
        if meta.decode_kernel is not None and g.kv_lens is not None:
            out[g.out_index] = meta.decode_kernel(q[g.out_index], k_cache, v_cache, g.kv_slots.view(n, -1),
                                                  g.kv_lens, scale)
            continue
        if g.kv_rows is None:  # the same for every layer: computed once per step
            heads = torch.arange(kv_heads, device=g.kv_slots.device)[:, None] * slots
            g.kv_rows = (heads + g.kv_slots[None, :]).reshape(-1)
            if g.shared_slots is not None:
                g.shared_rows = (heads + g.shared_slots[None, :]).reshape(-1)
        # [KVH, n, K, D]: each KV head's keys of the group in one contiguous block. index_select over
        # the rows of the flat cache copies whole rows, several times faster than selecting along dim 1.
        kg = k_cache.view(-1, d).index_select(0, g.kv_rows).view(kv_heads, n, -1, d)
        vg = v_cache.view(-1, d).index_select(0, g.kv_rows).view(kv_heads, n, -1, d)
        if g.valid is None:
            shared = None
            if g.shared_rows is not None:
                shared = (k_cache.view(-1, d).index_select(0, g.shared_rows).view(kv_heads, -1, d),
                          v_cache.view(-1, d).index_select(0, g.shared_rows).view(kv_heads, -1, d))
            out[g.out_index] = _decode_attention(q[g.out_index], kg, vg, g.mask, scale, shared)
        else:
            o = F.scaled_dot_product_attention(q[g.q_index].transpose(1, 2), kg.transpose(0, 1), vg.transpose(0, 1),
                                               attn_mask=g.mask, scale=scale, enable_gqa=True)
            out[g.out_index] = o.transpose(1, 2)[g.valid]
    return out


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                      shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One query per sequence: q [G, H, D]; k, v [KVH, G, K, D] (contiguous); bias [G, 1, 1, K] (0 or -inf);
    shared: keys and values [KVH, P, D] that every sequence sees before its own K.

    Batched matmuls over (KV head, sequence) pairs, with the query heads that share a KV head stacked
    as rows (GQA without repeating K/V), reading the gathered K/V in place; the shared keys take one
    matmul per KV head with all the group's queries as rows. The CPU flash-attention kernel is several
    times slower for single-query attention. Scores are normalised in float32, as in the reference
    implementations.
    """
    g, h, d = q.shape
    kv_heads, _, keys, _ = k.shape
    group = h // kv_heads
    qh = q.view(g, kv_heads, group, d).transpose(0, 1).reshape(kv_heads * g, group, d)
    scores = torch.bmm(qh, k.view(kv_heads * g, keys, d).transpose(1, 2)).float()
    scores = scores.view(kv_heads, g, group, keys).mul_(scale).add_(bias.view(1, g, 1, keys))
    p = 0
    if shared is not None:
        ks, vs = shared
        p = ks.shape[1]
        prefix = torch.bmm(qh.view(kv_heads, g * group, d), ks.transpose(1, 2)).float().mul_(scale)
        scores = torch.cat([prefix.view(kv_heads, g, group, p), scores], dim=-1)
    probs = scores.softmax(dim=-1).to(q.dtype)
    out = torch.bmm(probs[..., p:].reshape(kv_heads * g, group, keys), v.view(kv_heads * g, keys, d))
    if shared is not None:
        out = out.view(kv_heads, g * group, d).baddbmm_(probs[..., :p].reshape(kv_heads, g * group, p), vs)
    return out.view(kv_heads, g, group, d).transpose(0, 1).reshape(g, h, d)
