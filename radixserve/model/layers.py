"""Building blocks of the decoder: RMSNorm, rotary position embedding, LoRA-aware (fused) linear."""
from __future__ import annotations

import math

import torch
from torch import nn

from radixserve.lora.ops import LoRABatch, add_lora, add_lora_stacked
from radixserve.kernels.matmul import linear, pack_weight


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
    """A linear layer, possibly several fused along the output (q|k|v, gate|up), whose output gets the
    LoRA deltas of the step's adapters once stacked adapter buffers are attached (radixserve/lora)."""

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], bias: bool = False):
        self.splits = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        super().__init__(in_features, sum(self.splits), bias=bias)
        # Attached by lora.buffers.LoRABuffers (see lora/ops.py): every slot's stacked adapter weights,
        # lora_a [slots, R * pieces, in] and lora_b [slots, R * pieces, out], and, when the base weight
        # is packed, packed copies of both (as linear weights [slots * R * pieces, in] and [out, ...]).
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.lora_a_packed: torch.Tensor | None = None
        self.lora_b_packed: torch.Tensor | None = None
        self.lora_pieces = 0
        self.lora_name = ""  # qkv_proj, o_proj, ...: skipped in steps whose adapters do not target it
        self.lora_pack = False
        # The checkpoint's own 4-bit values (set_int4), used by steps of at most int4_max_tokens tokens.
        self.int4_weight: torch.Tensor | None = None
        self.int4_scales: torch.Tensor | None = None
        self.int4_max_tokens = 0
        self.packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout (pack_weight)

    def set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_tokens: int) -> None:
        """q [out, in] in 0..15, scale/zero [out, in / 32]: weight = (q - 8) * scale + zero per block of 32.
        A decode step reads a quarter of the bfloat16 weight's bytes, and memory bandwidth is what bounds
        a step of a few tokens on a CPU; larger steps are bound by compute, where bfloat16 GEMMs win."""
        self.int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.int4_scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(self.weight.dtype)
        self.int4_max_tokens = max_tokens

    def pack_weight(self) -> None:
        self.packed = pack_weight(self.weight)

    def copies(self) -> list[torch.Tensor]:
        """The weight's copies made for speed (packed layout, int4), and the adapter buffers' packed ones."""
        return [t for t in (self.packed, self.int4_weight, self.int4_scales, self.lora_a_packed,
                            self.lora_b_packed) if t is not None]

    def attach_lora(self, a: torch.Tensor, b: torch.Tensor, pieces: int, name: str, pack: bool = True) -> None:
        """pack: keep packed copies for the stacked path's matmuls (where the base weight is packed too);
        not needed where the LoRA kernel (radixserve/kernels) takes every adapter step."""
        self.lora_a, self.lora_b, self.lora_pieces, self.lora_name = a, b, pieces, name
        self.lora_pack = pack
        self.repack_lora()

    def repack_lora(self) -> None:
        """Refresh the packed copies of the adapter buffers after their slots were written."""
        if self.packed is not None and self.lora_pack:
            self.lora_a_packed = pack_weight(self.lora_a.flatten(0, 1))
            self.lora_b_packed = pack_weight(self.lora_b.flatten(0, 1).T)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if x.shape[0] <= self.int4_max_tokens:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4_weight, 32, self.int4_scales)
            y = y if self.bias is None else y + self.bias
        else:
            y = linear(x, self.weight, self.bias, self.packed)
        if lora is None or self.lora_a is None or (lora.linears is not None and self.lora_name not in lora.linears):
            return y
        if lora.kernel is not None:
            lora.kernel(y, x.contiguous(), self.lora_a, self.lora_b, lora.token_slots, lora.start,
                        lora.rank * self.lora_pieces)
        elif lora.stacked:
            add_lora_stacked(y, x, self.lora_a, self.lora_b, lora, self.lora_a_packed, self.lora_b_packed)
        else:
            add_lora(y, x, self.lora_a, self.lora_b, self.lora_pieces, lora)
        return y
