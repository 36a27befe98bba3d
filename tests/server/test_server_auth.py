"""A server with --api-key, --admin-api-key, --allowed-origins, --served-model-name and request limits."""
from __future__ import annotations

import openai
import pytest
from server_util import assert_error, assert_serving

KEY = "secret"
ADMIN_KEY = "admin-secret"
NAME = "test-model"
ORIGIN = "https://app.example"
PROMPT_MARK = "Zanzibar-quokka-17"  # a prompt whose text must not reach the log
MAX_BODY = 100_000


@pytest.fixture(scope="module")
def auth_server(launch_server):
    with launch_server("--served-model-name", NAME, "--admin-api-key", ADMIN_KEY, "--allowed-origins", ORIGIN,
                       "--max-body-bytes", str(MAX_BODY), "--max-prompt-tokens", "64", "--max-output-tokens", "32",
                       api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def anon(auth_server):
    with auth_server.http() as c:
        yield c


BEARER = {"Authorization": f"Bearer {KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize("method,route,body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2}),
    ("GET", "/get_server_info", None),
    ("POST", "/generate", {"text": "Hi"}),
    ("GET", "/health_generate", None),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"},
                                     {"Authorization": "Bearer secret2"}, {"x-api-key": "wrong"}],
                         ids=["none", "wrong", "no-bearer", "longer", "wrong-x-api-key"])
def test_missing_or_wrong_key_401(anon, method, route, body, headers):
    r = anon.request(method, route, json=body, headers=headers)
    err = assert_error(r, 401, code="invalid_api_key")
    assert err["type"] == "authentication_error"


def test_right_key(anon):
    assert anon.post("/v1/chat/completions", json=CHAT, headers=BEARER).status_code == 200
    assert anon.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert anon.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": KEY}).status_code == 200


def test_health_is_open(anon):
    assert anon.get("/health").status_code == 200


def test_key_is_not_echoed(anon):
    info = anon.get("/get_server_info", headers=BEARER).json()
    assert info["api_key"] == "***" and info["admin_api_key"] == "***"
    assert KEY not in anon.get("/get_server_info", headers=BEARER).text


@pytest.mark.parametrize("route, body", [("/flush_cache", None),
                                         ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}),
                                         ("/unload_lora_adapter", {"lora_name": "x"})])
def test_admin_routes_need_the_admin_key(anon, route, body):
    assert_error(anon.post(route, json=body), 401, code="invalid_api_key")
    assert_error(anon.post(route, json=body, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert_error(anon.post(route, json=body, headers=BEARER), 403, code="permission_denied", contains="admin")
    assert anon.post(route, json=body, headers=ADMIN).status_code != 401  # past the guard: the route answers


def test_admin_key_passes_everywhere(anon):
    assert anon.post("/flush_cache", headers=ADMIN).status_code == 200
    assert anon.post("/v1/chat/completions", json=CHAT, headers=ADMIN).status_code == 200


def test_cors_only_for_the_allowed_origin(anon, http):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = anon.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = anon.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN, **BEARER})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = anon.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in r.headers
    # The default server (no --allowed-origins) sends no CORS headers at all.
    r = http.post("/v1/chat/completions", json={**CHAT, "model": http.get("/v1/models").json()["data"][0]["id"]},
                  headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_no_secret_or_text_in_the_log(auth_server, anon):
    """At the default log level the log holds neither the keys nor what clients send or get."""
    body = {**CHAT, "messages": [{"role": "user", "content": f"Repeat: {PROMPT_MARK}"}], "max_tokens": 8}
    r = anon.post("/v1/chat/completions", json=body, headers=BEARER)
    assert r.status_code == 200
    output = r.json()["choices"][0]["message"]["content"]
    anon.post("/v1/chat/completions", json={**body, "regex": PROMPT_MARK + "[", "max_tokens": 2}, headers=BEARER)
    log = auth_server.log(tail=10**7)
    for secret in (KEY, ADMIN_KEY, PROMPT_MARK, *([output] if len(output) >= 16 else [])):
        assert secret not in log, secret


def test_sdk_auth(auth_server):
    with pytest.raises(openai.AuthenticationError) as e:
        auth_server.client(api_key="wrong").models.list()
    assert e.value.status_code == 401
    good = auth_server.client(api_key=KEY)
    r = good.chat.completions.create(model=NAME, messages=CHAT["messages"], max_tokens=2)
    assert r.model == NAME and r.choices[0].message.content is not None


def test_served_model_name(auth_server):
    c = auth_server.client(api_key=KEY)
    assert [m.id for m in c.models.list().data] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("other-model")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other-model", prompt="Hi", max_tokens=2)
    info = auth_server.http(headers=BEARER).get("/get_model_info").json()
    assert info["served_model_name"] == NAME
    assert_serving(auth_server, BEARER)


def test_request_limits(anon):
    big = {"model": NAME, "prompt": "x" * MAX_BODY, "max_tokens": 2}
    assert_error(anon.post("/v1/completions", json=big, headers=BEARER), 413, contains=str(MAX_BODY))
    long_prompt = {"model": NAME, "prompt": "word " * 100, "max_tokens": 2}
    assert_error(anon.post("/v1/completions", json=long_prompt, headers=BEARER), 400, contains="--max-prompt-tokens")
    assert_error(anon.post("/v1/chat/completions", json={**CHAT, "max_tokens": 33}, headers=BEARER), 400,
                 contains="--max-output-tokens")
    assert_error(anon.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 33}},
                           headers=BEARER), 400, contains="--max-output-tokens")
    r = anon.post("/v1/chat/completions", json={**CHAT, "max_tokens": 32, "ignore_eos": True}, headers=BEARER)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
