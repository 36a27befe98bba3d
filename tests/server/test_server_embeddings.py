"""/v1/embeddings end to end: the real server on the default embedding model (all-MiniLM-L6-v2), driven
by the official `openai` client and httpx, checked against sentence-transformers on the same folder.

One embedding server for the module (float32, so that the oracle comparison is tight), with an API key,
metrics, admission limits and operator Matryoshka sizes; the generation server of conftest answers the
cross-kind checks."""
from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from server_util import Server, assert_error, stats, wait_idle

from embedding_texts import cosines, make_texts

KEY = "embedding-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DIM = 384
MAX_LEN = 256  # the folder's sentence-transformers max_seq_length
VOCAB = 30522
RUNNING, QUEUED = 16, 48
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def embed_server(launch_server) -> Server:
    with launch_server("--is-embedding", "--dtype", "float32", "--enable-metrics",
                       "--max-running-requests", str(RUNNING), "--max-queued-requests", str(QUEUED),
                       "--matryoshka-dimensions", "128", "256", api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def eclient(embed_server) -> openai.OpenAI:
    c = embed_server.client(api_key=KEY)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ehttp(embed_server) -> httpx.Client:
    with embed_server.http(headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def st_model(default_embedding_model):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_embedding_model, device="cpu")


def embed_floats(http: httpx.Client, model: str, inp, **kw) -> dict:
    r = http.post("/v1/embeddings", json={"model": model, "input": inp, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_serves_embeddings(server: Server) -> None:
    """The server still answers /health and a normal embedding request."""
    with server.http(headers=AUTH) as http:
        assert http.get("/health").status_code == 200
        body = embed_floats(http, server.model, "still here")
        assert len(body["data"][0]["embedding"]) == DIM


# ---------------------------------------------------------------- shapes and formats

def test_inputs_through_the_openai_client(embed_server, eclient, ehttp):
    model = embed_server.model
    text = "The quick brown fox jumps over the lazy dog."
    ids = ehttp.post("/tokenize", json={"prompt": text}).json()["tokens"]
    one = eclient.embeddings.create(model=model, input=text)  # the client asks for base64 and decodes it
    assert one.object == "list" and one.model == model and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0 and len(one.data[0].embedding) == DIM
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids)
    vec = np.array(one.data[0].embedding)
    assert abs(np.linalg.norm(vec) - 1) < 1e-5

    many = eclient.embeddings.create(model=model, input=["Hello!", text, "A third, longer sentence about cats."],
                                     user="someone")
    assert [d.index for d in many.data] == [0, 1, 2]
    np.testing.assert_allclose(many.data[1].embedding, vec, atol=1e-6)
    assert many.usage.prompt_tokens > len(ids)

    by_ids = eclient.embeddings.create(model=model, input=ids)
    np.testing.assert_allclose(by_ids.data[0].embedding, vec, atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids)
    by_lists = eclient.embeddings.create(model=model, input=[ids, ids[:4]])
    np.testing.assert_allclose(by_lists.data[0].embedding, vec, atol=1e-6)
    assert by_lists.usage.prompt_tokens == len(ids) + 4


def test_base64_is_little_endian_float32_of_the_float_output(embed_server, eclient, ehttp):
    texts = ["base64 please", "and another one"]
    floats = embed_floats(ehttp, embed_server.model, texts)  # encoding_format defaults to float
    raw = eclient.embeddings.create(model=embed_server.model, input=texts, encoding_format="base64")
    for f, b in zip(floats["data"], raw.data):
        assert isinstance(b.embedding, str)
        decoded = np.frombuffer(base64.b64decode(b.embedding), dtype="<f4")
        # Two forward passes agree to float32 rounding; a wrong byte order or width would not come close.
        assert decoded.shape == (DIM,)
        np.testing.assert_allclose(decoded, f["embedding"], rtol=0, atol=1e-6)


def test_dimensions_truncate_and_renormalise(embed_server, eclient):
    text = "Matryoshka embeddings nest smaller ones inside."
    full = np.array(eclient.embeddings.create(model=embed_server.model, input=text).data[0].embedding)
    for dims in (128, 256, DIM):
        out = eclient.embeddings.create(model=embed_server.model, input=[text, text], dimensions=dims)
        for d in out.data:
            v = np.array(d.embedding)
            assert v.shape == (dims,)
            np.testing.assert_allclose(v, full[:dims] / np.linalg.norm(full[:dims]), atol=1e-6)


# ---------------------------------------------------------------- the oracle

def test_matches_sentence_transformers_in_one_batch_and_concurrently(embed_server, st_model):
    texts = make_texts(24, seed=11)
    ref = st_model.encode(texts, normalize_embeddings=True)
    model = embed_server.model
    client = embed_server.client(api_key=KEY)
    try:
        batch = client.embeddings.create(model=model, input=texts, encoding_format="float")
        together = np.array([d.embedding for d in batch.data])
        assert cosines(together, ref).min() >= MIN_COSINE
        with ThreadPoolExecutor(16) as pool:  # 16 requests in flight at once
            singles = list(pool.map(lambda t: client.embeddings.create(model=model, input=t,
                                                                        encoding_format="float"), texts))
    finally:
        client.close()
    apart = np.array([s.data[0].embedding for s in singles])
    assert cosines(apart, ref).min() >= MIN_COSINE
    np.testing.assert_allclose(apart, together, atol=1e-5)  # batch-invariant


# ---------------------------------------------------------------- errors

LONG_TEXT = "word " * 300  # 302 tokens with [CLS] and [SEP]

BAD_REQUESTS = {
    "empty list": ({"input": []}, "must not be an empty list"),
    "empty string": ({"input": ""}, "empty string"),
    "empty string in a list": ({"input": ["ok", ""]}, "item 1 is an empty string"),
    "empty token list": ({"input": [[1, 2], []]}, "item 1 is an empty list of token ids"),
    "too long": ({"input": LONG_TEXT}, f"302 tokens, more than this model's maximum input length of {MAX_LEN}"),
    "too long in a list": ({"input": ["short", LONG_TEXT]}, "input[1] has 302 tokens"),
    "too many ids": ({"input": [101] * (MAX_LEN + 1)}, f"{MAX_LEN + 1} tokens"),
    "number": ({"input": 5}, "must be a string, a list of strings, a list of token ids"),
    "floats": ({"input": [1.5, 2.0]}, "must be a string, a list of strings"),
    "mixed": ({"input": ["a", 1]}, "must be a string, a list of strings"),
    "booleans": ({"input": [True, False]}, "must be a string, a list of strings"),
    "nested mixed": ({"input": [[1, 2], "a"]}, "must be a string, a list of strings"),
    "missing input": ({}, "missing required parameter: input"),
    "id over vocab": ({"input": [101, VOCAB]}, f"input: {VOCAB} is not a token id of this model (ids are in [0, {VOCAB}))"),
    "negative id": ({"input": [[101], [-1]]}, "input.1.0: Input should be greater than or equal to 0"),
    "encoding": ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    "dimensions zero": ({"input": "x", "dimensions": 0}, "greater than or equal to 1"),
    "dimensions negative": ({"input": "x", "dimensions": -5}, "greater than or equal to 1"),
    "dimensions too big": ({"input": "x", "dimensions": 500}, "exceeds this model's embedding size 384"),
    "dimensions not matryoshka": ({"input": "x", "dimensions": 100}, "not one of this model's Matryoshka dimensions"),
    "dimensions type": ({"input": "x", "dimensions": "many"}, "dimensions"),
    "unknown parameter": ({"input": "x", "temperature": 0.5}, "unsupported parameter: temperature"),
}


def test_invalid_requests_get_400_and_serving_continues(embed_server, ehttp):
    for name, (body, expected) in BAD_REQUESTS.items():
        r = ehttp.post("/v1/embeddings", json={"model": embed_server.model, **body})
        err = assert_error(r, 400, contains=expected)
        assert err["type"] == "invalid_request_error", name
    assert_error(ehttp.post("/v1/embeddings", json={"model": "other-model", "input": "x"}), 404,
                 code="model_not_found")
    assert_serves_embeddings(embed_server)


def test_generation_routes_on_an_embedding_model(embed_server, ehttp):
    model = embed_server.model
    for path, body in (("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"model": model, "prompt": "hi"}),
                       ("/generate", {"text": "hi"})):
        assert_error(ehttp.post(path, json=body), 400, contains="is an embedding model, not a generation model")
    assert_error(ehttp.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}), 403,
                 code="permission_denied", contains="--enable-lora-runtime-loading")
    assert_error(ehttp.post("/v1/embeddings", json={"model": f"{model}:x", "input": "hi"}), 404,
                 code="model_not_found", contains="LoRA adapters apply to generation models")
    assert_serves_embeddings(embed_server)


def test_embeddings_on_a_generation_model(server, http):
    r = http.post("/v1/embeddings", json={"model": server.model, "input": "hi"})
    assert_error(r, 400, contains="is a generation model, not an embedding model")
    assert http.get("/v1/models").json()["data"][0]["is_generation"] is True


def test_api_key_is_required(embed_server):
    with embed_server.http() as http:
        r = http.post("/v1/embeddings", json={"model": embed_server.model, "input": "x"})
        assert_error(r, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        embed_server.client(api_key="wrong").embeddings.create(model=embed_server.model, input="x")


# ---------------------------------------------------------------- model info, health, metrics

def test_model_info_says_embedding(embed_server, eclient, ehttp):
    card = ehttp.get("/v1/models").json()["data"][0]
    assert card["is_generation"] is False and card["max_model_len"] == MAX_LEN
    assert eclient.models.retrieve(embed_server.model).id == embed_server.model
    info = ehttp.get("/get_model_info").json()
    assert info["is_generation"] is False and info["architecture"] == "BertModel"
    assert (info["embedding_dim"], info["pooling"], info["normalized"]) == (DIM, "mean", True)
    assert info["matryoshka_dimensions"] == [128, 256] and info["context_length"] == MAX_LEN
    assert ehttp.get("/health_generate").status_code == 200


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_embeddings(embed_server, ehttp):
    before = _metric(ehttp.get("/metrics").text, "radixserve_embedding_inputs_total")
    embed_floats(ehttp, embed_server.model, ["one", "two", "three"])
    text = ehttp.get("/metrics").text
    assert _metric(text, "radixserve_embedding_inputs_total") == before + 3
    assert _metric(text, "radixserve_num_queued_requests") == 0


# ---------------------------------------------------------------- admission and disconnects

def _busy_request(server: Server, n: int, results: list) -> threading.Thread:
    def run():
        with server.http(headers=AUTH) as http:
            results.append(http.post("/v1/embeddings", json={"model": server.model, "input": [LONG_TEXT[:1200]] * n}))

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait_active(server: Server, at_least: int) -> None:
    deadline = time.monotonic() + 30
    while stats(server, AUTH)["active_requests"] < at_least:
        assert time.monotonic() < deadline, "the request never became active"
        time.sleep(0.01)


def test_overload_gets_503_and_oversized_requests_400(embed_server, ehttp):
    model = embed_server.model
    too_many = ehttp.post("/v1/embeddings", json={"model": model, "input": ["x"] * (RUNNING + QUEUED + 1)})
    assert_error(too_many, 400, contains="exceeds what this server admits at once")
    results: list = []
    busy = _busy_request(embed_server, RUNNING + QUEUED - 4, results)
    _wait_active(embed_server, RUNNING + QUEUED - 4)
    r = ehttp.post("/v1/embeddings", json={"model": model, "input": ["a", "b", "c", "d", "e"]})
    assert_error(r, 503, contains="overloaded")
    assert r.headers.get("retry-after")
    busy.join(120)
    assert results[0].status_code == 200 and len(results[0].json()["data"]) == RUNNING + QUEUED - 4
    assert_serves_embeddings(embed_server)


def test_client_disconnect_aborts_queued_texts(embed_server, ehttp):
    before = _metric(ehttp.get("/metrics").text, "radixserve_embedding_inputs_total")
    with httpx.Client(base_url=embed_server.url, headers=AUTH, timeout=0.3) as http:
        with pytest.raises(httpx.TimeoutException):
            http.post("/v1/embeddings", json={"model": embed_server.model, "input": [LONG_TEXT[:1200]] * 60})
    s = wait_idle(embed_server, 60, AUTH)
    assert s["active_requests"] == 0 and s["num_waiting"] == 0
    # The texts still queued when the client left were never embedded.
    assert _metric(ehttp.get("/metrics").text, "radixserve_embedding_inputs_total") < before + 60
    assert_serves_embeddings(embed_server)
