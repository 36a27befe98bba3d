"""Shared fixtures: the real default models and tokenizer, and tiny random Llama-family HF folders."""
from __future__ import annotations

import pytest

from radixserve.config import default_embedding_model_path, default_model_path
from radixserve.model.loader import load_tokenizer
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
