"""The linear layer's weight methods (model/formats) give what the plain matmuls give: packed exactly
as the plain bfloat16 matmul, int4 exactly as torch's int4 kernel on its own for short steps and exactly
as the method it wraps for longer ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.kernels.matmul import can_pack
from radixserve.model.formats import DENSE, Int4, Packed
from radixserve.model.layers import Linear


def random_linear(seed: int, dtype: torch.dtype, in_features: int = 96, bias: bool = True) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(in_features, (64, 32), bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def test_dense_is_the_default():
    layer = random_linear(0, torch.float32)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    assert layer.method is DENSE and layer.copies() == []
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN packs bfloat16 weights only on CPUs with AVX512 (BW, VL, DQ) or AVX-NE-CONVERT")
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_weight_same_as_plain(rows):
    layer = random_linear(rows, torch.bfloat16)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    with torch.no_grad():
        plain = layer(x)
        layer.method = Packed(layer.weight)
        copies = layer.copies()  # an opaque oneDNN tensor: no data pointer to compare
        assert len(copies) == 1 and copies[0] is layer.method.packed
        assert torch.equal(layer(x), plain)
    assert torch.equal(plain, F.linear(x, layer.weight, layer.bias))


def q4_blocks(out_features: int, in_features: int, seed: int):
    """Random Q4_1-style values: q in 0..15, a scale and a zero per block of 32 inputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_features, in_features // 32, generator=g) * 0.1 + 0.01
    zero = torch.randn(out_features, in_features // 32, generator=g) * 0.1
    return q, scale, zero


@pytest.mark.parametrize("bias", [False, True])
def test_int4_short_steps_take_the_int4_kernel_longer_ones_the_base(bias):
    layer = random_linear(2, torch.float32, in_features=128, bias=bias)
    q, scale, zero = q4_blocks(96, 128, 3)
    with torch.no_grad():
        layer.method = Int4(q, scale, zero, 4, layer.weight.dtype, base=layer.method)
    assert layer.method.base is DENSE and len(layer.copies()) == 2
    packed_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    dequantised = ((q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1))
    g = torch.Generator().manual_seed(4)
    for rows in (1, 4):
        x = torch.randn(rows, 128, generator=g)
        with torch.no_grad():
            y = layer(x)
        expected = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed_q, 32, scales)
        assert torch.equal(y, expected if not bias else expected + layer.bias)
        ref = F.linear(x, dequantised, layer.bias)
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    x = torch.randn(5, 128, generator=g)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # past max_tokens: the base


def test_model_methods_set_at_load(tiny_model_dir):
    """pack_weights gives every linear and the head a packed method (where oneDNN packs), load_int4
    wraps what a linear had, and weight_copies counts what the methods made."""
    from radixserve.config import ServerArgs
    from radixserve.model.runner import ModelRunner

    runner = ModelRunner(ServerArgs(model_path=tiny_model_dir("llama"), dtype="float32", device="cpu",
                                    max_total_tokens=32, max_running_requests=2))
    model = runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.method is DENSE for m in linears) and model.weight_copies() == []
    lin = model.layers[0].o_proj
    q, scale, zero = q4_blocks(*lin.weight.shape, 5)
    lin.method = Int4(q, scale, zero, 2, lin.weight.dtype, base=lin.method)
    assert [t.data_ptr() for t in model.weight_copies()] == [lin.method.weight.data_ptr(),
                                                              lin.method.scales.data_ptr()]
