"""The API process's side of the engine: starts the engine process, tokenizes, sends requests over
ZMQ, and turns the engine's per-step token batches into detokenized per-request streams."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from radixserve.config import ServerArgs
from radixserve.constrained.grammar import check_constraint, tokenizer_vocab
from radixserve.engine.scheduler import run_engine_process
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.detokenizer import IncrementalDetokenizer
from radixserve.managers.messages import (AbortReq, BatchOutput, EmbedBatch, EmbedReq, EngineOutput, FlushCacheReq,
                                          GenerateReq, LoadLoRAReq, LoRAAdapterInfo, LoRAUpdateOutput, Stats,
                                          StatsReq, TokenOutput, UnloadLoRAReq)
from radixserve.model.loader import load_tokenizer
from radixserve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


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

    def __init__(self, manager: "TokenizerManager", sub_rids: list[str]):
        self.manager, self.sub_rids = manager, sub_rids
        self.queue: asyncio.Queue = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        remaining = len(self.sub_rids)
        try:
            while remaining:
                chunk = await self.queue.get()
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


class SequenceResult:
    """Accumulates one sequence's chunks into SGLang's output dict: text, output_ids, meta_info."""

    def __init__(self) -> None:
        self.text, self.ids, self.logprobs, self.last = "", [], [], None

    def add(self, c: GenerationChunk) -> None:
        self.text += c.text
        self.ids += c.token_ids
        self.logprobs += c.logprobs
        self.last = c

    def to_dict(self, rid: str) -> dict:
        c = self.last
        finish: dict = {"type": c.finish_reason}
        if c.matched_stop is not None:
            finish["matched"] = c.matched_stop
        meta = {"id": rid, "finish_reason": finish if c.finish_reason else None, "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens, "cached_tokens": c.cached_tokens}
        if self.logprobs:
            meta["output_token_logprobs"] = [(lp, tok) for tok, lp, _ in self.logprobs]
            meta["output_top_logprobs"] = [[(lp, t) for t, lp in top] for _, _, top in self.logprobs]
        return {"text": self.text, "output_ids": self.ids, "meta_info": meta}


class TokenizerManager:
    def __init__(self, args: ServerArgs):
        self.args = args
        self.tokenizer = load_tokenizer(args.model_path, args.tokenizer_path)
        self._ipc_dir = tempfile.mkdtemp(prefix="radixserve-")
        in_addr, out_addr = f"ipc://{self._ipc_dir}/in", f"ipc://{self._ipc_dir}/out"
        ctx = mp.get_context("spawn")
        parent_end, child_end = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=run_engine_process,
                                args=(args, in_addr, out_addr, child_end, tokenizer_vocab(self.tokenizer)),
                                daemon=True, name="radixserve-engine")
        self.proc.start()
        child_end.close()
        try:
            info = parent_end.recv()
        except EOFError:
            info = {"error": f"the engine process exited with code {self.proc.join(5) or self.proc.exitcode}"}
        if "error" in info:
            self.shutdown()
            raise RuntimeError(f"engine failed to start: {info['error']}")
        self.info: dict = info
        self.context_length: int = info["context_length"]
        self.is_generation: bool = info["is_generation"]
        self._zmq = zmq.Context()
        self._send = self._zmq.socket(zmq.PUSH)
        self._send.connect(in_addr)
        self._azmq = zmq.asyncio.Context()
        self._recv = self._azmq.socket(zmq.PULL)
        self._recv.connect(out_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineOutput)
        self._seqs: dict[str, _SeqState] = {}
        self._embeds: dict[str, _EmbedState] = {}
        self._stats_waiters: list[asyncio.Future] = []
        self._control_waiters: dict[str, asyncio.Future] = {}  # adapter loads/unloads, by request id
        self._path_loads: dict[str, asyncio.Future] = {}  # adapters loaded by path for a request
        self._unloading: set[str] = set()  # names no new request may use, whatever a reply still lists
        # The adapters requests may use (name → id, path), as the engine last reported them.
        self.loras: dict[str, LoRAAdapterInfo] = {a["name"]: LoRAAdapterInfo(**a) for a in info.get("loras", [])}
        self._recv_task: asyncio.Task | None = None
        self.num_active = 0  # sequences submitted and not yet released
        self.metrics = None  # an object with on_token/on_finish (the server's Prometheus metrics)
        self.dead = False

    # ---- requests
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize_for_embedding(self, texts: list[str]) -> list[list[int]]:
        """Texts as the embedding model reads them: lower-cased first when its config says so, tokenized
        together (the fast tokenizer's batch path) with the model's special tokens."""
        if self.info.get("do_lower_case"):
            texts = [t.lower() for t in texts]
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def embedding_dimensions(self, dimensions: int | None) -> int | None:
        """What to ask the engine for a request's `dimensions` (None: the model's own size). Only the model's
        size or one of the Matryoshka sizes it declares (or the operator gave) keep the embedding
        meaningful; anything else is a ValueError saying why."""
        size, matryoshka = self.info["embedding_dim"], self.info["matryoshka_dimensions"]
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

    def _admit(self, n: int, what: str) -> None:
        """Raise unless n more sequences fit --max-running-requests + --max-queued-requests."""
        if self.dead:
            raise EngineDeadError("the engine process is not running")
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
        lora_id: from resolve_lora (0: the base model)."""
        check_constraint(params)
        if lora_id and all(a.id != lora_id for a in self.loras.values()):
            # Unloaded meanwhile (an unload leaves self.loras before the engine hears of it, so a request
            # that passes this check reaches the engine before the unload does).
            raise LoRANotFoundError(f"the LoRA adapter was unloaded; loaded: {self._lora_names()}")
        self._admit(params.n, f"n={params.n}")
        self._ensure_receiving()
        rid = rid or uuid.uuid4().hex
        handle = RequestHandle(self, [rid] if params.n == 1 else [f"{rid}-{i}" for i in range(params.n)])
        if any(sub in self._seqs for sub in handle.sub_rids):
            raise ValueError(f"request id {rid!r} is already in use")
        for i, sub in enumerate(handle.sub_rids):
            seed = None if params.seed is None else params.seed + i
            sub_params = dataclasses.replace(params, n=1, seed=seed)
            self._seqs[sub] = _SeqState(i, handle.queue, IncrementalDetokenizer(
                self.tokenizer, input_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens, stop=params.stop))
            self._send_msg(GenerateReq(sub, input_ids, sub_params, group=rid if params.n > 1 else None,
                                       namespace=namespace, prompt_logprobs=prompt_logprobs, lora_id=lora_id))
        self.num_active += params.n
        return handle

    async def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> list[Embedding]:
        """Embed token sequences, in order. Each is one engine request (the engine batches them with
        everyone else's), sent in one message; admitted all together or not at all. Cancelling aborts
        the unfinished ones."""
        self._admit(len(inputs), f"{len(inputs)} inputs")
        self._ensure_receiving()
        loop = asyncio.get_running_loop()
        base = uuid.uuid4().hex
        rids = [f"{base}-{i}" for i in range(len(inputs))]
        futures = []
        for rid in rids:
            state = _EmbedState(loop.create_future())
            self._embeds[rid] = state
            futures.append(state.future)
        self._send_msg(EmbedBatch([EmbedReq(rid, ids, dimensions) for rid, ids in zip(rids, inputs)]))
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
                        self._send_msg(AbortReq(rid))
                elif not state.future.cancelled():
                    state.future.exception()  # retrieved: a second failure is not logged as unhandled

    def _release(self, sub_rids: list[str]) -> None:
        for sub in sub_rids:
            state = self._seqs.pop(sub, None)
            if state is None:
                continue
            self.num_active -= 1
            if not state.finished and not self.dead:
                self._send_msg(AbortReq(sub))

    async def flush_cache(self) -> Stats:
        return await self._ask(FlushCacheReq())

    async def stats(self) -> Stats:
        return await self._ask(StatsReq())

    async def _ask(self, msg) -> Stats:
        self._ensure_receiving()
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self._send_msg(msg)
        return await fut

    # ---- LoRA adapters
    def _lora_names(self) -> str:
        return ", ".join(sorted(self.loras)) or "none"

    def _require_lora(self) -> None:
        if not self.is_generation:
            raise ValueError("LoRA adapters apply to generation models; this model is served for embeddings")
        if not self.args.enable_lora:
            raise ValueError("LoRA adapters are not enabled on this server (start it with --enable-lora)")

    async def resolve_lora(self, name_or_path: str | None) -> int:
        """The id of a loaded adapter given by name or by path; a path not loaded yet is loaded (named
        after the path). 0 for None / "" (the base model). Raises LoRANotFoundError."""
        if not name_or_path:
            return 0
        self._require_lora()
        if name_or_path in self.loras:
            return self.loras[name_or_path].id
        for a in self.loras.values():
            if os.path.abspath(a.path) == os.path.abspath(name_or_path):
                return a.id
        if not os.path.isdir(name_or_path):
            raise LoRANotFoundError(f"LoRA adapter {name_or_path!r} is not loaded; loaded: {self._lora_names()}")
        load = self._path_loads.get(name_or_path)
        if load is None:  # concurrent requests for one new path load it once
            load = asyncio.ensure_future(self.load_lora_adapter(name_or_path, name_or_path))
            self._path_loads[name_or_path] = load
            load.add_done_callback(lambda _: self._path_loads.pop(name_or_path, None))
        await asyncio.shield(load)
        return self.loras[name_or_path].id

    async def load_lora_adapter(self, name: str, path: str, pinned: bool = False) -> dict[str, str]:
        """Load a PEFT adapter folder under name; {name: path} of the adapters loaded. ValueError when
        the files are missing or unsupported (the message names what)."""
        self._require_lora()
        if not name:
            raise ValueError("lora_name must be a non-empty string")
        if name in self.loras:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded (unload it first)")
        reply = await self._control(LoadLoRAReq(uuid.uuid4().hex, name, path, pinned))
        if not reply.success:
            raise ValueError(reply.message)
        return self.loaded_adapters()

    async def unload_lora_adapter(self, name: str) -> dict[str, str]:
        """Unload an adapter once its running requests have finished (new ones are refused at once)."""
        self._require_lora()
        if name not in self.loras:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded; loaded: {self._lora_names()}")
        del self.loras[name]
        self._unloading.add(name)
        try:
            reply = await self._control(UnloadLoRAReq(uuid.uuid4().hex, name))
        finally:
            self._unloading.discard(name)
        if not reply.success:
            raise (LoRANotFoundError if reply.not_found else ValueError)(reply.message)
        return self.loaded_adapters()

    def loaded_adapters(self) -> dict[str, str]:
        return {a.name: a.path for a in self.loras.values()}

    async def _control(self, msg) -> LoRAUpdateOutput:
        if self.dead:
            raise EngineDeadError("the engine process is not running")
        self._ensure_receiving()
        fut = asyncio.get_running_loop().create_future()
        self._control_waiters[msg.req_id] = fut
        self._send_msg(msg)
        reply: LoRAUpdateOutput = await fut
        self.loras = {a.name: a for a in reply.adapters if a.name not in self._unloading}
        return reply

    def _send_msg(self, msg) -> None:
        self._send.send(self._encoder.encode(msg))

    # ---- engine outputs
    def _ensure_receiving(self) -> None:
        if self._recv_task is None or self._recv_task.done():
            self._recv_task = asyncio.get_running_loop().create_task(self._receive_loop())

    async def _receive_loop(self) -> None:
        while True:
            if not await self._recv.poll(1000):
                if not self.proc.is_alive():
                    self._engine_died()
                    return
                continue
            msg = self._decoder.decode(await self._recv.recv())
            if isinstance(msg, Stats):
                self._stats_waiters.pop(0).set_result(msg)
                continue
            if isinstance(msg, LoRAUpdateOutput):
                fut = self._control_waiters.pop(msg.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            assert isinstance(msg, BatchOutput)
            for out in msg.outputs:
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
                self._send_msg(AbortReq(rid))
        elif out.finish_reason is not None:
            chunk.text += state.detok.flush()
            chunk.finish_reason, chunk.matched_stop = out.finish_reason, out.matched_stop
        chunk.completion_tokens = state.completion_tokens
        state.finished = chunk.finish_reason is not None
        if state.finished and self.metrics is not None:
            self.metrics.on_finish(chunk.finish_reason, out.prompt_tokens, out.cached_tokens, now - state.submitted)
        state.queue.put_nowait(chunk)

    def _engine_died(self) -> None:
        self.dead = True
        logger.error("the engine process died (exit code %s)", self.proc.exitcode)
        err = EngineDeadError("the engine process died")
        for state in self._seqs.values():
            if not state.finished:
                state.finished = True
                state.queue.put_nowait(err)
        for emb in self._embeds.values():
            if not emb.future.done():
                emb.future.set_exception(err)
        for fut in [*self._stats_waiters, *self._control_waiters.values()]:
            if not fut.done():
                fut.set_exception(err)
        self._stats_waiters.clear()
        self._control_waiters.clear()

    async def stop_receiving(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)

    def shutdown(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        for name in ("_send", "_recv"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
