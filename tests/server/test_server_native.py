"""/v1/models, SGLang's native routes (/generate, /tokenize, /get_model_info, ...) and /metrics."""
from __future__ import annotations

import urllib.parse

import pytest
from server_util import CONTEXT_LENGTH, assert_error, sse_json, wait_idle

# ---- models


def test_list_models(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].object == "model"
    assert models[0].max_model_len == CONTEXT_LENGTH


def test_retrieve_model(client, model):
    m = client.models.retrieve(model)
    assert m.id == model and m.max_model_len == CONTEXT_LENGTH


def test_unknown_model_404(http):
    r = http.get("/v1/models/" + urllib.parse.quote("no-such-model"))
    assert_error(r, 404, code="model_not_found", contains="no-such-model")


# ---- health and info


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200


def test_health_generate(http):
    assert http.get("/health_generate").status_code == 200


def test_get_model_info(http, model):
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True
    assert info["context_length"] == CONTEXT_LENGTH
    assert "float" in str(info["dtype"])
    assert info["served_model_name"] == model
    assert info["vocab_size"] == 49152


def test_get_server_info(http, client, model):
    client.completions.create(model=model, prompt="Hello", max_tokens=2)
    info = http.get("/get_server_info").json()
    # The server's arguments...
    assert info["max_total_tokens"] == 16384
    assert info["enable_cache_report"] is True and info["enable_metrics"] is True
    assert info["host"] == "127.0.0.1" and info["port"] == int(http.base_url.port)
    assert info["api_key"] is None
    # ...and its live state.
    s = info["stats"]
    assert {"num_running", "num_waiting", "kv_total", "kv_free", "kv_cached", "kv_used"} <= s.keys()
    assert s["kv_total"] == 16384
    assert s["kv_free"] + s["kv_cached"] + s["kv_used"] == s["kv_total"]
    assert s["kv_cached"] > 0, "the finished request's prompt stays in the prefix cache"


def test_flush_cache(server, http, client, model):
    client.completions.create(model=model, prompt="Flush me, please.", max_tokens=2)
    assert wait_idle(server, 10)["kv_cached"] > 0
    r = http.post("/flush_cache")
    assert r.status_code == 200, r.text
    s = http.get("/get_server_info").json()["stats"]
    assert s["kv_cached"] == 0 and s["kv_free"] == s["kv_total"]


def test_metrics(http, client, model):
    client.completions.create(model=model, prompt="Count me", max_tokens=2)
    r = http.get("/metrics")
    assert r.status_code == 200
    assert "radixserve_generation_tokens" in r.text
    assert "radixserve_num_running_requests" in r.text


# ---- tokenize / detokenize


def test_tokenize_detokenize_round_trip(http):
    text = "Hello world, this is radixserve."
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 3 and body["max_model_len"] == CONTEXT_LENGTH
    assert all(isinstance(t, int) for t in body["tokens"])
    back = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json()["text"] == text


def test_detokenize_rejects_bad_ids(http):
    assert_error(http.post("/detokenize", json={"tokens": [1, 10 ** 9]}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400)


# ---- /generate

GEN = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def generated(http):
    r = http.post("/generate", json={"text": "The capital of France is", "sampling_params": GEN})
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_text(generated):
    assert isinstance(generated["text"], str) and generated["text"]
    assert len(generated["output_ids"]) == 6
    meta = generated["meta_info"]
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"]["type"] == "length"


def test_generate_input_ids(http, generated):
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    r = http.post("/generate", json={"input_ids": ids, "sampling_params": GEN})
    assert r.status_code == 200
    assert r.json()["text"] == generated["text"]
    assert r.json()["output_ids"] == generated["output_ids"]


def test_generate_batch(http, generated):
    r = http.post("/generate", json={"text": ["The capital of France is", "One, two, three,"],
                                     "sampling_params": GEN})
    assert r.status_code == 200
    out = r.json()
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["text"] == generated["text"]
    assert all(len(o["output_ids"]) == 6 for o in out)


def test_generate_stream(http, generated):
    body = {"text": "The capital of France is", "sampling_params": GEN, "stream": True}
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        raw = "".join(r.iter_text())
    events = sse_json(raw)
    assert len(events) >= 2
    # Each event carries the text so far; the last one is the whole output.
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == generated["text"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_logprobs(http):
    r = http.post("/generate", json={"text": "Hello", "sampling_params": GEN, "return_logprob": True,
                                     "top_logprobs_num": 2})
    meta = r.json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 6
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


@pytest.mark.parametrize("body", [
    {"text": "x", "sampling_params": {"bogus": 1}},
    {"text": "x", "sampling_params": {"temperature": -1}},
    {"text": "x", "input_ids": [1, 2]},
    {},
    {"text": ""},
])
def test_generate_bad_requests(http, body):
    assert_error(http.post("/generate", json=body), 400)


def test_embeddings_not_supported(http, model):
    r = http.post("/v1/embeddings", json={"model": model, "input": "hello"})
    assert_error(r, 400, contains="not an embedding model")
