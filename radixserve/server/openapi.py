"""The published contract, /openapi.json: FastAPI's schema of the routes and their pydantic models, with
the errors this server really answers instead of FastAPI's 422, which it never sends (an invalid request
is a 400 here, as on OpenAI's API). Every error has the ErrorResponse body."""
from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from radixserve.config import ServerArgs
from radixserve.server.responses import (ChatCompletionChunk, CompletionResponse, ErrorResponse, GenerateResult,
                                         StreamError)

STREAMED = (ChatCompletionChunk, CompletionResponse, GenerateResult, StreamError, ErrorResponse)

_WHY = {
    400: "The request is invalid: the message says which parameter and why.",
    401: "The API key is missing or wrong.",
    403: "The key or the server's options do not allow this.",
    404: "The model, adapter or route does not exist.",
    413: "The request body is larger than --max-body-bytes.",
    503: "The model is loading, the engine is restarting, or the server is overloaded (see Retry-After).",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's own error responses (responses= of its decorator)."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


def sse_or_json(model: Any, chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """200 of a route that answers JSON (model), or with stream: true server-sent events: each event's
    data is a chunk (JSON), or the error that ended the stream, and the last one is [DONE]."""
    payload = {"anyOf": [{"$ref": _ref(chunk)}, {"$ref": _ref(StreamError)}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "anyOf": [
        {"const": "[DONE]"}, {"contentMediaType": "application/json", "contentSchema": payload}]}}}
    return {200: {"model": model, "description": "The result, or with stream: true its events.",
                  "content": {"text/event-stream": {"schema": event}}}}


def _ref(model: type[BaseModel]) -> str:
    return f"#/components/schemas/{model.__name__}"


GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
EMBEDDING_PATHS = ("/v1/embeddings",)


def for_model(schema: dict, vocab_size: int, is_generation: bool) -> dict:
    """The schema of a server once its model is loaded: the routes of its kind only (the others answer
    400 saying which kind it is), token ids (x-token-id) within its vocabulary."""
    def bound(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: bound(v) for k, v in node.items()}
            if out.get("x-token-id"):
                out["maximum"] = vocab_size - 1
            return out
        if isinstance(node, list):
            return [bound(v) for v in node]
        return node

    other = EMBEDDING_PATHS if is_generation else GENERATION_PATHS
    out = bound(schema)
    out["paths"] = {p: item for p, item in out["paths"].items() if p not in other}
    return out


def install(app: FastAPI, args: ServerArgs, open_paths: set[str], admin_paths: set[str],
            model: Callable[[], tuple[int, bool] | None]) -> None:
    """Serve the schema with the errors every route shares: 400 and 413 where there is a body, 401
    where a key is asked (when the server has one), 403 on admin routes under --admin-api-key, and 503
    everywhere (the engine may be loading or restarting). Once the model is loaded (model() gives its
    vocabulary size and whether it generates; None before), the schema is for_model's."""
    routes_schema: dict | None = None

    def openapi() -> dict:
        nonlocal routes_schema
        if app.openapi_schema is not None:
            return app.openapi_schema
        if routes_schema is None:
            routes_schema = _routes_schema()
        loaded = model()
        if loaded is None:
            return routes_schema
        app.openapi_schema = for_model(routes_schema, *loaded)
        return app.openapi_schema

    def _routes_schema() -> dict:
        # separate_input_output_schemas=False: fields with defaults stay optional in the response
        # schemas, as the bodies leave out what is None.
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             separate_input_output_schemas=False)
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, item in schema["paths"].items():
            for op in item.values():
                responses = op["responses"]
                responses.pop("422", None)
                shared = [503]
                if "requestBody" in op or op.get("parameters"):
                    shared += [400]
                if "requestBody" in op:
                    shared += [413]
                if path not in open_paths and (args.api_key or args.admin_api_key):
                    shared += [401]
                if path in admin_paths and args.admin_api_key:
                    shared += [403]
                for status in shared:
                    responses.setdefault(str(status), {"description": _WHY[status], **error})
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        # The models the streams' events carry (the routes name only their JSON answers).
        _, streamed = models_json_schema([(m, "validation") for m in STREAMED],
                                         ref_template="#/components/schemas/{model}")
        for name, model_schema in streamed.get("$defs", {}).items():
            components.setdefault(name, model_schema)
        return schema

    app.openapi = openapi
