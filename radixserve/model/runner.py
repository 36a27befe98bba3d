"""ModelRunner: owns the device, the weights and the KV pool; turns a step's inputs into logits."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from radixserve import kernels
from radixserve.cache.kv_pool import KVPool
from radixserve.config import ServerArgs, cache_dir
from radixserve.kernels.matmul import can_pack
from radixserve.model.formats import QUANTIZATION_TYPES
from radixserve.model.attention import AttentionMetadata
from radixserve.model.layers import RotaryEmbedding
from radixserve.model.loader import embedding_kind, is_gguf, iter_block_weights, iter_weights, load_architecture
from radixserve.model.pooling import EmbeddingSpec, check_matryoshka, read_embedding_spec

if TYPE_CHECKING:
    from radixserve.lora.ops import LoRABatch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bfloat16 where the hardware computes it natively (2.5x faster linears than float32 on an
    AVX512-BF16 CPU), else float32 (CPU) / float16 (older GPUs)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_index: torch.Tensor  # [B] step positions whose next-token logits are needed
    lora: LoRABatch | None = None  # the adapters' token segments; None when no token uses one


class ModelRunner:
    def __init__(self, args: ServerArgs):
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.architecture, self.config = load_architecture(args.model_path)
        cfg = self.config
        # Served for embeddings (--is-embedding or a sentence-transformers folder): the final hidden
        # state of each text's last token, normalised (gte-Qwen2 / Qwen3-Embedding convention).
        self.embedding: EmbeddingSpec | None = None
        self.embedding_dim = cfg.hidden_size
        self.matryoshka_dimensions: list[int] | None = None
        if embedding_kind(args.model_path, args.is_embedding) == "decoder":
            self.embedding = read_embedding_spec(args.model_path, default_pooling="lasttoken")
            if self.embedding.pooling != ("lasttoken",):
                raise ValueError(f"a decoder embeds with last-token pooling only, but the model's "
                                 f"sentence-transformers config asks for {'+'.join(self.embedding.pooling)}")
            self.matryoshka_dimensions = check_matryoshka(
                args.matryoshka_dimensions or self.embedding.matryoshka_dimensions, self.embedding_dim)
        default_length = cfg.max_position_embeddings
        if self.embedding is not None and self.embedding.max_length:
            default_length = min(default_length, self.embedding.max_length)
        self.context_length = args.context_length or default_length
        if self.context_length > cfg.max_position_embeddings:
            raise ValueError(f"--context-length {self.context_length} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        free_before = _available_memory(self.device)
        start = time.perf_counter()
        # Block steps quantise activations to 8 bits: their tokens may differ from the dense path's.
        self._int4_tokens = 0 if args.enable_deterministic_inference else args.int4_decode_tokens
        self.model = self._load(args.model_path, args.quantization)
        logger.info("loaded %s (%s, %s) in %.1fs", os.path.basename(args.model_path), self.dtype,
                    self.device, time.perf_counter() - start)
        self.lora_kernel = None  # kernels.lora_add() when serving adapters on a CPU (_lora_buffers)
        self.lora_buffers, self.lora_layout = self._lora_buffers(args) if args.enable_lora else (None, None)
        num_slots = args.max_total_tokens or self._default_pool_size(args, free_before)
        self.kv = KVPool(num_slots + 1, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                         args.max_running_requests, self.context_length, self.dtype, self.device)
        logger.info("KV pool: %d tokens", num_slots)
        self.decode_kernel = kernels.decode_attention() if self.device.type == "cpu" else None

    def _load(self, path: str, quantization: str | None) -> nn.Module:
        cfg = self.config
        with torch.device("meta"):
            model = self.architecture.model(cfg)
        model = model.to_empty(device=self.device).to(self.dtype)
        # Buffers computed at construction were lost on the meta device: rebuild them on the real one.
        model.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                       cfg.rope_scaling).to(self.device)
        model.load_weights((name, w.to(self.device)) for name, w in iter_weights(path, self.dtype))
        if can_pack(self.device, self.dtype):
            model.pack_weights()
        if self._int4_tokens != 0 and (is_gguf(path) or quantization) and self.device.type == "cpu":
            start = time.perf_counter()
            cache = os.path.join(cache_dir(), "gguf_block_steps.json")
            if quantization:
                steps = model.quantize_blocks(QUANTIZATION_TYPES[quantization], self._int4_tokens, cache)
            else:
                steps = model.load_gguf_blocks(iter_block_weights(path), self._int4_tokens, cache)
            if steps:
                how = "set by --int4-decode-tokens" if self._int4_tokens else \
                    f"measured on this CPU, or read from what was: {time.perf_counter() - start:.1f}s"
                logger.info("GGUF blocks kept for %d weights, multiplied as stored in steps of at most %s tokens (%s)",
                            len(steps), "/".join(str(n) for n in sorted(set(steps.values()))), how)
        return model.eval().requires_grad_(False)

    def _lora_buffers(self, args: ServerArgs):
        """Stacked adapter weights for --max-loras-per-batch adapters, attached to the model's linears as
        LoRA hooks."""
        from radixserve.lora.adapter import model_layout, read_adapter_config
        from radixserve.lora.buffers import LoRABuffers, lora_shape
        from radixserve.lora.refs import parse_lora_paths

        initial = [(r.path, read_adapter_config(r.path)) for r in parse_lora_paths(args.lora_paths)]
        rank, targets = lora_shape(args, initial)
        layout = model_layout(self.architecture.lora_projections(self.config), targets)
        self.lora_kernel = kernels.lora_add() if self.device.type == "cpu" else None
        # The stacked path's matmuls go through packed copies where the base weights are packed.
        buffers = LoRABuffers(self.model, layout, args.max_loras_per_batch, rank, self.dtype, self.device,
                              pack=self.lora_kernel is None and can_pack(self.device, self.dtype))
        logger.info("LoRA: %d batch slots, rank <= %d, targets %s (%.1f MiB)", args.max_loras_per_batch, rank,
                    ", ".join(targets), buffers.nbytes() / 2**20)
        return buffers, layout

    def _default_pool_size(self, args: ServerArgs, free_before: int) -> int:
        """KV tokens that fit in mem_fraction_static of the memory free at start, less the weights."""
        cfg = self.config
        weights = sum(t.numel() * t.element_size()
                      for t in [*self.model.parameters(), *self.model.weight_copies()])
        if self.lora_buffers is not None:
            weights += self.lora_buffers.nbytes()
        per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        budget = int(free_before * args.mem_fraction_static) - weights
        tokens = budget // per_token
        if tokens < self.context_length:
            raise MemoryError(f"only {max(tokens, 0)} KV tokens fit in --mem-fraction-static "
                              f"{args.mem_fraction_static}; need at least the context length {self.context_length}")
        return int(tokens)

    @torch.inference_mode()
    def forward(self, inp: ModelInput) -> torch.Tensor:
        """Float32 logits [len(inp.logit_index), vocab]; for an embedding model, the final hidden states
        [len(inp.logit_index), hidden_size] instead."""
        inp.meta.decode_kernel = self.decode_kernel
        if inp.lora is not None:
            inp.lora.kernel = self.lora_kernel
        return self.model(inp.input_ids, inp.positions, self.kv.k, self.kv.v, inp.meta, inp.logit_index, inp.lora,
                          hidden=self.embedding is not None)
