"""The engine loop: receive requests, plan a step, run one forward pass for the whole batch, sample,
send every request's new token back. Runs in its own process; `Scheduler` itself has no I/O."""
from __future__ import annotations

import itertools
import logging
import os
import random
from collections import deque

import msgspec
import torch
import zmq

from radixserve.config import ServerArgs
from radixserve.engine.batch import build_batch
from radixserve.engine.kv_manager import KVManager
from radixserve.engine.policy import plan_step
from radixserve.engine.request import Request
from radixserve.lora.adapter import LoRAError
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.messages import (AbortReq, BatchOutput, EngineInput, FlushCacheReq, GenerateReq,
                                          LoadLoRAReq, LoRAAdapterInfo, LoRAUpdateOutput, Stats, StatsReq,
                                          TokenOutput, UnloadLoRAReq)
from radixserve.model.runner import ModelRunner
from radixserve.sampling.sampler import Sampler

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, args: ServerArgs, runner: ModelRunner | None = None):
        self.args = args
        self.runner = runner or ModelRunner(args)
        self.kv = KVManager(self.runner.kv, args.disable_radix_cache)
        cfg = self.runner.config
        self.sampler = Sampler(args.max_running_requests, cfg.vocab_size, self.runner.device)
        self.eos_ids = set(cfg.eos_token_ids)
        # A sequence never outgrows the context nor the whole pool (then it could never be scheduled).
        self.max_seq_len = min(self.runner.context_length, self.kv.capacity)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.by_rid: dict[str, Request] = {}
        self.outputs: list[TokenOutput] = []
        self._rng = random.Random(args.random_seed)
        self._order = itertools.count()
        self.lora = None
        if self.runner.lora_buffers is not None:
            from radixserve.lora.manager import LoRAManager

            self.lora = LoRAManager(args, cfg, self.runner.lora_buffers, self.runner.lora_layout, self.runner.dtype)
        self.control: list[LoRAUpdateOutput] = []  # answers to adapter loads/unloads
        self._unloads: dict[int, list[str]] = {}  # adapter id → unload requests waiting for its requests

    # ---- requests in and out
    def submit(self, msg: GenerateReq) -> None:
        error = self._check(msg)
        if error:
            self.outputs.append(TokenOutput(msg.rid, finish_reason="error", error=error,
                                            prompt_tokens=len(msg.input_ids)))
            return
        namespace = msg.namespace
        if msg.lora_id:
            try:
                self.lora.acquire(msg.lora_id)
            except (LoRAError, LoRANotFoundError) as e:
                self.outputs.append(TokenOutput(msg.rid, finish_reason="error", error=str(e),
                                                prompt_tokens=len(msg.input_ids)))
                return
            # An adapter's KV differs from the base model's: it gets its own prefix-cache namespace.
            namespace = ("lora", msg.lora_id, msg.namespace)
        seed = msg.params.seed if msg.params.seed is not None else self._rng.getrandbits(63)
        req = Request(msg.rid, list(msg.input_ids), msg.params, seed, msg.group, namespace,
                      lora_id=msg.lora_id, order=next(self._order), want_prompt_logprobs=msg.prompt_logprobs)
        self.by_rid[req.rid] = req
        self.waiting.append(req)

    def _check(self, msg: GenerateReq) -> str | None:
        n = len(msg.input_ids)
        if msg.rid in self.by_rid:
            return f"request id {msg.rid!r} is already in use"
        if n == 0:
            return "the prompt is empty"
        if n >= self.max_seq_len:
            return (f"the prompt has {n} tokens; this model's context length is {self.max_seq_len} "
                    f"tokens, including at least one generated token")
        vocab = self.runner.config.vocab_size
        if min(msg.input_ids) < 0 or max(msg.input_ids) >= vocab:
            return f"prompt token ids must be in [0, {vocab})"
        if msg.lora_id and self.lora is None:
            return "LoRA adapters are not enabled on this server (--enable-lora)"
        return None

    def abort(self, rid: str) -> None:
        req = self.by_rid.get(rid)
        if req is None:
            return  # already finished: nothing to free
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.finish_reason = "abort"
        self._finish(req)

    def _finish(self, req: Request, token_out: TokenOutput | None = None) -> None:
        self.kv.release(req)
        del self.by_rid[req.rid]
        if req.lora_id and self.lora.release(req.lora_id):
            self._unloaded(req.lora_id)
        out = token_out or TokenOutput(req.rid, prompt_tokens=len(req.prompt_ids),
                                       cached_tokens=req.cached_tokens)
        out.finish_reason, out.matched_stop = req.finish_reason, req.matched_stop
        self.outputs.append(out)

    def flush_cache(self) -> bool:
        """Drop the prefix cache; only when idle, since running requests hold parts of it."""
        if self.running or self.waiting:
            return False
        self.kv.tree.reset()
        return True

    # ---- LoRA adapters
    def _lora_reply(self, req_id: str, success: bool, message: str = "", not_found: bool = False) -> None:
        adapters = [LoRAAdapterInfo(*a) for a in self.lora.loaded()] if self.lora else []
        self.control.append(LoRAUpdateOutput(req_id, success, message, not_found, adapters))

    def load_lora(self, msg: LoadLoRAReq) -> None:
        if self.lora is None:
            return self._lora_reply(msg.req_id, False, "LoRA adapters are not enabled on this server (--enable-lora)")
        try:
            self.lora.load(msg.name, msg.path, msg.pinned)
        except LoRAError as e:
            return self._lora_reply(msg.req_id, False, str(e))
        self._lora_reply(msg.req_id, True, f"loaded LoRA adapter {msg.name!r}")

    def unload_lora(self, msg: UnloadLoRAReq) -> None:
        """Answered at once, or when the adapter's last request finishes (they are never cut short)."""
        if self.lora is None:
            return self._lora_reply(msg.req_id, False, "LoRA adapters are not enabled on this server (--enable-lora)")
        try:
            lid, gone = self.lora.start_unload(msg.name)
        except LoRANotFoundError as e:
            return self._lora_reply(msg.req_id, False, str(e), not_found=True)
        self._unloads.setdefault(lid, []).append(msg.req_id)
        if gone:
            self._unloaded(lid)

    def _unloaded(self, lid: int) -> None:
        # Its cached prefixes can never match again: free them now rather than when evicted.
        self.kv.tree.drop_namespaces(lambda ns: isinstance(ns, tuple) and ns[:2] == ("lora", lid))
        for req_id in self._unloads.pop(lid, []):
            self._lora_reply(req_id, True, "unloaded")

    def take_control(self) -> list[LoRAUpdateOutput]:
        out, self.control = self.control, []
        return out

    def stats(self, flushed: bool = False) -> Stats:
        return Stats(num_running=len(self.running), num_waiting=len(self.waiting), kv_total=self.kv.capacity,
                     kv_free=self.kv.free_slots(), kv_cached=self.kv.cached_tokens(), flushed=flushed)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def take_outputs(self) -> list[TokenOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---- one step
    def step(self) -> None:
        plan = plan_step(self.running, self.waiting, self.kv, self.args.max_running_requests,
                         self.args.chunked_prefill_size, self.args.max_loras_per_batch if self.lora else None)
        for req in plan.admitted:
            self.sampler.set_row(req.row, req.params, req.prompt_ids, req.output_ids, req.seed)
        if not plan.entries:
            return
        prefilling = [req for req, _ in plan.entries if req.num_computed < len(req.prompt_ids)]
        slots = self.kv.alloc(sum(n for _, n in plan.entries))
        lora_ids = {req.lora_id for req, _ in plan.entries if req.lora_id}
        if lora_ids:
            batch = build_batch(plan.entries, slots, self.kv.pool.req_to_token, self.runner.device,
                                self.lora.prepare(lora_ids), max(self.lora.rank(i) for i in lora_ids),
                                self.lora.buffers.num_slots, self.lora.linears(lora_ids))
        else:  # the LoRA path costs nothing when no request of the step uses an adapter
            batch = build_batch(plan.entries, slots, self.kv.pool.req_to_token, self.runner.device)
        logits = self.runner.forward(batch.model_input)
        for req, n in plan.entries:
            req.num_computed += n
        for req, first, count, pos in batch.prompt_scores:
            self._score_prompt(req, logits[first:first + count], pos)
        if batch.sampled:
            self._process_tokens(batch.sampled, logits if batch.sample_rows is None else logits[batch.sample_rows])
        for req in prefilling:
            if req.row >= 0:  # still running: share its computed prompt (chunk boundary)
                self.kv.cache_prefix(req)

    @staticmethod
    def _score_prompt(req: Request, logits: torch.Tensor, pos: int) -> None:
        """Log-probabilities of prompt tokens pos.. given the logits of the positions before them."""
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(req.prompt_ids[pos:pos + len(logits)], dtype=torch.int64, device=logits.device)
        chosen = logp.gather(1, targets[:, None]).squeeze(1).tolist()
        k = req.params.top_logprobs
        tops = [[]] * len(chosen)
        if k:
            vals, ids = logp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        req.prompt_logprobs.extend(zip(targets.tolist(), chosen, tops))

    def _process_tokens(self, reqs: list[Request], logits: torch.Tensor) -> None:
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64)
        steps = torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.int64)
        out = self.sampler.sample(logits, rows, steps)
        self.sampler.record(rows, out.next_ids)
        ids = out.next_ids.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top = None
        if out.top_ids is not None:
            top = [list(zip(i, p)) for i, p in zip(out.top_ids.tolist(), out.top_logprobs.tolist())]
        for i, req in enumerate(reqs):
            p = req.params
            if p.max_new_tokens == 0:  # prompt-only request (to warm the cache, or to score the prompt)
                req.finish_reason = "length"
                self.running.remove(req)
                self._finish(req, TokenOutput(req.rid, prompt_tokens=len(req.prompt_ids), cached_tokens=req.cached_tokens,
                                              prompt_logprobs=req.prompt_logprobs if req.want_prompt_logprobs else None))
                continue
            tok = ids[i]
            req.output_ids.append(tok)
            res = TokenOutput(req.rid, tok, prompt_tokens=len(req.prompt_ids), cached_tokens=req.cached_tokens)
            if req.want_prompt_logprobs and len(req.output_ids) == 1:
                res.prompt_logprobs = list(req.prompt_logprobs)
            if p.logprobs and lps is not None:
                res.logprob = lps[i]
                if p.top_logprobs and top is not None:
                    res.top_logprobs = top[i][:p.top_logprobs]
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                req.finish_reason, req.matched_stop = "stop", tok
            elif len(req.output_ids) >= p.max_new_tokens or req.seq_len >= self.max_seq_len:
                req.finish_reason = "length"
            if req.finish_reason:
                self.running.remove(req)
                self._finish(req, res)
            else:
                self.outputs.append(res)


