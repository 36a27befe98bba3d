"""A scheduled step → model inputs: token ids, positions, KV slot mapping, attention groups, logit rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.engine.request import Request
from radixserve.model.attention import AttentionMetadata, AttnGroup
from radixserve.model.runner import ModelInput


@dataclass
class ScheduledBatch:
    """entries: (request, tokens computed this step); single-token entries (decodes) come first."""

    entries: list[tuple[Request, int]]
    model_input: ModelInput
    sampled: list[Request]  # requests that get a next token, in logit-row order


def build_batch(entries: list[tuple[Request, int]], slots: torch.Tensor, req_to_token: torch.Tensor,
                device: torch.device) -> ScheduledBatch:
    """Lay the step's tokens out as [decodes..., prefill chunks...] and record their new slots in each
    request's row of req_to_token (which attention then reads)."""
    input_ids: list[int] = []
    for req, n in entries:
        input_ids.extend(req.tokens(req.num_computed, req.num_computed + n))
    starts = torch.tensor([req.num_computed for req, _ in entries], dtype=torch.int64)
    lens = torch.tensor([n for _, n in entries], dtype=torch.int64)
    rows = torch.tensor([req.row for req, _ in entries], dtype=torch.int64)
    offsets = torch.cumsum(lens, 0) - lens  # where each entry's tokens start in the step
    total = len(input_ids)
    positions = starts.repeat_interleave(lens) + torch.arange(total) - offsets.repeat_interleave(lens)

    rows, starts, lens, offsets, positions = (t.to(device) for t in (rows, starts, lens, offsets, positions))
    req_to_token[rows.repeat_interleave(lens), positions] = slots

    num_single = sum(1 for _, n in entries if n == 1)
    groups = []
    for part in (slice(0, num_single), slice(num_single, len(entries))):
        if part.stop > part.start:
            groups.append(AttnGroup.build(offsets[part], lens[part], starts[part], req_to_token, rows[part]))

    completes = [req.num_computed + n == req.seq_len for req, n in entries]
    sampled = [req for (req, _), done in zip(entries, completes) if done]
    done_mask = torch.tensor(completes, device=device)
    logit_index = (offsets + lens - 1)[done_mask]
    model_input = ModelInput(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=positions,
        meta=AttentionMetadata(out_cache_loc=slots, groups=groups),
        logit_index=logit_index,
    )
    return ScheduledBatch(entries, model_input, sampled)
