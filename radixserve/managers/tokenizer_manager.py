"""Tokenization and admission for the API process: turns requests into engine messages (sent through the
EngineClient) and the engine's per-step token batches into detokenized per-request streams. When the engine
process dies, its requests fail with EngineDeadError and a new engine is started (--engine-restart-limit)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from radixserve.config import ServerArgs
from radixserve.managers.detokenizer import IncrementalDetokenizer
from radixserve.managers.engine_client import EngineClient, EngineDeadError
from radixserve.managers.launch import EngineProcess, RestartBudget
from radixserve.managers.lora_registry import LoRARegistry
from radixserve.managers.messages import (AbortReq, EmbedBatch, EmbedReq, EngineInfo, FlushCacheReq, GenerateReq, Stats,
                                          StatsReq, TokenOutput)
from radixserve.model_files import load_tokenizer
from radixserve.sampling.params import SamplingParams, sample_seed

logger = logging.getLogger(__name__)

__all__ = ["EngineDeadError", "GenerationChunk", "OverloadedError", "RequestHandle", "TokenizerManager"]


class OverloadedError(RuntimeError):
    pass


@dataclass
class GenerationChunk:
    """An increment of one sequence (choice `index` of its request)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # first chunk, when asked


@dataclass
class _SeqState:
    index: int
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    completion_tokens: int = 0
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None


@dataclass
class Embedding:
    """One text's embedding: little-endian float32 bytes, and the tokens it took."""

    data: bytes
    prompt_tokens: int


@dataclass
class _EmbedState:
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)


