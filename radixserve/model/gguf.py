"""GGUF files: metadata → an HF-style config dict, tensors → dequantised HF-named weights."""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize

from radixserve.model.registry import gguf_architecture
from radixserve.model_files import gguf_field

# Per-layer tensor names: GGUF suffix → HF suffix.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
SUPPORTED_TYPES = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
}


def read_config(reader: GGUFReader) -> dict:
    """The model's hyper-parameters as an HF config.json would state them."""
    arch = gguf_field(reader, "general.architecture")
    name = gguf_architecture(arch).name
    names = {t.name for t in reader.tensors}
    heads = gguf_field(reader, f"{arch}.attention.head_count")
    hidden = gguf_field(reader, f"{arch}.embedding_length")
    vocab = gguf_field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    cfg = {
        "architectures": [name],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": gguf_field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": gguf_field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": gguf_field(reader, f"{arch}.attention.key_length", hidden // heads),
        "intermediate_size": gguf_field(reader, f"{arch}.feed_forward_length"),
        "vocab_size": vocab,
        "rms_norm_eps": gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": gguf_field(reader, f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": gguf_field(reader, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "eos_token_id": eos,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
    }
    return cfg


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved per rotary pair; restore HF's half-split order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_weights(reader: GGUFReader, cfg: dict, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantised tensor) for every tensor of the file."""
    llama_layout = cfg["model_type"] == "llama"
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}")
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            m = _BLOCK.match(t.name)
            if m is None or m.group(2) not in _LAYER_NAMES:
                if t.name == "rope_freqs.weight":  # llama3 rope factors; recomputed from the config
                    continue
                raise ValueError(f"unexpected GGUF tensor {t.name}")
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        w = dequantize(t.data, t.tensor_type)
        if llama_layout and ".attn_q." in t.name:
            w = _unpermute_rotary(w, cfg["num_attention_heads"])
        elif llama_layout and ".attn_k." in t.name:
            w = _unpermute_rotary(w, cfg["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(w, copy=True)).to(dtype)  # writable copy: the file is mmapped


# Block types that kernels/gguf_matmul.cpp multiplies as stored, and the tensors kept that way: the
# projections and the output head (the token embedding where it is tied).
BLOCK_TYPES = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
               GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K}
_PROJECTIONS = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")


def iter_block_weights(reader: GGUFReader, cfg: dict) -> Iterator[tuple[str, list[tuple[torch.Tensor, int]]]]:
    """(HF name, [(blocks uint8 [N, row bytes], GGML type)]) of each projection and output-head weight
    stored in a BLOCK_TYPES format: the file's bytes, rows in HF's order (one segment; fusing joins
    them, see formats/gguf_blocks.py)."""
    llama_layout = cfg["model_type"] == "llama"
    head = "output.weight" if "output.weight" in {t.name for t in reader.tensors} else "token_embd.weight"
    for t in reader.tensors:
        if t.tensor_type not in BLOCK_TYPES:
            continue
        m = _BLOCK.match(t.name)
        if t.name == head:
            name = "lm_head.weight" if head == "output.weight" else "model.embed_tokens.weight"
        elif m is not None and m.group(2).startswith(_PROJECTIONS):
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        else:
            continue
        rows = np.asarray(t.data).reshape(t.data.shape[0], -1)
        if llama_layout and ".attn_q." in t.name:
            rows = _unpermute_rotary(rows, cfg["num_attention_heads"])
        elif llama_layout and ".attn_k." in t.name:
            rows = _unpermute_rotary(rows, cfg["num_key_value_heads"])
        # A copy: the file is mmapped.
        yield name, [(torch.from_numpy(np.array(rows, order="C", copy=True)), int(t.tensor_type))]


def chat_template(reader: GGUFReader) -> str | None:
    return gguf_field(reader, "tokenizer.chat_template")
