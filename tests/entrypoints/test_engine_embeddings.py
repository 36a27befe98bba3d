"""Engine.encode end to end: a real engine process on the default embedding model (vs
sentence-transformers) and on a tiny Llama started with is_embedding (vs transformers)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import radixserve
from embedding_texts import cosines, make_texts


@pytest.fixture(scope="module")
def engine():
    with radixserve.Engine(is_embedding=True, dtype="float32", max_running_requests=8) as e:
        yield e


def test_encode_matches_sentence_transformers(engine, default_embedding_model):
    from sentence_transformers import SentenceTransformer

    assert engine.args.model_path == default_embedding_model
    texts = make_texts(20, seed=21)
    ours = engine.encode(texts)
    assert len(ours) == 20 and all(isinstance(v, list) and len(v) == 384 for v in ours)
    ref = SentenceTransformer(default_embedding_model, device="cpu").encode(texts, normalize_embeddings=True)
    assert cosines(ours, ref).min() >= 0.9999
    one = engine.encode(texts[3])
    assert isinstance(one[0], float)
    np.testing.assert_allclose(one, ours[3], atol=1e-5)
    by_ids = engine.encode(input_ids=engine.tokenizer(texts[3])["input_ids"])
    np.testing.assert_allclose(by_ids, one, atol=1e-6)


def test_encode_errors(engine):
    with pytest.raises(ValueError, match="maximum input length is 256"):
        engine.encode("word " * 300)
    with pytest.raises(ValueError, match="Matryoshka"):
        engine.encode("x", dimensions=128)
    with pytest.raises(ValueError, match="non-empty"):
        engine.encode([])
    with pytest.raises(ValueError, match="embedding model, not a generation model"):
        engine.generate("hi")
    assert len(engine.encode("still serving", dimensions=384)) == 384
    stats = engine.get_stats()
    assert stats["num_waiting"] == 0 and stats["kv_total"] == 0
    assert engine.flush_cache() is True


def test_llama_with_is_embedding(tiny_model_dir):
    from transformers import AutoModel

    path = tiny_model_dir("llama")
    ids = [[5, 17, 300, 4000, 12], [9] * 40]
    with radixserve.Engine(model_path=path, is_embedding=True, dtype="float32", max_total_tokens=2048) as e:
        ours = e.encode(input_ids=ids)
        assert e.get_stats()["kv_total"] - e.get_stats()["kv_free"] == e.get_stats()["kv_cached"]  # none held
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for vec, x in zip(ours, ids):
        with torch.no_grad():
            ref = torch.nn.functional.normalize(hf(torch.tensor([x])).last_hidden_state[0, -1], dim=-1)
        np.testing.assert_allclose(vec, ref.numpy(), atol=2e-5)
    with radixserve.Engine(model_path=path, dtype="float32", max_total_tokens=2048) as gen:
        with pytest.raises(ValueError, match="generation model, not an embedding model"):
            gen.encode("hi")
