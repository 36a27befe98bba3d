"""A GGUF checkpoint's own 4-bit values (Q4_0/Q4_1 blocks), multiplied by torch's int4 CPU kernel."""
from __future__ import annotations

import torch

from radixserve.model.formats.dense import DENSE


class Int4:
    """Used by steps of at most max_tokens tokens; the larger steps go to the method it wraps (dense or
    packed), on the layer's full-precision weight."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_tokens: int,
                 dtype: torch.dtype, base=DENSE):
        """q [out, in] in 0..15, scale/zero [out, in / 32]: weight = (q - 8) * scale + zero per block of 32.
        A decode step reads a quarter of the bfloat16 weight's bytes, and memory bandwidth is what bounds
        a step of a few tokens on a CPU; larger steps are bound by compute, where bfloat16 GEMMs win."""
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(dtype)
        self.max_tokens = max_tokens
        self.base = base

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > self.max_tokens:
            return self.base.apply(x, weight, bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, 32, self.scales)
        return y if bias is None else y + bias

    def copies(self) -> list[torch.Tensor]:
        return [self.weight, self.scales, *self.base.copies()]
