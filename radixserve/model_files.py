"""Model files on disk, read without torch (the API process and the launcher use them): what a path
holds, a check that names the file and what is wrong with it, GGUF metadata, and the tokenizer."""
from __future__ import annotations

import functools
import json
import os
from typing import Any


class ModelFileError(ValueError):
    """A model path that cannot be served: the message names the file and the problem."""


# What the engine serves: model/registry.py's ARCHITECTURES keys, and those with known GGUF names (a test
# keeps them equal). Here without torch, so that a checkpoint it cannot serve is refused before the
# engine process starts.
MODEL_TYPES = ("bert", "llama", "mistral", "qwen2", "qwen3")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def model_type(cfg: dict) -> str:
    """An HF config's model type (older BERT configs name only their architecture)."""
    kind = cfg.get("model_type")
    if kind is None and any(isinstance(a, str) and a.startswith("Bert") for a in cfg.get("architectures") or []):
        return "bert"
    return kind or "llama"


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (models are loaded from local files only)")


@functools.lru_cache(maxsize=2)
def gguf_reader(path: str):
    """The parsed GGUF file (metadata and memory-mapped tensors). Parsing takes seconds, since the
    vocabulary is stored as fields: once per file and process."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails with whatever a broken file provokes
        raise ModelFileError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                             f"is it truncated or not a GGUF file?") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                                 f"the file has {size} bytes")
    return reader


def gguf_field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def check_model_files(path: str) -> None:
    """Raise FileNotFoundError / ModelFileError unless path is a readable GGUF file or a model folder with
    a config.json and weights, of an architecture the engine serves."""
    check_exists(path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelFileError(f"{path} is a file but not a GGUF file (.gguf): give a .gguf file or a model folder")
        arch = gguf_field(gguf_reader(path), "general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelFileError(f"{path}: unsupported GGUF architecture {arch!r} (supported: "
                                 f"{', '.join(GGUF_ARCHITECTURES)})")
        return
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ModelFileError(f"{path} has no config.json: a model folder holds config.json and *.safetensors")
    try:
        with open(config) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{config} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{config} is not a JSON object")
    if model_type(cfg) not in MODEL_TYPES:
        raise ModelFileError(f"{config}: unsupported model type {model_type(cfg)!r} (supported: "
                             f"{', '.join(MODEL_TYPES)})")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise ModelFileError(f"{path} has no *.safetensors weights")


# GGUF tokenizer keys that say which special token each id is (transformers' names).
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def _gguf_tokenizer(path: str):
    """A fast tokenizer from a GGUF's vocabulary, merges, special tokens and chat template, through
    transformers' converters (its own GGUF path reads the file with torch)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                         convert_gguf_tokenizer)

    reader = gguf_reader(path)
    meta = {key: gguf_field(reader, key) for key in reader.fields if key.startswith("tokenizer.")}
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in names.items() if f"tokenizer.{key}" in meta}
              for group, names in GGUF_TOKENIZER_MAPPING.items()}
    vocab, config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in vocab:
        raise ModelFileError(f"{path} has no tokenizer (no tokenizer.ggml.tokens): pass --tokenizer-path")
    if vocab.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary by default
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = vocab["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(gguf_field(reader, "general.architecture"), vocab)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def load_tokenizer(path: str, tokenizer_path: str | None = None):
    """A transformers fast tokenizer with the model's chat template (GGUF metadata or the folder's files)."""
    source = tokenizer_path or path
    check_exists(source)
    if is_gguf(source):
        return _gguf_tokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)
