"""The GGUF block kernel (kernels/gguf_matmul.cpp) against gguf's dequantise-then-matmul, on every
instruction-set path this CPU has: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K, block counts odd and even, 1 to
9 tokens.

The kernel quantises x per block of 32 to 8 bits (x ≈ dx * qx, |x - dx qx| ≤ dx / 2 per element), so
against the exact product its error is at most Σ_blocks dx / 2 · Σ_block |w| per output, plus float32
rounding; that bound is what the test holds it to. The paths compute the same integer sums, so they
agree with the portable one to float32 rounding (1e-5 of Σ|x||w|)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kernel_util import built_kernel
from radixserve import kernels
from radixserve.model.formats import kquants

ISA_NAMES = {1: "portable", 2: "AVX2", 3: "AVX-512 VNNI"}
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
K_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module")
def matmul():
    return built_kernel(kernels.gguf_matmul(), "GGUF")


# What each path needs, as /proc/cpuinfo names it.
ISA_FLAGS = {1: set(), 2: {"avx2", "fma", "f16c"}, 3: {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                       "avx512dq", "avx512_vnni"}}


def cpu_isas() -> list[int]:
    """The paths this CPU can run, from /proc/cpuinfo (independently of the kernel's own detection)."""
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    return [isa for isa, needed in ISA_FLAGS.items() if needed <= flags]


def isa_params():
    here = cpu_isas()
    return [pytest.param(isa, id=name, marks=pytest.mark.skipif(isa not in here, reason=f"this CPU lacks {name}"))
            for isa, name in ISA_NAMES.items()]


def blocks_of(w: np.ndarray, kind: Q) -> tuple[torch.Tensor, torch.Tensor]:
    """(the file's bytes [N, row bytes], the dequantised weight [N, K] float64)."""
    return as_blocks(kquants.quantize(w, kind), kind)


def as_blocks(data: np.ndarray, kind: Q) -> tuple[torch.Tensor, torch.Tensor]:
    dense = dequantize(data, kind).astype(np.float64).reshape(data.shape[0], -1)
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(dense)


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, N]: Σ_b (max|x_b| / 127) / 2 · Σ_{i in b} |w_i|, plus float32 rounding of the sums."""
    t, k = x.shape
    dx = x.double().abs().view(t, k // 32, 32).amax(-1) / 127
    wsum = w.abs().view(w.shape[0], k // 32, 32).sum(-1)
    return dx / 2 @ wsum.T + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6


def test_dispatch_follows_the_cpu(matmul):
    expected = max(cpu_isas())
    assert kernels.gguf_isa() == expected
    x, w = torch.randn(1, 32), torch.zeros(1, 18, dtype=torch.uint8)
    if expected < 3:
        with pytest.raises(RuntimeError, match="not available on this CPU"):
            matmul(x, w, int(Q.Q4_0), 3)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_matches_dequantised_matmul(matmul, isa, kind, large):
    # Odd and even counts of 32-blocks (3, 18), or of K-quant super-blocks (1, 3).
    k = (768 if large else 256) if kind in K_TYPES else (576 if large else 96)
    g = np.random.default_rng(k + int(kind))
    w = (g.standard_normal((37, k)) * 0.05).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale 0
    w[5, : k // 2] += 0.2  # positive blocks: a K-quant's minimum 0
    blocks, dense = blocks_of(w, kind)
    check(matmul, isa, kind, blocks, dense, g)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("kind", K_TYPES, ids=lambda k: k.name)
def test_k_quants_any_bytes(matmul, isa, kind):
    """Every bit of a K-quant super-block in use (negative Q6_K scales, 6-bit scales and minimums at
    their top): random bytes, float16 scales kept finite and small."""
    g = np.random.default_rng(int(kind))
    data = g.integers(0, 256, (24, 2 * kquants.BYTES[kind]), dtype=np.uint8)
    rows = data.reshape(24, 2, -1)
    small = (g.standard_normal((24, 2, 2)) * 1e-3).astype(np.float16).view(np.uint8).reshape(24, 2, 4)
    if kind == Q.Q6_K:
        rows[:, :, 208:210] = small[:, :, :2]  # d, at the end
    else:
        rows[:, :, 0:4] = small  # d and dmin, at the start
    blocks, dense = as_blocks(data, kind)
    check(matmul, isa, kind, blocks, dense, g)


def check(matmul, isa: int, kind: Q, blocks: torch.Tensor, dense: torch.Tensor, g: np.random.Generator) -> None:
    k = dense.shape[1]
    for tokens in (1, 3, 4, 5, 9):
        x = torch.from_numpy(g.standard_normal((tokens, k)).astype(np.float32))
        x[0, :32] = 0.0  # an all-zero block of x
        y = matmul(x, blocks, int(kind), isa)
        exact = x.double() @ dense.T
        assert y.dtype == torch.float32 and y.shape == (tokens, dense.shape[0])
        assert ((y.double() - exact).abs() <= error_bound(x, dense)).all()
        if isa != 1:  # the same integer sums, scaled and added in another order
            portable = matmul(x, blocks, int(kind), 1)
            assert ((y - portable).abs() <= 1e-5 * (x.abs() @ dense.abs().float().T) + 1e-6).all()


def test_bfloat16_in_and_out(matmul):
    g = np.random.default_rng(0)
    w = (g.standard_normal((16, 64)) * 0.05).astype(np.float32)
    blocks, _ = blocks_of(w, Q.Q8_0)
    x = torch.from_numpy(g.standard_normal((2, 64)).astype(np.float32)).bfloat16()
    y = matmul(x, blocks, int(Q.Q8_0), 0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, matmul(x.float(), blocks, int(Q.Q8_0), 0).bfloat16())


def test_refuses_what_it_cannot_multiply(matmul):
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="unsupported GGUF block type"):
        matmul(x, torch.zeros(4, 2 * 18, dtype=torch.uint8), int(Q.Q5_0), 0)
    with pytest.raises(RuntimeError, match="bytes"):
        matmul(x, torch.zeros(4, 18, dtype=torch.uint8), int(Q.Q4_0), 0)
    with pytest.raises(RuntimeError, match="multiples of 256"):
        matmul(x, torch.zeros(4, 144, dtype=torch.uint8), int(Q.Q4_K), 0)
