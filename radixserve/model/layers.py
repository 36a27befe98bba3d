"""Building blocks of the decoder: RMSNorm, rotary position embedding, (fused) linear."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from radixserve.model.formats import DENSE, WeightMethod


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as the reference implementations do), scale in the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate_half") rotary embedding with a precomputed cos/sin table indexed by position.

    The table is stored as full-width cos and sign-folded sin, [cos | cos] and [-sin | sin], so that
    rotating is x * cos + roll(x, D / 2) * sin: four ops where the halves and a concatenation take
    fourteen, with the same roundings (the product of a swapped half with a negated sin is the negated
    product). The model looks the step's positions up once and every layer applies them."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), _inv_freq(head_dim, theta, scaling))
        cos, sin = freqs.cos().float(), freqs.sin().float()
        self.register_buffer("cos", torch.cat([cos, cos], -1), persistent=False)
        self.register_buffer("sin", torch.cat([-sin, sin], -1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] of the positions, to broadcast over heads (apply_rotary)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by the step's table from RotaryEmbedding.forward."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Linear(nn.Linear):
    """A linear layer, possibly several fused along the output (q|k|v, gate|up: `splits`). It holds the
    weight and bias and leaves the matmul to its weight method (model/formats: dense by default, packed or
    int4 as set at load time). A LoRA hook (`lora`, attached by radixserve/lora) adds the deltas of a
    step's adapters to the output: called as lora(y, x, lora_batch) in steps with adapter tokens.

    A tensor-parallel linear is meant to compose with the methods rather than multiply them: it would
    shard the weight (by output columns or input rows), give its shard a method, and gather or reduce
    the outputs, with no class per (parallelism, format) pair."""

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], bias: bool = False):
        self.splits = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        super().__init__(in_features, sum(self.splits), bias=bias)
        self.method: WeightMethod = DENSE
        self.lora: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None

    def copies(self) -> list[torch.Tensor]:
        """The weight's copies made for speed by its method (packed layout, int4)."""
        return self.method.copies()

    def forward(self, x: torch.Tensor, lora_batch: Any = None) -> torch.Tensor:
        """lora_batch: where the step's adapter tokens are (lora.ops.LoRABatch); None when it has none."""
        y = self.method.apply(x, self.weight, self.bias)
        if self.lora is not None and lora_batch is not None:
            y = self.lora(y, x, lora_batch)
        return y
