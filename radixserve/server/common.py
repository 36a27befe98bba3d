"""What chat and completions share: model check, request → SamplingParams, usage, logprob tokens, SSE."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
from typing import AsyncIterator

from transformers.convert_slow_tokenizer import bytes_to_unicode

from radixserve.config import ServerArgs
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.tokenizer_manager import EngineDeadError, GenerationChunk, OverloadedError, RequestHandle
from radixserve.server.errors import APIError, bad_request
from radixserve.server.protocol import _Sampling
from radixserve.server.responses import PromptTokensDetails, Usage

logger = logging.getLogger(__name__)

# Byte-level BPE vocabularies spell each byte as one printable character (GPT-2's mapping).
_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}

SSE_DONE = "data: [DONE]\n\n"


def _read_template(value: str | None) -> str | None:
    """--chat-template is a file path or the template itself."""
    if value and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


class ServingContext:
    """What every handler needs: the tokenizer manager, the served names and the operator's options."""

    def __init__(self, tokenizer_manager, args: ServerArgs):
        self.tm = tokenizer_manager
        self.args = args
        self.served_model_name = args.served_model_name
        self.model_path = args.model_path
        self.chat_template = _read_template(args.chat_template)
        self.is_generation: bool = tokenizer_manager.is_generation

    def require_generation(self, route: str) -> None:
        """A generation route on an embedding model (or the reverse) is the client's mistake: 400."""
        if not self.is_generation:
            raise bad_request(f"{self.served_model_name} is an embedding model, not a generation model: it serves "
                              f"/v1/embeddings, not {route}", param="model")

    def require_embedding(self) -> None:
        if self.is_generation:
            raise bad_request(f"{self.served_model_name} is a generation model, not an embedding model: it does "
                              f"not serve /v1/embeddings (start an embedding model, or this one with "
                              f"--is-embedding)", param="model")

    def adapter_of(self, model: str) -> str | None:
        """The LoRA adapter a model id names (`<served name>:<adapter>`), None for the base model;
        404 for any other model."""
        if model in (self.served_model_name, self.model_path):
            return None
        for base in (self.served_model_name, self.model_path):
            if model.startswith(base + ":") and len(model) > len(base) + 1:
                return model[len(base) + 1:]
        raise APIError(404, f"The model {model!r} does not exist; this server serves {self.served_model_name!r}",
                       code="model_not_found", param="model")

    async def resolve_lora(self, model: str, lora_path: str | None) -> int:
        """The adapter of a request, named by `model` or by `lora_path` (a loaded name, or a path that is
        loaded now); 0 for the base model. 404 naming the loaded adapters when it is not loaded."""
        adapter = self.adapter_of(model)
        if adapter is not None and lora_path and lora_path != adapter:
            raise bad_request(f"model names the LoRA adapter {adapter!r} but lora_path names {lora_path!r}",
                              param="lora_path")
        name = adapter or lora_path
        param = "model" if adapter else "lora_path"
        if name and not self.args.enable_lora:
            raise APIError(404, f"LoRA adapter {name!r} is not loaded (this server has no LoRA adapters; start "
                                f"it with --enable-lora)", code="model_not_found", param=param)
        # A path (it has a separator) not loaded yet is a folder to load now, if the operator allows it; a
        # bare name must be loaded already.
        is_path = bool(name) and os.sep in name and self.tm.lora.find(name) is None
        if is_path:
            self.check_runtime_load(name, param)
        try:
            return await self.tm.lora.resolve(name, load_folders=is_path)
        except LoRANotFoundError as e:
            raise APIError(404, str(e), code="model_not_found", param=param) from None

    def check_runtime_load(self, path: str, param: str) -> None:
        """403 unless clients may load adapters from this folder (--enable-lora-runtime-loading, within
        --lora-allowed-dirs when given): a path from a client must not make the server read any folder."""
        if not self.args.enable_lora_runtime_loading:
            raise APIError(403, "loading LoRA adapters at run time is off on this server (the operator can start "
                                "it with --enable-lora-runtime-loading or --lora-allowed-dirs DIR)",
                           code="permission_denied", param=param)
        allowed = self.args.lora_allowed_dirs
        if allowed:
            real = os.path.realpath(path)
            if not any(os.path.commonpath([real, d]) == d for d in allowed):
                raise APIError(403, f"{path!r} is outside the folders adapters may be loaded from "
                                    f"(--lora-allowed-dirs)", code="permission_denied", param=param)

    def model_ids(self) -> list[tuple[str, str, str | None]]:
        """(id, root, parent) of the base model and of each loaded adapter."""
        served = self.served_model_name
        return [(served, self.model_path, None)] + [
            (f"{served}:{name}", path, served) for name, path in sorted(self.tm.lora.loaded().items())]

    def check_prompt(self, prompt_len: int, param: str = "messages") -> None:
        """400 when a prompt leaves no room in the context or exceeds --max-prompt-tokens."""
        ctx, limit = self.tm.context_length, self.args.max_prompt_tokens
        if prompt_len >= ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens; the prompt has "
                              f"{prompt_len} tokens", param=param)
        if limit is not None and prompt_len > limit:
            raise bad_request(f"the prompt has {prompt_len} tokens; this server accepts at most {limit} "
                              f"(--max-prompt-tokens)", param=param)

    def check_output(self, requested: int, param: str) -> None:
        limit = self.args.max_output_tokens
        if limit is not None and requested > limit:
            raise bad_request(f"{param} is {requested}; this server generates at most {limit} tokens per "
                              f"request (--max-output-tokens)", param=param)

    def max_new_tokens(self, requested: int | None, prompt_len: int, param: str = "max_tokens") -> int:
        """A request's max_tokens, checked against the context length with its prompt and against
        --max-output-tokens; when it gives none, --default-max-tokens (-1: until the context is full)
        within what both leave."""
        self.check_prompt(prompt_len)
        ctx, limit = self.tm.context_length, self.args.max_output_tokens
        if requested is not None:
            if prompt_len + requested > ctx:
                raise bad_request(f"This model's maximum context length is {ctx} tokens; {prompt_len} prompt tokens "
                                  f"+ {param} {requested} exceed it", param=param)
            self.check_output(requested, param)
            return requested
        default = self.args.default_max_tokens
        room = ctx - prompt_len if limit is None else min(ctx - prompt_len, limit)
        return room if default < 0 else min(default, room)

    def usage(self, req: _Sampling, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        # As SGLang: reported only when the operator enables it and the request asks for it.
        if self.args.enable_cache_report and req.return_cached_tokens_details:
            usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached_tokens)
        return usage

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token_id: int) -> str:
        return self.tm.tokenizer.decode([token_id])

    @functools.lru_cache(maxsize=65536)
    def token_bytes(self, token_id: int) -> list[int]:
        """The token's exact bytes (a piece of a multi-byte character decodes to U+FFFD as text, but
        its bytes still concatenate to the right UTF-8)."""
        piece = self.tm.tokenizer.convert_ids_to_tokens(token_id)
        if piece and all(ch in _BYTE_OF_CHAR for ch in piece):  # byte-level BPE: one char per byte
            return [_BYTE_OF_CHAR[ch] for ch in piece]
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece or "")  # sentencepiece byte fallback
        if byte:
            return [int(byte.group(1), 16)]
        return list(self.token_text(token_id).encode())


