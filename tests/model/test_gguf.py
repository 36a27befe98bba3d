"""GGUF checkpoints: the real default model against transformers' own GGUF loader, and tiny random Llama
files written here in each supported weight format against transformers on the dequantised weights.

Tolerances (float32 logits; both sides run on identical dequantised float32 weights, so the only
differences are float32 op order):
- tiny GGUF models: max |ours - transformers| <= 1e-4 * max |transformers logit| (measured ~1e-6);
- the real 30-layer SmolLM2-135M: the same 1e-4 * logit scale (measured ~2e-6 of a scale of ~31),
  and the greedy token agrees at every position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize

from radixserve.config import ServerArgs
from radixserve.model.attention import AttentionMetadata, AttnGroup
from radixserve.model.formats import GGUFBlocks, kquants
from radixserve.model.formats.gguf_blocks import CALIBRATION_STEPS
from radixserve.model.loader import load_model_config
from radixserve.model.runner import ModelInput, ModelRunner

TINY_RTOL = 1e-4  # of the logit scale
REAL_RTOL = 1e-4  # of the logit scale
# Steps that multiply GGUF blocks quantise activations to 8 bits per block of 32 (as llama.cpp does):
# measured 4.7e-2 of the logit scale on the real model (bfloat16 activations, the dense default on
# AVX512-BF16 CPUs: 3.4e-2), under 1e-2 on the tiny ones.
BLOCK_RTOL = 8e-2


def make_runner(path: str, tokens: int = 64) -> ModelRunner:
    """Steps of up to 4 tokens take the block kernel (fixed here; the server measures where it pays)."""
    return ModelRunner(ServerArgs(model_path=path, dtype="float32", device="cpu", max_total_tokens=tokens,
                                  max_running_requests=2, int4_decode_tokens=4))


@torch.no_grad()
def prefill_logits(runner: ModelRunner, ids: torch.Tensor) -> torch.Tensor:
    """All-position logits of ids run as one prefill on row 0, into slots in descending order."""
    n = len(ids)
    slots = torch.arange(n, 0, -1, dtype=torch.int64)
    runner.kv.req_to_token[0, :n] = slots
    group = AttnGroup.build(torch.tensor([0]), torch.tensor([n]), torch.tensor([0]),
                            runner.kv.req_to_token, torch.tensor([0]))
    meta = AttentionMetadata(out_cache_loc=slots, groups=[group])
    return runner.forward(ModelInput(ids, torch.arange(n), meta, torch.arange(n)))


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    assert scale > 1.0  # logits of a meaningful size (guards the relative tolerance)
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol:g} * logit scale {scale:.3g}"


# --- the real default model -------------------------------------------------------------------------

PROMPT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin "
          "is the capital of Germany. The sun rises in the east and sets in the")


@pytest.fixture(scope="module")
def real_runner(default_model):
    return make_runner(default_model)


@pytest.fixture(scope="module")
def real_hf(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(default_model),
                                                gguf_file=os.path.basename(default_model),
                                                dtype=torch.float32).eval()


def test_default_model_config(real_runner, real_hf):
    cfg, hf = real_runner.config, real_hf.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        hf.hidden_size // hf.num_attention_heads)
    assert (cfg.intermediate_size, cfg.vocab_size) == (hf.intermediate_size, hf.vocab_size)
    assert cfg.tie_word_embeddings  # SmolLM2 ships without output.weight
    assert cfg.eos_token_ids


def test_default_model_logits_match_transformers(real_runner, real_hf, tokenizer):
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"], dtype=torch.int64)
    assert 25 <= len(ids) <= 40
    ours = prefill_logits(real_runner, ids)
    with torch.no_grad():
        ref = real_hf(ids[None]).logits[0].float()
    assert_close_logits(ours, ref, REAL_RTOL)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    # A trained model, not noise (both sides use gguf-py's dequantisation, so check the result is sane):
    # the prompt's own next tokens cost < 4 nats each on average (uniform over the vocab: ln 49152 = 10.8;
    # measured ~2.5), and "Paris is the" is continued with " capital".
    nll = -torch.log_softmax(ours[:-1], -1).gather(1, ids[1:, None]).mean().item()
    assert nll < 4.0, nll
    at = len(tokenizer(PROMPT.split(" capital of France")[0])["input_ids"]) - 1
    assert tokenizer.decode(int(ours[at].argmax())) == " capital"


def block_methods(runner: ModelRunner) -> list:
    model = runner.model
    linears = [m for layer in model.layers for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
    return [m.method for m in linears] + [model.head_method]


def test_block_steps_match_transformers(default_model, real_hf, tokenizer):
    """Steps of at most --int4-decode-tokens tokens multiply the file's own Q4_1 (projections) and Q8_0
    (tied head) blocks with 8-bit activations: every projection and the head has them, and the whole
    prompt as one such step stays as close to transformers (float32, dequantised weights) as the
    bfloat16 dense path does: measured max error 4.7 % of the logit scale (bfloat16 dense: 3.4 %),
    greedy tokens 35 of 35 (bfloat16 dense: 34), mean prompt NLL 2.267 vs 2.283 nats."""
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"], dtype=torch.int64)
    runner = ModelRunner(ServerArgs(model_path=default_model, dtype="float32", device="cpu", max_total_tokens=64,
                                    max_running_requests=2, int4_decode_tokens=len(ids)))
    methods = block_methods(runner)
    assert all(isinstance(m, GGUFBlocks) for m in methods)
    assert set().union(*(m.ggml_types for m in methods)) == {int(Q.Q4_1), int(Q.Q8_0)}
    ours = prefill_logits(runner, ids)
    with torch.no_grad():
        ref = real_hf(ids[None]).logits[0].float()
    assert_close_logits(ours, ref, BLOCK_RTOL)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.94

    def nll(logits: torch.Tensor) -> float:
        return -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).mean().item()

    assert abs(nll(ours) - nll(ref)) < 0.05


def test_block_step_sizes_measured_at_start(default_model):
    """Without --int4-decode-tokens, each weight's block method serves the step sizes at which this CPU
    measured the kernel faster than the dense path, once per shape and format."""
    runner = ModelRunner(ServerArgs(model_path=default_model, dtype="float32", device="cpu", max_total_tokens=64,
                                    max_running_requests=2))
    methods = block_methods(runner)
    assert all(isinstance(m, GGUFBlocks) and m.max_tokens in {0, *CALIBRATION_STEPS} for m in methods)
    for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert len({getattr(layer, proj).method.max_tokens for layer in runner.model.layers}) == 1


def test_deterministic_inference_keeps_one_arithmetic(default_model):
    """--enable-deterministic-inference: every step multiplies the dequantised weights, whatever its size."""
    runner = ModelRunner(ServerArgs(model_path=default_model, dtype="float32", device="cpu", max_total_tokens=64,
                                    max_running_requests=2, enable_deterministic_inference=True))
    assert not any(isinstance(m, GGUFBlocks) for m in block_methods(runner))


# --- tiny GGUF files written here --------------------------------------------------------------------

Q = GGMLQuantizationType
EPS, THETA = 1e-5, 10000.0


@dataclass(frozen=True)
class Dims:
    hidden: int = 64
    inter: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    vocab: int = 256
    ctx: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = Dims()
WIDE = Dims(hidden=256, inter=512)  # every matrix row a multiple of 256 weights, as K-quants need
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB, CTX = (TINY.hidden, TINY.inter, TINY.heads, TINY.kv_heads,
                                                      TINY.layers, TINY.vocab, TINY.ctx)
HEAD_DIM = TINY.head_dim


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's converter stores Llama q/k rows (interleaved rotary pairs)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path: str, qtype: Q, tied: bool, seed: int = 0, with_rope_freqs: bool = False,
                    odd: tuple[str, Q] | None = None, dims: Dims = TINY,
                    types: dict[str, Q] | None = None) -> dict[str, np.ndarray]:
    """A random 2-layer Llama as GGUF with every matrix stored as qtype (norms in F32, as llama.cpp
    does). Returns the HF-named float32 state dict transformers should see: each matrix is what
    quantising then dequantising it gives (row-wise blocks, so it commutes with the q/k row permutation,
    which is applied to the GGUF copy only). odd=(name, type): that tensor is stored as zero bytes
    of another type instead. types: {part of a GGUF name: type} for the matrices stored otherwise (a
    mixed file, as llama.cpp's Q4_K_M)."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(dims.layers)
    writer.add_context_length(dims.ctx)
    writer.add_embedding_length(dims.hidden)
    writer.add_feed_forward_length(dims.inter)
    writer.add_head_count(dims.heads)
    writer.add_head_count_kv(dims.kv_heads)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(THETA)
    writer.add_vocab_size(dims.vocab)
    writer.add_eos_token_id(2)
    writer.add_bos_token_id(1)
    hf: dict[str, np.ndarray] = {}

    def matrix(gguf_name: str, hf_name: str, rows: int, cols: int, permute_heads: int = 0) -> None:
        kind = next((t for part, t in (types or {}).items() if part in gguf_name), qtype)
        w = rng.normal(0, 0.2, (rows, cols)).astype(np.float32)
        hf[hf_name] = dequantize(kquants.quantize(w, kind), kind).astype(np.float32).reshape(rows, cols)
        stored = llama_cpp_permute(w, permute_heads) if permute_heads else w
        if odd is not None and odd[0] == gguf_name:
            block, nbytes = GGML_QUANT_SIZES[odd[1]]
            writer.add_tensor(gguf_name, np.zeros((rows, cols // block * nbytes), np.uint8), raw_dtype=odd[1])
            return
        writer.add_tensor(gguf_name, kquants.quantize(stored, kind), raw_dtype=kind)

    def norm(gguf_name: str, hf_name: str) -> None:
        w = (1.0 + rng.normal(0, 0.1, dims.hidden)).astype(np.float32)
        hf[hf_name] = w
        writer.add_tensor(gguf_name, w)

    d = dims
    matrix("token_embd.weight", "model.embed_tokens.weight", d.vocab, d.hidden)
    for i in range(d.layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        norm(b + "attn_norm.weight", h + "input_layernorm.weight")
        matrix(b + "attn_q.weight", h + "self_attn.q_proj.weight", d.heads * d.head_dim, d.hidden, d.heads)
        matrix(b + "attn_k.weight", h + "self_attn.k_proj.weight", d.kv_heads * d.head_dim, d.hidden, d.kv_heads)
        matrix(b + "attn_v.weight", h + "self_attn.v_proj.weight", d.kv_heads * d.head_dim, d.hidden)
        matrix(b + "attn_output.weight", h + "self_attn.o_proj.weight", d.hidden, d.heads * d.head_dim)
        norm(b + "ffn_norm.weight", h + "post_attention_layernorm.weight")
        matrix(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", d.inter, d.hidden)
        matrix(b + "ffn_up.weight", h + "mlp.up_proj.weight", d.inter, d.hidden)
        matrix(b + "ffn_down.weight", h + "mlp.down_proj.weight", d.hidden, d.inter)
    norm("output_norm.weight", "model.norm.weight")
    if not tied:
        matrix("output.weight", "lm_head.weight", d.vocab, d.hidden)
    if with_rope_freqs:  # llama3-style rope factors tensor: must be tolerated (and not change anything)
        writer.add_tensor("rope_freqs.weight", np.ones(d.head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def hf_llama(state: dict[str, np.ndarray], tied: bool, dims: Dims = TINY):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = dims
    cfg = LlamaConfig(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.inter, num_hidden_layers=d.layers,
                      num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, rms_norm_eps=EPS,
                      rope_theta=THETA, max_position_embeddings=d.ctx, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in state.items():
            params[name].copy_(torch.from_numpy(w))
    expected = set(params) - ({"lm_head.weight"} if tied else set())
    assert expected == set(state), sorted(expected ^ set(state))
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_tiny_gguf_logits_match_transformers(tmp_path, qtype, tied):
    path = str(tmp_path / f"tiny-{qtype.name}.gguf")
    state = write_tiny_gguf(path, qtype, tied, seed=int(qtype), with_rope_freqs=qtype == Q.Q8_0)
    if qtype not in (Q.F32,):  # the format really is lossy here, so the oracle is the dequantised weights
        raw = write_tiny_gguf(str(tmp_path / "f32.gguf"), Q.F32, tied, seed=int(qtype))
        assert not np.array_equal(raw["model.layers.0.self_attn.q_proj.weight"],
                                  state["model.layers.0.self_attn.q_proj.weight"])
    runner = make_runner(path)
    assert runner.config.tie_word_embeddings == tied
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(5))
    ours = prefill_logits(runner, ids)
    with torch.no_grad():
        ref = hf_llama(state, tied)(ids[None]).logits[0]
    assert_close_logits(ours, ref, TINY_RTOL)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_tiny_gguf_block_steps_match_transformers(tmp_path, qtype):
    """A short step (decode-sized) multiplies the file's blocks: logits within BLOCK_RTOL of transformers
    on the dequantised weights, tied head and untied."""
    for tied in (True, False):
        path = str(tmp_path / f"tiny-{qtype.name}-{tied}.gguf")
        state = write_tiny_gguf(path, qtype, tied, seed=int(qtype) + 1)
        runner = make_runner(path)
        methods = block_methods(runner)
        assert all(isinstance(m, GGUFBlocks) and m.ggml_types == {int(qtype)} for m in methods)
        ids = torch.randint(0, VOCAB, (methods[0].max_tokens,), generator=torch.Generator().manual_seed(6))
        ours = prefill_logits(runner, ids)
        with torch.no_grad():
            ref = hf_llama(state, tied)(ids[None]).logits[0]
        assert_close_logits(ours, ref, BLOCK_RTOL)


# llama.cpp's Q4_K_M: Q4_K, with the v and down projections and the output head in Q6_K (it does so for
# some layers; here for all).
Q4_K_M = {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K}


@pytest.mark.parametrize("qtype, types", [(Q.Q4_K, None), (Q.Q5_K, None), (Q.Q6_K, None), (Q.Q4_K, Q4_K_M)],
                         ids=["Q4_K", "Q5_K", "Q6_K", "Q4_K_M"])
def test_tiny_k_quant_gguf_matches_transformers(tmp_path, qtype, types):
    """K-quant files (rows of 256-weight super-blocks, blocks written by formats/kquants.py): a prompt
    step (dense, dequantised weights) within TINY_RTOL of transformers, a short step (the block kernel,
    fused q/k/v joining Q4_K and Q6_K rows in the mixed file) within BLOCK_RTOL; tied head and untied."""
    for tied in (True, False):
        path = str(tmp_path / f"tiny-{qtype.name}-{tied}.gguf")
        state = write_tiny_gguf(path, qtype, tied, seed=int(qtype) + 2, dims=WIDE, types=types)
        runner = make_runner(path)
        model = hf_llama(state, tied, WIDE)
        ids = torch.randint(0, WIDE.vocab, (24,), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert_close_logits(prefill_logits(runner, ids), model(ids[None]).logits[0], TINY_RTOL)
        methods = block_methods(runner)
        assert all(isinstance(m, GGUFBlocks) for m in methods)
        qkv = runner.model.layers[0].qkv_proj.method
        expected = [int(qtype)] if types is None else [int(Q.Q4_K), int(Q.Q6_K)]
        assert [t for _, t in qkv.segments] == expected
        short = ids[: methods[0].max_tokens]
        with torch.no_grad():
            assert_close_logits(prefill_logits(runner, short), model(short[None]).logits[0], BLOCK_RTOL)


def test_tiny_gguf_config(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, Q.Q8_0, tied=True)
    cfg = load_model_config(path)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (INTER, VOCAB, CTX)
    assert cfg.rms_norm_eps == pytest.approx(EPS)
    assert cfg.rope_theta == pytest.approx(THETA)
    assert cfg.tie_word_embeddings is True
    assert cfg.attention_bias is False and cfg.qk_norm is False
    assert cfg.eos_token_ids == [2]
    untied = str(tmp_path / "untied.gguf")
    write_tiny_gguf(untied, Q.F16, tied=False)
    assert load_model_config(untied).tie_word_embeddings is False


def test_unsupported_gguf_architecture(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    writer = GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model_config(path)


def test_unsupported_gguf_tensor_type(tmp_path):
    """A tensor type the loader does not dequantise (IQ4_NL, 32-wide blocks) is refused by name."""
    path = str(tmp_path / "odd.gguf")
    write_tiny_gguf(path, Q.F32, tied=True, odd=("blk.1.ffn_up.weight", Q.IQ4_NL))
    with pytest.raises(ValueError, match="unsupported type IQ4_NL"):
        make_runner(path)
