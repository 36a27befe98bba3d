"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2 with QKV bias, Qwen3 with q/k norm) over a paged KV pool."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.model.attention import AttentionMetadata, paged_attention
from radixserve.model.formats import (DENSE, GGUFBlocks, Packed, Segment, WeightMethod, calibrate, join_segments,
                                      quantize_weight)
from radixserve.model.layers import Linear, RMSNorm, RotaryEmbedding, apply_rotary
from radixserve.model.weights import Target, fused, load_checkpoint

if TYPE_CHECKING:
    from radixserve.lora.ops import LoRABatch


@dataclass
class LlamaConfig:
    """Shape of a Llama-family decoder, read from an HF config.json or GGUF metadata."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    rope_scaling: dict | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, cfg: dict, eos_token_ids: list[int] | None = None) -> "LlamaConfig":
        """From an HF config.json (or GGUF metadata in its names); eos_token_ids: generation_config.json's."""
        arch = (cfg.get("architectures") or [cfg.get("model_type", "llama")])[0]
        model_type = cfg.get("model_type", "llama")  # the registry checked it is one this class serves
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id") if eos_token_ids is None else eos_token_ids
        # transformers >= 5 writes theta and scaling together under rope_parameters.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0)
        rope_scaling = cfg.get("rope_scaling") or {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in ("default", None):
            rope_scaling = None
        return cls(
            architecture=arch,
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
            rope_scaling=rope_scaling,
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )


def lora_projections(cfg: LlamaConfig) -> dict[str, tuple[int, tuple[tuple[str, int], ...]]]:
    """The linears of a DecoderLayer that LoRA adapters may target, by attribute name: (in_features,
    ((HF projection, output width), ...) in the fused output's order) (see lora.adapter.model_layout)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv_proj": (cfg.hidden_size, (("q_proj", q), ("k_proj", kv), ("v_proj", kv))),
            "o_proj": (q, (("o_proj", cfg.hidden_size),)),
            "gate_up_proj": (cfg.hidden_size, (("gate_proj", cfg.intermediate_size),
                                               ("up_proj", cfg.intermediate_size))),
            "down_proj": (cfg.intermediate_size, (("down_proj", cfg.hidden_size),))}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qk_size = q_size + kv_size  # q and k lead the fused qkv output
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # q/k/v and gate/up are fused: one matmul each instead of three and two.
        self.qkv_proj = Linear(cfg.hidden_size, self.split, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size)
        self.gate_up_proj = Linear(cfg.hidden_size, (cfg.intermediate_size, cfg.intermediate_size))
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora: LoRABatch | None = None) -> torch.Tensor:
        t, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(self.input_layernorm(x), lora)
        v = qkv[:, self.qk_size:].view(t, kv_heads, self.head_dim)
        if self.q_norm is None:  # q and k side by side: rotated together
            qk = apply_rotary(qkv[:, :self.qk_size].view(t, heads + kv_heads, self.head_dim), *rope)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q, k, _ = qkv.split(self.split, dim=-1)
            q = apply_rotary(self.q_norm(q.reshape(t, heads, self.head_dim)), *rope)
            k = apply_rotary(self.k_norm(k.reshape(t, kv_heads, self.head_dim)), *rope)
        attn = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        x = x + self.o_proj(attn.view(t, -1), lora)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x), lora).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up, lora)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_method: WeightMethod = DENSE  # how the output head multiplies (pack_weights)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, logit_index: torch.Tensor,
                lora: LoRABatch | None = None, hidden: bool = False) -> torch.Tensor:
        """input_ids/positions: [T]; k_cache/v_cache: [layers, KVH, slots, D]. Returns float32 logits of
        the tokens at logit_index only (each sequence's last token), [len(logit_index), vocab]; with
        hidden=True their final (normed) hidden states instead, [len(logit_index), hidden_size].
        lora: where the step's adapter tokens are (None: base model only)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, (k_cache[i], v_cache[i]), meta, lora)
        x = self.norm(x[logit_index])
        if hidden:
            return x.float()
        return self.head_method.apply(x, self._head_weight(), None).float()

    def _head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _head_name(self) -> str:
        """The head weight's parameter name (the embedding's where they are tied)."""
        return "embed_tokens.weight" if self.lm_head is None else "lm_head.weight"

    def _linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def weight_copies(self) -> list[torch.Tensor]:
        """The copies of weights made for speed (the weight methods' packed layouts, int4), beside the
        parameters."""
        return self.head_method.copies() + [t for m in self._linears() for t in m.copies()]

    def pack_weights(self) -> None:
        """Give every linear (and the output head) the packed method: its weight reordered for oneDNN
        (see formats/packed.py)."""
        for module in self._linears():
            module.method = Packed(module.weight)
        self.head_method = Packed(self._head_weight())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up; every parameter must be covered."""
        load_checkpoint(self, weights, self._rename)

    def load_gguf_blocks(self, weights: Iterable[tuple[str, list[Segment]]], max_tokens: int | None,
                         cache_path: str | None = None) -> dict:
        """Give the linears (and the output head) whose weight comes whole as GGUF blocks the block method
        (see formats/gguf_blocks.py) for steps of at most max_tokens tokens (None: as many as this CPU
        measures the kernel faster for, per weight shape; measurements kept in cache_path), wrapping the
        method they had for the larger steps. Returns {weight name: max_tokens}."""
        return self._install_blocks(((name, segments) for _, name, segments in
                                     fused(weights, self._rename, strict=False, concat=join_segments)),
                                    max_tokens, cache_path)

    def quantize_blocks(self, ggml_type: int, max_tokens: int | None, cache_path: str | None = None) -> dict:
        """The same for a checkpoint without blocks (--quantization): every linear's weight and the
        output head's quantised into GGUF blocks of ggml_type here (see formats.quantize_weight)."""
        weights = [(f"{name}.weight", module.weight) for name, module in self.named_modules() if isinstance(module, Linear)]
        weights.append((self._head_name(), self._head_weight()))
        return self._install_blocks(((name, [quantize_weight(w, ggml_type)]) for name, w in weights),
                                    max_tokens, cache_path)

    def _install_blocks(self, weights: Iterable[tuple[str, list[Segment]]], max_tokens: int | None,
                        cache_path: str | None) -> dict:
        modules = dict(self.named_modules())
        head = self._head_name()
        layers: dict[str, tuple[GGUFBlocks, torch.Tensor]] = {}
        for name, segments in weights:
            if name == head:
                self.head_method = GGUFBlocks(segments, max_tokens or 0, base=self.head_method)
                layers[name] = (self.head_method, self._head_weight())
            else:
                linear = modules[name.removesuffix(".weight")]
                rows = sum(blocks.shape[0] for blocks, _ in segments)
                if rows != linear.weight.shape[0]:
                    raise ValueError(f"GGUF weight {name}: {rows} rows != {linear.weight.shape[0]}")
                linear.method = GGUFBlocks(segments, max_tokens or 0, base=linear.method)
                layers[name] = (linear.method, linear.weight)
        if max_tokens is None:
            calibrate(list(layers.values()), cache_path)
        return {name: method.max_tokens for name, (method, _) in layers.items()}

    # layers.{i}.self_attn.q_proj.weight → piece 0 of layers.{i}.qkv_proj.weight
    _FUSED = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
              "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}

    def _rename(self, name: str) -> Target:
        name = name.removeprefix("model.")
        if "rotary_emb" in name:
            return None
        if self.lm_head is None and name == "lm_head.weight":
            return None  # tied: the embedding doubles as the output projection
        parts = name.split(".")
        if len(parts) == 5 and parts[3] in self._FUSED:
            target, piece, count = self._FUSED[parts[3]]
            return f"layers.{parts[1]}.{target}.{parts[4]}", piece, count
        if len(parts) == 5 and parts[2] in ("self_attn", "mlp"):
            return f"layers.{parts[1]}.{parts[3]}.{parts[4]}"
        return name
