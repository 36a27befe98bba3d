"""Batched LoRA application: one forward pass for tokens of the base model and of several adapters.

The step's tokens are laid out base first, then each adapter's tokens contiguously in buffer-slot order
(engine/batch.py sorts them), so every adapter's tokens form one segment. Each targeted linear of the
model carries a LoRAHook (attached by lora/buffers.py), which it calls after its own matmul in steps
with adapter tokens; the hook picks the path. On CPUs, it hands the step to the C++ kernel
(radixserve/kernels/lora.cpp), which adds every adapter token's own delta B·A·x in one call, tokens of
one adapter sharing each read of its weights; measured against the torch paths
(benchmarks/lora_kernels.py, RESULTS.md), it is faster for decodes and prefills alike.
Elsewhere (or without a compiler) the delta takes a few tensor ops, in one of two ways chosen per step:

- grouped (larger steps over several slots): two segmented matmuls over the stacked per-slot weights,
      y[start:] += grouped_mm(grouped_mm(x[start:], Aᵀ), B)   (one segment per slot, empty ones free)
  sliced to the step's largest rank. On the CPU grouped_mm runs one small matmul per adapter, which
  costs 20-30 µs each in bfloat16 whatever its size: fine for long segments, too slow for decodes.
- stacked (decode-sized steps): two plain matmuls over every slot's weights, stacked, with a mask that
  keeps each token's own slot:
      y[start:] += (x[start:] · [A_0; ...; A_n]ᵀ * mask) · [B_0; ...; B_n]
  Being plain matmuls, they run through oneDNN-packed copies of the stacked weights like the base
  weights do where those are packed (LoRAHook.repack). Their extra work grows with adapter tokens ×
  slots, so larger steps take the grouped path.

Base tokens are never touched, and a step without adapter tokens skips LoRA entirely.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from radixserve.kernels.matmul import linear, pack_weight

# The stacked path computes every adapter token against every slot (tokens × slots rows of LoRA work)
# where the grouped path computes each adapter token once but pays a fixed cost per adapter (two small
# matmuls, ~25 µs each on the CPU). A step takes the stacked path when its extra rows stay within this
# many per adapter: adapter tokens × slots <= adapter tokens + STACKED_SLACK × adapters. Measured on a
# 2-core CPU with 8 slots (SmolLM2-135M, bfloat16, rank 16, step time relative to the base model's,
# stacked vs grouped; benchmarks/lora_kernels.py): decode of 16 requests over 4 adapters + base 0.71x vs
# 0.54x; 48 over 4 adapters 0.72x vs 0.65x; a prefill of 128 tokens for each of two adapters 0.69x vs
# 0.82x.
STACKED_SLACK = 128


@dataclass
class LoRABatch:
    """Where the adapters' tokens are in a step: tokens[start:] split into one segment per buffer slot."""

    start: int  # number of base-model tokens (they come first)
    offsets: torch.Tensor  # [slots] int32, cumulative end of each slot's segment, relative to start
    rank: int  # the largest rank among this step's adapters (the grouped path slices buffers to it)
    segments: list[tuple[int, int, int]]  # (slot, begin, end) of the non-empty segments
    linears: frozenset[str] | None = None  # the linears some adapter of the step targets (None: all)
    stacked: bool = False  # take the stacked path (see the module docstring)
    token_slots: torch.Tensor | None = None  # [tokens - start] slot of each adapter token
    # kernels.lora_add() where the runner has it (CPU): every step then adds each adapter token's own
    # delta in one call per projection, and neither path below runs.
    kernel: Callable | None = None
    _masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, counts: list[int], rank: int, device: torch.device,
              linears: frozenset[str] | None = None) -> "LoRABatch | None":
        """counts[0]: base-model tokens; counts[1 + s]: tokens of the adapter in buffer slot s. None when
        no token uses an adapter (the LoRA path is then skipped)."""
        if not any(counts[1:]):
            return None
        ends, segments, end = [], [], 0
        for slot, n in enumerate(counts[1:]):
            begin, end = end, end + n
            ends.append(end)
            if n:
                segments.append((slot, begin, end))
        batch = cls(counts[0], torch.tensor(ends, dtype=torch.int32, device=device), rank, segments, linears)
        adapter_tokens = sum(counts[1:])
        batch.stacked = adapter_tokens * (len(counts) - 1) <= adapter_tokens + STACKED_SLACK * len(segments)
        batch.token_slots = torch.repeat_interleave(
            torch.arange(len(counts) - 1, device=device), torch.tensor(counts[1:], device=device))
        return batch

    def mask(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """[adapter tokens, slots * rows]: 1 in the columns of the token's own slot (cached per shape)."""
        key = (rows, dtype)
        m = self._masks.get(key)
        if m is None:
            slots = len(self.offsets)
            own = self.token_slots[:, None] == torch.arange(slots, device=self.token_slots.device)
            m = self._masks[key] = own.repeat_interleave(rows, dim=1).to(dtype)
        return m


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, pieces: int,
             batch: LoRABatch) -> None:
    """Grouped path: y[T, out] += the LoRA delta of x[T, in] for the adapter tokens of the step (in place).

    lora_a: [slots, R * pieces, in] and lora_b: [slots, R * pieces, out] with rows ordered rank-major
    (row r * pieces + p is rank r of piece p), so the first rank * pieces rows hold every piece's first
    `rank` ranks: slicing them is a view that the segmented matmul reads without a copy."""
    k = batch.rank * pieces
    a, b = lora_a[:, :k], lora_b[:, :k]
    xs = x[batch.start:]
    if _grouped_mm_works(x.device.type, x.dtype):
        h = F.grouped_mm(xs, a.transpose(1, 2), offs=batch.offsets)
        y[batch.start:] += F.grouped_mm(h, b, offs=batch.offsets)
        return
    # A loop over the step's adapters (never over requests or tokens) where grouped_mm is unavailable.
    for slot, begin, end in batch.segments:
        seg = xs[begin:end]
        y[batch.start + begin:batch.start + end] += (seg @ a[slot].T) @ b[slot]


