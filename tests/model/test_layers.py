"""The linear layer's weight methods (model/formats) give what the plain matmuls give: packed exactly
as the plain bfloat16 matmul, GGUF blocks exactly as the block kernel on its own for short steps and
exactly as the method it wraps for longer ones."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
import torch.nn.functional as F

from radixserve import kernels
from radixserve.kernels.matmul import can_pack
from radixserve.model.formats import DENSE, GGUFBlocks, Packed, calibrate
from radixserve.model.formats.gguf_blocks import CALIBRATION_STEPS
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


def gguf_blocks(out_features: int, in_features: int, seed: int, kind: Q = Q.Q4_1) -> torch.Tensor:
    """Random weights in a GGUF block format: the file's bytes, one row per output."""
    w = np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    return torch.from_numpy(np.ascontiguousarray(quantize(w, kind)))


@pytest.mark.parametrize("bias", [False, True])
def test_gguf_blocks_short_steps_take_the_kernel_longer_ones_the_base(bias):
    matmul = kernels.gguf_matmul()
    if matmul is None:
        pytest.skip("no C++ toolchain to build the GGUF kernel")
    layer = random_linear(2, torch.float32, in_features=128, bias=bias)
    blocks = gguf_blocks(96, 128, 3)
    layer.method = GGUFBlocks([(blocks, int(Q.Q4_1))], 4, base=layer.method)
    assert layer.method.base is DENSE and [id(t) for t in layer.copies()] == [id(blocks)]
    g = torch.Generator().manual_seed(4)
    for rows in (1, 4):
        x = torch.randn(rows, 128, generator=g)
        with torch.no_grad():
            y = layer(x)
        expected = matmul(x, blocks, int(Q.Q4_1), 0)
        assert torch.equal(y, expected if not bias else expected + layer.bias)
    x = torch.randn(5, 128, generator=g)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # past max_tokens: the base


class _SlowBase:
    """A base method that computes for 2 ms a call (far slower than the kernel on a 96 x 128 weight; busy,
    not asleep, as a real matmul is): counts its calls."""
    calls = 0

    def apply(self, x, weight, bias):
        type(self).calls += 1
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
        return torch.zeros(x.shape[0], weight.shape[0])


class _InstantBase:
    """A base method that takes no time: the kernel (on a weight of 2 M) never beats it."""

    def apply(self, x, weight, bias):
        return x[:, :1]


def test_calibration_follows_what_it_measures_and_remembers_it(tmp_path):
    if kernels.gguf_matmul() is None:
        pytest.skip("no C++ toolchain to build the GGUF kernel")
    weight = torch.zeros(96, 128)
    cache = str(tmp_path / "steps.json")

    def methods():
        return [GGUFBlocks([(gguf_blocks(96, 128, 1), int(Q.Q4_1))], 0, base=_SlowBase()),
                GGUFBlocks([(gguf_blocks(96, 128, 2), int(Q.Q4_1))], 0, base=_SlowBase()),
                GGUFBlocks([(gguf_blocks(2048, 1024, 3), int(Q.Q4_1))], 9, base=_InstantBase())]

    slow, twin, instant = methods()
    big = torch.zeros(2048, 1024)
    found = calibrate([(slow, weight), (twin, weight), (instant, big)], cache)
    assert (slow.max_tokens, twin.max_tokens, instant.max_tokens) == (max(CALIBRATION_STEPS), max(CALIBRATION_STEPS), 0)
    assert sorted(found.values()) == [0, max(CALIBRATION_STEPS)]
    # Every step size: a warm-up round and three timed ones, each a pass over both slow-based methods.
    assert _SlowBase.calls == len(CALIBRATION_STEPS) * 4 * 2
    # A second start (a restarted engine) reads the measurements: nothing is timed, the same paths result.
    again = methods()
    assert calibrate([(again[0], weight), (again[1], weight), (again[2], big)], cache) == found
    assert [m.max_tokens for m in again] == [m.max_tokens for m in (slow, twin, instant)]
    assert _SlowBase.calls == len(CALIBRATION_STEPS) * 4 * 2


def test_model_methods_set_at_load(tiny_model_dir):
    """pack_weights gives every linear and the head a packed method (where oneDNN packs), a block method
    wraps what a linear had, and weight_copies counts what the methods made."""
    from radixserve.config import ServerArgs
    from radixserve.model.runner import ModelRunner

    if kernels.gguf_matmul() is None:
        pytest.skip("no C++ toolchain to build the GGUF kernel")
    runner = ModelRunner(ServerArgs(model_path=tiny_model_dir("llama"), dtype="float32", device="cpu",
                                    max_total_tokens=32, max_running_requests=2))
    model = runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.method is DENSE for m in linears) and model.weight_copies() == []
    lin = model.layers[0].o_proj
    lin.method = GGUFBlocks([(gguf_blocks(*lin.weight.shape, 5), int(Q.Q4_1))], 2, base=lin.method)
    assert [id(t) for t in model.weight_copies()] == [id(lin.method.segments[0][0])]
