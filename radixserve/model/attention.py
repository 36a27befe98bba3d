"""Attention over the paged KV pool for a step that mixes prefill chunks (with cached prefixes) and decodes.

A step's sequences are split into at most two groups, decodes (one query each) and prefills (many), so
that neither is padded to the other's query length. Each group runs as one batched SDPA call over the
KV gathered from the pool through the requests' slot tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnGroup:
    q_index: torch.Tensor  # [G, Q] positions of each sequence's queries in the step (padding → 0)
    kv_slots: torch.Tensor  # [G, K] pool slots of each sequence's keys, cached prefix first (padding → 0)
    mask: torch.Tensor  # [G, 1, Q, K] True where a query may attend a key (causal, within length)
    valid: torch.Tensor | None  # [G, Q] real (non-padding) queries; None when Q == 1
    out_index: torch.Tensor  # [N] step positions of the real queries, in `valid` order

    @classmethod
    def build(cls, q_starts: torch.Tensor, q_lens: torch.Tensor, prefix_lens: torch.Tensor,
              req_to_token: torch.Tensor, rows: torch.Tensor) -> "AttnGroup":
        """q_starts/q_lens/prefix_lens/rows: [G]; req_to_token[rows] lists each sequence's slots."""
        device = q_lens.device
        max_q = int(q_lens.max())
        kv_lens = prefix_lens + q_lens
        max_kv = int(kv_lens.max())
        ar_q = torch.arange(max_q, device=device)
        valid = ar_q[None, :] < q_lens[:, None]
        q_index = torch.where(valid, q_starts[:, None] + ar_q[None, :], 0)
        ar_k = torch.arange(max_kv, device=device)
        # Rows past q_len still see key 0, so no softmax row is empty (those rows are discarded).
        mask = (ar_k[None, None, :] <= (prefix_lens[:, None] + ar_q[None, :])[:, :, None]) & (
            ar_k[None, None, :] < kv_lens[:, None, None]
        )
        return cls(
            q_index=q_index,
            kv_slots=req_to_token[rows, :max_kv],
            mask=mask.unsqueeze(1),
            valid=None if max_q == 1 else valid,
            out_index=q_index[valid],
        )


@dataclass
class AttentionMetadata:
    out_cache_loc: torch.Tensor  # [T] slot where each new token's K/V is written
    groups: list[AttnGroup]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; k_cache/v_cache: [slots, KVH, D] of this layer. Returns [T, H, D]."""
    k_cache[meta.out_cache_loc] = k
    v_cache[meta.out_cache_loc] = v
    out = torch.empty_like(q)
    for g in meta.groups:
        qg = q[g.q_index].transpose(1, 2)
        kg = k_cache[g.kv_slots].transpose(1, 2)
        vg = v_cache[g.kv_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2)  # [G, Q, H, D]
        out[g.out_index] = o[:, 0] if g.valid is None else o[g.valid]
    return out
