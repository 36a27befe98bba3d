"""The paged-KV decoder against transformers on the same (tiny, random) weights.

Every comparison runs the same token sequence through transformers' `AutoModelForCausalLM` (no KV cache
tricks, one full forward) and through `ModelRunner.forward` with the KV read back from the paged pool
through `req_to_token`. The pool is pre-filled with noise so that a read of a wrong slot changes the
logits instead of silently hitting zeros.

Tolerance (float32): max |ours - transformers| <= 1e-4 * max |transformers logit| (FP32_RTOL below).
Both sides compute in float32 with different op orders (fused qkv, SDPA over gathered KV), which
leaves differences around 1e-6 of the logit scale; any indexing / masking / rotary / weight-mapping
error moves logits by a sizeable fraction of that scale.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from radixserve.config import ServerArgs
from radixserve.engine.batch import build_batch
from radixserve.engine.request import Request
from radixserve.model.attention import AttentionMetadata, AttnGroup
from radixserve.model.runner import ModelInput, ModelRunner
from radixserve.sampling.params import SamplingParams

FAMILIES = ["llama", "qwen2", "qwen3"]  # tied embeddings / QKV bias / q-k norm
FP32_RTOL = 1e-4  # of the logit scale, see the module docstring
POOL_TOKENS = 96
SEQ_LEN = 20


def make_runner(path: str, dtype: str = "float32") -> ModelRunner:
    runner = ModelRunner(ServerArgs(model_path=path, dtype=dtype, device="cpu",
                                    max_total_tokens=POOL_TOKENS, max_running_requests=4))
    # Noise in every slot but the reserved slot 0: stale or wrong reads must show up in the logits.
    g = torch.Generator().manual_seed(123)
    for cache in (runner.kv.k, runner.kv.v):
        cache[:, :, 1:] = torch.randn(cache[:, :, 1:].shape, generator=g).to(cache.dtype) * 5
    return runner


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, rtol: float = FP32_RTOL) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == torch.float32
    scale = ref.abs().max().item()
    assert scale > 1.0  # the random weights give logits of a meaningful size (guards the tolerance)
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol:g} * logit scale {scale:.3g}"


def random_ids(n: int, seed: int, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def shuffled_slots(seed: int) -> list[int]:
    """All usable pool slots (1..POOL_TOKENS) in a random order: sequences get scattered, descending runs."""
    perm = torch.randperm(POOL_TOKENS, generator=torch.Generator().manual_seed(seed)) + 1
    return perm.tolist()


_HF_CACHE: dict[str, object] = {}


def hf_model(path: str):
    if path not in _HF_CACHE:
        from transformers import AutoModelForCausalLM

        _HF_CACHE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_CACHE[path]


@torch.no_grad()
def hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits for every position of ids ([T] → [T, vocab])."""
    return hf_model(path)(ids[None]).logits[0].float()


def chunk_input(runner: ModelRunner, row: int, start: int, ids: torch.Tensor, slots: list[int],
                logit_index: torch.Tensor | None = None) -> ModelInput:
    """One sequence's chunk ids = tokens[start:start+len(ids)], with tokens[:start] already in the pool."""
    n = len(ids)
    slots_t = torch.tensor(slots, dtype=torch.int64)
    runner.kv.req_to_token[row, start:start + n] = slots_t
    group = AttnGroup.build(torch.tensor([0]), torch.tensor([n]), torch.tensor([start]),
                            runner.kv.req_to_token, torch.tensor([row]))
    return ModelInput(
        input_ids=ids.to(torch.int64),
        positions=torch.arange(start, start + n),
        meta=AttentionMetadata(out_cache_loc=slots_t, groups=[group]),
        logit_index=torch.arange(n) if logit_index is None else logit_index,
    )


@pytest.fixture(params=FAMILIES)
def family_dir(request, tiny_model_dir) -> str:
    return tiny_model_dir(request.param)


def test_prefill_all_positions_match_transformers(family_dir):
    runner = make_runner(family_dir)
    ids = random_ids(SEQ_LEN, seed=1)
    slots = shuffled_slots(seed=2)[:SEQ_LEN]
    ours = runner.forward(chunk_input(runner, 1, 0, ids, slots))
    ref = hf_logits(family_dir, ids)
    assert_close_logits(ours, ref)
    # Only some positions asked for: the rows come back in logit_index order.
    pick = torch.tensor([7, 0, SEQ_LEN - 1])
    ours_pick = runner.forward(chunk_input(runner, 1, 0, ids, slots, logit_index=pick))
    assert_close_logits(ours_pick, ref[pick])


@pytest.fixture(params=["kernel", "matmuls"])
def decode_path(request):
    """Decode groups through the C++ kernel (radixserve/kernels) or the batched matmuls over gathered KV."""
    return request.param


