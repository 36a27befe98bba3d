"""Model files → config, weights and tokenizer: an HF folder (config.json + *.safetensors) or a GGUF file."""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

import torch

from radixserve.model import gguf as gguf_file
from radixserve.model.registry import Architecture, lookup
from radixserve.model_files import check_exists, gguf_reader, is_gguf


def read_hf_config(path: str) -> dict:
    """The model's config as a dict in HF's names (config.json, or GGUF metadata translated)."""
    check_exists(path)
    if is_gguf(path):
        return gguf_file.read_config(gguf_reader(path))
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _generation_eos(path: str) -> list[int] | None:
    """generation_config.json often lists more stop ids (e.g. <|im_end|> and <|endoftext|>) than config.json."""
    gen = os.path.join(path, "generation_config.json")
    if is_gguf(path) or not os.path.exists(gen):
        return None
    with open(gen) as f:
        eos = json.load(f).get("eos_token_id")
    return None if eos is None else [eos] if isinstance(eos, int) else list(eos)


def embedding_kind(path: str, is_embedding: bool) -> str | None:
    """None for a generation model; "encoder" for an encoder such as BERT (always an embedding model);
    "decoder" for a decoder served for embeddings (--is-embedding, or a folder with a
    sentence-transformers modules.json, as gte-Qwen2 / Qwen3-Embedding ship). ValueError for an
    architecture the registry does not serve."""
    if lookup(read_hf_config(path)).encoder:
        return "encoder"
    if is_embedding or (not is_gguf(path) and os.path.isfile(os.path.join(path, "modules.json"))):
        return "decoder"
    return None


def load_architecture(path: str) -> tuple[Architecture, Any]:
    """The registry's entry for the checkpoint and its parsed config."""
    cfg = read_hf_config(path)
    arch = lookup(cfg)
    return arch, arch.parse_config(cfg, _generation_eos(path))


def load_model_config(path: str) -> Any:
    return load_architecture(path)[1]


def iter_weights(path: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor in dtype, on the CPU) for every weight of the checkpoint, shard by shard."""
    if is_gguf(path):
        reader = gguf_reader(path)
        yield from gguf_file.iter_weights(reader, gguf_file.read_config(reader), dtype)
        return
    from safetensors import safe_open

    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)


def iter_block_weights(path: str) -> Iterator[tuple[str, list[tuple[torch.Tensor, int]]]]:
    """(HF name, [(blocks, GGML type)]) for every GGUF weight that stays in its block format (see
    model/gguf.py iter_block_weights)."""
    reader = gguf_reader(path)
    yield from gguf_file.iter_block_weights(reader, gguf_file.read_config(reader))