def run_engine_process(args: ServerArgs, in_addr: str, out_addr: str, ready) -> None:
    """Entry point of the engine process: load, report readiness on `ready` (a Pipe end), then loop."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
    try:
        scheduler = Scheduler(args)
    except Exception as e:  # report load failures to the parent instead of dying silently
        logger.exception("engine failed to start")
        ready.send({"error": f"{type(e).__name__}: {e}"})
        return
    runner = scheduler.runner
    loras = scheduler.lora.loaded() if scheduler.lora else []
    ready.send({
        "context_length": scheduler.max_seq_len, "vocab_size": runner.config.vocab_size,
        "architecture": runner.config.architecture, "dtype": str(runner.dtype).removeprefix("torch."),
        "device": str(runner.device), "max_total_tokens": scheduler.kv.capacity,
        "eos_token_ids": sorted(scheduler.eos_ids),
        "loras": [msgspec.structs.asdict(LoRAAdapterInfo(*a)) for a in loras],
    })
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(in_addr)
    send = ctx.socket(zmq.PUSH)
    send.bind(out_addr)
    decoder = msgspec.msgpack.Decoder(EngineInput)
    encoder = msgspec.msgpack.Encoder()
    parent = os.getppid()
    try:
        while True:
            # Idle: block (waking every second to notice an orphaned engine); busy: just drain.
            if not scheduler.has_work() and not recv.poll(1000):
                if os.getppid() != parent:
                    return
                continue
            while recv.poll(0):
                msg = decoder.decode(recv.recv())
                if isinstance(msg, GenerateReq):
                    scheduler.submit(msg)
                elif isinstance(msg, AbortReq):
                    scheduler.abort(msg.rid)
                elif isinstance(msg, FlushCacheReq):
                    send.send(encoder.encode(scheduler.stats(flushed=scheduler.flush_cache())))
                elif isinstance(msg, StatsReq):
                    send.send(encoder.encode(scheduler.stats()))
                elif isinstance(msg, LoadLoRAReq):
                    scheduler.load_lora(msg)
                elif isinstance(msg, UnloadLoRAReq):
                    scheduler.unload_lora(msg)
            if scheduler.has_work():
                scheduler.step()
            outputs = scheduler.take_outputs()
            if outputs:
                send.send(encoder.encode(BatchOutput(outputs)))
            for reply in scheduler.take_control():  # after the outputs of the requests it waited for
                send.send(encoder.encode(reply))
    except KeyboardInterrupt:
        pass
    finally:
        recv.close(0)
        send.close(0)
        ctx.term()