def runner_on(path: str, decode_path: str) -> ModelRunner:
    runner = make_runner(path)
    if decode_path == "matmuls":
        runner.decode_kernel = None
    elif runner.decode_kernel is None:
        pytest.skip("no C++ toolchain to build the decode kernel")
    return runner


def test_decode_steps_through_shuffled_slots(family_dir, decode_path):
    runner = runner_on(family_dir, decode_path)
    ids = random_ids(SEQ_LEN, seed=3)
    ref = hf_logits(family_dir, ids)
    slots = shuffled_slots(seed=4)[:SEQ_LEN]
    assert slots != sorted(slots)
    row, k = 3, 5
    # Prefill the first k tokens, then one token per step, each into its own scattered slot.
    ours = [runner.forward(chunk_input(runner, row, 0, ids[:k], slots[:k],
                                       logit_index=torch.tensor([k - 1])))]
    for pos in range(k, SEQ_LEN):
        ours.append(runner.forward(chunk_input(runner, row, pos, ids[pos:pos + 1], [slots[pos]])))
    assert_close_logits(torch.cat(ours), ref[k - 1:])


def test_decode_reads_the_slot_table_not_positions(family_dir, decode_path):
    """A decode whose slot table points at another sequence's KV must see that sequence (guards the
    test above against an implementation that happens to ignore req_to_token)."""
    runner = runner_on(family_dir, decode_path)
    a, b = random_ids(SEQ_LEN, seed=5), random_ids(SEQ_LEN, seed=6)
    b[-1] = a[-1]
    slots = shuffled_slots(seed=7)
    slots_a, slots_b = slots[:SEQ_LEN - 1], slots[SEQ_LEN:2 * SEQ_LEN - 1]
    runner.forward(chunk_input(runner, 0, 0, a[:-1], slots_a))
    runner.forward(chunk_input(runner, 1, 0, b[:-1], slots_b))
    # Row 2 borrows b's prefix slots and then decodes a's last token (== b's last token).
    runner.kv.req_to_token[2, :SEQ_LEN - 1] = torch.tensor(slots_b)
    ours = runner.forward(chunk_input(runner, 2, SEQ_LEN - 1, b[-1:], [slots[-1]]))
    assert_close_logits(ours, hf_logits(family_dir, b)[-1:])
    assert (ours - hf_logits(family_dir, a)[-1:]).abs().max() > 1e-2


def test_mixed_step_decodes_and_prefill_chunk(family_dir, decode_path):
    """Two decodes and one prefill chunk with a cached prefix in one step, laid out by build_batch."""
    runner = runner_on(family_dir, decode_path)
    kv = runner.kv
    seq_a, seq_b, seq_c = random_ids(14, seed=8), random_ids(9, seed=9), random_ids(SEQ_LEN, seed=10)
    ref_a, ref_b, ref_c = (hf_logits(family_dir, s) for s in (seq_a, seq_b, seq_c))
    free = iter(shuffled_slots(seed=11))

    def take(n: int) -> torch.Tensor:
        return torch.tensor([next(free) for _ in range(n)], dtype=torch.int64)

    def request(rid: str, prompt: torch.Tensor) -> Request:
        req = Request(rid=rid, prompt_ids=prompt.tolist(), params=SamplingParams(), seed=0)
        req.row = kv.alloc_row()
        return req

    a, b, c = request("a", seq_a[:12]), request("b", seq_b[:8]), request("c", seq_c)
    assert len({a.row, b.row, c.row}) == 3

    # Step 1: three prefills of different lengths (one padded group); c's chunk leaves it unfinished.
    step1 = build_batch([(a, 12), (b, 8), (c, 7)], take(27), kv.req_to_token, runner.device)
    assert step1.sampled == [a, b]
    out1 = runner.forward(step1.model_input)
    assert_close_logits(out1, torch.stack([ref_a[11], ref_b[7]]))
    a.num_computed, b.num_computed, c.num_computed = 12, 8, 7
    a.output_ids.append(int(seq_a[12]))
    b.output_ids.append(int(seq_b[8]))

    # Step 2: decodes of a and b (their sampled token) + the rest of c's prompt over its cached prefix.
    step2 = build_batch([(a, 1), (b, 1), (c, 13)], take(15), kv.req_to_token, runner.device)
    assert step2.sampled == [a, b, c]
    assert len(step2.model_input.meta.groups) == 2
    out2 = runner.forward(step2.model_input)
    assert_close_logits(out2, torch.stack([ref_a[12], ref_b[8], ref_c[19]]))

    # Every position of the mixed step (re-running it rewrites the same KV into the same slots).
    inp = step2.model_input
    every = runner.forward(ModelInput(inp.input_ids, inp.positions, inp.meta, torch.arange(15)))
    assert_close_logits(every, torch.cat([ref_a[12:13], ref_b[8:9], ref_c[7:20]]))


