"""LoRA test fixtures: PEFT adapters of the tiny random Llama (and Qwen2), built once per session."""
from __future__ import annotations

import pytest
import torch

from lora_adapters import build_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name → build_adapter kwargs: ranks 4/8/16, different target sets, rsLoRA, a non-default alpha.
TINY_ADAPTERS = {
    "r4_qv": dict(r=4, targets=["q_proj", "v_proj"], b_std=0.1, seed=1),
    "r8_all": dict(r=8, targets=ALL, b_std=0.05, seed=2),
    "r16_mlp_rslora": dict(r=16, targets=["o_proj", "gate_proj", "up_proj", "down_proj"], alpha=8,
                           use_rslora=True, b_std=0.05, seed=3),
    "r8_kv_alpha": dict(r=8, targets=["k_proj", "v_proj", "down_proj"], alpha=5, b_std=0.1, seed=4),
}


@pytest.fixture(scope="package", autouse=True)
def _two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_llama) -> dict[str, str]:
    """Adapters of the tiny Llama: name → PEFT folder."""
    from lora_adapters import load_hf_base

    root = tmp_path_factory.mktemp("tiny-adapters")
    base = load_hf_base(tiny_llama)
    return {name: build_adapter(tiny_llama, str(root / name), base=base, **kw) for name, kw in TINY_ADAPTERS.items()}
