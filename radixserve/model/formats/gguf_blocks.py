"""A GGUF checkpoint's own blocks (Q4_0, Q4_1, Q8_0), multiplied as stored by kernels/gguf_matmul.cpp."""
from __future__ import annotations

import torch

from radixserve import kernels
from radixserve.model.formats.dense import DENSE


class GGUFBlocks:
    """Used by steps of at most max_tokens tokens; the larger steps go to the method it wraps (dense or
    packed), on the layer's full-precision weight."""

    def __init__(self, blocks: torch.Tensor, ggml_type: int, max_tokens: int, base=DENSE):
        """blocks uint8 [out, in / 32 * block bytes]: the file's rows. A decode step reads 4.5-8.5 bits per
        weight instead of 16 or 32, and memory bandwidth is what bounds a step of a few tokens on a CPU."""
        self.matmul = kernels.gguf_matmul()
        if self.matmul is None:
            raise RuntimeError("the GGUF block kernel is not built")
        self.blocks = blocks
        self.ggml_type = ggml_type
        self.max_tokens = max_tokens
        self.base = base

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > self.max_tokens:
            return self.base.apply(x, weight, bias)
        y = self.matmul(x, self.blocks, self.ggml_type, 0)
        return y if bias is None else y + bias

    def copies(self) -> list[torch.Tensor]:
        return [self.blocks, *self.base.copies()]