def test_sharded_safetensors_load(tiny_model_dir, tmp_path):
    """A checkpoint split over several shards (q/k/v of one layer may sit in different files)."""
    src = tiny_model_dir("qwen2")
    hf_model(src).save_pretrained(tmp_path, max_shard_size="100KB")
    shards = glob.glob(os.path.join(tmp_path, "*.safetensors"))
    assert len(shards) >= 3
    assert os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))
    runner = make_runner(str(tmp_path))
    ids = random_ids(SEQ_LEN, seed=12)
    ours = runner.forward(chunk_input(runner, 0, 0, ids, shuffled_slots(seed=13)[:SEQ_LEN]))
    assert_close_logits(ours, hf_logits(src, ids))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_close_to_float32_reference(tiny_model_dir, arch):
    """Sanity bound only: bf16 weights/activations (8-bit mantissa) vs the float32 reference.
    Tolerances: max abs diff <= 8% of the logit scale, mean abs diff <= 1% of it, and the greedy token
    agrees on at least 75% of positions (measured: ~3%, ~0.3%, 90-100%)."""
    path = tiny_model_dir(arch)
    runner = make_runner(path, dtype="bfloat16")
    assert runner.kv.k.dtype == torch.bfloat16
    ids = random_ids(SEQ_LEN, seed=14)
    ours = runner.forward(chunk_input(runner, 0, 0, ids, shuffled_slots(seed=15)[:SEQ_LEN]))
    ref = hf_logits(path, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    scale = ref.abs().max().item()
    diff = (ours - ref).abs()
    assert diff.max().item() <= 0.08 * scale, (diff.max().item(), scale)
    assert diff.mean().item() <= 0.01 * scale, (diff.mean().item(), scale)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path, kind, layout):
    """Scaled rotary from config.json, in both layouts found in the wild: the legacy `rope_scaling` dict
    (checkpoints saved by transformers 4) and `rope_parameters` (what transformers >= 5 writes, with
    rope_theta inside it). Logits far enough into the sequence that the scaling changes them."""
    import json

    from tiny_models import build_tiny_model  # tests/ is on sys.path (rootdir conftest)

    from radixserve.model.loader import load_model_config

    scaling = ROPE_SCALINGS[kind]
    path = build_tiny_model(str(tmp_path / "m"), "llama", seed=3,
                            rope_parameters={"rope_theta": 10000.0, **scaling})
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    assert cfg["rope_parameters"]["rope_type"] == kind  # what transformers 5 wrote
    if layout == "rope_scaling":
        del cfg["rope_parameters"]
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = dict(scaling)
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)
    assert hf_model(path).config.rope_parameters["rope_type"] == kind  # the oracle applies the scaling

    read = load_model_config(path).rope_scaling
    assert read is not None and read.get("rope_type", read.get("type")) == kind
    assert read["factor"] == scaling["factor"]

    runner = make_runner(path)
    ids = random_ids(SEQ_LEN, seed=16)
    ours = runner.forward(chunk_input(runner, 0, 0, ids, shuffled_slots(seed=17)[:SEQ_LEN]))
    assert_close_logits(ours, hf_logits(path, ids))


def test_decodes_sharing_a_cached_prefix(family_dir):
    """Sequences whose slot tables start with the same slots (a shared prefix-cache hit, or n samples of
    one prompt) decode with those keys read once for the group: logits still match transformers, for
    sequences of different lengths past the prefix."""
    runner = make_runner(family_dir)
    kv = runner.kv
    free = iter(shuffled_slots(seed=21))
    prefix = random_ids(20, seed=22)
    tails = [random_ids(n, seed=23 + n) for n in (1, 3, 6)]
    seqs = [torch.cat([prefix, t]) for t in tails]
    prefix_slots = torch.tensor([next(free) for _ in range(len(prefix))])
    reqs = []
    for i, seq in enumerate(seqs):  # the prefix is computed once (the cache), then each tail but its last token
        req = Request(rid=str(i), prompt_ids=seq.tolist(), params=SamplingParams(), seed=0)
        req.row = kv.alloc_row()
        kv.req_to_token[req.row, :len(prefix)] = prefix_slots
        req.num_computed = len(prefix)
        reqs.append(req)
    runner.forward(chunk_input(runner, reqs[0].row, 0, prefix, prefix_slots.tolist()))
    for req, seq in zip(reqs, seqs):
        n = len(seq) - 1 - len(prefix)
        if n:
            step = build_batch([(req, n)], torch.tensor([next(free) for _ in range(n)]), kv.req_to_token,
                               runner.device)
            runner.forward(step.model_input)
            req.num_computed += n
    step = build_batch([(r, 1) for r in reqs], torch.tensor([next(free) for _ in reqs]), kv.req_to_token,
                       runner.device)
    (group,) = step.model_input.meta.groups
    assert group.shared_slots is not None and group.shared_slots.tolist() == prefix_slots.tolist()
    ours = runner.forward(step.model_input)
    assert_close_logits(ours, torch.stack([hf_logits(family_dir, s)[-1] for s in seqs]))