class RequestHandle:
    """A submitted request: iterate it for the chunks of its sequences (tagged by index). Leaving the
    iteration early (client gone, error) aborts whatever is still running in the engine."""

    def __init__(self, manager: "TokenizerManager", sub_rids: list[str], constrained: bool = False):
        self.manager, self.sub_rids = manager, sub_rids
        self.constrained = constrained  # an output constraint, which the engine may refuse (ready())
        self.queue: asyncio.Queue = asyncio.Queue()
        self._first: GenerationChunk | Exception | None = None

    async def ready(self) -> None:
        """Wait for the first chunk, raising the request's error if that is what came: the engine checks
        output constraints, so a stream can start only once its constraint was accepted."""
        if self._first is None:
            self._first = await self.queue.get()
        if isinstance(self._first, Exception):
            raise self._first

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        remaining = len(self.sub_rids)
        try:
            while remaining:
                chunk, self._first = (self._first, None) if self._first is not None else (await self.queue.get(), None)
                if isinstance(chunk, Exception):
                    raise chunk
                if chunk.finish_reason is not None:
                    remaining -= 1
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Release the request (aborting what still runs); idempotent."""
        self.manager._release(self.sub_rids)


class TokenizerManager:
    def __init__(self, args: ServerArgs, engine: EngineProcess):
        """engine: just started (EngineProcess(args)); the tokenizer loads while the engine loads the model."""
        self.args = args
        try:
            self.tokenizer = load_tokenizer(args.model_path, args.tokenizer_path)
            self.info = engine.wait_ready()
        except BaseException:
            engine.stop()
            raise
        self.context_length: int = self.info.context_length
        self.is_generation: bool = self.info.is_generation
        self.client = EngineClient(engine, self._on_outputs, self._on_death)
        self.lora = LoRARegistry(self.client, args, self.is_generation, self.info.loras)
        self._seqs: dict[str, _SeqState] = {}
        self._embeds: dict[str, _EmbedState] = {}
        self.num_active = 0  # sequences submitted and not yet released
        self.metrics = None  # an object with on_token/on_finish (the server's Prometheus metrics)
        self.on_fatal: Callable[[str], None] | None = None  # told once the engine is dead for good
        self.failure: str | None = None  # why, once it is
        self._budget = RestartBudget(args.engine_restart_limit)
        self._restart_task: asyncio.Task | None = None
        self._starting: EngineProcess | None = None  # an engine being started again
        self._closing = False

    @property
    def dead(self) -> bool:
        return self.client.dead

    def alive(self) -> bool:
        return self.client.alive()

    def watch(self) -> None:
        """Start receiving the engine's outputs, which is also how its death is noticed (then a new
        engine is started). Called on the event loop, once the tokenizer manager exists."""
        self.client.ensure_receiving()

    def down_reason(self) -> str:
        """Why requests cannot be served now (while not alive())."""
        if self.failure is not None:
            return self.failure
        if self._restart_task is not None and not self._restart_task.done():
            return "the engine process died and is being restarted; retry shortly"
        return "the engine process is not running"

    # ---- requests
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize_for_embedding(self, texts: list[str]) -> list[list[int]]:
        """Texts as the embedding model reads them: lower-cased first when its config says so, tokenized
        together (the fast tokenizer's batch path) with the model's special tokens."""
        if self.info.do_lower_case:
            texts = [t.lower() for t in texts]
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def embedding_dimensions(self, dimensions: int | None) -> int | None:
        """What to ask the engine for a request's `dimensions` (None: the model's own size). Only the model's
        size or one of the Matryoshka sizes it declares (or the operator gave) keep the embedding
        meaningful; anything else is a ValueError saying why."""
        size, matryoshka = self.info.embedding_dim, self.info.matryoshka_dimensions
        if dimensions is None or dimensions == size:
            return None
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        if dimensions > size:
            raise ValueError(f"dimensions {dimensions} exceeds this model's embedding size {size}")
        if not matryoshka:
            raise ValueError(f"this model does not support dimensions other than its embedding size {size}: it "
                             f"declares no Matryoshka dimensions (the operator can set --matryoshka-dimensions)")
        if dimensions not in matryoshka:
            raise ValueError(f"dimensions {dimensions} is not one of this model's Matryoshka dimensions "
                             f"{sorted(set(matryoshka) | {size})}")
        return dimensions

    def check_token_ids(self, ids: list[int], what: str = "token ids") -> None:
        """ValueError unless every id is a token of the vocabulary (checked before anything decodes them)."""
        vocab = self.info.vocab_size
        if ids and 0 <= min(ids) and max(ids) < vocab:  # the common case in C, not a loop per id
            return
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{what}: {bad!r} is not a token id of this model (ids are in [0, {vocab}))")

    def _admit(self, n: int, what: str) -> None:
        """Raise unless n more sequences fit --max-running-requests + --max-queued-requests."""
        self.client.check_alive()
        limit = self.args.max_queued_requests
        if limit is not None and n > self.args.max_running_requests + limit:
            raise ValueError(f"{what} exceeds what this server admits at once "
                             f"({self.args.max_running_requests + limit} sequences)")
        if limit is not None and self.num_active + n > self.args.max_running_requests + limit:
            raise OverloadedError(f"the server is overloaded: {self.num_active} sequences running or queued "
                                  f"(--max-running-requests {self.args.max_running_requests} + "
                                  f"--max-queued-requests {limit}); retry later")

    def submit(self, input_ids: list[int], params: SamplingParams, rid: str | None = None,
               namespace: str | None = None, prompt_logprobs: bool = False, lora_id: int = 0) -> "RequestHandle":
        """Admit a request (or raise OverloadedError at once) and send its params.n sequences to the engine.
        lora_id: from LoRARegistry.resolve (0: the base model). An output constraint is checked by the
        engine: an invalid one is the request's first (and only) item, a ValueError."""
        self.check_token_ids(input_ids, "prompt")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.lora.check_loaded(lora_id)
        self._admit(params.n, f"n={params.n}")
        self.client.ensure_receiving()
        rid = rid or uuid.uuid4().hex
        handle = RequestHandle(self, [rid] if params.n == 1 else [f"{rid}-{i}" for i in range(params.n)],
                               constrained=params.grammar is not None)
        if any(sub in self._seqs for sub in handle.sub_rids):
            raise ValueError(f"request id {rid!r} is already in use")
        for i, sub in enumerate(handle.sub_rids):
            sub_params = dataclasses.replace(params, n=1, seed=sample_seed(params.seed, i))
            self._seqs[sub] = _SeqState(i, handle.queue, IncrementalDetokenizer(
                self.tokenizer, input_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens, stop=params.stop))
            self.client.send(GenerateReq(sub, input_ids, sub_params, group=rid if params.n > 1 else None,
                                         namespace=namespace, prompt_logprobs=prompt_logprobs, lora_id=lora_id))
        self.num_active += params.n
        return handle

    async def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> list[Embedding]:
        """Embed token sequences, in order. Each is one engine request (the engine batches them with
        everyone else's), sent in one message; admitted all together or not at all. Cancelling aborts
        the unfinished ones."""
        for ids in inputs:
            self.check_token_ids(ids, "input")
        self._admit(len(inputs), f"{len(inputs)} inputs")
        self.client.ensure_receiving()
        loop = asyncio.get_running_loop()
        base = uuid.uuid4().hex
        rids = [f"{base}-{i}" for i in range(len(inputs))]
        futures = []
        for rid in rids:
            state = _EmbedState(loop.create_future())
            self._embeds[rid] = state
            futures.append(state.future)
        self.client.send(EmbedBatch([EmbedReq(rid, ids, dimensions) for rid, ids in zip(rids, inputs)]))
        self.num_active += len(inputs)
        try:
            return await asyncio.gather(*futures)
        finally:
            for rid in rids:
                state = self._embeds.pop(rid)
                self.num_active -= 1
                if not state.future.done():
                    state.future.cancel()
                    if not self.dead:
                        self.client.send(AbortReq(rid))
                elif not state.future.cancelled():
                    state.future.exception()  # retrieved: a second failure is not logged as unhandled

    def _release(self, sub_rids: list[str]) -> None:
        for sub in sub_rids:
            state = self._seqs.pop(sub, None)
            if state is None:
                continue
            self.num_active -= 1
            if not state.finished and not self.dead:
                self.client.send(AbortReq(sub))

    async def flush_cache(self) -> Stats:
        return await self.client.ask(FlushCacheReq())

    async def stats(self) -> Stats:
        return await self.client.ask(StatsReq())

    # ---- engine outputs
    def _on_outputs(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            state = self._seqs.get(out.rid)
            if state is not None and not state.finished:
                self._apply(out.rid, state, out)
            elif out.rid in self._embeds:
                self._apply_embedding(self._embeds[out.rid], out)

    def _apply_embedding(self, state: _EmbedState, out: TokenOutput) -> None:
        if state.future.done():
            return
        if out.embedding is None:
            state.future.set_exception(ValueError(out.error or f"the request finished without an embedding "
                                                                f"({out.finish_reason})"))
            return
        if self.metrics is not None:
            self.metrics.on_embedding(out.prompt_tokens, out.cached_tokens, time.perf_counter() - state.submitted)
        state.future.set_result(Embedding(out.embedding, out.prompt_tokens))

    def _apply(self, rid: str, state: _SeqState, out: TokenOutput) -> None:
        if out.finish_reason == "error":
            state.finished = True
            state.queue.put_nowait(ValueError(out.error))
            return
        chunk = GenerationChunk(state.index, prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
                                prompt_logprobs=out.prompt_logprobs)
        tok = out.token_id
        now = time.perf_counter()
        if tok is not None:
            if self.metrics is not None:
                self.metrics.on_token(state.last_token is None, now - (state.last_token or state.submitted))
            state.last_token = now
            state.completion_tokens += 1
            chunk.token_ids.append(tok)
            if out.logprob is not None:
                chunk.logprobs.append((tok, out.logprob, out.top_logprobs or []))
            # A stop token ends the text without appearing in it.
            if not (out.finish_reason == "stop" and out.matched_stop == tok):
                chunk.text = state.detok.add([tok])
        if state.detok.finished:  # a stop string: the engine may still be generating
            chunk.finish_reason, chunk.matched_stop = "stop", state.detok.matched_stop
            state.completion_tokens = state.detok.num_tokens
            if out.finish_reason is None:
                self.client.send(AbortReq(rid))
        elif out.finish_reason is not None:
            chunk.text += state.detok.flush()
            chunk.finish_reason, chunk.matched_stop = out.finish_reason, out.matched_stop
        chunk.completion_tokens = state.completion_tokens
        state.finished = chunk.finish_reason is not None
        if state.finished and self.metrics is not None:
            self.metrics.on_finish(chunk.finish_reason, out.prompt_tokens, out.cached_tokens, now - state.submitted)
        state.queue.put_nowait(chunk)

    def _on_death(self, err: EngineDeadError) -> None:
        for state in self._seqs.values():
            if not state.finished:
                state.finished = True
                state.queue.put_nowait(err)
        for emb in self._embeds.values():
            if not emb.future.done():
                emb.future.set_exception(err)
        self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        """Start a new engine after the last one died, within the restart budget; requests get 503 (from
        the dead client) meanwhile. The tokenizer and the requests' state stay; adapters loaded at run
        time are loaded into the new engine."""
        self._budget.died()
        while (delay := self._budget.next_delay()) is not None:
            logger.warning("starting the engine again in %.0f s (try %d of %d)", delay, self._budget.failures,
                           self._budget.limit)
            await asyncio.sleep(delay)
            try:
                started = await asyncio.to_thread(self._start_engine)
            except Exception as e:  # noqa: BLE001 - one more try, if the budget allows
                logger.error("the engine failed to start again: %s", e)
                continue
            if started is None:  # shutting down
                return
            engine, info = started
            dead, self.client = self.client, EngineClient(engine, self._on_outputs, self._on_death)
            dead.close()
            self.watch()
            self.info = info
            self._budget.started()
            await self.lora.reattach(self.client, info.loras)
            logger.warning("the engine is serving again")
            return
        self.failure = (f"the engine process died and was started again {self._budget.limit} times in a row "
                        f"(--engine-restart-limit); giving up")
        logger.error(self.failure)
        if self.on_fatal is not None:
            self.on_fatal(self.failure)

    def _start_engine(self) -> tuple[EngineProcess, EngineInfo] | None:
        """(In a worker thread.) A new engine process and its info once ready; None if the server began
        to shut down meanwhile (the engine is then stopped here, never left behind)."""
        engine = EngineProcess(self.args)
        self._starting = engine
        try:
            info = engine.wait_ready()
        finally:
            self._starting = None
        if self._closing:
            engine.stop()
            return None
        return engine, info

    async def stop_receiving(self) -> None:
        self._closing = True
        starting = self._starting
        if starting is not None:  # its wait_ready (in the worker thread) sees it exit and cleans up
            starting.proc.kill()
        if self._restart_task is not None:
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
        await self.client.stop_receiving()

    def shutdown(self) -> None:
        """Stop the engine process and close the sockets."""
        self.client.close()
