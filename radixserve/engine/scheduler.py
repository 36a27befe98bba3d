"""The engine loop: receive requests, plan a step, run one forward pass for the whole batch, sample,
send every request's new token back. Runs in the engine process (engine/process.py); no I/O here."""
from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from concurrent.futures import Future

import torch

from radixserve.config import ServerArgs
from radixserve.constrained.backend import GrammarBackend
from radixserve.constrained.grammar import tokenizer_vocab
from radixserve.engine.batch import build_batch
from radixserve.engine.kv_manager import KVManager
from radixserve.engine.policy import plan_step
from radixserve.engine.request import Request
from radixserve.lora.adapter import LoRAError
from radixserve.lora.refs import LoRANotFoundError
from radixserve.managers.messages import (EmbedReq, EngineInfo, GenerateReq, LoadLoRAReq, LoRAAdapterInfo,
                                          LoRAUpdateOutput, Stats, TokenOutput, UnloadLoRAReq)
from radixserve.model.loader import embedding_kind
from radixserve.model_files import load_tokenizer
from radixserve.model.pooling import embedding_info, finish
from radixserve.model.runner import ModelRunner
from radixserve.sampling.params import SamplingParams
from radixserve.sampling.sampler import Sampler

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, args: ServerArgs, runner: ModelRunner | None = None,
                 grammar_vocab: tuple[list[str], str] | Future | None = None):
        """grammar_vocab: the tokenizer as constrained.grammar.tokenizer_vocab gives it, or a future of it
        (loaded beside the model); without it the tokenizer is loaded when the first constrained request
        arrives."""
        self.args = args
        self.runner = runner or ModelRunner(args)
        self.kv = KVManager(self.runner.kv, args.disable_radix_cache)
        cfg = self.runner.config
        self.sampler = Sampler(args.max_running_requests, cfg.vocab_size, self.runner.device)
        self.eos_ids = set(cfg.eos_token_ids)
        # An embedding model's requests are prompts that generate nothing: prefilled like any prompt
        # (chunked, prefix-cached), then their last token's hidden state is the embedding.
        self.embedding = self.runner.embedding
        # A sequence never outgrows the context nor the whole pool (then it could never be scheduled).
        self.max_seq_len = min(self.runner.context_length, self.kv.capacity)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.compiling: list[Request] = []  # waiting for their grammar; not yet schedulable
        self._grammar_vocab = grammar_vocab
        self._grammar: GrammarBackend | None = None
        self.by_rid: dict[str, Request] = {}
        self.outputs: list[TokenOutput] = []
        self._rng = random.Random(args.random_seed)
        self._order = itertools.count()
        self.lora = None
        if self.runner.lora_buffers is not None:
            from radixserve.lora.manager import LoRAManager
            from radixserve.lora.refs import parse_lora_paths

            self.lora = LoRAManager(cfg.num_layers, self.runner.lora_buffers, self.runner.lora_layout,
                                    self.runner.dtype, args.max_loras_per_batch, args.max_loaded_loras,
                                    parse_lora_paths(args.lora_paths))
        self.control: list[LoRAUpdateOutput] = []  # answers to adapter loads/unloads
        self._unloads: dict[int, list[str]] = {}  # adapter id → unload requests waiting for its requests

    def info(self) -> EngineInfo:
        """What the API process needs to know about the model (sent once the engine is ready)."""
        runner = self.runner
        embedding = {} if self.embedding is None else embedding_info(self.embedding, runner.embedding_dim,
                                                                      runner.matryoshka_dimensions)
        return EngineInfo(
            context_length=self.max_seq_len, vocab_size=runner.config.vocab_size,
            architecture=runner.config.architecture, dtype=str(runner.dtype).removeprefix("torch."),
            device=str(runner.device), max_total_tokens=self.kv.capacity, is_generation=self.embedding is None,
            eos_token_ids=sorted(self.eos_ids), loras=[LoRAAdapterInfo(*a) for a in self.lora.loaded()] if self.lora else [],
            **embedding)

    # ---- requests in and out
    def submit(self, msg: GenerateReq | EmbedReq) -> None:
        error = self._check(msg)
        if error:
            self.outputs.append(TokenOutput(msg.rid, finish_reason="error", error=error,
                                            prompt_tokens=len(msg.input_ids)))
            return
        if isinstance(msg, EmbedReq):
            req = Request(msg.rid, list(msg.input_ids), _EMBED_PARAMS, 0, order=next(self._order),
                          dimensions=msg.dimensions)
        else:
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
        if req.params.grammar is None:
            self.waiting.append(req)
        else:
            req.grammar = self.grammar.compile(*req.params.grammar)
            self.compiling.append(req)

    @property
    def grammar(self) -> GrammarBackend:
        if self._grammar is None:
            vocab = self._grammar_vocab
            if isinstance(vocab, Future):
                vocab = vocab.result()
            elif vocab is None:
                vocab = tokenizer_vocab(load_tokenizer(self.args.model_path, self.args.tokenizer_path))
            self._grammar = GrammarBackend(*vocab, vocab_size=self.runner.config.vocab_size,
                                           stop_token_ids=sorted(self.eos_ids),
                                           max_rows=self.args.max_running_requests)
        return self._grammar

    def _admit_compiled(self) -> None:
        """Requests whose grammar finished compiling become schedulable, in arrival order."""
        for req in [r for r in self.compiling if r.grammar.done()]:
            self.compiling.remove(req)
            try:
                req.matcher = self.grammar.matcher(req.grammar.result())
            except Exception as e:  # noqa: BLE001 - an invalid spec (a 400 for its request), or a backend fault
                logger.debug("output constraint of %s refused: %s", req.rid, e)  # the error names request content
                req.finish_reason = "error"
                error = str(e) if isinstance(e, ValueError) else f"the output constraint failed to compile: {e}"
                self._finish(req, TokenOutput(req.rid, error=error, prompt_tokens=len(req.prompt_ids)))
                continue
            self.waiting.append(req)

    def _check(self, msg: GenerateReq | EmbedReq) -> str | None:
        n = len(msg.input_ids)
        embed = isinstance(msg, EmbedReq)
        if embed != (self.embedding is not None):
            return ("this model is served for embeddings only" if self.embedding is not None
                    else "this model is a generation model: it does not serve embeddings")
        if msg.rid in self.by_rid:
            return f"request id {msg.rid!r} is already in use"
        if n == 0:
            return "the input is empty" if embed else "the prompt is empty"
        if embed and n > self.max_seq_len:
            return f"the input has {n} tokens; this model's maximum input length is {self.max_seq_len} tokens"
        if not embed and n >= self.max_seq_len:
            return (f"the prompt has {n} tokens; this model's context length is {self.max_seq_len} "
                    f"tokens, including at least one generated token")
        vocab = self.runner.config.vocab_size
        if min(msg.input_ids) < 0 or max(msg.input_ids) >= vocab:
            return f"{'input' if embed else 'prompt'} token ids must be in [0, {vocab})"
        if not embed and msg.lora_id and self.lora is None:
            return "LoRA adapters are not enabled on this server (--enable-lora)"
        return None

    def abort(self, rid: str) -> None:
        req = self.by_rid.get(rid)
        if req is None:
            return  # already finished: nothing to free
        if req in self.running:
            self.running.remove(req)
        elif req in self.compiling:
            self.compiling.remove(req)
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
        return Stats(num_running=len(self.running), num_waiting=len(self.waiting) + len(self.compiling), kv_total=self.kv.capacity,
                     kv_free=self.kv.free_slots(), kv_cached=self.kv.cached_tokens(), flushed=flushed)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.compiling)

    def runnable(self) -> bool:
        """Work a step can do now (requests still compiling their grammar cannot run yet)."""
        return bool(self.running or self.waiting)

    def take_outputs(self) -> list[TokenOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---- one step
    def step(self) -> None:
        if self.compiling:
            self._admit_compiled()
        plan = plan_step(self.running, self.waiting, self.kv, self.args.max_running_requests,
                         self.args.chunked_prefill_size, self.args.max_loras_per_batch if self.lora else None)
        if self.embedding is None:
            for req in plan.admitted:
                self.sampler.set_row(req.row, req.params, req.prompt_ids, req.output_ids, req.seed)
        if not plan.entries:
            return
        prefilling = [req for req, _ in plan.entries if req.num_computed < len(req.prompt_ids)]
        slots = self.kv.alloc(plan.entries)
        lora_ids = {req.lora_id for req, _ in plan.entries if req.lora_id}
        if lora_ids:
            batch = build_batch(plan.entries, slots, self.kv.pool.req_to_token, self.runner.device,
                                self.lora.prepare(lora_ids), max(self.lora.rank(i) for i in lora_ids),
                                self.lora.buffers.num_slots, self.lora.linears(lora_ids))
        else:  # the LoRA path costs nothing when no request of the step uses an adapter
            batch = build_batch(plan.entries, slots, self.kv.pool.req_to_token, self.runner.device)
        # Grammar bitmasks are filled while the model runs.
        matchers = [r.matcher for r in batch.sampled]
        bitmask = self.grammar.bitmask_async(matchers) if any(m is not None for m in matchers) else None
        logits = self.runner.forward(batch.model_input)
        for req, n in plan.entries:
            req.num_computed += n
        if self.embedding is not None:
            # The rows are the hidden states of the requests whose whole input is now computed.
            self._finish_embeddings(batch.sampled, logits)
            for req in prefilling:
                if req.row >= 0:
                    self.kv.cache_prefix(req)
            return
        for req, first, count, pos in batch.prompt_scores:
            self._score_prompt(req, logits[first:first + count], pos)
        if batch.sampled:
            self._process_tokens(batch.sampled, logits if batch.sample_rows is None else logits[batch.sample_rows],
                                 bitmask.result() if bitmask is not None else None)
        for req in prefilling:
            if req.row >= 0:  # still running: share its computed prompt (chunk boundary)
                self.kv.cache_prefix(req)

    def _finish_embeddings(self, reqs: list[Request], hidden: torch.Tensor) -> None:
        """Last-token pooled embeddings of the finished requests; their KV goes to the prefix cache."""
        if not reqs:
            return
        vectors = finish(hidden, self.embedding.normalize, [r.dimensions for r in reqs])
        for req, vec in zip(reqs, vectors):
            req.finish_reason = "stop"
            self.running.remove(req)
            self._finish(req, TokenOutput(req.rid, prompt_tokens=len(req.prompt_ids),
                                          cached_tokens=req.cached_tokens, embedding=vec))

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

    def _process_tokens(self, reqs: list[Request], logits: torch.Tensor, bitmask: torch.Tensor | None) -> None:
        """Sample the next token of reqs (bitmask: their grammars' allowed tokens) and account it."""
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64)
        steps = torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.int64)
        out = self.sampler.sample(logits, rows, steps, token_bitmask=bitmask)
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
            # A grammar ends the output once complete (its stop token accepted), ignore_eos or not.
            grammar_done = req.matcher is not None and self._advance_grammar(req, tok)
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids or grammar_done:
                req.finish_reason, req.matched_stop = "stop", tok
            elif len(req.output_ids) >= p.max_new_tokens or req.seq_len >= self.max_seq_len:
                req.finish_reason = "length"
            if req.finish_reason:
                self.running.remove(req)
                self._finish(req, res)
            else:
                self.outputs.append(res)


    @staticmethod
    def _advance_grammar(req: Request, tok: int) -> bool:
        """Feed the sampled token to the request's matcher; True when the constrained output is complete."""
        if not req.matcher.accept_token(tok):  # the bitmask allowed it, so this is a backend fault
            logger.error("grammar rejected token %d of %s", tok, req.rid)
            return True
        return req.matcher.is_terminated()


# An embedding request generates nothing (its sampling parameters are never used).
_EMBED_PARAMS = SamplingParams(max_new_tokens=0)
