"""Invalid requests: the status, an OpenAI-style error body, and a server that keeps serving afterwards."""
from __future__ import annotations

import json

import openai
import pytest
from server_util import CONTEXT_LENGTH, assert_error, assert_serving

MESSAGES = [{"role": "user", "content": "Hello"}]

# (id, change to a valid chat request, text the error message must contain)
BAD_CHAT = [
    ("temperature-3", {"temperature": 3}, "temperature"),
    ("temperature-neg", {"temperature": -1}, "temperature"),
    ("top_p-0", {"top_p": 0}, "top_p"),
    ("top_p-1.5", {"top_p": 1.5}, "top_p"),
    ("top_k-0", {"top_k": 0}, "top_k"),
    ("frequency_penalty-3", {"frequency_penalty": 3}, "frequency_penalty"),
    ("presence_penalty-neg3", {"presence_penalty": -3}, "presence_penalty"),
    ("n-0", {"n": 0}, "n: input should be greater than or equal to 1"),
    ("max_tokens-0", {"max_tokens": 0}, "max_tokens"),
    ("max_completion_tokens-0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("top_logprobs-21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs-without-logprobs", {"top_logprobs": 3}, "requires logprobs"),
    ("messages-empty", {"messages": []}, "messages: list should have at least 1 item"),
    ("role-unknown", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("messages-string", {"messages": "Hello"}, "messages: input should be a valid list"),
    ("temperature-string", {"temperature": "hot"}, "temperature: input should be a valid number"),
    ("max_tokens-float", {"max_tokens": 2.5}, "max_tokens"),
    ("unknown-parameter", {"regexp": "a+"}, "unsupported parameter: regexp"),
    ("unknown-message-field", {"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "colour"),
    ("model-missing", {"model": None}, "missing required parameter: model"),
    ("over-context", {"max_tokens": CONTEXT_LENGTH}, "context length"),
    ("prompt-over-context", {"messages": [{"role": "user", "content": "hello " * (CONTEXT_LENGTH + 10)}]},
     "context length"),
    ("stop-empty-string", {"stop": [""]}, "stop"),
]


def _chat_body(model: str, change: dict) -> dict:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2}
    body.update(change)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize("change,contains", [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_request(server, http, model, change, contains):
    r = http.post("/v1/chat/completions", json=_chat_body(model, change))
    body = assert_error(r, 400, contains=contains)
    assert body["type"] == "invalid_request_error"
    assert_serving(server)


@pytest.mark.parametrize("change,contains", [
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": CONTEXT_LENGTH}, "context length"),
    ({"prompt": list(range(100, 100 + CONTEXT_LENGTH + 1))}, "context length"),
    ({"echo": "yes please"}, "echo"),
], ids=["logprobs-21", "over-context", "prompt-ids-over-context", "echo-string"])
def test_bad_completion_request(server, http, model, change, contains):
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, **change}
    assert_error(http.post("/v1/completions", json=body), 400, contains=contains)
    assert_serving(server)


def test_unknown_parameter_is_named(http, model):
    body = assert_error(http.post("/v1/chat/completions", json=_chat_body(model, {"guided_choice": ["a"]})), 400)
    assert body["param"] == "guided_choice"


def test_errors_through_the_sdk(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=3)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    assert e.value.body["object"] == "error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"guided_regex": "a+"})
    assert "guided_regex" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nonexistent", messages=MESSAGES)
    assert e.value.code == "model_not_found"


def test_malformed_json(server, http):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={
        "content-type": "application/json"})
    assert_error(r, 400, contains="JSON")
    assert_serving(server)


def test_body_not_an_object(server, http):
    r = http.post("/v1/chat/completions", content=b"[1, 2, 3]", headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_serving(server)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_404(server, http, route):
    body = {"model": "no-such-model", "max_tokens": 2, "messages": MESSAGES, "prompt": "Hi"}
    body.pop("prompt" if "chat" in route else "messages")
    err = assert_error(http.post(route, json=body), 404, code="model_not_found", contains="no-such-model")
    assert err["type"] == "not_found_error"
    assert_serving(server)


def test_unknown_route_404(server, http):
    assert_error(http.get("/v1/no/such/route"), 404, contains="/v1/no/such/route")
    assert_error(http.post("/v2/chat/completions", json={}), 404)
    assert_serving(server)


def test_wrong_method_405(http):
    assert_error(http.get("/v1/chat/completions"), 405)


def test_body_over_limit_413(server, http, model):
    body = json.dumps(_chat_body(model, {})).encode() + b" " * (32 * 1024 * 1024 + 1)
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert_serving(server)


def test_chunked_body_over_limit_413(server, http, model):
    head = json.dumps(_chat_body(model, {})).encode()

    def chunks():  # no Content-Length: httpx sends an iterator with Transfer-Encoding: chunked
        yield head
        for _ in range(33):
            yield b" " * (1024 * 1024)

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    try:
        assert_error(r, 413)
    finally:
        assert_serving(server)


def test_request_id_header(http):
    r = http.get("/health", headers={"x-request-id": "my-request-42"})
    assert r.headers["x-request-id"] == "my-request-42"
    r = http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert len(r.headers["x-request-id"]) >= 16, "errors carry a generated request id too"