def add_lora_stacked(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     batch: LoRABatch, a_packed: torch.Tensor | None = None,
                     b_packed: torch.Tensor | None = None) -> None:
    """Stacked path: y[T, out] += the LoRA delta of x[T, in] for the adapter tokens of the step (in place).

    lora_a: [slots, rows, in], lora_b: [slots, rows, out]; a_packed / b_packed: their packed copies as
    linear weights, [slots * rows, in] and [out, slots * rows] (kernels.matmul.pack_weight), or None."""
    rows = lora_a.shape[1]
    h = linear(x[batch.start:], lora_a.flatten(0, 1), None, a_packed) * batch.mask(rows, x.dtype)
    y[batch.start:] += linear(h, lora_b.flatten(0, 1).T, None, b_packed)


class LoRAHook:
    """One linear's share of the stacked adapter buffers, attached to it as `linear.lora` and called by it
    as hook(y, x, batch) after its own matmul in steps with adapter tokens: adds their deltas to y (in
    place, returning it) by the kernel, the stacked or the grouped path (see the module docstring).

    a [slots, R * pieces, in] and b [slots, R * pieces, out] hold every slot's weights, rows rank-major
    (see add_lora); with pack, also their oneDNN-packed copies for the stacked path's matmuls, as linear
    weights [slots * R * pieces, in] and [out, slots * R * pieces] (where the base weights are packed;
    not needed where the LoRA kernel takes every adapter step)."""

    def __init__(self, name: str, a: torch.Tensor, b: torch.Tensor, pieces: int, pack: bool = False):
        self.name = name  # qkv_proj, o_proj, ...: skipped in steps whose adapters do not target it
        self.a, self.b, self.pieces, self.pack = a, b, pieces, pack
        self.a_packed: torch.Tensor | None = None
        self.b_packed: torch.Tensor | None = None
        self.repack()

    def repack(self) -> None:
        """Refresh the packed copies after slots were written."""
        if self.pack:
            self.a_packed = pack_weight(self.a.flatten(0, 1))
            self.b_packed = pack_weight(self.b.flatten(0, 1).T)

    def tensors(self) -> list[torch.Tensor]:
        """The stacked weights and their packed copies (for memory accounting)."""
        return [t for t in (self.a, self.b, self.a_packed, self.b_packed) if t is not None]

    def __call__(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        if batch.linears is not None and self.name not in batch.linears:
            return y
        if batch.kernel is not None:
            batch.kernel(y, x.contiguous(), self.a, self.b, batch.token_slots, batch.start, batch.rank * self.pieces)
        elif batch.stacked:
            add_lora_stacked(y, x, self.a, self.b, batch, self.a_packed, self.b_packed)
        else:
            add_lora(y, x, self.a, self.b, self.pieces, batch)
        return y


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """torch's grouped_mm exists on this device and dtype, and agrees with plain matmuls (older GPUs and
    some dtypes lack it)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 8, generator=g).to(device_type, dtype)
        w = torch.randn(3, 8, 4, generator=g).to(device_type, dtype)
        offs = torch.tensor([2, 2, 5], dtype=torch.int32, device=device_type)
        out = F.grouped_mm(x, w, offs=offs)
        ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
        return bool(torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
