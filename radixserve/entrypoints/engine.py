"""The offline Python API: the same TokenizerManager and engine process as the server, without HTTP (and
the same result shape as SGLang's native /generate)."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator

from radixserve.config import ServerArgs
from radixserve.managers.launch import EngineProcess
from radixserve.managers.tokenizer_manager import TokenizerManager
from radixserve.server.native import SequenceResult
from radixserve.sampling.params import SamplingParams

Prompt = str | list[int]


def _to_params(p: SamplingParams | dict | None) -> SamplingParams:
    if isinstance(p, SamplingParams):
        p.validate()
        return p
    return SamplingParams.from_dict(p)


class Engine:
    """`Engine(model_path=..., **server_args)`; generate(), async_generate(), encode() (embedding
    models), shutdown().

    The tokenizer manager lives on a private event loop in a background thread, so the synchronous
    API works anywhere and the async API works from any event loop.
    """

    def __init__(self, **kwargs: Any):
        self.args = ServerArgs.from_kwargs(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="radixserve-engine-loop", daemon=True)
        self._thread.start()
        self.tokenizer_manager: TokenizerManager = self._call(self._create())
        self.tokenizer = self.tokenizer_manager.tokenizer

    async def _create(self) -> TokenizerManager:
        tm = TokenizerManager(self.args, EngineProcess(self.args))
        tm.watch()
        return tm

    async def _submit(self, ids: list[int], params: SamplingParams, lora: str | None = None):
        tm = self.tokenizer_manager
        return tm.submit(ids, params, lora_id=await tm.lora.resolve(lora))

    async def _close(self) -> None:
        await self.tokenizer_manager.stop_receiving()
        self.tokenizer_manager.shutdown()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- generation
    def _requests(self, prompt, input_ids, sampling_params) -> tuple[list[list[int]], list[SamplingParams], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        tm = self.tokenizer_manager
        if not tm.is_generation:
            raise ValueError(f"{self.args.model_path} is an embedding model, not a generation model: use encode()")
        if prompt is not None:
            single = isinstance(prompt, str)
            ids = [tm.tokenize(p) for p in ([prompt] if single else prompt)]
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int)
            ids = [list(input_ids)] if single else [list(x) for x in input_ids]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(ids):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(ids)} prompts")
            params = [_to_params(p) for p in sampling_params]
        else:
            params = [_to_params(sampling_params)] * len(ids)
        return ids, params, single

    async def _run_one(self, ids: list[int], params: SamplingParams, lora: str | None = None) -> list[dict]:
        results = [SequenceResult() for _ in range(params.n)]
        handle = await self._submit(ids, params, lora)
        async for chunk in handle:
            results[chunk.index].add(chunk)
        return [r.to_dict(sub) for r, sub in zip(results, handle.sub_rids)]

    async def _run_all(self, ids, params, loras) -> list[list[dict]]:
        return await asyncio.gather(*(self._run_one(i, p, lo) for i, p, lo in zip(ids, params, loras)))

    @staticmethod
    def _loras(lora_path: str | list[str | None] | None, n: int) -> list[str | None]:
        if not isinstance(lora_path, list):
            return [lora_path] * n
        if len(lora_path) != n:
            raise ValueError(f"{len(lora_path)} lora_path entries for {n} prompts")
        return lora_path

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | SamplingParams | list | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 lora_path: str | list[str | None] | None = None) -> dict | list[dict]:
        """One prompt → a dict (a list of n dicts when n > 1); a list of prompts → a flat list,
        prompt-major. Each dict: text, output_ids, meta_info (finish_reason, prompt/completion/cached
        tokens, logprobs when asked). lora_path: the LoRA adapter (a loaded name or an adapter folder),
        one for all prompts or one per prompt (None: the base model)."""
        ids, params, single = self._requests(prompt, input_ids, sampling_params)
        per_prompt = self._call(self._run_all(ids, params, self._loras(lora_path, len(ids))))
        if single and params[0].n == 1:
            return per_prompt[0][0]
        return [d for group in per_prompt for d in group]

    async def async_generate(self, prompt: str | None = None, sampling_params: dict | SamplingParams | None = None,
                             input_ids: list[int] | None = None, stream: bool = False, lora_path: str | None = None):
        """Await the result dict, or with stream=True get an async iterator of increments
        ({"index", "text", "output_ids", "finish_reason", "meta_info"} with the new text/tokens only)."""
        ids, params, single = self._requests(prompt, input_ids, sampling_params)
        if not single:
            raise ValueError("async_generate takes one prompt")
        if stream:
            return self._stream(ids[0], params[0], lora_path)
        fut = asyncio.run_coroutine_threadsafe(self._run_one(ids[0], params[0], lora_path), self._loop)
        out = await asyncio.wrap_future(fut)
        return out[0] if params[0].n == 1 else out

    async def _stream(self, ids: list[int], params: SamplingParams, lora: str | None) -> AsyncIterator[dict]:
        handle = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._submit(ids, params, lora),
                                                                            self._loop))
        agen = handle.__aiter__()
        try:
            while True:
                fut = asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop)
                try:
                    c = await asyncio.wrap_future(fut)
                except StopAsyncIteration:
                    return
                yield {"index": c.index, "text": c.text, "output_ids": c.token_ids, "finish_reason": c.finish_reason,
                       "meta_info": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                                     "cached_tokens": c.cached_tokens, "matched_stop": c.matched_stop}}
        finally:  # the consumer stopped early: abort in the engine
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()

    # ---- embeddings
    def encode(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
               dimensions: int | None = None) -> list[float] | list[list[float]]:
        """Embeddings of texts (or token-id lists) from an embedding model, batched by the engine: one text
        gives one list of floats, a list gives a list of them, in order. `dimensions` truncates to one of
        the model's Matryoshka sizes (and re-normalises)."""
        import numpy as np

        tm = self.tokenizer_manager
        if tm.is_generation:
            raise ValueError(f"{self.args.model_path} is a generation model, not an embedding model: start the "
                             f"Engine with is_embedding=True (or an embedding model) to use encode()")
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if single else list(prompt)
            if not texts or not all(isinstance(t, str) and t for t in texts):
                raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
            ids = tm.tokenize_for_embedding(texts)
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int)
            ids = [list(input_ids)] if single else [list(x) for x in input_ids]
            if not ids or not all(ids):
                raise ValueError("input_ids must be a non-empty list of token ids, or a list of them")
        results = self._call(tm.embed(ids, tm.embedding_dimensions(dimensions)))
        vectors = [np.frombuffer(r.data, dtype="<f4").tolist() for r in results]
        return vectors[0] if single else vectors
    # ---- LoRA adapters
    def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> dict[str, str]:
        """Load a PEFT adapter folder; returns {name: path} of the loaded adapters. ValueError naming what
        is wrong with the files."""
        return self._call(self.tokenizer_manager.lora.load(lora_name, lora_path, pinned))

    def unload_lora_adapter(self, lora_name: str) -> dict[str, str]:
        """Unload an adapter once its running requests have finished."""
        return self._call(self.tokenizer_manager.lora.unload(lora_name))

    def flush_cache(self) -> bool:
        return self._call(self.tokenizer_manager.flush_cache()).flushed

    def get_stats(self) -> dict:
        import msgspec

        return msgspec.structs.asdict(self._call(self.tokenizer_manager.stats()))

    # ---- lifecycle
    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
