"""Which model class serves a checkpoint: the config's `model_type` (a GGUF's `general.architecture`
is the same name) → the model class, its config parser and what the engine may do with it.

Keyed by model type rather than by HF `architectures` name: one family ships under several names
(Qwen2ForCausalLM for chat, Qwen2Model for gte-Qwen2 embeddings), and a GGUF names only the type.
Adding an architecture = one model file (the model, its config, its checkpoint-name mapping in
`load_weights`, the projections LoRA may target) + one entry here + its tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from radixserve.model.bert import BertConfig, BertModel
from radixserve.model.llama import LlamaConfig, LlamaForCausalLM, lora_projections
from radixserve.model_files import model_type


@dataclass(frozen=True)
class Architecture:
    name: str  # the HF architecture reported to clients (/get_model_info)
    model: type[nn.Module]  # model(config); load_weights(HF-named tensors)
    parse_config: Callable[..., Any]  # (HF config dict, eos ids from generation_config.json or None) → config
    encoder: bool = False  # a bidirectional encoder: an embedding model, no KV cache, no generation
    gguf: bool = False  # its GGUF tensor names and metadata keys are known (model/gguf.py)
    lora_projections: Callable[[Any], dict] | None = None  # config → the linears LoRA may target


def _llama(name: str, gguf: bool = True) -> Architecture:
    return Architecture(name, LlamaForCausalLM, LlamaConfig.from_hf, gguf=gguf, lora_projections=lora_projections)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _llama("LlamaForCausalLM"),
    "mistral": _llama("MistralForCausalLM", gguf=False),  # llama.cpp writes Mistral GGUFs as "llama"
    "qwen2": _llama("Qwen2ForCausalLM"),
    "qwen3": _llama("Qwen3ForCausalLM"),
    "bert": Architecture("BertModel", BertModel, lambda cfg, eos=None: BertConfig.from_hf(cfg), encoder=True),
}


def lookup(cfg: dict) -> Architecture:
    """The architecture serving an HF-style config dict; ValueError naming the supported ones."""
    kind = model_type(cfg)
    if kind not in ARCHITECTURES:
        raise ValueError(f"unsupported model type {kind!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[kind]


def gguf_architecture(name: str) -> Architecture:
    """The architecture of a GGUF's `general.architecture`; ValueError naming the supported ones."""
    arch = ARCHITECTURES.get(name)
    if arch is None or not arch.gguf:
        supported = ", ".join(sorted(k for k, a in ARCHITECTURES.items() if a.gguf))
        raise ValueError(f"unsupported GGUF architecture {name!r} (supported: {supported})")
    return arch
