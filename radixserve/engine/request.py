"""Per-request state in the engine: tokens, sampling parameters, where its KV lives, how it finished."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

from radixserve.sampling.params import SamplingParams


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    group: str | None = None
    namespace: Hashable = None
    lora_id: int = 0  # the LoRA adapter (0: the base model)
    output_ids: list[int] = field(default_factory=list)
    order: int = 0  # arrival order: the newest running request is preempted first
    want_prompt_logprobs: bool = False
    dimensions: int | None = None  # an embedding request's Matryoshka truncation
    # (token, logprob, top alternatives) of prompt tokens 1.., sent with the first output token
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)

    # KV state, managed by KVManager. tokens[:num_computed] have KV in the pool at the slots
    # req_to_token[row, :num_computed]; the first protected_len of them are owned by the radix
    # tree (tree_node, locked), the rest by this request.
    row: int = -1
    num_computed: int = 0
    protected_len: int = 0
    tree_node: Any = None
    cached_tokens: int = 0  # prompt tokens reused from the cache at first admission (reported)
    admitted: bool = False  # ran at least once (cached_tokens is final)

    finish_reason: str | None = None
    matched_stop: int | None = None

    # Output constraint: the compilation (a Future) until it is ready, then the request's own
    # grammar matcher, advanced by every accepted token (it survives preemption).
    grammar: Any = None
    matcher: Any = None

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def scores_prompt(self) -> bool:
        """Prompt logprobs still to compute (not after a preemption: they were already sent)."""
        return self.want_prompt_logprobs and not self.output_ids and self.num_computed < len(self.prompt_ids)

    @property
    def remaining(self) -> int:
        """Tokens whose KV must still be computed before the next token can be sampled."""
        return self.seq_len - self.num_computed

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]
