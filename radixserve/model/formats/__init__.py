"""Weight methods: how a linear layer multiplies by its weight, chosen per layer at load time.

A method is a small object with one job, `apply(x, weight, bias) -> y` (x [T, in] @ weight.T + bias),
plus `copies()`, the tensors it made from the weight for speed (counted as memory beside the
parameters). The layer keeps owning its weight and bias (loading writes them; a later tensor-parallel
layer would shard them) and hands them to its method; a method holds only what it derived from them.

- dense.py: F.linear on the weight as it is (the default);
- packed.py: the weight reordered once into oneDNN's blocked layout (CPUs with bfloat16);
- gguf_blocks.py: a GGUF checkpoint's own Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K blocks, for steps of a few
  tokens; it wraps the method that takes the larger steps (kquants.py writes K-quant blocks, for tests
  and for --quantization of checkpoints without blocks).

A new format is one more file here and the load step that sets it (model/llama.py, model/runner.py).
"""
from __future__ import annotations

from typing import Protocol

import torch

from radixserve.model.formats.dense import DENSE, Dense
from radixserve.model.formats.gguf_blocks import (QUANTIZATION_TYPES, GGUFBlocks, Segment, calibrate, join_segments,
                                                  quantize_weight)
from radixserve.model.formats.packed import Packed

__all__ = ["DENSE", "QUANTIZATION_TYPES", "Dense", "GGUFBlocks", "Packed", "Segment", "WeightMethod", "calibrate",
           "join_segments", "quantize_weight"]


class WeightMethod(Protocol):
    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def copies(self) -> list[torch.Tensor]: ...
