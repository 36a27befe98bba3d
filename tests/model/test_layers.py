"""The linear layer's fast paths give what the plain bfloat16 matmul gives."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.model.layers import Linear
from radixserve.kernels.matmul import can_pack


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN on this CPU build")
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_weight_same_as_plain(rows):
    g = torch.Generator().manual_seed(rows)
    layer = Linear(96, (64, 32), bias=True).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    plain = layer(x)
    layer.pack_weight()
    assert layer.packed is not None
    assert torch.equal(layer(x), plain)
    assert torch.equal(plain, F.linear(x, layer.weight, layer.bias))
