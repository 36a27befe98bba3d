"""Shared fixtures: the real default models and tokenizer, and tiny random Llama-family HF folders."""
from __future__ import annotations

import pytest

from radixserve.config import default_embedding_model_path, default_model_path
from radixserve.model_files import load_tokenizer
from lora_adapters import DEFAULT_ADAPTERS, TINY_ADAPTERS, build_adapter, load_hf_base
from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def default_model() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 as a sentence-transformers folder (BERT, mean pooling, normalised, 384 dims)."""
    return default_embedding_model_path()


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return load_tokenizer(default_model)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """Factory: tiny_model_dir(arch) → folder (built once per arch)."""
    built: dict[str, str] = {}

    def make(arch: str = "llama") -> str:
        if arch not in built:
            built[arch] = build_tiny_model(str(tmp_path_factory.mktemp(f"tiny-{arch}")), arch, tokenizer_dir)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def default_hf_model(default_model):
    """transformers' float32 model of the default GGUF (the same dequantised weights as ours)."""
    return load_hf_base(default_model)


@pytest.fixture(scope="session")
def default_adapters(tmp_path_factory, default_model, default_hf_model) -> dict[str, str]:
    """PEFT LoRA adapters of the default model (lora_adapters.DEFAULT_ADAPTERS): name → folder."""
    root = tmp_path_factory.mktemp("default-adapters")
    return {name: build_adapter(default_model, str(root / name), base=default_hf_model, **kw)
            for name, kw in DEFAULT_ADAPTERS.items()}


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """PEFT LoRA adapters of the tiny random Llama (lora_adapters.TINY_ADAPTERS): name → folder."""
    path = tiny_model_dir("llama")
    base = load_hf_base(path)
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {name: build_adapter(path, str(root / name), base=base, **kw) for name, kw in TINY_ADAPTERS.items()}
