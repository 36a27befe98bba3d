"""The weight in oneDNN's blocked layout (kernels.matmul.pack_weight): CPUs with bfloat16 support."""
from __future__ import annotations

import torch

from radixserve.kernels.matmul import linear, pack_weight


class Packed:
    """Reorders the weight once; its matmuls then skip oneDNN's per-call reorder (same results)."""

    def __init__(self, weight: torch.Tensor):
        self.packed = pack_weight(weight)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, weight, bias, self.packed)

    def copies(self) -> list[torch.Tensor]:
        return [self.packed]
