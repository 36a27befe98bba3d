"""The BERT encoder and its pooling against transformers and sentence-transformers on the same weights.

Oracles: `transformers.BertModel` (token states of a padded batch, masked) for the encoder itself;
`SentenceTransformer(folder).encode` for the whole pipeline (tokens → pooling → normalisation) on tiny
random folders for every pooling mode, and on the real all-MiniLM-L6-v2. Our side always runs several
texts of different lengths packed into one forward pass.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from radixserve.config import ServerArgs
from radixserve.model.bert import EncoderInput
from radixserve.model.encoder_runner import EncoderRunner
from radixserve.model.pooling import read_embedding_spec
from embedding_texts import cosines, make_texts
from tiny_models import build_tiny_bert

FP32_RTOL = 1e-4  # of the value scale; both sides compute in float32 with different op orders
MIN_COSINE = 0.9999

def embed(runner: EncoderRunner, ids: list[list[int]], dims=None) -> np.ndarray:
    out = runner.embed(ids, [dims] * len(ids))
    return np.stack([np.frombuffer(b, dtype="<f4") for b in out])


def make_runner(path: str, **kw) -> EncoderRunner:
    return EncoderRunner(ServerArgs(model_path=path, dtype=kw.pop("dtype", "float32"), device="cpu", **kw))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, default_embedding_model) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")), default_embedding_model)


@pytest.fixture(scope="module")
def minilm(default_embedding_model) -> EncoderRunner:
    return make_runner(default_embedding_model)


def _ragged_ids(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 7, 70, 33, 2, 70)]


def _hf_padded(path: str, ids: list[list[int]], cls=None):
    """transformers' last hidden states and pooler output for ids as one right-padded batch."""
    from transformers import BertModel

    model = (cls or BertModel).from_pretrained(path, dtype=torch.float32).eval()
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return out, mask.bool()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    assert scale > 0.1
    err = (ours - ref).abs().max().item()
    assert err <= FP32_RTOL * scale, f"max abs diff {err:.3g} > {FP32_RTOL:g} * scale {scale:.3g}"


def test_hidden_states_and_pooled_output_match_transformers(tiny_bert):
    runner = make_runner(tiny_bert)
    ids = _ragged_ids(runner.config.vocab_size, seed=1)
    with torch.inference_mode():
        hidden = runner.model(EncoderInput.pack(ids, torch.device("cpu")))
    ref, mask = _hf_padded(tiny_bert, ids)
    _assert_close(hidden, ref.last_hidden_state[mask])  # every real token of every text, in order
    # The folder's pooling (mean over real tokens, normalised) from transformers' states.
    states = ref.last_hidden_state * mask[..., None]
    pooled = torch.nn.functional.normalize(states.sum(1) / mask.sum(1, keepdim=True), dim=-1)
    _assert_close(torch.from_numpy(embed(runner, ids)), pooled)


def test_checkpoint_with_bert_prefix_and_heads_loads(tmp_path, default_embedding_model):
    """A BertForMaskedLM checkpoint ("bert." names, an MLM head) loads as the same encoder."""
    from transformers import BertForMaskedLM, BertModel

    path = build_tiny_bert(str(tmp_path / "base"), default_embedding_model, sentence_transformers=False)
    mlm = BertForMaskedLM.from_pretrained(path)
    mlm.save_pretrained(tmp_path / "mlm", safe_serialization=True)
    ids = _ragged_ids(mlm.config.vocab_size, seed=2)
    with torch.inference_mode():
        ours = make_runner(str(tmp_path / "mlm")).model(EncoderInput.pack(ids, torch.device("cpu")))
    ref, mask = _hf_padded(path, ids, BertModel)
    _assert_close(ours, ref.last_hidden_state[mask])


def test_bare_bert_folder_embeds_its_cls_state_normalised(tmp_path, default_embedding_model):
    path = build_tiny_bert(str(tmp_path / "bare"), default_embedding_model, sentence_transformers=False)
    runner = make_runner(path)
    assert runner.spec.pooling == ("cls",) and runner.spec.normalize
    assert runner.context_length == 128  # max_position_embeddings: no sentence-transformers limit
    ids = _ragged_ids(runner.config.vocab_size, seed=3)
    ref, _ = _hf_padded(path, ids)
    cls = torch.nn.functional.normalize(ref.last_hidden_state[:, 0], dim=-1)
    _assert_close(torch.from_numpy(embed(runner, ids)), cls)


