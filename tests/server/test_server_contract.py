"""The published contract is the real one: schemathesis generates requests from /openapi.json (valid
ones and invalid ones) for every operation of the running server and runs all its checks: no server
error, responses that match their documented schema, status code and content type, invalid data
refused and valid data accepted."""
from __future__ import annotations

import schemathesis
from conftest import DEFAULT_FLAGS
from hypothesis import HealthCheck, settings

from radixserve.config import ServerArgs, default_model_path
from radixserve.model_files import gguf_field, gguf_reader
from radixserve.sampling.params import MAX_N
from radixserve.server.app import create_app
from radixserve.server.openapi import for_model
from radixserve.server.protocol import MAX_INT, MAX_NAME_CHARS

MODEL = default_model_path()  # the shared server's served name (its model path)
VOCAB = len(gguf_field(gguf_reader(MODEL), "tokenizer.ggml.tokens"))
# The schema the shared server publishes (test_published_schema checks that it is this one), built here
# so that the operations are known when pytest collects the tests.
ARGS = ServerArgs(**{flag.removeprefix("--").replace("-", "_"): True for flag in DEFAULT_FLAGS})
schema = schemathesis.openapi.from_dict(for_model(create_app(ARGS).openapi(), VOCAB, is_generation=True))

# Generated requests reach generation: the served model's name, and few tokens (the generator would
# otherwise ask for thousands of tokens and samples, which is a load test, not a contract test). Values
# beyond the schema's own limits are left alone: they are the invalid cases.
SMALL = {"max_tokens": (4, MAX_INT), "max_completion_tokens": (4, MAX_INT), "max_new_tokens": (4, MAX_INT),
         "n": (2, MAX_N), "best_of": (2, MAX_N)}


def _small(body: dict) -> None:
    for key, (cap, limit) in SMALL.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and cap < value <= limit:
            body[key] = cap


# What a schema cannot state is supplied like the model's name: output constraints that compile (a JSON
# schema in the supported subset, a regex, an EBNF grammar; the engine answers 400 naming what it cannot
# compile) and the rules between fields that JSON Schema has no words for. Only values the schema already
# accepts are replaced, so that an invalid case stays invalid.
OBJECT_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _supply(body: dict) -> None:
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict):
            function["parameters"] = OBJECT_SCHEMA
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        fmt["json_schema"]["schema"] = OBJECT_SCHEMA
    for key, value in (("regex", "[a-z]{1,4}"), ("ebnf", 'root ::= "yes" | "no"')):
        if isinstance(body.get(key), str):
            body[key] = value
    _relate(body)
    params = body.get("sampling_params")
    if isinstance(params, dict):
        given = [k for k in ("regex", "ebnf", "json_schema", "structural_tag") if params.get(k) is not None]
        for key, value in (("regex", "[a-z]{1,4}"), ("ebnf", 'root ::= "yes" | "no"'), ("json_schema", OBJECT_SCHEMA)):
            if key in given:
                params[key] = value
        if given == ["structural_tag"]:  # alone (with another it is an invalid case: keep it)
            params["structural_tag"] = None


def _relate(body: dict) -> None:
    """The rules between fields: unique tool names, a named tool_choice among the tools, a forced tool
    call with no other output constraint, continue_final_message after an assistant message, best_of >= n,
    one lora_path per prompt."""
    tools = [t["function"] for t in body.get("tools") or []
             if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)]
    for i, function in enumerate(tools):
        if len(function["name"]) <= 60:
            function["name"] += f"_{i}"
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and tools:
        choice["function"]["name"] = tools[0]["name"]
    if choice == "required" or isinstance(choice, dict):
        for key in ("regex", "ebnf", "response_format"):
            body.pop(key, None)
    messages = body.get("messages")
    if body.get("continue_final_message") is True and isinstance(messages, list) and messages and not (
            isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"):
        body["continue_final_message"] = False
    lora = body.get("lora_path")
    if isinstance(lora, list) and all(x is None or isinstance(x, str) for x in lora):  # /generate: one per prompt
        body["lora_path"] = None
    n, best_of = body.get("n", 1), body.get("best_of")
    if isinstance(n, int) and isinstance(best_of, int) and 1 <= best_of < n <= MAX_N:
        body["best_of"] = n


@schema.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        if isinstance(body.get("model"), str) and len(body["model"]) <= MAX_NAME_CHARS:
            body["model"] = MODEL
        _small(body)
        _supply(body)
        if isinstance(body.get("sampling_params"), dict):
            _small(body["sampling_params"])
    return body


def test_published_schema(http, server):
    assert server.model == MODEL
    assert http.get("/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_contract(case, server):
    case.call_and_validate(base_url=server.url, timeout=60)


def test_native_sampling_params_are_the_engines():
    """/generate's sampling_params model lists exactly SamplingParams' fields."""
    import dataclasses

    from radixserve.sampling.params import SamplingParams
    from radixserve.server.protocol import NativeSamplingParams

    assert set(NativeSamplingParams.model_fields) == {f.name for f in dataclasses.fields(SamplingParams)}
