"""The FastAPI app: lifecycle, error mapping and routes (the Guard middleware does auth and limits)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve.config import ServerArgs
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.launch import EngineProcess
from radixserve.managers.tokenizer_manager import EngineDeadError, OverloadedError, TokenizerManager
from radixserve.sampling.params import SamplingParams
from radixserve.server import chat, completions, embeddings, native, openapi
from radixserve.server.common import ServingContext, as_api_error, sse_with_errors
from radixserve.server.errors import APIError, bad_request
from radixserve.server.guard import Guard
from radixserve.server.metrics import Metrics
from radixserve.server.openapi import errors, sse_or_json
from radixserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                        GenerateRequest, LoadLoRAAdapterRequest, TokenizeRequest,
                                        UnloadLoRAAdapterRequest)
from radixserve.server.responses import (ChatCompletionChunk, ChatCompletionResponse, CompletionResponse,
                                         DetokenizeResponse, EmbeddingResponse, GenerateResult, LoRAAdaptersResponse,
                                         MessageResponse, ModelCard, ModelList, TokenizeResponse)

logger = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/metrics"}  # reachable without the API key (probes, scrapers)
ADMIN_PATHS = {"/flush_cache", "/load_lora_adapter", "/unload_lora_adapter"}  # --admin-api-key, when set


# pydantic names the member of a union it tried in an error's location ("str", "list[str]",
# "function-after[...]"): not a field the client wrote.
_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|null)$|[\[\]-]")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    # A union (e.g. a prompt as text or as token ids) fails once per member: the error about a value
    # (a range, a length) says more than "not a string" from the members whose type did not match.
    err = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0])
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and _UNION_TAG.search(p))]
    field = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if err.get("type") == "extra_forbidden":
        return f"unsupported parameter: {field}", field
    if err.get("type") == "missing":
        return f"missing required parameter: {field}", field
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{field}: {msg}" if field else msg), field


class _State:
    """The tokenizer manager appears once the engine has loaded (in the background, so that /health
    can answer 503 meanwhile). An engine that cannot start, or that keeps dying, is fatal: on_fatal
    (the CLI's: stop the server, exit non-zero) is called with the reason."""

    def __init__(self, args: ServerArgs, on_fatal: Callable[[str], None] | None):
        self.args = args
        self.ctx: ServingContext | None = None
        self.error: str | None = None
        self.metrics = Metrics() if args.enable_metrics else None
        self.on_fatal = on_fatal
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        try:
            tm = TokenizerManager(self.args, EngineProcess(self.args))
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            logger.error("the engine failed to start: %s", e)
            self.fatal(f"the engine failed to start: {e}")
            return
        tm.metrics = self.metrics
        tm.on_fatal = self.fatal
        self.ctx = ServingContext(tm, self.args)
        self.loop.call_soon_threadsafe(tm.watch)
        logger.info("ready: serving %s on http://%s:%d", self.args.served_model_name, self.args.host, self.args.port)

    def fatal(self, reason: str) -> None:
        self.error = reason
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def serving(self) -> ServingContext:
        if self.ctx is None:
            raise APIError(503, self.error or "the model is still loading", headers={"Retry-After": "5"})
        if not self.ctx.tm.alive():
            raise APIError(503, self.ctx.tm.down_reason(), headers={"Retry-After": "5"})
        return self.ctx


async def _until_disconnected(request: Request, coro) -> Any:
    """Await coro, cancelling it (which aborts the request in the engine) if the client goes away."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def _respond(request: Request, handles, run, stream: bool) -> Response:
    if stream:
        try:  # a stream starts once the engine accepted its output constraints (an invalid one is a 400)
            for h in handles:
                if h.constrained:
                    await h.ready()
        except BaseException as e:
            for h in handles:
                h.close()
            if isinstance(e, Exception):
                raise as_api_error(e) from None
            raise  # cancelled: the client went away

        async def events():
            try:
                async for event in sse_with_errors(run):
                    yield event
            finally:  # also on client disconnect: Starlette cancels the body iterator
                for h in handles:
                    h.close()
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        result = await _until_disconnected(request, run)
    except Exception as e:  # noqa: BLE001
        raise as_api_error(e) from None
    finally:
        for h in handles:
            h.close()
    if result is None:
        return Response(status_code=499)  # client closed the connection; nobody reads this
    return JSONResponse(result.model_dump(exclude_none=True) if hasattr(result, "model_dump") else result)


def create_app(args: ServerArgs, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The app; on_fatal(reason) is called (from any thread) when the engine cannot serve at all."""
    state = _State(args, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        loader = threading.Thread(target=state.start, name="radixserve-loader", daemon=True)
        loader.start()
        yield
        loader.join()
        if state.ctx is not None:
            await state.ctx.tm.stop_receiving()
            state.ctx.tm.shutdown()

    app = FastAPI(title="radixserve", version=version("radixserve"), lifespan=lifespan)
    app.state.radixserve = state
    openapi.install(app, args, OPEN_PATHS, ADMIN_PATHS,
                    lambda: (state.ctx.tm.info.vocab_size, state.ctx.is_generation) if state.ctx else None)

    app.add_middleware(Guard, api_key=args.api_key, admin_api_key=args.admin_api_key, open_paths=OPEN_PATHS,
                       admin_paths=ADMIN_PATHS, max_body_bytes=args.max_body_bytes, log_requests=args.log_requests)
    if args.allowed_origins:  # browsers may call the API from these origins' pages (off by default)
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-Id"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(OverloadedError)
    @app.exception_handler(EngineDeadError)
    @app.exception_handler(LoRANotFoundError)
    @app.exception_handler(ValueError)  # validation below the HTTP layer (SamplingParams, engine limits)
    async def engine_error(request: Request, exc: Exception):
        return as_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"route {request.method} {request.url.path} not found" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, message, headers=exc.headers).response()  # 405 keeps its Allow header

    # ---- OpenAI API
    def log_request(request: Request, req) -> None:
        if args.log_requests:
            logger.info("request %s %s: %s", request.state.rid, request.url.path, req.model_dump_json(exclude_none=True))

    def generating(route: str) -> ServingContext:
        ctx = state.serving()
        ctx.require_generation(route)
        return ctx

    @app.post("/v1/chat/completions", responses={**sse_or_json(ChatCompletionResponse, ChatCompletionChunk), **errors(404)})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        log_request(request, req)
        handle, run = await chat.create_chat_completion(generating("/v1/chat/completions"), req)
        return await _respond(request, [handle], run, req.stream)

    @app.post("/v1/completions", responses={**sse_or_json(CompletionResponse, CompletionResponse), **errors(404)})
    async def completions_(req: CompletionRequest, request: Request):
        log_request(request, req)
        handles, run = await completions.create_completion(generating("/v1/completions"), req)
        return await _respond(request, handles, run, req.stream)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors(404))
    async def embeddings_(req: EmbeddingRequest, request: Request):
        log_request(request, req)
        run = embeddings.create_embedding(state.serving(), req)
        try:
            body = await _until_disconnected(request, run)
        except Exception as e:  # noqa: BLE001
            raise as_api_error(e) from None
        if body is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        return Response(body, media_type="application/json")

    def model_cards() -> list[ModelCard]:
        """The base model, then each loaded LoRA adapter as `<served name>:<adapter>`."""
        ctx = state.serving()
        return [ModelCard(id=i, root=root, parent=parent, max_model_len=ctx.tm.context_length,
                          is_generation=ctx.is_generation) for i, root, parent in ctx.model_ids()]

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=model_cards())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(404))
    async def get_model(model_id: str):
        ctx = state.serving()
        adapter = ctx.adapter_of(model_id)
        cards = model_cards()
        if adapter is None:
            return cards[0]
        card = next((c for c in cards[1:] if c.id == f"{ctx.served_model_name}:{adapter}"), None)
        if card is None:
            raise APIError(404, f"LoRA adapter {adapter!r} is not loaded; loaded: "
                                f"{ctx.tm.lora.names()}", code="model_not_found")
        return card

    # ---- SGLang's native and operational routes
    @app.get("/health", response_class=Response, responses={200: {"description": "Serving."}})
    async def health():
        state.serving()
        return Response(status_code=200)

    if args.enable_metrics:
        @app.get("/metrics", response_class=Response, responses={200: {
            "description": "Prometheus metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(await state.metrics.render(state.serving().tm), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health_generate", response_class=Response,
             responses={200: {"description": "The model generated (or embedded) a token."}})
    async def health_generate(request: Request):
        ctx = state.serving()
        if not ctx.is_generation:  # an embedding model: embed one token instead
            try:
                await ctx.tm.embed([[ctx.tm.tokenizer.cls_token_id or ctx.tm.tokenizer.eos_token_id or 0]])
            except Exception as e:  # noqa: BLE001
                raise as_api_error(e) from None
            return Response(status_code=200)
        handle = ctx.tm.submit([ctx.tm.tokenizer.eos_token_id or 0], SamplingParams(max_new_tokens=1))
        try:
            async for _ in handle:
                pass
        except Exception as e:  # noqa: BLE001
            raise as_api_error(e) from None
        return Response(status_code=200)

    @app.get("/get_model_info", response_model=dict[str, Any])
    async def get_model_info():
        ctx = state.serving()
        info = ctx.tm.info
        out = {"model_path": ctx.model_path, "tokenizer_path": args.tokenizer_path or ctx.model_path,
               "served_model_name": ctx.served_model_name, "is_generation": ctx.is_generation,
               "architecture": info.architecture, "dtype": info.dtype, "device": info.device,
               "context_length": ctx.tm.context_length, "vocab_size": info.vocab_size}
        if not ctx.is_generation:
            out.update({k: getattr(info, k) for k in ("embedding_dim", "pooling", "normalized",
                                                      "matryoshka_dimensions")})
        return out

    @app.get("/get_server_info", response_model=dict[str, Any])
    async def get_server_info():
        ctx = state.serving()
        stats = await ctx.tm.stats()
        secret = {k: "***" if getattr(args, k) else None for k in ("api_key", "admin_api_key")}
        return {**dataclasses.asdict(args), **secret,
                "max_total_tokens": ctx.tm.info.max_total_tokens,
                "stats": {"num_running": stats.num_running, "num_waiting": stats.num_waiting,
                          "kv_total": stats.kv_total, "kv_free": stats.kv_free, "kv_cached": stats.kv_cached,
                          "kv_used": stats.kv_total - stats.kv_free - stats.kv_cached,
                          "active_requests": ctx.tm.num_active}}

    @app.post("/flush_cache", response_model=MessageResponse, responses=errors(400))
    async def flush_cache():
        stats = await state.serving().tm.flush_cache()
        if not stats.flushed:
            raise bad_request("the cache cannot be flushed while requests are running")
        return {"message": "prefix cache flushed"}

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest):
        ctx = state.serving()
        ids = ctx.tm.tokenize(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx.tm.context_length}

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(req: DetokenizeRequest):
        ctx = state.serving()
        try:
            ctx.tm.check_token_ids(req.tokens, "tokens")
        except ValueError as e:
            raise bad_request(str(e), param="tokens") from None
        return {"text": ctx.tm.tokenizer.decode(req.tokens)}

    @app.post("/generate", responses={**sse_or_json(GenerateResult | list[GenerateResult], GenerateResult), **errors(403, 404)})
    async def generate(req: GenerateRequest, request: Request):
        log_request(request, req)
        handles, run = await native.create_generate(generating("/generate"), req)
        return await _respond(request, handles, run, req.stream)

    # ---- LoRA adapters at run time (SGLang's routes)
    @app.post("/load_lora_adapter", response_model=LoRAAdaptersResponse, responses=errors(403))
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        ctx = state.serving()
        ctx.check_runtime_load(req.lora_path, "lora_path")
        loaded = await ctx.tm.lora.load(req.lora_name, req.lora_path, req.pinned)
        return {"success": True, "message": f"loaded LoRA adapter {req.lora_name!r}", "loaded_adapters": loaded}

    @app.post("/unload_lora_adapter", response_model=LoRAAdaptersResponse, responses=errors(404))
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        try:
            loaded = await state.serving().tm.lora.unload(req.lora_name)
        except LoRANotFoundError as e:
            raise APIError(404, str(e), code="model_not_found", param="lora_name") from None
        return {"success": True, "message": f"unloaded LoRA adapter {req.lora_name!r}", "loaded_adapters": loaded}

    return app
