"""LoRA adapters over HTTP: one server (float32, so that greedy output is comparable with peft) started
with three adapters of the default model and at most two adapters per batch."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest
import torch
from lora_adapters import edited_adapter
from server_util import assert_error, assert_serving, sse_json, wait_idle

PROMPT = "The capital of France is"
NAMES = ("attn", "mlp", "qv")


@pytest.fixture(scope="module")
def lora_server(launch_server, default_adapters, tmp_path_factory):
    # Adapters may be loaded at run time from the test's temporary folders only. Prompts (over 4 tokens)
    # run on the dequantised weights, as peft's reference does.
    flags = ["--dtype", "float32", "--int4-decode-tokens", "4", "--enable-cache-report", "--max-loras-per-batch", "2", "--max-lora-rank", "16",
             "--lora-target-modules", "all", "--lora-paths", *[f"{n}={default_adapters[n]}" for n in NAMES],
             "--lora-allowed-dirs", str(tmp_path_factory.getbasetemp())]
    with launch_server(*flags) as s:
        yield s


@pytest.fixture(scope="module")
def lhttp(lora_server):
    with lora_server.http() as c:
        yield c


@pytest.fixture(scope="module")
def lclient(lora_server):
    c = lora_server.client()
    yield c
    c.close()


@pytest.fixture(scope="module")
def peft_greedy(default_hf_model, default_adapters, tokenizer):
    """name → peft's 12 greedy tokens after PROMPT (None → the base model's)."""
    from lora_adapters import peft_merged

    ids = torch.tensor([tokenizer.encode(PROMPT)])
    out = {}
    with torch.no_grad():
        for name in (None, "attn", "qv"):
            model = default_hf_model if name is None else peft_merged(default_hf_model, default_adapters[name])
            out[name] = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    return out


def complete(http: httpx.Client, model: str, prompt=PROMPT, **kw) -> dict:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


# ---- selection


def test_models_list_adapters(lclient, lora_server, default_adapters):
    base = lora_server.model
    models = {m.id: m for m in lclient.models.list().data}
    assert list(models) == [base] + [f"{base}:{n}" for n in sorted(NAMES)]
    card = models[f"{base}:attn"]
    assert card.parent == base and card.root == default_adapters["attn"]
    assert lclient.models.retrieve(f"{base}:qv").id == f"{base}:qv"


def test_adapter_by_model_name_matches_peft(lhttp, lora_server, peft_greedy, tokenizer):
    base = lora_server.model
    for name in (None, "attn", "qv"):
        out = complete(lhttp, base if name is None else f"{base}:{name}")
        assert out["model"] == (base if name is None else f"{base}:{name}")
        assert out["choices"][0]["text"] == tokenizer.decode(peft_greedy[name])
        gen = lhttp.post("/generate", json={"text": PROMPT, "lora_path": name,
                                            "sampling_params": {"max_new_tokens": 12, "temperature": 0}}).json()
        assert gen["output_ids"] == peft_greedy[name]
    assert peft_greedy["attn"] != peft_greedy[None] and peft_greedy["qv"] != peft_greedy[None]


def test_chat_model_name_equals_lora_path_and_stream(lclient, lora_server):
    base = lora_server.model
    messages = [{"role": "user", "content": "Name a colour."}]
    by_model = lclient.chat.completions.create(model=f"{base}:mlp", messages=messages, max_tokens=10, temperature=0)
    by_path = lclient.chat.completions.create(model=base, messages=messages, max_tokens=10, temperature=0,
                                              extra_body={"lora_path": "mlp"})
    plain = lclient.chat.completions.create(model=base, messages=messages, max_tokens=10, temperature=0)
    assert by_model.choices[0].message.content == by_path.choices[0].message.content
    assert by_model.choices[0].message.content != plain.choices[0].message.content
    stream = lclient.chat.completions.create(model=f"{base}:mlp", messages=messages, max_tokens=10, temperature=0,
                                             stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == by_model.choices[0].message.content
    n = lclient.chat.completions.create(model=f"{base}:mlp", messages=messages, max_tokens=6, temperature=0.9,
                                        n=2, seed=3)
    again = lclient.chat.completions.create(model=f"{base}:mlp", messages=messages, max_tokens=6, temperature=0.9,
                                            n=2, seed=3)
    assert [c.message.content for c in n.choices] == [c.message.content for c in again.choices]
    text = by_model.choices[0].message.content
    stop = text.strip().split()[-1] if len(text.split()) > 1 else text.strip()[-1]
    cut = lclient.chat.completions.create(model=f"{base}:mlp", messages=messages, max_tokens=10, temperature=0,
                                          stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content


def test_generate_batch_lora_path_per_prompt(lhttp):
    texts = ["Hello, my name is", "The sky is", "def add(a, b):", "The sky is"]
    loras = [None, "attn", "qv", "mlp"]  # three adapters with two per batch: some wait
    params = {"max_new_tokens": 8, "temperature": 0}
    batch = lhttp.post("/generate", json={"text": texts, "lora_path": loras, "sampling_params": params}).json()
    alone = [lhttp.post("/generate", json={"text": t, "lora_path": lo, "sampling_params": params}).json()
             for t, lo in zip(texts, loras)]
    assert [b["output_ids"] for b in batch] == [a["output_ids"] for a in alone]
    assert batch[1]["output_ids"] != batch[3]["output_ids"]
    r = lhttp.post("/generate", json={"text": texts, "lora_path": ["attn"], "sampling_params": params})
    assert_error(r, 400, contains="lora_path lists 1 adapters for 4 prompts")


def test_adapter_with_json_schema(lhttp, lora_server):
    """Grammar bitmasks apply to adapter rows as to any: sampled outputs of adapters and the base
    model in one batch all validate."""
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False}
    body = {"prompt": "A city as JSON:", "max_tokens": 60, "temperature": 1.0, "seed": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}
    models = [lora_server.model] + [f"{lora_server.model}:{n}" for n in NAMES]
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(lambda m: lhttp.post("/v1/completions", json={"model": m, **body}), models))
    for r in replies:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_cache_isolation(lhttp, lora_server):
    base = lora_server.model
    prompt = "A long shared prompt about caching, repeated to be long enough to matter. " * 4 + PROMPT
    details = {"return_cached_tokens_details": True}
    assert lhttp.post("/flush_cache").status_code == 200
    plain = complete(lhttp, base, prompt, **details)
    adapter = complete(lhttp, f"{base}:qv", prompt, **details)
    assert adapter["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = complete(lhttp, f"{base}:qv", prompt, **details)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 40
    assert again["choices"][0]["text"] == adapter["choices"][0]["text"] != plain["choices"][0]["text"]
    assert complete(lhttp, base, prompt, **details)["usage"]["prompt_tokens_details"]["cached_tokens"] > 40


# ---- errors


def test_unknown_adapter_404(lhttp, lora_server):
    base = lora_server.model
    for body in ({"model": f"{base}:nope"}, {"model": base, "lora_path": "nope"}):
        r = lhttp.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **body})
        assert_error(r, 404, code="model_not_found", contains="nope")
        assert "attn, mlp, qv" in r.json()["message"]
    r = lhttp.post("/v1/chat/completions", json={"model": f"{base}:attn", "lora_path": "qv", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
    assert_error(r, 400, contains="lora_path names 'qv'")
    assert_error(lhttp.post("/generate", json={"text": "Hi", "lora_path": "nope"}), 404, code="model_not_found")
    assert_error(lhttp.get(f"/v1/models/{base}:nope"), 404, code="model_not_found", contains="nope")
    assert_serving(lora_server)


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, default_adapters, tiny_adapters) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-adapters")

    def variant(name: str, src: str, **config) -> str:
        return edited_adapter(root, src, name, config)

    empty = root / "empty"
    empty.mkdir()
    no_weights = variant("no_weights", default_adapters["qv"])
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    return {
        "dora": variant("dora", default_adapters["qv"], use_dora=True),
        "rank": variant("rank", default_adapters["qv"], r=64),
        "other_model": tiny_adapters["r4_qv"],
        "no_config": str(empty),
        "no_weights": no_weights,
        "missing": str(root / "does-not-exist"),
    }


@pytest.mark.parametrize("case, message", [
    ("dora", "DoRA"), ("rank", "rank 64, above --max-lora-rank 16"), ("other_model", "another base model"),
    ("no_config", "no adapter_config.json"), ("no_weights", "has no weights"), ("missing", "not a directory"),
])
def test_load_bad_adapter_400(lhttp, lora_server, bad_adapters, case, message):
    r = lhttp.post("/load_lora_adapter", json={"lora_name": case, "lora_path": bad_adapters[case]})
    assert_error(r, 400, contains=message)
    assert f"{lora_server.model}:{case}" not in [m["id"] for m in lhttp.get("/v1/models").json()["data"]]
    assert_serving(lora_server)


def test_load_use_unload(lhttp, lora_server, default_adapters, peft_greedy):
    base = lora_server.model
    r = lhttp.post("/load_lora_adapter", json={"lora_name": "attn2", "lora_path": default_adapters["attn"]})
    assert r.status_code == 200, r.text
    assert r.json()["loaded_adapters"]["attn2"] == default_adapters["attn"]
    assert_error(lhttp.post("/load_lora_adapter", json={"lora_name": "attn2", "lora_path": default_adapters["qv"]}),
                 400, contains="already loaded")
    gen = lhttp.post("/generate", json={"text": PROMPT, "lora_path": "attn2",
                                        "sampling_params": {"max_new_tokens": 12, "temperature": 0}}).json()
    assert gen["output_ids"] == peft_greedy["attn"]
    r = lhttp.post("/unload_lora_adapter", json={"lora_name": "attn2"})
    assert r.status_code == 200 and "attn2" not in r.json()["loaded_adapters"]
    assert f"{base}:attn2" not in [m["id"] for m in lhttp.get("/v1/models").json()["data"]]
    assert_error(complete_raw(lhttp, f"{base}:attn2"), 404, code="model_not_found")
    err = assert_error(lhttp.post("/unload_lora_adapter", json={"lora_name": "attn2"}), 404, code="model_not_found",
                       contains="not loaded")
    assert err["param"] == "lora_name"
    assert_error(lhttp.post("/load_lora_adapter", json={"lora_name": "", "lora_path": "x"}), 400)


def complete_raw(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})


def test_lora_path_folder_is_loaded(lhttp, lora_server, default_adapters):
    path = default_adapters["all"]
    out = lhttp.post("/generate", json={"text": PROMPT, "lora_path": path,
                                        "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert out.status_code == 200, out.text
    assert f"{lora_server.model}:{path}" in [m["id"] for m in lhttp.get("/v1/models").json()["data"]]
    assert lhttp.post("/unload_lora_adapter", json={"lora_name": path}).status_code == 200


def test_unload_waits_for_running_requests(lora_server, default_adapters):
    """A streaming request of the adapter keeps going while an unload is pending; the unload returns
    after the stream has finished, and new requests for the adapter are refused meanwhile."""
    base = lora_server.model
    with lora_server.http() as http:
        assert http.post("/load_lora_adapter", json={"lora_name": "tmp", "lora_path": default_adapters["qv"]}
                         ).status_code == 200
    first_chunk = concurrent.futures.Future()

    def stream() -> tuple[list[dict], float]:
        with lora_server.http() as http:
            with http.stream("POST", "/v1/completions", json={
                    "model": f"{base}:tmp", "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                raw = ""
                for piece in r.iter_text():
                    raw += piece
                    if not first_chunk.done():
                        first_chunk.set_result(None)
            return sse_json(raw), time.monotonic()

    def unload() -> tuple[httpx.Response, float]:
        with lora_server.http() as http:
            r = http.post("/unload_lora_adapter", json={"lora_name": "tmp"})
        return r, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream)
        first_chunk.result(timeout=60)
        unloading = pool.submit(unload)
        time.sleep(0.3)
        with lora_server.http() as http:
            assert_error(complete_raw(http, f"{base}:tmp"), 404, code="model_not_found")
        events, stream_end = streaming.result(timeout=120)
        response, unload_end = unloading.result(timeout=120)
    assert response.status_code == 200, response.text
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert unload_end >= stream_end - 0.5  # it waited for the stream
    assert wait_idle(lora_server, 30)["kv_used"] == 0


def test_lora_disabled_server(http, model):
    """The default server has no adapters: model:adapter is an unknown model, loading is refused."""
    assert_error(complete_raw(http, f"{model}:x"), 404, code="model_not_found", contains="--enable-lora")
    assert_error(http.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}), 403,
                 code="permission_denied", contains="--enable-lora-runtime-loading")


def test_loading_outside_the_allowed_dirs_403(lhttp, lora_server):
    """A client's path must not make the server read any folder: only those under --lora-allowed-dirs."""
    for r in (lhttp.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": "/usr"}),
              lhttp.post("/generate", json={"text": "Hi", "lora_path": "/usr"}),
              lhttp.post("/v1/completions", json={"model": lora_server.model, "prompt": "Hi",
                                                  "lora_path": "/usr/../tmp"})):
        assert_error(r, 403, code="permission_denied", contains="--lora-allowed-dirs")
    assert "/usr" not in lhttp.get("/v1/models").text


