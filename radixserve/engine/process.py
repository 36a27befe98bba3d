"""The engine process: `python -m radixserve.engine.process`, started by the launcher
(entrypoints/launch.py), which writes an `EngineStart` to its stdin. It loads the model, answers the
handshake, then loops: receive messages (each type has one handler), run a step, send the outputs."""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol, runtime_checkable

import msgspec
import zmq

from radixserve.config import ServerArgs
from radixserve.managers.messages import (AbortReq, BatchOutput, EmbedBatch, EmbedReq, EngineFailed, EngineInfo,
                                          EngineInput, EngineReady, EngineStart, FlushCacheReq, GenerateReq,
                                          LoadLoRAReq, LoRAUpdateOutput, Stats, StatsReq, TokenOutput,
                                          UnloadLoRAReq)

logger = logging.getLogger(__name__)


@runtime_checkable
class EngineScheduler(Protocol):
    """What the loop needs of a scheduler (Scheduler for decoders, EncoderScheduler for BERT encoders).
    No I/O: the loop feeds it messages and takes its outputs."""

    def info(self) -> EngineInfo: ...
    def submit(self, msg: GenerateReq | EmbedReq) -> None: ...
    def abort(self, rid: str) -> None: ...
    def flush_cache(self) -> bool: ...
    def stats(self, flushed: bool = False) -> Stats: ...
    def load_lora(self, msg: LoadLoRAReq) -> None: ...
    def unload_lora(self, msg: UnloadLoRAReq) -> None: ...

    def has_work(self) -> bool:
        """Requests admitted and not finished (including those that cannot run yet)."""

    def runnable(self) -> bool:
        """A step can do work now."""

    def step(self) -> None: ...
    def take_outputs(self) -> list[TokenOutput]: ...

    def take_control(self) -> list[LoRAUpdateOutput]:
        """Answers to adapter loads and unloads, sent after the outputs of the step that completed them."""


def create_scheduler(args: ServerArgs) -> EngineScheduler:
    """The scheduler for the model's kind: Scheduler (generation, or a decoder served for embeddings)
    or EncoderScheduler (a BERT-family embedding model: no KV, no sampling)."""
    from radixserve.model.loader import embedding_kind

    kind = embedding_kind(args.model_path, args.is_embedding)
    if kind == "encoder":
        from radixserve.engine.encoder_scheduler import EncoderScheduler

        return EncoderScheduler(args)
    from radixserve.engine.scheduler import Scheduler

    return Scheduler(args, grammar_vocab=_load_grammar_vocab(args) if kind is None else None)


def _load_grammar_vocab(args: ServerArgs) -> Future:
    """The tokenizer as the grammar backend needs it, loaded beside the model (a GGUF's takes seconds),
    so that the first constrained request does not stall the loop."""
    from radixserve.constrained.grammar import tokenizer_vocab
    from radixserve.model_files import load_tokenizer

    executor = ThreadPoolExecutor(1, thread_name_prefix="radixserve-tokenizer")
    future = executor.submit(lambda: tokenizer_vocab(load_tokenizer(args.model_path, args.tokenizer_path)))
    executor.shutdown(wait=False)
    return future


def _handlers(scheduler: EngineScheduler, reply: Callable[[Stats], None]) -> dict[type, Callable]:
    def embed_batch(msg: EmbedBatch) -> None:
        for req in msg.reqs:
            scheduler.submit(req)

    return {
        GenerateReq: scheduler.submit,
        EmbedReq: scheduler.submit,
        EmbedBatch: embed_batch,
        AbortReq: lambda msg: scheduler.abort(msg.rid),
        FlushCacheReq: lambda msg: reply(scheduler.stats(flushed=scheduler.flush_cache())),
        StatsReq: lambda msg: reply(scheduler.stats()),
        LoadLoRAReq: scheduler.load_lora,
        UnloadLoRAReq: scheduler.unload_lora,
    }


def _heap_trimmer() -> Callable[[], object]:
    """glibc keeps the heap pages that a busy engine's freed tensors leave (hundreds of MB after a burst);
    malloc_trim gives them back to the system (about 10 ms for a 1 GB heap, measured on Zen 4), so the
    loop calls it when the engine turns idle. A no-op on other C libraries."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return (lambda: None) if malloc_trim is None else functools.partial(malloc_trim, 0)


def serve(scheduler: EngineScheduler, recv: zmq.Socket, send: zmq.Socket) -> None:
    """The loop, until the API process is gone (checked every second while idle)."""
    decoder = msgspec.msgpack.Decoder(EngineInput)
    encoder = msgspec.msgpack.Encoder()
    handlers = _handlers(scheduler, lambda stats: send.send(encoder.encode(stats)))
    parent = os.getppid()
    trim_heap = _heap_trimmer()
    trim_heap()  # what loading the model left
    while True:
        # Idle: block (waking every second to notice an orphaned engine); busy: just drain.
        # Work that cannot run yet (grammars compiling): wait briefly, leaving the CPU to the compiler.
        if not scheduler.runnable() and not recv.poll(2 if scheduler.has_work() else 1000) \
                and not scheduler.has_work():
            if os.getppid() != parent:
                return
            continue
        while recv.poll(0):
            msg = decoder.decode(recv.recv())
            handlers[type(msg)](msg)
        stepped = scheduler.has_work()
        if stepped:
            scheduler.step()
        outputs = scheduler.take_outputs()
        if outputs:
            send.send(encoder.encode(BatchOutput(outputs)))
        for reply in scheduler.take_control():  # after the outputs of the requests it waited for
            send.send(encoder.encode(reply))
        if stepped and not scheduler.has_work():
            trim_heap()


def main() -> None:
    start = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineStart)
    args = ServerArgs(**start.args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
    ctx = zmq.Context()
    ready = ctx.socket(zmq.PUSH)
    ready.connect(start.ready_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        scheduler = create_scheduler(args)
    except Exception as e:  # noqa: BLE001 - reported to the launcher, which raises it in the API process
        logger.exception("engine failed to start")
        ready.send(encoder.encode(EngineFailed(f"{type(e).__name__}: {e}")))
        ready.close(linger=5000)
        ctx.term()
        sys.exit(1)
    recv = ctx.socket(zmq.PULL)
    recv.bind(start.in_addr)
    send = ctx.socket(zmq.PUSH)
    send.bind(start.out_addr)
    ready.send(encoder.encode(EngineReady(scheduler.info())))
    ready.close(linger=5000)
    try:
        serve(scheduler, recv, send)
    except KeyboardInterrupt:
        pass
    finally:
        recv.close(0)
        send.close(0)
        ctx.term()


if __name__ == "__main__":
    main()
