"""A server with --api-key and --served-model-name."""
from __future__ import annotations

import openai
import pytest
from server_util import assert_error, assert_serving

KEY = "secret"
NAME = "test-model"


@pytest.fixture(scope="module")
def auth_server(launch_server):
    with launch_server("--served-model-name", NAME, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def anon(auth_server):
    with auth_server.http() as c:
        yield c


BEARER = {"Authorization": f"Bearer {KEY}"}
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
    assert info["api_key"] == "***"
    assert KEY not in anon.get("/get_server_info", headers=BEARER).text


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