def test_adapters_loaded_at_run_time_survive_an_engine_restart(lhttp, lora_server, default_adapters, peft_greedy):
    """Last in this module: the engine is killed; the new one serves the --lora-paths adapters and, loaded
    again, those loaded at run time."""
    from test_server_supervision import RESTART_TIMEOUT_S, _engine_pid

    r = lhttp.post("/load_lora_adapter", json={"lora_name": "attn2", "lora_path": default_adapters["attn"]})
    assert r.status_code == 200, r.text
    os.kill(_engine_pid(lora_server.proc.pid), signal.SIGKILL)
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while lhttp.get("/health").status_code == 200:  # until the death is noticed
        assert time.monotonic() < deadline, lora_server.log()
        time.sleep(0.1)
    while lhttp.get("/health").status_code != 200 or "attn2" not in lhttp.get("/v1/models").text:
        assert time.monotonic() < deadline, lora_server.log()
        time.sleep(0.5)
    ids = [m["id"] for m in lhttp.get("/v1/models").json()["data"]]
    assert {f"{lora_server.model}:{n}" for n in (*NAMES, "attn2")} <= set(ids)
    r = lhttp.post("/generate", json={"text": PROMPT, "lora_path": "attn2",
                                      "sampling_params": {"max_new_tokens": 12, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == peft_greedy["attn"]
