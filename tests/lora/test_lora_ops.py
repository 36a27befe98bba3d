"""The batched LoRA kernels against a per-token reference: segments per buffer slot (empty ones too),
base tokens untouched, rank slicing, the grouped_mm path, its per-adapter fallback loop, and the
stacked path (masked matmuls over every slot), plain and through oneDNN-packed copies."""
from __future__ import annotations

import pytest
import torch

import radixserve.lora.ops as ops
from radixserve.kernels.matmul import can_pack
from radixserve.lora.buffers import LoRABuffers
from radixserve.lora.ops import LoRABatch, LoRAHook, add_lora
from radixserve.model.formats import Packed
from radixserve.model.layers import Linear

SLOTS, MAX_RANK, PIECES, IN, OUT = 5, 8, 3, 32, 48


def buffers(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, MAX_RANK * PIECES, IN, generator=g).to(dtype)
    b = torch.randn(SLOTS, MAX_RANK * PIECES, OUT, generator=g).to(dtype)
    return a, b


def reference(y, x, a, b, token_slots, rank):
    """Token by token: y[t] += (x[t] @ A_s[:k]ᵀ) @ B_s[:k] for the slot s of token t (none: the base)."""
    k = rank * PIECES
    out = y.clone().double()
    for t, s in enumerate(token_slots):
        if s is not None:
            out[t] += (x[t].double() @ a[s, :k].double().T) @ b[s, :k].double()
    return out


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("counts", [
    [3, 2, 0, 4, 0, 1],  # base + slots 0, 2, 4; slots 1, 3 empty
    [0, 0, 0, 0, 0, 7],  # only the last slot
    [5, 1, 1, 1, 1, 1],  # decode-like: one token each
    [2, 40, 0, 0, 0, 0],  # a prefill chunk of one adapter
])
def test_matches_per_token_reference(monkeypatch, grouped, counts):
    if not grouped:
        monkeypatch.setattr(ops, "_grouped_mm_works", lambda *_: False)
    a, b = buffers()
    total = sum(counts)
    x = torch.randn(total, IN, generator=torch.Generator().manual_seed(1))
    y = torch.randn(total, OUT, generator=torch.Generator().manual_seed(2))
    token_slots = [None] * counts[0] + [s for s in range(SLOTS) for _ in range(counts[s + 1])]
    for rank in (3, MAX_RANK):
        ref = reference(y, x, a, b, token_slots, rank)
        out = y.clone()
        add_lora(out, x, a, b, PIECES, LoRABatch.build(counts, rank, torch.device("cpu")))
        assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-4)
        assert torch.equal(out[:counts[0]], y[:counts[0]])  # base tokens untouched


def test_no_adapter_tokens_means_no_lora_batch():
    assert LoRABatch.build([7, 0, 0, 0, 0, 0], 8, torch.device("cpu")) is None


def test_segments_and_offsets():
    batch = LoRABatch.build([3, 2, 0, 4, 0, 1], 4, torch.device("cpu"))
    assert batch.start == 3 and batch.rank == 4
    assert batch.offsets.tolist() == [2, 2, 6, 6, 7] and batch.offsets.dtype == torch.int32
    assert batch.segments == [(0, 0, 2), (2, 2, 6), (4, 6, 7)]


def test_bfloat16_close():
    a, b = buffers(torch.bfloat16)
    counts = [1, 2, 0, 3, 0, 0]
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = torch.zeros(6, OUT, dtype=torch.bfloat16)
    add_lora(y, x, a, b, PIECES, LoRABatch.build(counts, MAX_RANK, torch.device("cpu")))
    ref = reference(torch.zeros(6, OUT), x.float(), a.float(), b.float(), [None, 0, 0, 2, 2, 2], MAX_RANK)
    assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()


