"""Which models are embedding models: BERT folders always; Llama-family ones with --is-embedding or a
sentence-transformers modules.json (which must then ask for last-token pooling)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from radixserve.config import ServerArgs
from radixserve.model.loader import embedding_kind
from radixserve.model.runner import ModelRunner
from tiny_models import build_tiny_bert


def _with_st_config(src: str, dst: str, pooling: dict) -> str:
    shutil.copytree(src, dst)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    with open(os.path.join(dst, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(dst, "1_Pooling"))
    with open(os.path.join(dst, "1_Pooling", "config.json"), "w") as f:
        json.dump(pooling, f)
    return dst


def test_kinds(tmp_path, tiny_model_dir, default_model, default_embedding_model):
    llama = tiny_model_dir("llama")
    bare_bert = build_tiny_bert(str(tmp_path / "bert"), default_embedding_model, sentence_transformers=False)
    st_llama = _with_st_config(llama, str(tmp_path / "st-llama"), {"pooling_mode_lasttoken": True})
    assert embedding_kind(default_embedding_model, False) == "encoder"
    assert embedding_kind(bare_bert, False) == embedding_kind(bare_bert, True) == "encoder"
    assert embedding_kind(llama, False) is None
    assert embedding_kind(llama, True) == "decoder"
    assert embedding_kind(st_llama, False) == "decoder"
    assert embedding_kind(default_model, False) is None  # GGUF
    assert embedding_kind(default_model, True) == "decoder"


def test_decoder_embedding_runner(tmp_path, tiny_model_dir):
    llama = tiny_model_dir("llama")
    st_llama = _with_st_config(llama, str(tmp_path / "st-llama"), {"pooling_mode_lasttoken": True})
    runner = ModelRunner(ServerArgs(model_path=st_llama, dtype="float32", device="cpu", max_total_tokens=256))
    assert runner.embedding.pooling == ("lasttoken",) and runner.embedding.normalize
    assert runner.embedding_dim == runner.config.hidden_size
    assert ModelRunner(ServerArgs(model_path=llama, dtype="float32", device="cpu", max_total_tokens=256)).embedding is None
    mean_llama = _with_st_config(llama, str(tmp_path / "mean-llama"), {"pooling_mode_mean_tokens": True})
    with pytest.raises(ValueError, match="last-token pooling only"):
        ModelRunner(ServerArgs(model_path=mean_llama, dtype="float32", device="cpu", max_total_tokens=256))


def test_default_embedding_model_with_the_flag(default_embedding_model):
    assert ServerArgs(is_embedding=True).model_path == default_embedding_model
    assert ServerArgs().model_path != default_embedding_model
