"""PEFT LoRA adapters with random non-zero weights for tests, and peft's merged model as the oracle."""
from __future__ import annotations

import json
import os
import shutil

import torch


def load_hf_base(model_path: str):
    """transformers' float32 model of an HF folder or a GGUF file (dequantised as radixserve does)."""
    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), dtype=torch.float32,
                                                    gguf_file=os.path.basename(model_path)).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def build_adapter(base_model_path: str, out_dir: str, r: int, targets: list[str], alpha: float | None = None,
                  use_rslora: bool = False, seed: int = 0, b_std: float = 0.02, base=None, **config) -> str:
    """A PEFT adapter of base_model_path saved to out_dir: lora_A as peft initialises it with
    init_lora_weights=False, lora_B ~ N(0, b_std) (non-zero: the output changes, stays finite)."""
    from peft import LoraConfig, get_peft_model

    model = base if base is not None else load_hf_base(base_model_path)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=list(targets),
                     use_rslora=use_rslora, init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM",
                     **config)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    peft_model.save_pretrained(out_dir)
    if base is not None:  # give the caller its base model back, without the adapter
        peft_model.unload()
    return out_dir


def merged_model(base_model_path: str, adapter_dir: str):
    """peft's reference: the base model with the adapter merged into its weights (float32)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf_base(base_model_path), adapter_dir).merge_and_unload().eval()


def peft_merged(base, adapter_dir: str):
    """peft's merged model on a copy of an already loaded base model (which is left untouched)."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Adapters of the tiny random Llama: ranks 4/8/16, different target sets, rsLoRA, a non-default alpha.
TINY_ADAPTERS = {
    "r4_qv": dict(r=4, targets=["q_proj", "v_proj"], b_std=0.1, seed=1),
    "r8_all": dict(r=8, targets=ALL, b_std=0.05, seed=2),
    "r16_mlp_rslora": dict(r=16, targets=["o_proj", "gate_proj", "up_proj", "down_proj"], alpha=8,
                           use_rslora=True, b_std=0.05, seed=3),
    "r8_kv_alpha": dict(r=8, targets=["k_proj", "v_proj", "down_proj"], alpha=5, b_std=0.1, seed=4),
}

# Adapters of the default model used across the engine and server tests: name → build_adapter kwargs.
# Different ranks and target sets, one with rsLoRA; lora_B's scale makes greedy outputs differ from the
# base model's within a few tokens.
DEFAULT_ADAPTERS = {
    "attn": dict(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"], b_std=0.03, seed=1),
    "mlp": dict(r=16, targets=["gate_proj", "up_proj", "down_proj"], alpha=16, use_rslora=True, b_std=0.06, seed=2),
    "qv": dict(r=4, targets=["q_proj", "v_proj"], b_std=0.05, seed=3),
    "all": dict(r=8, targets=ALL, b_std=0.02, seed=4),
}


def edited_adapter(root, src: str, name: str, config: dict | None = None, weights=None) -> str:
    """A copy of adapter src under root/name with config keys replaced and/or its weights transformed
    (a function dict → dict)."""
    from safetensors.torch import load_file, save_file

    dst = os.path.join(str(root), name)
    shutil.copytree(src, dst)
    if config:
        with open(os.path.join(dst, "adapter_config.json")) as f:
            data = json.load(f)
        data.update(config)
        with open(os.path.join(dst, "adapter_config.json"), "w") as f:
            json.dump(data, f)
    if weights:
        file = os.path.join(dst, "adapter_model.safetensors")
        save_file(weights(load_file(file)), file)
    return dst
