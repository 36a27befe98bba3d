"""Tiny random Llama-family HF folders for unit tests (imported by tests/conftest.py and test modules)."""
from __future__ import annotations

import os

import torch

TINY_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], tie_word_embeddings=False, head_dim=32),
}



def build_tiny_model(path: str, arch: str, tokenizer_dir: str | None = None, seed: int = 0, **overrides) -> str:
    """A random 2-layer model of the given family saved as an HF folder (config.json + safetensors),
    with the real tokenizer's files when tokenizer_dir is given."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY_CONFIGS[arch])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, eos_token_id=2, bos_token_id=1, **kw, **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; scale up so outputs differ across tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    return str(path)
