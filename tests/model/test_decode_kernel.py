"""The C++ decode attention kernel (radixserve/kernels) against the batched-matmul path over gathered KV, on
random data: GQA ratios, head sizes with and without a compiled-in size, sequences of different lengths
through scattered slots, float32 and bfloat16. Model-level logits against transformers take both paths
in test_llama_logits.py."""
from __future__ import annotations


import pytest
import torch

from kernel_util import built_kernel
from radixserve import kernels
from radixserve.model.attention import _decode_attention


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(kernels.decode_attention(), "decode")


def reference(q, k_cache, v_cache, slots, lens, scale):
    """The torch path: gather each sequence's K/V rows, mask past its length, two batched matmuls."""
    kv_heads, _, d = k_cache.shape
    g, keys = slots.shape
    kg = k_cache[:, slots.reshape(-1)].view(kv_heads, g, keys, d).contiguous()
    vg = v_cache[:, slots.reshape(-1)].view(kv_heads, g, keys, d).contiguous()
    bias = torch.zeros(g, 1, 1, keys).masked_fill_(torch.arange(keys) >= lens[:, None, None, None], float("-inf"))
    return _decode_attention(q, kg, vg, bias, scale)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 128), (8, 2, 32), (6, 1, 48)])
def test_matches_gathered_matmuls(kernel, dtype, tol, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads * dim)
    pool, seqs, keys = 500, 5, 40
    k_cache = torch.randn(kv_heads, pool, dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, pool, dim, generator=g).to(dtype)
    q = torch.randn(seqs, heads, dim, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(pool, generator=g)[:keys] for _ in range(seqs)])
    lens = torch.tensor([1, 40, 17, 33, 2])
    scale = dim ** -0.5
    ours = kernel(q, k_cache, v_cache, slots, lens, scale)
    ref = reference(q, k_cache, v_cache, slots, lens, scale)
    assert ours.dtype == dtype and ours.shape == q.shape
    assert (ours.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    # Keys past a sequence's length are never read: changing them changes nothing.
    k_cache[:, slots[0, 1:]] = float("nan")
    v_cache[:, slots[0, 1:]] = float("nan")
    assert torch.equal(kernel(q, k_cache, v_cache, slots, lens, scale)[0], ours[0])