def sse(payload) -> str:
    """One server-sent event; payload is a pydantic model or a dict."""
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Errors after the stream began cannot change the status code: send them as an error event."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # noqa: BLE001 - every failure must reach the client as an event
        yield sse({"error": as_api_error(e).body()})
    yield SSE_DONE


def as_api_error(e: Exception) -> APIError:
    """The HTTP face of an engine-side failure (a 500 is always a bug, logged by the app)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, LoRANotFoundError):
        return APIError(404, str(e), code="model_not_found", param="lora_path")
    if isinstance(e, OverloadedError):
        return APIError(503, str(e), headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    if isinstance(e, ValueError):
        return bad_request(str(e))
    logger.error("internal error while generating", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}")


async def merge_streams(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Chunks of several prompts' requests as they come, tagged with the prompt's position."""
    if len(handles) == 1:
        async for c in handles[0]:
            yield 0, c
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for c in h:
                queue.put_nowait((i, c))
        except Exception as e:  # noqa: BLE001 - re-raised in the consumer
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        open_ = len(tasks)
        while open_:
            i, c = await queue.get()
            if c is None:
                open_ -= 1
            elif isinstance(c, Exception):
                raise c
            else:
                yield i, c
    finally:  # cancelling the pumps closes their handles, which aborts unfinished requests
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