POOLINGS = {
    "cls": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    "max": {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
    "mean": {"pooling_mode_mean_tokens": True},
    "mean_sqrt_len": {"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False},
    "weightedmean": {"pooling_mode_weightedmean_tokens": True, "pooling_mode_mean_tokens": False},
    "lasttoken": {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False},
    "legacy-cls+mean+max": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True,
                            "pooling_mode_max_tokens": True},  # concatenated in sentence-transformers' order
    "new-mean+lasttoken": {"pooling_mode": ["mean", "lasttoken"], "include_prompt": True},
    "new-weightedmean": {"pooling_mode": "weightedmean"},
}


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_pooling_matches_sentence_transformers(tmp_path, default_embedding_model, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    path = build_tiny_bert(str(tmp_path / "st"), default_embedding_model, pooling=POOLINGS[pooling],
                           normalize=normalize)
    runner = make_runner(path)
    texts = make_texts(12, seed=4, max_words=60)
    ours = embed(runner, runner_ids(runner, path, texts))
    ref = SentenceTransformer(path, device="cpu").encode(texts, batch_size=5, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(texts), runner.embedding_dim)
    _assert_close(torch.from_numpy(ours), torch.from_numpy(ref))


def runner_ids(runner: EncoderRunner, path: str, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(texts)["input_ids"]
    assert max(map(len, ids)) <= runner.context_length
    return ids


def test_minilm_matches_sentence_transformers_alone_and_batched(minilm, default_embedding_model):
    from sentence_transformers import SentenceTransformer

    texts = make_texts(24, seed=5)
    ids = runner_ids(minilm, default_embedding_model, texts)
    assert len({len(x) for x in ids}) > 15 and max(map(len, ids)) > 150  # many different lengths
    ref = SentenceTransformer(default_embedding_model, device="cpu").encode(texts, normalize_embeddings=True)
    batched = embed(minilm, ids)
    alone = np.concatenate([embed(minilm, [x]) for x in ids])
    assert cosines(batched, ref).min() >= MIN_COSINE
    assert cosines(alone, ref).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_minilm_bfloat16_stays_close(default_embedding_model):
    """The default dtype on CPUs with bfloat16 arithmetic: still the same embedding space."""
    from sentence_transformers import SentenceTransformer

    texts = make_texts(8, seed=6)
    runner = make_runner(default_embedding_model, dtype="bfloat16")
    ref = SentenceTransformer(default_embedding_model, device="cpu").encode(texts, normalize_embeddings=True)
    assert cosines(embed(runner, runner_ids(runner, default_embedding_model, texts)), ref).min() >= 0.99


def test_matryoshka_truncation_renormalises(minilm, default_embedding_model):
    ids = runner_ids(minilm, default_embedding_model, make_texts(5, seed=7))
    full = embed(minilm, ids)
    for dims in (128, 64):
        cut = embed(minilm, ids, dims)
        assert cut.shape == (5, dims)
        expected = full[:, :dims] / np.linalg.norm(full[:, :dims], axis=1, keepdims=True)
        np.testing.assert_allclose(cut, expected, atol=1e-6)
    mixed = minilm.embed(ids[:3], [None, 64, 384])  # a step mixes requests of different sizes
    assert [len(b) // 4 for b in mixed] == [384, 64, 384]


def test_spec_reads_the_folder(tmp_path, default_embedding_model):
    spec = read_embedding_spec(default_embedding_model, default_pooling="cls")
    assert (spec.pooling, spec.normalize, spec.max_length, spec.source) == (("mean",), True, 256,
                                                                          "sentence-transformers")
    path = build_tiny_bert(str(tmp_path / "m"), default_embedding_model, matryoshka_dimensions=[16, 8])
    assert read_embedding_spec(path, "cls").matryoshka_dimensions == [8, 16]
    assert make_runner(path).matryoshka_dimensions == [8, 16]
    assert make_runner(path, matryoshka_dimensions=[4]).matryoshka_dimensions == [4]  # the operator's win
    with pytest.raises(ValueError, match="exceed the embedding size"):
        make_runner(path, matryoshka_dimensions=[64])


def test_input_limit_from_the_tokenizer_when_the_config_has_none(tmp_path, default_embedding_model):
    """Newer sentence-transformers saves keep the limit in the tokenizer's model_max_length."""
    path = build_tiny_bert(str(tmp_path / "new"), default_embedding_model, max_seq_length=128)
    with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
        json.dump({"modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}}, f)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tok = json.load(f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**tok, "model_max_length": 100}, f)
    assert read_embedding_spec(path, "cls").max_length == 100
    assert make_runner(path).context_length == 100


def test_unsupported_sentence_transformers_module_is_refused(tmp_path, default_embedding_model):
    path = build_tiny_bert(str(tmp_path / "dense"), default_embedding_model)
    with open(os.path.join(path, "modules.json")) as f:
        modules = json.load(f)
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    with pytest.raises(ValueError, match="Dense"):
        read_embedding_spec(path, "cls")


def test_context_length_limits(default_embedding_model):
    assert make_runner(default_embedding_model, context_length=512).context_length == 512
    with pytest.raises(ValueError, match="max_position_embeddings 512"):
        make_runner(default_embedding_model, context_length=513)
