"""Hostile clients: whatever body a client sends, the answer is a 2xx or a 4xx with the error body, never
a 5xx, a hang or a dead engine. Property-based (hypothesis): each route's request model gives the fields;
one field at a time gets an arbitrary JSON value (huge or negative integers, booleans, nested junk), or
an unknown field is added; the known regressions are listed first."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_util import ERROR_KEYS, assert_error, assert_serving

from radixserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                        GenerateRequest, LoadLoRAAdapterRequest, TokenizeRequest,
                                        UnloadLoRAAdapterRequest)

# Any JSON value, with the integers that overflow int64 / uint64 and the usual edge values on purpose.
_SCALARS = (st.none() | st.booleans() | st.text(max_size=12)
            | st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1, 10**30])
            | st.integers(-(2**66), 2**66) | st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                             max_size=3), max_leaves=8)


def _routes(model: str) -> dict[str, tuple[type, dict]]:
    """route: (its request model, a small valid body to start from)."""
    return {
        "/v1/chat/completions": (ChatCompletionRequest, {"model": model, "messages": [
            {"role": "user", "content": "Hi"}], "max_tokens": 2}),
        "/v1/completions": (CompletionRequest, {"model": model, "prompt": "Hi", "max_tokens": 2}),
        "/generate": (GenerateRequest, {"text": "Hi", "sampling_params": {"max_new_tokens": 2}}),
        "/v1/embeddings": (EmbeddingRequest, {"model": model, "input": "Hi"}),
        "/tokenize": (TokenizeRequest, {"prompt": "Hi"}),
        "/detokenize": (DetokenizeRequest, {"tokens": [1, 2]}),
        "/load_lora_adapter": (LoadLoRAAdapterRequest, {"lora_name": "x", "lora_path": "/tmp"}),
        "/unload_lora_adapter": (UnloadLoRAAdapterRequest, {"lora_name": "x"}),
    }


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert ERROR_KEYS <= body.keys() and body["object"] == "error", body
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]


def _post(http: httpx.Client, route: str, body) -> None:
    _check(http.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"}))


KNOWN = {
    "chat seed 2**70": ("/v1/chat/completions", {"seed": 2**70}),
    "completions seed 2**70": ("/v1/completions", {"seed": 2**70}),
    "negative token id": ("/v1/completions", {"prompt": [-1]}),
    "token id past the vocabulary": ("/v1/completions", {"prompt": [[1], [10**9]]}),
    "booleans as token ids": ("/generate", {"text": None, "input_ids": [[False]], "sampling_params": None}),
    "top_k 2**70": ("/v1/completions", {"top_k": 2**70}),
    "max_tokens 2**70": ("/v1/completions", {"max_tokens": 2**70}),
    "stop_token_ids 2**70": ("/v1/chat/completions", {"stop_token_ids": [2**70]}),
    "native seed 2**64": ("/generate", {"sampling_params": {"seed": 2**64, "max_new_tokens": 2}}),
    "native max_new_tokens 2**70": ("/generate", {"sampling_params": {"max_new_tokens": 2**70}}),
    "native unknown sampling parameter": ("/generate", {"sampling_params": {"max_new_tokens": 2, "beam": 3}}),
    "true as max_tokens": ("/v1/chat/completions", {"max_tokens": True}),
    "infinite temperature": ("/v1/completions", {"temperature": 1e400}),
}


@pytest.mark.parametrize("case", KNOWN, ids=list(KNOWN))
def test_known_hostile_bodies_are_400(http, model, case):
    route, change = KNOWN[case]
    body = {**_routes(model)[route][1], **change}
    r = http.post(route, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert_error(r, 400)


def test_booleans_are_not_token_ids(http):
    """[[false]] once passed as the token id 0 (pydantic's lax integers); 0 itself is a fine prompt."""
    assert_error(http.post("/generate", json={"input_ids": [[False]], "sampling_params": None}), 400,
                 contains="input_ids")
    r = http.post("/generate", json={"input_ids": [[0]], "sampling_params": {"max_new_tokens": 4}}, timeout=60)
    assert r.status_code == 200, r.text


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_any_field_any_value(http, model, data):
    route = data.draw(st.sampled_from(sorted(_routes(model))), label="route")
    request_model, body = _routes(model)[route]
    body = dict(body)
    names = sorted(request_model.model_fields) + ["unknown_field"]
    name = data.draw(st.sampled_from(names), label="field")
    body[name] = data.draw(JSON, label="value")
    if name in ("n", "best_of") and isinstance(body[name], int) and body[name] > 4:
        body[name] = 4  # valid but slow: 128 samples of a prompt are a load test, not a fuzz case
    _post(http, route, body)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=JSON)
def test_any_body(http, body):
    for route in ("/v1/chat/completions", "/v1/completions", "/generate"):
        _post(http, route, body)


def test_engine_still_answers(server):
    """Runs after the fuzzing above (file order)."""
    assert_serving(server)
