"""Copying a checkpoint's tensors into a model's parameters, fusing the pieces of fused projections."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

# What a model makes of a checkpoint name: None (skip it), its parameter's name, or
# (fused parameter name, piece index, number of pieces) for e.g. q/k/v concatenated into one qkv weight.
Target = str | tuple[str, int, int] | None


@torch.no_grad()
def load_checkpoint(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    rename: Callable[[str], Target]) -> None:
    """Copy every (name, tensor) into module's parameter rename(name); shapes must match and every
    parameter must be covered (ValueError naming the weight otherwise)."""
    params = dict(module.named_parameters())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    for source, tensor in weights:
        target = rename(source)
        if target is None:
            continue
        if isinstance(target, tuple):
            name, piece, count = target
            group = pending.setdefault(name, {})
            group[piece] = tensor
            if len(group) < count:
                continue
            tensor = torch.cat([group[i] for i in range(count)])
            del pending[name]
        else:
            name = target
        if name not in params:
            raise ValueError(f"unexpected weight {source!r} in checkpoint")
        if params[name].shape != tensor.shape:
            raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != expected {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing or pending:
        raise ValueError(f"checkpoint is missing weights: {missing[:5] or sorted(pending)[:5]}")
