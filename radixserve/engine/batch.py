"""A scheduled step → model inputs: token ids, positions, KV slot mapping, attention groups, logit rows."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixserve.engine.request import Request
from radixserve.lora.ops import LoRABatch
from radixserve.model.attention import AttentionMetadata, AttnGroup
from radixserve.model.runner import ModelInput


@dataclass
class ScheduledBatch:
    """entries: (request, tokens computed this step); single-token entries (decodes) come first."""

    entries: list[tuple[Request, int]]
    model_input: ModelInput | None
    sampled: list[Request]  # requests that get a next token
    sample_rows: torch.Tensor | None = None  # their logit rows, when not simply all rows in order
    # (request, first logit row, rows, first prompt position scored) for prompt-logprob requests
    prompt_scores: list[tuple[Request, int, int, int]] = field(default_factory=list)


def build_batch(entries: list[tuple[Request, int]], slots: torch.Tensor, req_to_token: torch.Tensor,
                device: torch.device, lora_slots: dict[int, int] | None = None, lora_rank: int = 0,
                num_lora_slots: int = 0, lora_linears: frozenset[str] | None = None) -> ScheduledBatch:
    """Lay the step's tokens out as [decodes..., prefill chunks...] and record their new slots (given in
    entry order) in each request's row of req_to_token (which attention then reads).

    With LoRA adapters in the step (lora_slots: adapter id → buffer slot), the tokens are laid out by
    adapter instead (base first, then each buffer slot's requests), so that each adapter's tokens form
    one segment for the batched LoRA matmuls; attention and the logit rows follow each entry's offset."""
    seg = [0] * len(entries)
    if lora_slots:
        seg = [lora_slots[req.lora_id] + 1 if req.lora_id else 0 for req, _ in entries]
    order = sorted(range(len(entries)), key=seg.__getitem__) if lora_slots else None
    input_ids: list[int] = []
    for i in order or range(len(entries)):
        req, n = entries[i]
        input_ids.extend(req.tokens(req.num_computed, req.num_computed + n))
    starts = torch.tensor([req.num_computed for req, _ in entries], dtype=torch.int64)
    lens = torch.tensor([n for _, n in entries], dtype=torch.int64)
    rows = torch.tensor([req.row for req, _ in entries], dtype=torch.int64)
    total = len(input_ids)
    if order is None:
        offsets = torch.cumsum(lens, 0) - lens  # where each entry's tokens start in the step
        positions = starts.repeat_interleave(lens) + torch.arange(total) - offsets.repeat_interleave(lens)
        token_rows = rows.repeat_interleave(lens)
    else:
        perm = torch.tensor(order, dtype=torch.int64)
        lens_l = lens[perm]
        offsets_l = torch.cumsum(lens_l, 0) - lens_l
        offsets = torch.empty_like(offsets_l)
        offsets[perm] = offsets_l
        positions = starts[perm].repeat_interleave(lens_l) + torch.arange(total) - offsets_l.repeat_interleave(lens_l)
        token_rows = rows[perm].repeat_interleave(lens_l)
        parts = slots.split(lens.tolist())
        slots = torch.cat([parts[i] for i in order])

    rows, starts, lens, offsets, positions = (t.to(device) for t in (rows, starts, lens, offsets, positions))
    req_to_token[token_rows.to(device), positions] = slots

    num_single = sum(1 for _, n in entries if n == 1)
    groups = []
    for part in (slice(0, num_single), slice(num_single, len(entries))):
        if part.stop > part.start:
            groups.append(AttnGroup.build(offsets[part], lens[part], starts[part], req_to_token, rows[part]))

    completes = [req.num_computed + n == req.seq_len for req, n in entries]
    sampled = [req for (req, _), done in zip(entries, completes) if done]
    batch = ScheduledBatch(entries, None, sampled)
    if any(req.scores_prompt for req, _ in entries):
        logit_index = _with_prompt_scores(batch, completes, offsets.tolist())
    else:
        logit_index = (offsets + lens - 1)[torch.tensor(completes, device=device)]
    batch.model_input = ModelInput(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=positions,
        meta=AttentionMetadata(out_cache_loc=slots, groups=groups),
        logit_index=logit_index.to(device),
    )
    if lora_slots:
        counts = [0] * (num_lora_slots + 1)
        for s, (_, n) in zip(seg, entries):
            counts[s] += n
        batch.model_input.lora = LoRABatch.build(counts, lora_rank, device, lora_linears)
    return batch


def _with_prompt_scores(batch: ScheduledBatch, completes: list[bool], offsets: list[int]) -> torch.Tensor:
    """Logit rows for every prompt position of requests that asked for prompt logprobs (position p
    scores prompt token p + 1), besides the usual last-token rows of sampled requests."""
    index: list[int] = []
    sample_rows: list[int] = []
    for (req, n), done, off in zip(batch.entries, completes, offsets):
        start = req.num_computed
        if req.scores_prompt:
            first = len(index)
            index.extend(range(off, off + n))
            scored = min(n, len(req.prompt_ids) - 1 - start)
            if scored > 0:
                batch.prompt_scores.append((req, first, scored, start + 1))
            if done:
                sample_rows.append(first + n - 1)
        elif done:
            sample_rows.append(len(index))
            index.append(off + n - 1)
    batch.sample_rows = torch.tensor(sample_rows, dtype=torch.int64)
    return torch.tensor(index, dtype=torch.int64)
