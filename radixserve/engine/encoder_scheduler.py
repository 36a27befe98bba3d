"""The engine loop's planner for an encoder embedding model (BERT family): each step takes the oldest
waiting texts that fit the token budget and embeds them in one forward pass. Nothing is kept between
steps (no KV, no sampling), so a text is always finished in the step that runs it. No I/O here."""
from __future__ import annotations

import logging
from collections import deque

from radixserve.config import ServerArgs
from radixserve.managers.messages import (EmbedReq, EngineInfo, GenerateReq, LoadLoRAReq, LoRAUpdateOutput, Stats,
                                          TokenOutput, UnloadLoRAReq)
from radixserve.model.encoder_runner import EncoderRunner
from radixserve.model.pooling import embedding_info

logger = logging.getLogger(__name__)


class EncoderScheduler:
    def __init__(self, args: ServerArgs, runner: EncoderRunner | None = None):
        self.args = args
        self.runner = runner or EncoderRunner(args)
        self.max_seq_len = self.runner.context_length
        # A text is never split across steps: the budget always admits the longest allowed one.
        self.token_budget = max(args.max_prefill_tokens, self.max_seq_len)
        self.max_batch = args.max_running_requests
        self.waiting: deque[EmbedReq] = deque()
        self.by_rid: dict[str, EmbedReq] = {}  # waiting and not aborted (aborted ones are skipped lazily)
        self.outputs: list[TokenOutput] = []
        self.control: list[LoRAUpdateOutput] = []

    def info(self) -> EngineInfo:
        runner, cfg = self.runner, self.runner.config
        return EngineInfo(context_length=self.max_seq_len, vocab_size=cfg.vocab_size, architecture=cfg.architecture,
                          dtype=str(runner.dtype).removeprefix("torch."), device=str(runner.device),
                          max_total_tokens=0, is_generation=False,
                          **embedding_info(runner.spec, runner.embedding_dim, runner.matryoshka_dimensions))

    # ---- requests in and out
    def submit(self, msg: EmbedReq | GenerateReq) -> None:
        error = self._check(msg)
        if error:
            self.outputs.append(TokenOutput(msg.rid, finish_reason="error", error=error,
                                            prompt_tokens=len(msg.input_ids)))
            return
        self.by_rid[msg.rid] = msg
        self.waiting.append(msg)

    def _check(self, msg: EmbedReq | GenerateReq) -> str | None:
        n = len(msg.input_ids)
        if not isinstance(msg, EmbedReq):
            return "this model is an embedding model: it does not generate text"
        if msg.rid in self.by_rid:
            return f"request id {msg.rid!r} is already in use"
        if n == 0:
            return "the input is empty"
        if n > self.max_seq_len:
            return f"the input has {n} tokens; this model's maximum input length is {self.max_seq_len} tokens"
        vocab = self.runner.config.vocab_size
        if min(msg.input_ids) < 0 or max(msg.input_ids) >= vocab:
            return f"input token ids must be in [0, {vocab})"
        return None

    def abort(self, rid: str) -> None:
        if self.by_rid.pop(rid, None) is not None:  # still waiting: its queue entry is skipped later
            self.outputs.append(TokenOutput(rid, finish_reason="abort"))

    def flush_cache(self) -> bool:
        return True  # nothing is cached between steps

    def stats(self, flushed: bool = False) -> Stats:
        return Stats(num_running=0, num_waiting=len(self.by_rid), kv_total=0, kv_free=0, kv_cached=0,
                     flushed=flushed)

    def has_work(self) -> bool:
        return bool(self.by_rid)

    def runnable(self) -> bool:
        return self.has_work()

    def take_outputs(self) -> list[TokenOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---- LoRA adapters: none (the API process refuses them for embedding models before asking)
    def load_lora(self, msg: LoadLoRAReq) -> None:
        self.control.append(LoRAUpdateOutput(msg.req_id, False, "LoRA adapters apply to generation models"))

    def unload_lora(self, msg: UnloadLoRAReq) -> None:
        self.control.append(LoRAUpdateOutput(msg.req_id, False, f"LoRA adapter {msg.name!r} is not loaded",
                                             not_found=True))

    def take_control(self) -> list[LoRAUpdateOutput]:
        out, self.control = self.control, []
        return out

    # ---- one step
    def step(self) -> None:
        batch: list[EmbedReq] = []
        tokens = 0
        while self.waiting and len(batch) < self.max_batch:
            msg = self.waiting[0]
            if self.by_rid.get(msg.rid) is not msg:  # aborted while waiting
                self.waiting.popleft()
                continue
            if tokens + len(msg.input_ids) > self.token_budget:
                break
            self.waiting.popleft()
            del self.by_rid[msg.rid]
            batch.append(msg)
            tokens += len(msg.input_ids)
        if not batch:
            return
        vectors = self.runner.embed([m.input_ids for m in batch], [m.dimensions for m in batch])
        self.outputs.extend(TokenOutput(m.rid, finish_reason="stop", prompt_tokens=len(m.input_ids), embedding=v)
                            for m, v in zip(batch, vectors))
