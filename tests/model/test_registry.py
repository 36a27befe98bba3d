"""The model registry: a config's model type (or a GGUF's architecture) picks the model class and its
config parser; anything else is refused naming what is supported."""
from __future__ import annotations

import pytest
import torch

from radixserve.model.bert import BertConfig, BertModel
from radixserve.model.llama import LlamaConfig, LlamaForCausalLM
from radixserve.model.registry import ARCHITECTURES, gguf_architecture, lookup

LLAMA = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "vocab_size": 100}


@pytest.mark.parametrize("model_type, name, bias, qk_norm", [
    ("llama", "LlamaForCausalLM", False, False), ("mistral", "MistralForCausalLM", False, False),
    ("qwen2", "Qwen2ForCausalLM", True, False), ("qwen3", "Qwen3ForCausalLM", False, True)])
def test_decoder_families(model_type, name, bias, qk_norm):
    arch = lookup({**LLAMA, "model_type": model_type})
    assert arch.model is LlamaForCausalLM and arch.name == name and not arch.encoder
    cfg = arch.parse_config({**LLAMA, "model_type": model_type}, [7])
    assert isinstance(cfg, LlamaConfig) and cfg.eos_token_ids == [7]
    assert (cfg.attention_bias, cfg.qk_norm) == (bias, qk_norm)
    with torch.device("meta"):
        model = arch.model(cfg)
    assert set(arch.lora_projections(cfg)) <= {n.split(".")[-1] for n, _ in model.layers[0].named_modules()}


def test_bert_by_type_or_by_architecture_name():
    bert = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
            "vocab_size": 100}
    for cfg in ({**bert, "model_type": "bert"}, {**bert, "architectures": ["BertModel"]}):
        arch = lookup(cfg)
        assert arch.encoder and arch.model is BertModel and arch.lora_projections is None
    assert isinstance(lookup({**bert, "model_type": "bert"}).parse_config({**bert, "model_type": "bert"}), BertConfig)


def test_unsupported_types_name_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model type 'gpt2' \(supported: bert, llama, mistral, qwen2, qwen3\)"):
        lookup({"model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'bert' \(supported: llama, qwen2, qwen3\)"):
        gguf_architecture("bert")
    assert {a for a, entry in ARCHITECTURES.items() if entry.gguf} == {"llama", "qwen2", "qwen3"}


def test_the_launchers_list_matches_the_registry():
    """model_files refuses unsupported checkpoints before the engine starts (without torch): its lists are
    the registry's."""
    from radixserve.model_files import GGUF_ARCHITECTURES, MODEL_TYPES

    assert sorted(MODEL_TYPES) == sorted(ARCHITECTURES)
    assert sorted(GGUF_ARCHITECTURES) == sorted(k for k, a in ARCHITECTURES.items() if a.gguf)
