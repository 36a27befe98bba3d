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
    kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
              eos_token_id=2, bos_token_id=1, **kw)
    cfg = AutoConfig.for_model(model_type, **{**kw, **overrides})
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


BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_tiny_bert(path: str, tokenizer_dir: str, pooling: dict | None = None, normalize: bool = True,
                    sentence_transformers: bool = True, max_seq_length: int = 128, seed: int = 0,
                    **overrides) -> str:
    """A random 2-layer BERT saved as a sentence-transformers folder: config.json + model.safetensors,
    the given tokenizer's files (its vocabulary size is used), modules.json (Transformer → Pooling →
    Normalize when normalize), 1_Pooling/config.json (`pooling`: that file's keys; default mean) and
    sentence_bert_config.json. sentence_transformers=False: a bare BertModel folder."""
    import json
    import shutil

    from transformers import BertConfig, BertModel

    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        vocab = len(json.load(f)["model"]["vocab"])
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=max(128, max_seq_length), **overrides)
    torch.manual_seed(seed)
    model = BertModel(cfg, add_pooling_layer=True)
    with torch.no_grad():  # random init is tiny; scale up so token states differ
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    for name in BERT_TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    if not sentence_transformers:
        return str(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": cfg.hidden_size, **(pooling or {"pooling_mode_mean_tokens": True})}, f)
    with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)
    return str(path)