def lora_linear(bias: bool, dtype=torch.float32, packed: bool = False) -> Linear:
    """A fused 3-piece Linear with random base weights and a hook over random stacked adapter buffers,
    attached the way LoRABuffers attaches them."""
    g = torch.Generator().manual_seed(4)
    lin = Linear(IN, (16, 16, 16), bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(OUT, generator=g))
    if packed:
        lin.method = Packed(lin.weight)
    lin.lora = LoRAHook("qkv_proj", *buffers(dtype), PIECES, pack=packed)
    return lin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("counts", [[3, 2, 0, 4, 0, 1], [0, 1, 1, 1, 1, 1], [5, 0, 2, 3, 0, 0], [2, 6, 0, 0, 0, 0]])
def test_stacked_and_grouped_paths_match_reference(bias, counts):
    lin = lora_linear(bias)
    x = torch.randn(sum(counts), IN, generator=torch.Generator().manual_seed(5))
    token_slots = [None] * counts[0] + [s for s in range(SLOTS) for _ in range(counts[s + 1])]
    with torch.no_grad():
        base = torch.nn.functional.linear(x, lin.weight, lin.bias)
        ref = reference(base, x, lin.lora.a, lin.lora.b, token_slots, MAX_RANK)
        batch = LoRABatch.build(counts, MAX_RANK, torch.device("cpu"))
        assert batch.stacked
        stacked = lin(x, batch)
        batch.stacked = False
        grouped = lin(x, batch)
        plain = lin(x)
    assert torch.allclose(stacked.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(grouped.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(plain, base)


def test_hook_runs_only_in_steps_whose_adapters_target_its_linear():
    lin = lora_linear(True)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        base = torch.nn.functional.linear(x, lin.weight, lin.bias)
        other = LoRABatch.build([1, 3, 0, 0, 0, 0], MAX_RANK, torch.device("cpu"), frozenset({"o_proj"}))
        assert torch.equal(lin(x, other), base)
        own = LoRABatch.build([1, 3, 0, 0, 0, 0], MAX_RANK, torch.device("cpu"), frozenset({"qkv_proj"}))
        assert not torch.equal(lin(x, own), base)
        lin.lora = None  # a linear without a hook ignores the step's adapters
        assert torch.equal(lin(x, own), base)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN does not pack bfloat16 on this CPU")
def test_packed_stacked_path_follows_slot_writes():
    """The packed copies give the plain path's result, and follow a slot rewritten after packing."""
    lin, plain = lora_linear(True, torch.bfloat16, packed=True), lora_linear(True, torch.bfloat16)
    assert lin.lora.a_packed is not None and plain.lora.a_packed is None
    counts = [2, 1, 0, 3, 0, 1]
    x = torch.randn(sum(counts), IN, generator=torch.Generator().manual_seed(6)).bfloat16()
    for rewrite in (False, True):
        if rewrite:
            for m in (lin, plain):
                m.lora.b[2].mul_(-3)
                m.lora.repack()
        batch = LoRABatch.build(counts, MAX_RANK, torch.device("cpu"))
        with torch.no_grad():
            assert torch.allclose(lin(x, batch).float(), plain(x, batch).float(), rtol=1e-2, atol=0.05)
            ref = reference(torch.nn.functional.linear(x, lin.weight, lin.bias).float(), x.float(),
                            lin.lora.a.float(), lin.lora.b.float(), [None] * 2 + [0, 2, 2, 2, 4], MAX_RANK)
            assert (lin(x, batch).double() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_path_choice():
    cpu = torch.device("cpu")
    assert LoRABatch.build([4, 3, 3, 3, 3, 0], 8, cpu).stacked  # decode over several adapters
    assert not LoRABatch.build([0, 256, 0, 0, 0, 0], 8, cpu).stacked  # one adapter's prefill: 5x the work
    assert not LoRABatch.build([16, 256, 16, 0, 0, 0], 8, cpu).stacked  # prefill-sized over two slots
    only = LoRABatch.build([2, 0, 0, 1, 0, 1], 8, cpu)
    assert only.token_slots.tolist() == [2, 4]
    assert only.mask(2, torch.float32).tolist() == [[0] * 4 + [1, 1] + [0] * 4, [0] * 8 + [1, 1]]


def test_buffer_slots_lowest_free_then_lru_unpinned_first():
    from torch import nn

    from radixserve.lora.adapter import LinearLayout, LoRAAdapter

    layer = nn.Module()
    layer.o_proj = Linear(8, 8)
    model = nn.Module()
    model.layers = nn.ModuleList([layer])
    bufs = LoRABuffers(model, {"o_proj": LinearLayout(8, 8, (("o_proj", 0, 8),))}, num_slots=3, max_rank=4,
                       dtype=torch.float32, device=torch.device("cpu"))

    def adapter(lid: int, rank: int = 2) -> LoRAAdapter:
        w = (torch.full((rank, 8), float(lid)), torch.full((rank, 8), float(-lid)))
        return LoRAAdapter(f"/a{lid}", rank, 1.0, ("o_proj",), {(0, "o_proj"): w})

    a, b = layer.o_proj.lora.a, layer.o_proj.lora.b
    assert bufs.assign({1: adapter(1), 2: adapter(2)}, set()) == {1: 0, 2: 1}
    assert torch.equal(a[1, :2], torch.full((2, 8), 2.0)) and not a[1, 2:].any()  # rows past its rank: zero
    bufs.release(1)
    assert bufs.assign({3: adapter(3)}, set()) == {3: 0}  # the lowest free slot, not a fresh one
    assert bufs.assign({4: adapter(4, rank=4)}, set()) == {4: 2}
    # Full: a new adapter takes the least recently used slot outside the step, pinned ones last.
    assert bufs.assign({2: adapter(2)}, set()) == {2: 1}  # 2 used again: 3 is now the oldest
    assert bufs.assign({5: adapter(5)}, pinned={3}) == {5: 2}  # 3 is pinned: 4 goes instead
    assert bufs.slot_of == {3: 0, 2: 1, 5: 2}
    assert torch.equal(b[2, :2], torch.full((2, 8), -5.0)) and not b[2, 2:].any()  # 4's rank-4 rows cleared
    with pytest.raises(RuntimeError, match="scheduler bug"):
        bufs.assign({i: adapter(i) for i in range(6, 10)}, set())


@pytest.mark.parametrize("counts", [[2, 1, 0, 3, 0, 2], [1, 6, 0, 1, 0, 9]])  # runs of 1-3; split at 4
@pytest.mark.parametrize("dtype, in_f, out_f", [(torch.float32, 32, 48), (torch.bfloat16, 64, 128),
                                                (torch.bfloat16, 64, 96), (torch.bfloat16, 40, 48)])
def test_lora_kernel_matches_reference(dtype, in_f, out_f, counts):
    """The C++ per-token kernel (radixserve/kernels/lora.cpp): its AVX512-BF16 paths (input size a multiple
    of 32, output of 64, or of neither) and its generic one; tokens of one adapter taken together in
    runs of up to 4; base tokens untouched, rows past the step's rank unread."""
    from radixserve import kernels

    kernel = kernels.lora_add()
    if kernel is None:
        pytest.skip("no C++ toolchain to build the CPU kernels")
    g = torch.Generator().manual_seed(7)
    a = torch.randn(SLOTS, MAX_RANK * PIECES, in_f, generator=g).to(dtype)
    b = torch.randn(SLOTS, MAX_RANK * PIECES, out_f, generator=g).to(dtype)
    x = torch.randn(sum(counts), in_f, generator=g).to(dtype)
    y = torch.randn(sum(counts), out_f, generator=g).to(dtype)
    batch = LoRABatch.build(counts, 3, torch.device("cpu"))
    a[:, 3 * PIECES:] = float("nan")  # past the step's rank: never read
    out = y.clone()
    kernel(out, x, a, b, batch.token_slots, batch.start, 3 * PIECES)
    token_slots = [None] * counts[0] + [s for s in range(SLOTS) for _ in range(counts[s + 1])]
    ref = reference(y.float(), x.float(), a.float(), b.float(), token_slots, 3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(out[:counts[0]], y[:counts[0]])
